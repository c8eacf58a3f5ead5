"""The task registry and one interface to every task: metadata, loaded splits, batch iterators.

    info = data.task_info(config)           # TaskInfo from the config alone (no data touched)
    task = data.load_task(config)           # TaskData: info + {'train','validation','test'} arrays
    for batch in data.eval_batches(task.splits['test'], 32): ...
    it = data.train_batches(task.splits['train'], 32, seed=0, start_step=1200)

A task is one module ``data/<task>.py`` exporting ``TASK`` (a :class:`common.Task`: classes,
vocabulary, paired inputs, its own config fields and their checks, its loader) plus its name in
``_MODULES``; :data:`REGISTRY` holds them, and ``config_lib`` and the tests derive the task list
from it.

Batches are dicts of numpy arrays: 'inputs' int32 [batch, seq_len] (or 'inputs1'/'inputs2' for
retrieval), 'targets' int32 [batch] and 'weights' float32 [batch] (0 for padding examples of the
last eval batch). Token id 0 is padding for every task. The training stream is an endless
sequence of per-epoch permutations; the batch of step ``s`` is a pure function of (seed, s), so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Iterator

import numpy as np

from lra_sparse.data.common import (
    ConfigError,
    DataFormatError,
    DataNotFoundError,
    Task,
    TaskData,
    TaskField,
    TaskInfo,
    synthetic_splits,
)
from lra_sparse.errors import check

# Order = the order tasks appear in tables and plots.
_MODULES = ('listops', 'text', 'retrieval', 'image')


def _declarations(modules: tuple[str, ...]) -> types.MappingProxyType[str, Task]:
    """{name: TASK} of the task modules; each module's TASK must carry the module's name."""
    tasks = {}
    for module in modules:
        task = importlib.import_module(f'lra_sparse.data.{module}').TASK
        if task.name != module:
            raise ValueError(f'lra_sparse.data.{module}.TASK is named {task.name!r}, not '
                             f'{module!r}')
        tasks[module] = task
    return types.MappingProxyType(tasks)


REGISTRY: types.MappingProxyType[str, Task] = _declarations(_MODULES)


def get_task(name: str) -> Task:
    """Registry lookup with an error that lists the registered names."""
    if name not in REGISTRY:
        raise ConfigError(f'config.task={name!r} is not allowed: registered tasks are '
                          f'{", ".join(REGISTRY)}.')
    return REGISTRY[name]


def task_info(config) -> TaskInfo:
    """Task metadata from the config alone (vocab size, classes, sequence length, pairs).

    Args:
      config: a full config (``task``, ``max_length`` and the task's own fields).

    Returns:
      The TaskInfo. ListOps has 17 ids (fixed sorted vocabulary), text and retrieval 257 (bytes + 1,
      0 = padding), image 256 grey levels used directly as ids (the reference; pixel 0 is then also
      padding) or 257 (grey level + 1) when ``data.image_pixel0_is_padding`` is False.
    """
    return get_task(config.task).info(config)


def validate_task(config) -> None:
    """Checks ``config.max_length`` against the task's bound, then the task's own fields.

    Raises:
      ConfigError: naming the field, the value and what is allowed.
    """
    task = get_task(config.task)
    length = config.max_length
    check(isinstance(length, int) and 0 < length <= task.max_length_limit, 'max_length', length,
          f'a positive integer at most {task.max_length_limit} for task {task.name} '
          f'({task.max_length_note})')
    task.validate(config)


def load_task(config) -> TaskData:
    """Loads (or generates, or synthesises) the three splits of ``config.task``.

    The task's fields are validated first (:func:`validate_task`), before any data is read.

    Raises:
      ConfigError: a task field is not allowed.
      DataNotFoundError: the real data is missing; the message says what to download and where.
      DataFormatError: the data is damaged; the message names the file and line (or member).
    """
    validate_task(config)
    task = get_task(config.task)
    info = task.info(config)
    if config.data.source == 'synthetic':
        splits = synthetic_splits(info, config.data.synthetic_examples, config.seed,
                                  min_token=1, full_length=task.full_length_inputs)
    else:
        splits = task.load(config, info)
    for name, split in splits.items():
        _check_split(info, name, split)
    return TaskData(info=info, splits=splits)


def _check_split(info: TaskInfo, name: str, split: dict) -> None:
    """Shapes and id ranges of a loaded split (a wrong loader must fail loudly, not train)."""
    n = len(split['targets'])
    if n == 0:
        raise DataFormatError(f'the {info.name} {name} split is empty')
    for key in info.input_keys:
        arr = split[key]
        if arr.shape != (n, info.seq_len):
            raise DataFormatError(f'{info.name} {name}[{key!r}] has shape {arr.shape}, expected '
                                  f'({n}, {info.seq_len})')
        if int(arr.max()) >= info.vocab_size:
            raise DataFormatError(f'{info.name} {name}[{key!r}] holds id {int(arr.max())} >= '
                                  f'vocab_size {info.vocab_size}')
    targets = split['targets']
    if targets.min() < 0 or targets.max() >= info.num_classes:
        raise DataFormatError(f'{info.name} {name} targets outside 0..{info.num_classes - 1}')


def _input_keys(split: dict) -> list[str]:
    return [k for k in split if k != 'targets']


def _take(split: dict, idx: np.ndarray) -> dict[str, np.ndarray]:
    batch = {k: split[k][idx].astype(np.int32) for k in _input_keys(split)}
    batch['targets'] = split['targets'][idx].astype(np.int32)
    return batch


def _process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    if batch_size % process_count:
        raise ValueError(f'batch_size={batch_size} is not divisible by the {process_count} '
                         'processes; use a multiple of the process count')
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one training epoch: int64 [num_examples], a function of its args."""
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**63, epoch, 0xDA7A]))
    return rng.permutation(num_examples)


