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
import sys

import tqdm
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
      config_text: the run's config (JSON) for TensorBoard's text tab, or None.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0,
                 config_text: str | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self.logged: set[tuple[int, str]] = set()
        if not enabled:
            return
        self._drop_after(resume_step)
        self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
        if config_text is not None:  # TensorBoard's Text tab shows the run's config
            self.tb.add_text('config', f'```\n{config_text}\n```', resume_step)

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


class Progress:
    """What a run shows on the terminal while it trains (process 0 only).

    On a terminal: a progress bar on stderr, with the latest train loss and accuracy beside it,
    "evaluating <split>" while an evaluation runs, and one line per evaluation printed on stdout
    above the bar. When stderr is not a terminal (a log file, SLURM, CI): no bar, one plain line
    on stdout per log step and per evaluation, so a log never fills with carriage-return
    fragments. Errors alone go to stderr.

    Lines look like ``[listops/dense] step 200/600 validation loss 1.7702 accuracy 0.3480
    sparsity 0.000 1210 ex/s``.
    """

    def __init__(self, name: str, total: int, start_step: int, *, enabled: bool = True):
        self.name, self.total, self.enabled = name, total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm.tqdm(total=total, initial=start_step, disable=not self.tty, desc=name,
                             unit='step', dynamic_ncols=True)  # on stderr

    def step(self) -> None:
        """One optimizer step done."""
        self.bar.update(1)

    def evaluating(self, step: int, split: str) -> None:
        """An evaluation of ``split`` starts (it can take a while: say so)."""
        if self.tty:
            self.bar.set_description(f'{self.name} evaluating {split}')
        elif self.enabled:
            self._line(f'step {step}/{self.total} evaluating {split}')

    def report(self, step: int, split: str, values: dict[str, float]) -> None:
        """The metrics of a log step ('train') or of an evaluation, as one line (or bar postfix)."""
        if not self.enabled:
            return
        if self.tty and split == 'train':
            self.bar.set_postfix(loss=f'{values["loss"]:.3f}', acc=f'{values["accuracy"]:.3f}')
            return
        if self.tty:
            self.bar.set_description(self.name)
        self._line(format_line(step, self.total, split, values))

    def _line(self, text: str) -> None:
        """One line on stdout (above the bar, if there is one)."""
        tqdm.tqdm.write(f'[{self.name}] {text}', file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        """Closes the bar (before any error message, so that it prints on a line of its own)."""
        self.bar.close()


def format_line(step: int, total: int, split: str, values: dict[str, float]) -> str:
    """``step S/T <split> loss L accuracy A [sparsity X] [N steps/s | N ex/s]``."""
    parts = [f'step {step}/{total} {split} loss {values["loss"]:.4f}',
             f'accuracy {values["accuracy"]:.4f}']
    if 'sparsity' in values:
        parts.append(f'sparsity {values["sparsity"]:.3f}')
    if 'steps_per_second' in values:
        parts.append(f'{values["steps_per_second"]:.2f} steps/s')
    if 'examples_per_second' in values:
        parts.append(f'{values["examples_per_second"]:.0f} ex/s')
    return ' '.join(parts)
