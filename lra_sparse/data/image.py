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
   then the last 5000 images of ``data_batch_5`` in file order.
2. TFDS ``cifar10`` prepared as ArrayRecord under ``config.data_dir`` (or
   ``~/tensorflow_datasets``), read with ``tfds.data_source``; ``train[:90%]`` / ``train[90%:]``
   follow TFDS's stored order, so the 45k/5k partition differs from the tarball's (the
   test set is the same).
"""

from __future__ import annotations

import os
import tarfile

import numpy as np

from lra_sparse.data import common

ARCHIVE = 'cifar-10-binary.tar.gz'
ARCHIVE_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
BATCH_DIR = 'cifar-10-batches-bin'
TRAIN_FILES = tuple(f'data_batch_{i}.bin' for i in range(1, 6))
TEST_FILE = 'test_batch.bin'
RECORD_BYTES = 1 + 32 * 32 * 3
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


def parse_binary(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records -> (uint8 RGB images [N, 32, 32, 3], int32 labels [N])."""
    if len(data) % RECORD_BYTES:
        raise common.DataFormatError(f'{source}: {len(data)} bytes is not a multiple of the '
                                     f'{RECORD_BYTES}-byte CIFAR-10 record')
    records = np.frombuffer(data, np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int32)
    if labels.max() > 9:
        raise common.DataFormatError(f'{source}: label {labels.max()} is not in 0-9')
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def missing_message(config) -> str:
    """One line: what to download and where, for the DataNotFoundError."""
    return common.missing_message(config, 'CIFAR-10 (task image)', ARCHIVE_URL, ARCHIVE,
                                  BATCH_DIR, TFDS_NAME)


def _read_binary(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    files: dict[str, bytes] = {}
    if os.path.isdir(path):
        for name in (*TRAIN_FILES, TEST_FILE):
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                raise common.DataFormatError(f'{path} lacks {name}')
            with open(full, 'rb') as f:
                files[name] = f.read()
    else:
        with tarfile.open(path, 'r:gz') as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and base in (*TRAIN_FILES, TEST_FILE):
                    files[base] = tar.extractfile(member).read()
        missing = [n for n in (*TRAIN_FILES, TEST_FILE) if n not in files]
        if missing:
            raise common.DataFormatError(f'{path} lacks {", ".join(missing)}')
    train = [parse_binary(files[n], n) for n in TRAIN_FILES]
    images = np.concatenate([t[0] for t in train])
    labels = np.concatenate([t[1] for t in train])
    cut = len(labels) * 9 // 10
    return {'train': (images[:cut], labels[:cut]), 'validation': (images[cut:], labels[cut:]),
            'test': parse_binary(files[TEST_FILE], TEST_FILE)}


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
    if info.seq_len != 32 * 32:
        from lra_sparse.errors import config_error  # noqa: PLC0415

        raise config_error('max_length', info.seq_len, '1024 for the image task (32x32 pixels)')
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
