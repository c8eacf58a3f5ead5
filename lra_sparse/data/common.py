"""Shared pieces of the data package: task metadata, errors, cache paths, byte ids, synthetic data.

Token id 0 is padding for every task. Split arrays are kept in memory in the smallest integer dtype
that holds the ids (uint8 / uint16); the batch iterators hand out int32.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable

import numpy as np

from lra_sparse.errors import DataFormatError, DataNotFoundError  # noqa: F401  (re-exported)

# The LRA release archive (ListOps TSVs, AAN TSVs, Pathfinder); IMDB and CIFAR-10 are not in it.
LRA_RELEASE_URL = 'https://storage.googleapis.com/long-range-arena/lra_release.gz'


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a model needs to know about a task; computed from the config alone.

    Attributes:
      name: 'listops' | 'text' | 'retrieval' | 'image'.
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
