"""Metric writers: append-only ``metrics.jsonl`` (for notebooks and reports) and TensorBoard.

Every event is one JSON object per line: ``{"step": int, "split": "train"|"validation"|"test",
"loss": ..., "accuracy": ..., ...every attention statistic...}``. Statistics of individual layers
are keyed ``layer{i}/{name}``. TensorBoard gets the same scalars as ``{split}/{name}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

from absl import flags
from absl import logging as absl_logging
from tensorboardX import SummaryWriter

from lra_sparse import files
from lra_sparse.errors import DataFormatError

_log = logging.getLogger(__name__)

METRICS_FILE = 'metrics.jsonl'


def quiet_library_logs() -> None:
    """Terminal shows warnings and this package's own INFO lines, not every library's INFO.

    Orbax logs about a dozen INFO lines per checkpoint. Passing ``--verbosity`` (absl) keeps
    the user's choice instead.
    """
    if not flags.FLAGS['verbosity'].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger('lra_sparse').setLevel(logging.INFO)


def read_metrics(workdir: str) -> list[dict]:
    """All events of a workdir's metrics.jsonl, in order (empty list if there is none).

    A torn last line (a run killed while writing it, or a line being written right now) is left
    out with a warning naming the file.

    Raises:
      DataFormatError: a line other than the last is not a JSON event (names the file and line).
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    events, torn = load_events(path)
    if torn is not None:
        _log.warning('%s: its last line is incomplete (a run was killed while writing it) and '
                     'is left out: %s', path, torn[:80])
    return events


def load_events(path: str) -> tuple[list[dict], str | None]:
    """(the events of a metrics.jsonl file, its torn last line or None).

    The last line is torn when it is not a complete JSON event (a kill while it was written).

    Raises:
      DataFormatError: a line other than the last is not a JSON event (names the file and line).
    """
    with open(path, 'rb') as f:
        lines = [(n, line) for n, line in enumerate(f.read().split(b'\n'), 1) if line.strip()]
    events = []
    for index, (number, line) in enumerate(lines):
        event = _parse_event(line)
        if event is not None:
            events.append(event)
        elif index == len(lines) - 1:
            return events, line.decode(errors='replace')
        else:
            raise DataFormatError(
                f'{path} line {number} is not a JSON metrics event: {line[:80]!r}; the file is '
                'damaged (remove that line to go on).')
    return events, None


def _parse_event(line: bytes) -> dict | None:
    """One JSON event with an int 'step' and a str 'split', or None."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if (isinstance(event, dict) and isinstance(event.get('step'), int)
            and isinstance(event.get('split'), str)):
        return event
    return None


class MetricWriter:
    """Appends events to ``workdir/metrics.jsonl`` and mirrors them to ``workdir/tensorboard``.

    The file is append-only. When a run resumes from a checkpoint at ``resume_step``, events the
    interrupted run logged after that step are dropped by writing the kept events to a new file
    and renaming it over the old one (never by truncating in place), so that a kill at any
    instant leaves a complete history; a torn last line is repaired the same way, with a warning.

    Args:
      workdir: run directory.
      enabled: False on non-main hosts (nothing is written).
      resume_step: the step the run continues from (0: a fresh start, every old event dropped).
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self.logged: set[tuple[int, str]] = set()
        if not enabled:
            return
        self._drop_after(resume_step)
        self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def _drop_after(self, resume_step: int) -> None:
        """Keeps the events up to ``resume_step`` (an atomic rewrite if any is dropped)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(files.tmp_path(self.path))
        if not os.path.exists(self.path):
            return
        events, torn = load_events(self.path)
        kept = [e for e in events if e['step'] <= resume_step]
        if torn is not None:
            _log.warning('%s: repaired its incomplete last line (a run was killed while writing '
                         'it): %s', self.path, torn[:80])
        if torn is not None or len(kept) < len(events):
            files.atomic_write_text(self.path, ''.join(json.dumps(e) + '\n' for e in kept))
        self.logged = {(e['step'], e['split']) for e in kept}

    def has(self, step: int, split: str) -> bool:
        """Whether the file holds an event of ``split`` at ``step`` (kept or written)."""
        return (int(step), split) in self.logged

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        """Appends one event and mirrors its scalars to TensorBoard."""
        if not self.enabled:
            return
        event = {'step': int(step), 'split': split, **{k: float(v) for k, v in values.items()}}
        files.append_line(self.path, json.dumps(event))
        self.logged.add((int(step), split))
        for name, value in values.items():
            self.tb.add_scalar(f'{split}/{name}', float(value), int(step))
        self.tb.flush()

    def close(self) -> None:
        """Flushes and closes TensorBoard."""
        if self.enabled:
            self.tb.close()
