"""Metric writers: append-only ``metrics.jsonl`` (for notebooks and reports) and TensorBoard.

Every event is one JSON object per line: ``{"step": int, "split": "train"|"validation"|"test",
"loss": ..., "accuracy": ..., ...every attention statistic...}``. Statistics of individual layers
are keyed ``layer{i}/{name}``. TensorBoard gets the same scalars as ``{split}/{name}``.
"""

from __future__ import annotations

import json
import logging
import os

from absl import flags
from absl import logging as absl_logging
from tensorboardX import SummaryWriter


def quiet_library_logs() -> None:
    """Terminal shows warnings and this package's own INFO lines, not every library's INFO.

    Orbax logs about a dozen INFO lines per checkpoint. Passing ``--verbosity`` (absl) keeps
    the user's choice instead.
    """
    if not flags.FLAGS['verbosity'].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger('lra_sparse').setLevel(logging.INFO)


def read_metrics(workdir: str) -> list[dict]:
    """All events of a workdir's metrics.jsonl, in order (empty list if there is none)."""
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
    """Writes events to ``workdir/metrics.jsonl`` and ``workdir/tensorboard``.

    Args:
      workdir: run directory.
      enabled: False on non-main hosts (nothing is written).
      resume_step: when resuming from a checkpoint at this step, events logged after it by the
        interrupted run are dropped so that the file stays one consistent history.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(workdir, 'metrics.jsonl')
        if not enabled:
            return
        kept = [e for e in read_metrics(workdir) if e['step'] <= resume_step] if resume_step else []
        with open(self.path, 'w') as f:
            f.writelines(json.dumps(e) + '\n' for e in kept)
        self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        """Appends one event and mirrors its scalars to TensorBoard."""
        if not self.enabled:
            return
        event = {'step': int(step), 'split': split, **{k: float(v) for k, v in values.items()}}
        with open(self.path, 'a') as f:
            f.write(json.dumps(event) + '\n')
        for name, value in values.items():
            self.tb.add_scalar(f'{split}/{name}', float(value), int(step))
        self.tb.flush()

    def close(self) -> None:
        """Flushes and closes TensorBoard."""
        if self.enabled:
            self.tb.close()
