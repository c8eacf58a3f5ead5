"""Byte-level AAN document matching (LRA retrieval) from the LRA release TSVs.

Files ``new_aan_pairs.{train,eval,test}.tsv``: tab-separated, no header, no quoting, columns
label (read as float, then int: 0/1), id1, id2, text1, text2. As the reference: each document is cut
to its first 10,000 bytes, then to ``max_length`` (4000) byte ids (byte + 1, 0 = padding); the
batch keys are 'inputs1', 'inputs2', 'targets'. The texts are bytes (any byte, UTF-8 or not, is
an id). Looked up in ``config.data_dir`` and its
``tsv_data/``, ``lra_release/tsv_data/`` and ``lra_release/lra_release/tsv_data/`` subfolders.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tqdm

from lra_sparse.data import common
from lra_sparse.errors import DataFormatError

FILES = {'train': 'new_aan_pairs.train.tsv', 'validation': 'new_aan_pairs.eval.tsv',
         'test': 'new_aan_pairs.test.tsv'}
SUBFOLDERS = ('', 'tsv_data', os.path.join('lra_release', 'tsv_data'),
              os.path.join('lra_release', 'lra_release', 'tsv_data'))
RAW_BYTES = 10000  # the reference cuts the raw text to this many bytes before tokenising

_log = logging.getLogger(__name__)


def find_folder(config) -> str:
    """The folder that holds the three TSVs.

    Raises:
      DataNotFoundError: with what to download and where to put it.
    """
    root = common.data_dir(config)
    if root:
        for sub in SUBFOLDERS:
            folder = os.path.join(root, sub)
            if all(os.path.isfile(os.path.join(folder, f)) for f in FILES.values()):
                return folder
    where = root or '<data_dir>'
    raise common.DataNotFoundError(
        'AAN (task retrieval) was not found: it needs the LRA release files '
        f'{", ".join(FILES.values())}. Download {common.LRA_RELEASE_URL} (a tar.gz, about 8 GB), '
        f'extract it, and put its tsv_data/ folder in {where}; then pass '
        f'--config.data_dir={where}' + ('' if root else ' (no data_dir is set now)') + '.')


def read_tsv(path: str, max_length: int) -> dict[str, np.ndarray]:
    """Reads one AAN pairs TSV into byte ids.

    Args:
      path: the file.
      max_length: ids kept per document.

    Returns:
      {'inputs1', 'inputs2': uint16 [N, max_length], 'targets': int32 [N]}.

    Raises:
      DataFormatError: naming the file and line of a malformed line (field count, a label that is
        not 0 or 1, non-numeric or non-UTF-8 label bytes), or the file holds no pair; the message
        says what to re-download.
    """
    fix = f're-download {common.LRA_RELEASE_URL} and extract its tsv_data/ files again'
    docs1, docs2, labels = [], [], []
    truncated = 0
    with open(path, 'rb') as f:
        for lineno, line in enumerate(tqdm.tqdm(f, desc=os.path.basename(path), unit='pair',
                                                leave=False), 1):
            line = line.rstrip(b'\r\n')
            if not line:
                continue
            fields = line.split(b'\t')
            try:
                if len(fields) != 5:
                    raise ValueError(f'expected 5 tab-separated fields (label, id1, id2, text1, '
                                     f'text2), found {len(fields)}')
                label = int(float(fields[0]))
                if label not in (0, 1):
                    raise ValueError(f'label {fields[0].decode(errors="replace")} is not 0 or 1')
            except (ValueError, OverflowError) as e:  # int(float('inf')) overflows
                raise DataFormatError(f'{path}, line {lineno}: {e}; {fix}') from None
            text1, text2 = fields[3][:RAW_BYTES], fields[4][:RAW_BYTES]
            truncated += (len(text1) > max_length) + (len(text2) > max_length)
            docs1.append(common.byte_ids(text1, max_length))
            docs2.append(common.byte_ids(text2, max_length))
            labels.append(label)
    if not labels:
        raise DataFormatError(f'{path} holds no examples; {fix}')
    _log.info('%s: %d pairs, %d documents longer than max_length=%d (first bytes kept, as the '
              'reference)', path, len(labels), truncated, max_length)
    return {'inputs1': common.pack_rows(docs1, max_length),
            'inputs2': common.pack_rows(docs2, max_length),
            'targets': np.asarray(labels, np.int32)}


def load(config, info: common.TaskInfo) -> dict[str, dict[str, np.ndarray]]:
    """The three splits: {'train' | 'validation' | 'test': {'inputs1', 'inputs2', 'targets'}}."""
    folder = find_folder(config)
    return {split: read_tsv(os.path.join(folder, f), info.seq_len) for split, f in FILES.items()}


TASK = common.Task(
    name='retrieval',
    num_classes=2,
    vocab_size=common.BYTE_VOCAB_SIZE,
    load=load,
    max_length_limit=RAW_BYTES,
    max_length_note=f'documents are cut to their first {RAW_BYTES} bytes before tokenising',
    pair_inputs=True,
)
