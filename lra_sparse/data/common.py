"""Shared pieces of the data package: task declarations, metadata, errors, cache paths, byte ids.

Each task module ``data/<task>.py`` exports ``TASK``, a :class:`Task` (name, classes, vocabulary,
paired inputs, its own config fields and their validation, its loader); ``data/__init__.py`` keeps
them in its registry. Token id 0 is padding for every task. Split arrays are kept in memory in the
smallest integer dtype that holds the ids (uint8 / uint16); the batch iterators hand out int32.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lra_sparse.errors import (  # noqa: F401  (ConfigError, DataNotFoundError re-exported)
    ConfigError,
    DataFormatError,
    DataNotFoundError,
)

# The LRA release archive (ListOps TSVs, AAN TSVs, Pathfinder); IMDB and CIFAR-10 are not in it.
LRA_RELEASE_URL = 'https://storage.googleapis.com/long-range-arena/lra_release.gz'


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a model needs to know about a task; computed from the config alone.

    Attributes:
      name: the task's registry name ('listops', 'text', 'retrieval', 'image', ...).
      num_classes: number of target classes.
      seq_len: tokens per sequence (per document for retrieval), before any CLS token.
      vocab_size: embedding rows; id 0 is padding everywhere.
      pair_inputs: True for retrieval (batches carry 'inputs1' and 'inputs2').
    """

    name: str
    num_classes: int
    seq_len: int
    vocab_size: int
    pair_inputs: bool

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The input array names of a split or batch: ('inputs',) or ('inputs1', 'inputs2')."""
        return ('inputs1', 'inputs2') if self.pair_inputs else ('inputs',)


@dataclasses.dataclass(frozen=True)
class TaskField:
    """A config field that only one task has (added to that task's config by ``make_config``).

    Attributes:
      name: dotted path below ``config`` whose parent exists, e.g. ``'data.listops_max_depth'``.
      default: its default value (its type is the field's type).
      doc: one line: what it does.
    """

    name: str
    default: Any
    doc: str


def _no_own_checks(config) -> None:  # noqa: ARG001  (the signature of Task.validate)
    """The validator of a task without fields of its own."""


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything the framework knows about one task; ``data/<task>.py`` exports it as ``TASK``.

    Attributes:
      name: the registry key and ``config.task`` value (the module's name).
      num_classes: number of target classes.
      vocab_size: embedding rows (id 0 is padding), or a function of the config returning them.
      load: ``load(config, info) -> {'train' | 'validation' | 'test': {'inputs' [N, seq_len] (or
        'inputs1'/'inputs2'), 'targets' int32 [N]}}``, the real data; raises DataNotFoundError
        (what to download, where) or DataFormatError (which file, which line).
      max_length_limit: the largest ``config.max_length`` allowed.
      max_length_note: why that bound (ends the error message).
      pair_inputs: batches carry two documents ('inputs1', 'inputs2').
      full_length_inputs: every real sequence fills ``max_length`` (images), so synthetic ones do.
      fields: the task's own config fields.
      validate: ``validate(config)`` checks the task's own fields (raises ConfigError); called by
        ``config_lib.validate`` and by ``data.load_task`` before any data is read.
    """

    name: str
    num_classes: int
    vocab_size: int | Callable[[Any], int]
    load: Callable[[Any, TaskInfo], dict[str, dict[str, np.ndarray]]]
    max_length_limit: int
    max_length_note: str
    pair_inputs: bool = False
    full_length_inputs: bool = False
    fields: tuple[TaskField, ...] = ()
    validate: Callable[[Any], None] = _no_own_checks

    def info(self, config) -> TaskInfo:
        """The TaskInfo of ``config`` (its ``max_length`` and the task's own fields)."""
        vocab = self.vocab_size(config) if callable(self.vocab_size) else self.vocab_size
        return TaskInfo(name=self.name, num_classes=self.num_classes,
                        seq_len=int(config.max_length), vocab_size=vocab,
                        pair_inputs=self.pair_inputs)

    def add_fields(self, config) -> None:
        """Adds the task's own fields with their defaults to ``config`` (an unlocked ConfigDict)."""
        for field in self.fields:
            node = config
            *parents, leaf = field.name.split('.')
            for parent in parents:
                node = node[parent]
            node[leaf] = field.default


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A loaded task.

    Attributes:
      info: the task metadata.
      splits: {'train' | 'validation' | 'test': {'inputs': [N, seq_len] (or 'inputs1', 'inputs2'),
        'targets': [N]}}. Inputs use a compact unsigned dtype (uint8 or uint16); targets are int32.
        The batch iterators cast everything to int32.
    """

    info: TaskInfo
    splits: dict[str, dict[str, np.ndarray]]


def cache_root(config) -> str:
    """``config.cache_dir``, or ``${XDG_CACHE_HOME:-~/.cache}/lra_sparse`` when it is None."""
    if config.get('cache_dir'):
        return os.path.expanduser(config.cache_dir)
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'lra_sparse')


def data_dir(config) -> str | None:
    """``config.data_dir`` with ``~`` expanded (None stays None)."""
    value = config.get('data_dir')
    return os.path.expanduser(value) if value else None


def atomic_write_dir(final_dir: str, write: Callable[[str], None]) -> None:
    """Runs ``write(tmp_dir)`` and renames ``tmp_dir`` to ``final_dir`` in one step.

    A killed run leaves only a ``*.tmp*`` folder, never a half-written ``final_dir``. If another
    process finished ``final_dir`` first, its result is kept and this one is discarded.
    """
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(final_dir) + '.tmp', dir=parent)
    try:
        write(tmp_dir)
        try:
            os.replace(tmp_dir, final_dir)
        except OSError:
            if not os.path.isdir(final_dir):
                raise
    finally:
        if os.path.isdir(tmp_dir):
            for name in os.listdir(tmp_dir):
                os.remove(os.path.join(tmp_dir, name))
            os.rmdir(tmp_dir)


# Errors of reading a damaged or foreign .tar.gz (gzip raises OSError/EOFError, tarfile TarError).
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def read_archive(path: str, wanted: Callable[[str], bool], max_member_bytes: int,
                 fix: str) -> Iterator[tuple[str, bytes]]:
    """The regular files of a gzip tar archive that ``wanted`` accepts, each read with a size cap.

    Args:
      path: the ``.tar.gz`` file.
      wanted: ``wanted(member_name)``: read this member?
      max_member_bytes: a wanted member larger than this is refused before it is read, so a
        garbage archive cannot exhaust memory.
      fix: how to get an intact copy, e.g. ``'re-download https://...'``; ends every message.

    Yields:
      (member name, its bytes), in archive order.

    Raises:
      DataFormatError: the archive is not a gzip tar or is truncated (naming the archive and the
        member being read), or a wanted member is larger than ``max_member_bytes``.
    """
    current = None
    try:
        with tarfile.open(path, 'r:gz') as tar:
            for member in tar:
                current = member.name
                if not (member.isfile() and wanted(member.name)):
                    continue
                if member.size > max_member_bytes:
                    raise DataFormatError(
                        f'{path}, member {member.name}: {member.size} bytes is more than the '
                        f'{max_member_bytes} any file of the real archive has; {fix}')
                yield member.name, tar.extractfile(member).read()
    except _ARCHIVE_ERRORS as e:
        where = f', member {current}' if current else ''
        raise DataFormatError(f'{path}{where}: the archive is damaged or not a gzip tar '
                              f'({type(e).__name__}: {e}); {fix}') from None


BYTE_VOCAB_SIZE = 257  # byte-level tasks: UTF-8 byte + 1, 0 = padding


def byte_ids(data: bytes | str, max_length: int) -> np.ndarray:
    """Byte-level ids as LRA's ``ByteTextEncoder``: UTF-8 byte + 1 (0 is padding), truncated.

    Args:
      data: text (encoded as UTF-8) or raw bytes.
      max_length: keep the first ``max_length`` bytes.

    Returns:
      uint16 [min(len(bytes), max_length)], values 1..256.
    """
    if isinstance(data, str):
        data = data.encode('utf-8')
    return np.frombuffer(data[:max_length], np.uint8).astype(np.uint16) + 1


def pack_rows(rows: list[np.ndarray], length: int, dtype=np.uint16) -> np.ndarray:
    """Right-pads variable-length id rows with 0 into one array.

    Args:
      rows: N arrays of at most ``length`` ids each.
      length: the padded length.
      dtype: dtype of the result.

    Returns:
      [N, length] array, ``rows[i]`` then zeros.
    """
    out = np.zeros((len(rows), length), dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def synthetic_splits(info: TaskInfo, num_train: int, seed: int, *,
                     min_token: int = 1, full_length: bool = False) -> dict[str, dict]:
    """Random data with the task's exact shapes, vocab and class count; a pure function of seed.

    Args:
      info: the task metadata.
      num_train: train examples; validation and test get a quarter (at least 1).
      seed: the seed.
      min_token: smallest token id drawn (1 keeps 0 for padding; 0 for image pixels).
      full_length: every sequence fills ``seq_len`` (images); otherwise lengths are uniform in
        [seq_len // 2, seq_len] and the rest is padding.

    Returns:
      {'train' | 'validation' | 'test': {'inputs' [N, seq_len] uint16 (or 'inputs1'/'inputs2'),
      'targets' int32 [N]}}.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**63, 0x5EED]))
    n_eval = max(1, num_train // 4)
    splits = {}
    for name, n in (('train', num_train), ('validation', n_eval), ('test', n_eval)):
        split = {}
        for key in info.input_keys:
            tokens = rng.integers(min_token, info.vocab_size, (n, info.seq_len), dtype=np.uint16)
            if not full_length:
                lengths = rng.integers(max(1, info.seq_len // 2), info.seq_len + 1, n)
                tokens[np.arange(info.seq_len)[None, :] >= lengths[:, None]] = 0
            split[key] = tokens
        split['targets'] = rng.integers(0, info.num_classes, n).astype(np.int32)
        splits[name] = split
    return splits



def missing_message(config, what: str, url: str, archive: str, folder: str, tfds_name: str) -> str:
    """One line: what to download and where (raw archive or a prepared TFDS dataset).

    Args:
      config: the config (its ``data_dir`` is named in the message).
      what: e.g. 'IMDB (task text)'.
      url: download address of the raw archive.
      archive: its file name.
      folder: the folder it extracts to.
      tfds_name: the TFDS dataset name.
    """
    where = data_dir(config) or '<data_dir>'
    builder_args = repr(tfds_name) + (f', data_dir={where!r}' if data_dir(config) else '')
    return (f'{what} was not found: download {url} and put {archive} (or its extracted {folder}/ '
            f'folder) in {where}, then pass --config.data_dir={where}; or prepare the TFDS dataset '
            "once as ArrayRecord (needs TensorFlow: pip install 'lra_sparse[prepare]'): python -c "
            '"import tensorflow_datasets as tfds; '
            f"tfds.builder({builder_args}).download_and_prepare(file_format='array_record')\"")


def tfds_records(config, tfds_name: str, split: str, missing: str) -> list[dict]:
    """All records of a prepared TFDS split, read with ``tfds.data_source`` (no TensorFlow).

    TFDS's info/warning log lines are silenced; any failure to open the split (not prepared, wrong
    file format) becomes one DataNotFoundError.

    Args:
      config: the config (``data_dir``: TFDS data_dir, None for the TFDS default).
      tfds_name: e.g. 'imdb_reviews'.
      split: a TFDS split spec, e.g. 'train[:90%]'.
      missing: the message saying how to get the data.

    Returns:
      The decoded records (dicts of numpy values), in stored order.
    """
    import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy import, only when needed)
    import tqdm  # noqa: PLC0415
    from absl import logging as absl_logging  # noqa: PLC0415

    old = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        source = tfds.data_source(tfds_name, split=split, data_dir=data_dir(config),
                                  download=False)
    except Exception as e:  # noqa: BLE001  (any failure here means "not prepared")
        raise DataNotFoundError(f'{missing} (TFDS: {str(e).splitlines()[0]})') from None
    finally:
        absl_logging.set_verbosity(old)
    return [source[i] for i in tqdm.tqdm(range(len(source)), desc=f'{tfds_name} {split}',
                                         unit='rec', leave=False)]
