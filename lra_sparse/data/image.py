"""Pixel-level grayscale CIFAR-10 (LRA image): TFDS ``cifar10`` or the binary tarball.

As the reference: train = the first 90% of the CIFAR-10 train split (45k), validation = the last
10% (5k), test = the test split (10k); each image is converted to grayscale with
``tf.image.rgb_to_grayscale`` semantics (reproduced in numpy, see :func:`rgb_to_grayscale`) and
flattened row-major to 1024 tokens. Token ids are the grey levels 0-255 (vocab 256), so every black
pixel is also treated as padding, exactly as the reference (its mask is ``inputs > 0``). With
``data.image_pixel0_is_padding=False`` the ids are grey level + 1 (vocab 257) and no pixel is
padding.

Where the data comes from (first match wins):

1. ``config.data_dir`` holds ``cifar-10-batches-bin/`` or ``cifar-10-binary.tar.gz``: read directly
   (records of 1 label byte + 3072 pixel bytes, R, G, B planes of 32x32). The validation split is
   then the last 5000 images of ``data_batch_5`` in file order. A damaged archive or an oversized
   member is a DataFormatError naming the archive and member.
2. TFDS ``cifar10`` prepared as ArrayRecord under ``config.data_dir`` (or
   ``~/tensorflow_datasets``), read with ``tfds.data_source``; ``train[:90%]`` / ``train[90%:]``
   follow TFDS's stored order, so the 45k/5k partition differs from the tarball's (the
   test set is the same).
"""

from __future__ import annotations

import os

import numpy as np

from lra_sparse.data import common
from lra_sparse.errors import DataFormatError, check

ARCHIVE = 'cifar-10-binary.tar.gz'
ARCHIVE_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
BATCH_DIR = 'cifar-10-batches-bin'
TRAIN_FILES = tuple(f'data_batch_{i}.bin' for i in range(1, 6))
TEST_FILE = 'test_batch.bin'
RECORD_BYTES = 1 + 32 * 32 * 3
# Every batch file of the real archive holds 10000 records; a member over twice that is refused.
MAX_MEMBER_BYTES = 2 * 10000 * RECORD_BYTES
SEQ_LEN = 32 * 32
TFDS_NAME = 'cifar10'
TFDS_SPLITS = {'train': 'train[:90%]', 'validation': 'train[90%:]', 'test': 'test'}
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)


def rgb_to_grayscale(rgb: np.ndarray) -> np.ndarray:
    """``tf.image.rgb_to_grayscale`` on uint8 images, then cast to integers, in numpy.

    TF converts uint8 to float32 as ``float32(x) * float32(1/255)``, takes the weighted sum with
    weights (0.2989, 0.5870, 0.1140) in float32, and converts back with
    ``convert_image_dtype``: multiply by ``255 + 0.5`` and cast, which truncates. The same float32
    operations are done here in the same order (r, g, b), so the integers match TF's.

    Args:
      rgb: uint8 [..., 3].

    Returns:
      uint8 [...] grey levels 0-255.
    """
    flt = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
    gray = (flt[..., 0] * GRAY_WEIGHTS[0] + flt[..., 1] * GRAY_WEIGHTS[1]) \
        + flt[..., 2] * GRAY_WEIGHTS[2]
    return np.clip(gray * np.float32(255.5), 0, 255).astype(np.uint8)