def step_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Global example indices of training step ``step``: int64 [batch_size].

    The stream is epoch 0's permutation, then epoch 1's, ...; step ``s`` takes positions
    ``[s*batch_size, (s+1)*batch_size)`` of it (a batch may straddle two epochs).
    """
    start = step * batch_size
    out, filled = np.empty(batch_size, np.int64), 0
    while filled < batch_size:
        epoch, offset = divmod(start + filled, num_examples)
        chunk = epoch_permutation(num_examples, seed, epoch)[offset:offset + batch_size - filled]
        out[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    return out


def train_batches(split: dict, batch_size: int, *, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Endless shuffled training batches starting at ``start_step``.

    Args:
      split: {'inputs' [N, L] (or 'inputs1'/'inputs2'), 'targets' [N]}.
      batch_size: the global batch size.
      seed: data-order seed.
      start_step: first step to produce (resume).
      process_index, process_count: this host's share of the global batch (a contiguous slice).

    Yields:
      {'inputs' int32 [batch_size / process_count, L], 'targets' int32, 'weights' float32 ones}.
    """
    n = len(split['targets'])
    local = _process_slice(batch_size, process_index, process_count)
    step = start_step
    while True:
        idx = step_indices(n, batch_size, seed, step)[local]
        batch = _take(split, idx)
        batch['weights'] = np.ones(len(idx), np.float32)
        yield batch
        step += 1


def eval_batches(split: dict, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """Every example once, in order; the last batch is padded with weight-0 copies of example 0.

    Args:
      split: as in :func:`train_batches`.
      batch_size: the global batch size.
      process_index, process_count: this host's share of each global batch.

    Yields:
      Batches as in :func:`train_batches`, with 'weights' 0 for padding examples.
    """
    n = len(split['targets'])
    local = _process_slice(batch_size, process_index, process_count)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        weights = (idx < n).astype(np.float32)
        idx = np.where(idx < n, idx, 0)[local]
        batch = _take(split, idx)
        batch['weights'] = weights[local]
        yield batch


__all__ = ['REGISTRY', 'ConfigError', 'DataFormatError', 'DataNotFoundError', 'Task', 'TaskData',
           'TaskField', 'TaskInfo', 'eval_batches', 'get_task', 'load_task', 'step_indices',
           'task_info', 'train_batches', 'validate_task']
