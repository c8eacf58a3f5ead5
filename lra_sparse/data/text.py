"""Byte-level IMDB (LRA text classification): TFDS ``imdb_reviews`` or the raw ``aclImdb`` archive.

As the reference input pipeline: train = the IMDB train split (25k), validation = test = the IMDB
test split (25k; IMDB has no validation split), ids = UTF-8 byte + 1 with 0 for padding
(``ByteTextEncoder``, vocab 257), the first ``max_length`` bytes kept, no BOS/EOS (the model adds
the CLS token). Label 1 = positive.

Where the data comes from (first match wins):

1. ``config.data_dir`` holds ``aclImdb/`` (extracted) or ``aclImdb_v1.tar.gz``: read directly, no
   TensorFlow needed (files in sorted path order). A damaged archive or an oversized review
   member is a DataFormatError naming the archive and member.
2. TFDS ``imdb_reviews`` prepared as ArrayRecord under ``config.data_dir`` (or the TFDS default
   ``~/tensorflow_datasets``), read with ``tfds.data_source``.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tqdm

from lra_sparse.data import common
from lra_sparse.errors import DataFormatError

ARCHIVE = 'aclImdb_v1.tar.gz'
ARCHIVE_URL = 'https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz'
TFDS_NAME = 'imdb_reviews'
SPLITS = {'train': 'train', 'validation': 'test', 'test': 'test'}
# A review member larger than this is refused (real reviews are a few kB, tens of kB at most).
MAX_REVIEW_BYTES = 1 << 20

_log = logging.getLogger(__name__)


def missing_message(config) -> str:
    """One line: what to download and where, for the DataNotFoundError."""
    return common.missing_message(config, 'IMDB (task text)', ARCHIVE_URL, ARCHIVE, 'aclImdb',
                                  TFDS_NAME)


def encode_documents(texts, max_length: int, desc: str) -> tuple[np.ndarray, int]:
    """Byte ids of documents, padded.

    Args:
      texts: iterable of str or bytes.
      max_length: ids kept per document.
      desc: progress-bar label.

    Returns:
      (uint16 [N, max_length] ids, number of documents longer than max_length).
    """
    rows, truncated = [], 0
    for text in tqdm.tqdm(texts, desc=desc, unit='doc', leave=False):
        raw = text.encode('utf-8') if isinstance(text, str) else bytes(text)
        truncated += len(raw) > max_length
        rows.append(common.byte_ids(raw, max_length))
    return common.pack_rows(rows, max_length), truncated


def _raw_source(root: str) -> str | None:
    for candidate in (os.path.join(root, 'aclImdb'), os.path.join(root, ARCHIVE)):
        if os.path.exists(candidate):
            return candidate
    return None


def _review_key(name: str) -> tuple[str, str] | None:
    """``'.../aclImdb/train/pos/1_9.txt'`` -> ``('train', 'pos/1_9.txt')``; None for other files."""
    parts = name.replace('\\', '/').split('/')
    if len(parts) >= 4 and parts[-4] == 'aclImdb' and parts[-3] in ('train', 'test') \
            and parts[-2] in ('neg', 'pos') and parts[-1].endswith('.txt'):
        return parts[-3], '/'.join(parts[-2:])
    return None


def _folder_reviews(path: str):
    """(name, bytes) of the review files of an extracted ``aclImdb/`` folder."""
    for split in ('train', 'test'):
        for label in ('neg', 'pos'):
            folder = os.path.join(path, split, label)
            names = sorted(os.listdir(folder)) if os.path.isdir(folder) else ()
            for fname in (n for n in names if n.endswith('.txt')):
                with open(os.path.join(folder, fname), 'rb') as f:
                    yield os.path.join('aclImdb', split, label, fname), f.read()


def read_raw(path: str) -> dict[str, tuple[list[bytes], np.ndarray]]:
    """Reads ``aclImdb/{train,test}/{neg,pos}/*.txt`` from the folder or the tar.gz.

    Returns:
      {'train' | 'test': (documents, labels int32 [N])}, sorted by path.

    Raises:
      DataFormatError: the archive is truncated or not a gzip tar, a review member is larger than
        :data:`MAX_REVIEW_BYTES`, or a split has no review; the message names the archive (and
        member) and says to re-download it.
    """
    fix = f're-download {ARCHIVE_URL}'
    if os.path.isdir(path):
        files = _folder_reviews(path)
    else:
        files = common.read_archive(path, lambda name: _review_key(name) is not None,
                                    MAX_REVIEW_BYTES, fix)
    found: dict[str, list[tuple[str, bytes]]] = {'train': [], 'test': []}
    for name, body in tqdm.tqdm(files, desc='reading ' + os.path.basename(path), unit='file',
                                leave=False):
        key = _review_key(name)
        if key is not None:
            found[key[0]].append((key[1], body))
    out = {}
    for split, items in found.items():
        if not items:
            raise DataFormatError(
                f'{path} holds no aclImdb/{split}/{{neg,pos}}/*.txt files; {fix}')
        items.sort()
        labels = np.array([1 if key.startswith('pos/') else 0 for key, _ in items], np.int32)
        out[split] = ([doc for _, doc in items], labels)
    return out


def _read_tfds(config) -> dict[str, tuple[list, np.ndarray]]:
    out = {}
    for split in ('train', 'test'):
        records = common.tfds_records(config, TFDS_NAME, split, missing_message(config))
        out[split] = ([r['text'] for r in records],
                      np.array([int(r['label']) for r in records], np.int32))
    return out


def load(config, info: common.TaskInfo) -> dict[str, dict[str, np.ndarray]]:
    """The three splits: {'train' | 'validation' | 'test': {'inputs' uint16, 'targets' int32}}."""
    root = common.data_dir(config)
    raw = _raw_source(root) if root else None
    docs = read_raw(raw) if raw else _read_tfds(config)
    encoded = {}
    for split, (texts, labels) in docs.items():
        inputs, truncated = encode_documents(texts, info.seq_len, f'encoding IMDB {split}')
        _log.info('IMDB %s: %d documents, %d longer than max_length=%d (first bytes kept, as the '
                  'reference)', split, len(texts), truncated, info.seq_len)
        encoded[split] = {'inputs': inputs, 'targets': labels}
    return {name: encoded[source] for name, source in SPLITS.items()}


TASK = common.Task(
    name='text',
    num_classes=2,
    vocab_size=common.BYTE_VOCAB_SIZE,
    load=load,
    max_length_limit=16384,
    max_length_note='4x the 4K variant LRA papers report',
)