def parse_binary(data: bytes, source: str, fix: str = '') -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records -> (uint8 RGB images [N, 32, 32, 3], int32 labels [N]), N >= 1.

    Args:
      data: the bytes of one batch file.
      source: the file (or archive member) named in error messages.
      fix: how to get an intact file (ends every error message).

    Raises:
      DataFormatError: the file is empty, not whole records, or holds a label outside 0-9.
    """
    suffix = f'; {fix}' if fix else ''
    if not data:
        raise DataFormatError(f'{source} is empty{suffix}')
    if len(data) % RECORD_BYTES:
        raise DataFormatError(f'{source}: {len(data)} bytes is not a multiple of the '
                              f'{RECORD_BYTES}-byte CIFAR-10 record{suffix}')
    records = np.frombuffer(data, np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int32)
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataFormatError(f'{source}: record {bad} has label {labels[bad]}, not in 0-9{suffix}')
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def missing_message(config) -> str:
    """One line: what to download and where, for the DataNotFoundError."""
    return common.missing_message(config, 'CIFAR-10 (task image)', ARCHIVE_URL, ARCHIVE,
                                  BATCH_DIR, TFDS_NAME)


def _read_binary(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The three splits from ``cifar-10-batches-bin/`` or ``cifar-10-binary.tar.gz``.

    Raises:
      DataFormatError: a batch file is missing, empty or malformed, a member is larger than
        :data:`MAX_MEMBER_BYTES`, or the archive is truncated or not a gzip tar; the message
        names the file (or archive and member) and says to re-download the archive.
    """
    fix = f're-download {ARCHIVE_URL}'
    names = (*TRAIN_FILES, TEST_FILE)
    files: dict[str, tuple[str, bytes]] = {}
    if os.path.isdir(path):
        for name in names:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                raise DataFormatError(f'{path} lacks {name}; {fix}')
            with open(full, 'rb') as f:
                files[name] = (full, f.read())
    else:
        members = common.read_archive(path, lambda m: os.path.basename(m) in names,
                                      MAX_MEMBER_BYTES, fix)
        for member, body in members:
            files[os.path.basename(member)] = (f'{path}, member {member}', body)
        missing = [n for n in names if n not in files]
        if missing:
            raise DataFormatError(f'{path} lacks {", ".join(missing)}; {fix}')
    parsed = {name: parse_binary(body, source, fix) for name, (source, body) in files.items()}
    images = np.concatenate([parsed[n][0] for n in TRAIN_FILES])
    labels = np.concatenate([parsed[n][1] for n in TRAIN_FILES])
    cut = len(labels) * 9 // 10
    return {'train': (images[:cut], labels[:cut]), 'validation': (images[cut:], labels[cut:]),
            'test': parsed[TEST_FILE]}


def _read_tfds(config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, spec in TFDS_SPLITS.items():
        records = common.tfds_records(config, TFDS_NAME, spec, missing_message(config))
        out[split] = (np.stack([np.asarray(r['image'], np.uint8) for r in records]),
                      np.array([int(r['label']) for r in records], np.int32))
    return out


def load(config, info: common.TaskInfo) -> dict[str, dict[str, np.ndarray]]:
    """The three splits: {'train' | 'validation' | 'test': {'inputs' [N, 1024], 'targets'}}.

    Raises:
      ConfigError: max_length is not 1024.
    """
    validate(config)
    root = common.data_dir(config)
    raw = None
    for candidate in ((os.path.join(root, BATCH_DIR), os.path.join(root, ARCHIVE)) if root else ()):
        if os.path.exists(candidate):
            raw = candidate
            break
    splits = _read_binary(raw) if raw else _read_tfds(config)
    shift = 0 if config.data.image_pixel0_is_padding else 1
    return {name: {'inputs': rgb_to_grayscale(images).reshape(len(images), -1).astype(np.uint16)
                   + shift, 'targets': labels}
            for name, (images, labels) in splits.items()}


def vocab_size(config) -> int:
    """256 grey levels as ids (pixel 0 is also padding, the reference), else 257 (level + 1)."""
    return 256 if config.data.image_pixel0_is_padding else 257


def validate(config) -> None:
    """Real images have exactly 1024 pixels (synthetic ones may be shorter, for smoke tests).

    Raises:
      ConfigError: ``data.image_pixel0_is_padding`` is not a bool, or ``max_length`` is not 1024
        with real data.
    """
    check(isinstance(config.data.image_pixel0_is_padding, bool), 'data.image_pixel0_is_padding',
          config.data.image_pixel0_is_padding, 'True or False')
    if config.data.source == 'real':
        check(config.max_length == SEQ_LEN, 'max_length', config.max_length,
              f'{SEQ_LEN} for the image task (32x32 pixels)')


TASK = common.Task(
    name='image',
    num_classes=10,
    vocab_size=vocab_size,
    load=load,
    max_length_limit=SEQ_LEN,
    max_length_note='an image has 32x32 pixels',
    full_length_inputs=True,
    fields=(common.TaskField('data.image_pixel0_is_padding', True,
                             'reference quirk: pixel value 0 is masked as padding'),),
    validate=validate,
)
