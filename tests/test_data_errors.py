"""Bad data and bad data fields: each is one line naming the file (and line or member) or the field.

Damaged files are written to ``tmp_path``: non-UTF-8 bytes, empty and header-only splits, garbage,
truncated and oversized ``.tar.gz`` archives. Field checks must fire before any data is read or
generated.
"""

import io
import os
import tarfile

import numpy as np
import pytest
from conftest import tiny_config

from lra_sparse import config_lib, data
from lra_sparse.data import common, image, listops, retrieval, text

SMALL_LISTOPS = {'data.listops_num_train': 20, 'data.listops_num_val': 5,
                 'data.listops_num_test': 5, 'data.listops_min_length': 10,
                 'data.listops_max_length': 60, 'max_length': 64}


def _one_line_error(error_type, call, *args):
    """The message of the ``error_type`` that ``call(*args)`` raises; it must be one line."""
    with pytest.raises(error_type) as e:
        call(*args)
    message = str(e.value)
    assert '\n' not in message, message
    return message


def _forbid_generation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('ListOps was generated although it should not have been')

    monkeypatch.setattr(listops, 'generate', fail)


# ---------------------------------------------------------------------------------------------
# ListOps data_dir and TSVs
# ---------------------------------------------------------------------------------------------


def test_listops_data_dir_that_does_not_exist_is_refused(tmp_path, monkeypatch):
    _forbid_generation(monkeypatch)
    missing = tmp_path / 'no_such_dir'
    config = tiny_config('listops', data_dir=str(missing), cache_dir=str(tmp_path / 'cache'),
                         **SMALL_LISTOPS)
    message = _one_line_error(data.DataNotFoundError, data.load_task, config)
    assert f'config.data_dir={str(missing)!r} does not exist' in message
    assert 'listops-1000/' in message and 'leave it unset' in message
    assert not (tmp_path / 'cache').exists()


def test_listops_data_dir_without_release_files_generates(tmp_path):
    """An existing data_dir without basic_*.tsv (it may hold other tasks' data) -> generated."""
    (tmp_path / 'data' / 'aclImdb').mkdir(parents=True)
    config = tiny_config('listops', data_dir=str(tmp_path / 'data'),
                         cache_dir=str(tmp_path / 'cache'), **SMALL_LISTOPS)
    assert listops.release_folder(config) is None
    task = data.load_task(config)
    assert len(task.splits['train']['targets']) == 20
    assert listops.cache_folder(config).startswith(str(tmp_path / 'cache'))


def _release(tmp_path, test_body: bytes):
    """An LRA-release ListOps folder whose test split holds ``test_body``; its config."""
    folder = tmp_path / 'data' / 'listops-1000'
    folder.mkdir(parents=True)
    for split, filename in listops.RELEASE_FILES.items():
        body = f'{listops.HEADER}\n[MAX 1 2 ]\t2\n[MIN 3 4 ]\t3\n'.encode()
        (folder / filename).write_bytes(test_body if split == 'test' else body)
    config = tiny_config('listops', data_dir=str(tmp_path / 'data'), **SMALL_LISTOPS)
    return folder / listops.RELEASE_FILES['test'], config


@pytest.mark.parametrize('body,where', [
    (b'Source\tTarget\n[MAX 1 2 ]\t2\n[MIN 3 \xff ]\t3\n', 'line 3: byte 0xff at column 8 is not '
                                                         'UTF-8 text'),
    (b'Source\tTarget\r\n[MAX 1 2 ]\t2\r\n\xe9\t3\r\n', 'line 3: byte 0xe9 at column 1'),
    (b'', 'is empty'),
    (b'Source\tTarget\n', 'holds only the header, no example'),
    (b'Source\tTarget\n\n\n', 'holds only the header, no example'),
])
def test_listops_damaged_release_file_names_file_line_and_download(tmp_path, monkeypatch, body,
                                                                    where):
    _forbid_generation(monkeypatch)
    path, config = _release(tmp_path, body)
    message = _one_line_error(data.DataFormatError, data.load_task, config)
    assert message.startswith(str(path)) and where in message, message
    assert f're-download {common.LRA_RELEASE_URL}' in message


def test_listops_damaged_cache_says_to_delete_it(tmp_path, monkeypatch):
    config = tiny_config('listops', cache_dir=str(tmp_path / 'cache'), **SMALL_LISTOPS)
    folder = listops.ensure_generated(config, progress=False)
    path = os.path.join(folder, listops.RELEASE_FILES['validation'])
    with open(path, 'ab') as f:
        f.write(b'[SM \xc3\x28 ]\t1\n')
    _forbid_generation(monkeypatch)
    message = _one_line_error(data.DataFormatError, data.load_task, config)
    assert message.startswith(f'{path}, line 7: byte 0xc3 at column 5 is not UTF-8 text')
    assert message.endswith(f'delete {folder} to generate it again')


# ---------------------------------------------------------------------------------------------
# AAN TSVs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('line,where', [
    (b'\xff1.0\ta\tb\tx\ty', "line 2: could not convert string to float: b'\\xff1.0'"),
    (b'inf\ta\tb\tx\ty', 'line 2: cannot convert float infinity to integer'),
    (b'nan\ta\tb\tx\ty', 'line 2: cannot convert float NaN to integer'),
    (b'1.0\ta\tb\tx\xff\ty\tz', 'line 2: expected 5 tab-separated fields'),
])
def test_retrieval_bad_line_names_file_and_line(tmp_path, line, where):
    path = tmp_path / 'new_aan_pairs.train.tsv'
    path.write_bytes(b'1.0\ta\tb\tx\ty\n' + line + b'\n')
    message = _one_line_error(data.DataFormatError, retrieval.read_tsv, str(path), 16)
    assert message.startswith(f'{path}, ') and where in message, message
    assert message.endswith(f're-download {common.LRA_RELEASE_URL} and extract its tsv_data/ '
                            'files again')


def test_retrieval_non_utf8_text_is_read_as_bytes(tmp_path):
    """Byte-level ids: any byte of a document is an id (byte + 1), UTF-8 or not."""
    path = tmp_path / 'pairs.tsv'
    path.write_bytes(b'1\ta\tb\t\xff\xfe\tok\n')
    arrays = retrieval.read_tsv(str(path), 4)
    assert arrays['inputs1'][0].tolist() == [256, 255, 0, 0]


@pytest.mark.parametrize('body', [b'', b'\n\n'])
def test_retrieval_empty_split_names_the_file(tmp_path, body):
    (tmp_path / 'tsv_data').mkdir()
    for name in retrieval.FILES.values():
        (tmp_path / 'tsv_data' / name).write_bytes(b'1\ta\tb\tx\ty\n')
    path = tmp_path / 'tsv_data' / retrieval.FILES['validation']
    path.write_bytes(body)
    config = tiny_config('retrieval', data_dir=str(tmp_path))
    message = _one_line_error(data.DataFormatError, data.load_task, config)
    assert message.startswith(f'{path} holds no examples; re-download {common.LRA_RELEASE_URL}')


# ---------------------------------------------------------------------------------------------
# Archives: garbage, truncated, oversized members, empty splits
# ---------------------------------------------------------------------------------------------


def _tar_gz(path, members: dict[str, bytes]):
    with tarfile.open(path, 'w:gz') as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


def _noise(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _imdb_members(review: bytes = b'Fine film.') -> dict[str, bytes]:
    return {f'aclImdb/{split}/{label}/{i}_7.txt': review
            for split in ('train', 'test') for label in ('neg', 'pos') for i in range(2)}


def _cifar_members(records: int = 4) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for name in (*image.TRAIN_FILES, image.TEST_FILE):
        rows = rng.integers(0, 256, (records, image.RECORD_BYTES), dtype=np.uint8)
        rows[:, 0] %= 10
        out[f'{image.BATCH_DIR}/{name}'] = rows.tobytes()
    return out


ARCHIVES = {
    'text': (text.ARCHIVE, text.ARCHIVE_URL, _imdb_members),
    'image': (image.ARCHIVE, image.ARCHIVE_URL, _cifar_members),
}


@pytest.mark.parametrize('task', list(ARCHIVES))
def test_garbage_archive_names_the_archive_and_the_download(tmp_path, task):
    archive, url, _ = ARCHIVES[task]
    (tmp_path / archive).write_bytes(_noise(5000))
    message = _one_line_error(data.DataFormatError, data.load_task,
                              tiny_config(task, data_dir=str(tmp_path)))
    assert message.startswith(f'{tmp_path / archive}: the archive is damaged or not a gzip tar')
    assert message.endswith(f're-download {url}')


@pytest.mark.parametrize('task', list(ARCHIVES))
def test_truncated_archive_names_the_member_being_read(tmp_path, task):
    archive, url, members = ARCHIVES[task]
    whole = tmp_path / 'whole.tar.gz'
    contents = members()
    if task == 'text':  # one large incompressible review, so the cut lands inside it
        contents['aclImdb/test/pos/9_9.txt'] = _noise(200_000)
    _tar_gz(whole, contents)
    raw = whole.read_bytes()
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / archive).write_bytes(raw[:len(raw) * 2 // 3])
    message = _one_line_error(data.DataFormatError, data.load_task,
                              tiny_config(task, data_dir=str(tmp_path / 'data')))
    assert message.startswith(f'{tmp_path / "data" / archive}, member ')
    member = message.split(', member ')[1].split(':')[0]
    assert member in contents, message
    assert 'EOFError' in message and message.endswith(f're-download {url}')


def test_oversized_review_member_is_refused_before_it_is_read(tmp_path, monkeypatch):
    contents = _imdb_members()
    contents['aclImdb/train/pos/5_9.txt'] = b'x' * 300
    _tar_gz(tmp_path / text.ARCHIVE, contents)
    monkeypatch.setattr(text, 'MAX_REVIEW_BYTES', 299)
    message = _one_line_error(data.DataFormatError, data.load_task,
                              tiny_config('text', data_dir=str(tmp_path)))
    assert message == (f'{tmp_path / text.ARCHIVE}, member aclImdb/train/pos/5_9.txt: 300 bytes '
                       f'is more than the 299 any file of the real archive has; '
                       f're-download {text.ARCHIVE_URL}')
    monkeypatch.setattr(text, 'MAX_REVIEW_BYTES', 300)
    assert data.load_task(tiny_config('text', data_dir=str(tmp_path))).splits['train']


def test_oversized_cifar_member_is_refused(tmp_path, monkeypatch):
    _tar_gz(tmp_path / image.ARCHIVE, _cifar_members(records=4))
    monkeypatch.setattr(image, 'MAX_MEMBER_BYTES', 3 * image.RECORD_BYTES)
    message = _one_line_error(data.DataFormatError, data.load_task,
                              tiny_config('image', data_dir=str(tmp_path)))
    assert message.startswith(f'{tmp_path / image.ARCHIVE}, member {image.BATCH_DIR}/'
                              f'data_batch_1.bin: {4 * image.RECORD_BYTES} bytes is more than')


def test_member_caps_hold_the_real_archives():
    """The caps leave a margin over the largest real members (CIFAR batches: 10000 records)."""
    assert image.MAX_MEMBER_BYTES >= 2 * 10000 * image.RECORD_BYTES
    assert text.MAX_REVIEW_BYTES >= 1 << 20


@pytest.mark.parametrize('where', ['archive', 'folder'])
def test_empty_cifar_batch_names_the_file(tmp_path, where):
    contents = _cifar_members()
    contents[f'{image.BATCH_DIR}/data_batch_3.bin'] = b''
    if where == 'archive':
        _tar_gz(tmp_path / image.ARCHIVE, contents)
        source = f'{tmp_path / image.ARCHIVE}, member {image.BATCH_DIR}/data_batch_3.bin'
    else:
        for name, body in contents.items():
            (tmp_path / name).parent.mkdir(exist_ok=True)
            (tmp_path / name).write_bytes(body)
        source = str(tmp_path / image.BATCH_DIR / 'data_batch_3.bin')
    message = _one_line_error(data.DataFormatError, data.load_task,
                              tiny_config('image', data_dir=str(tmp_path)))
    assert message == f'{source} is empty; re-download {image.ARCHIVE_URL}'


def test_cifar_bad_label_names_the_record():
    rows = np.zeros((3, image.RECORD_BYTES), np.uint8)
    rows[2, 0] = 12
    message = _one_line_error(data.DataFormatError, image.parse_binary, rows.tobytes(), 'b.bin')
    assert message == 'b.bin: record 2 has label 12, not in 0-9'


def test_imdb_archive_without_a_split_says_what_to_download(tmp_path):
    contents = {k: v for k, v in _imdb_members().items() if '/test/' not in k}
    _tar_gz(tmp_path / text.ARCHIVE, contents)
    message = _one_line_error(data.DataFormatError, data.load_task,
                              tiny_config('text', data_dir=str(tmp_path)))
    assert message == (f'{tmp_path / text.ARCHIVE} holds no aclImdb/test/{{neg,pos}}/*.txt '
                       f'files; re-download {text.ARCHIVE_URL}')


# ---------------------------------------------------------------------------------------------
# Field checks before any data
# ---------------------------------------------------------------------------------------------


LISTOPS_BAD = [
    ({'data.listops_max_depth': 0}, 'data.listops_max_depth', 'an integer >= 1'),
    ({'data.listops_max_args': 1}, 'data.listops_max_args', 'an integer >= 2'),
    ({'data.listops_num_train': 0}, 'data.listops_num_train', 'a positive integer'),
    ({'data.listops_num_val': -3}, 'data.listops_num_val', 'a positive integer'),
    ({'data.listops_num_test': 0}, 'data.listops_num_test', 'a positive integer'),
    ({'data.listops_min_length': -1}, 'data.listops_min_length', 'an integer in 0..58'),
    ({'data.listops_min_length': 59}, 'data.listops_min_length', 'an integer in 0..58'),
    ({'data.listops_max_length': 66}, 'data.listops_max_length', 'at most config.max_length+1=65'),
    ({'data.listops_max_depth': 1, 'data.listops_min_length': 1}, 'data.listops_min_length',
     'below 1, the longest tree of data.listops_max_depth=1'),
    ({'data.listops_max_depth': 2, 'data.listops_max_args': 3}, 'data.listops_min_length',
     'below 5, the longest tree of data.listops_max_depth=2 and data.listops_max_args=3'),
]


@pytest.mark.parametrize('overrides,field,allowed', LISTOPS_BAD)
def test_listops_fields_are_checked_before_generation(tmp_path, monkeypatch, overrides, field,
                                                      allowed):
    _forbid_generation(monkeypatch)
    config = tiny_config('listops', cache_dir=str(tmp_path), **{**SMALL_LISTOPS, **overrides})
    for check in (config_lib.validate, data.load_task):
        message = _one_line_error(data.ConfigError, check, config)
        assert message.startswith(f'config.{field}=') and allowed in message, message
    assert not os.listdir(tmp_path)


def test_listops_smallest_consistent_fields_generate():
    """At the boundary of every check (depth 2, 2 arguments, min_length = longest tree - 1)."""
    fields = {'data.listops_max_depth': 2, 'data.listops_max_args': 2,
              'data.listops_min_length': 3, 'data.listops_max_length': 5}
    config_lib.validate(tiny_config('listops', **{**SMALL_LISTOPS, **fields}))
    splits = listops.generate(3, 1, 1, min_length=3, max_length=5, max_depth=2, max_args=2,
                              progress=False)
    for source, target in (example for split in splits.values() for example in split):
        assert len(listops.encode(source)) == 4  # the only length in (3, 5): op, 2 values, ]
        assert listops.evaluate(source) == target


def test_synthetic_source_ignores_the_listops_generator_fields():
    config = tiny_config('listops', 'synthetic', **{'data.listops_max_depth': 0})
    config_lib.validate(config)


@pytest.mark.parametrize('task', list(data.REGISTRY))
def test_absurd_max_length_is_one_line_naming_the_bound(task):
    config = tiny_config(task, max_length=10**9)
    limit = data.REGISTRY[task].max_length_limit
    message = _one_line_error(data.ConfigError, config_lib.validate, config)
    assert message.startswith('config.max_length=1000000000 is not allowed: a positive integer at '
                              f'most {limit} for task {task} (')


def test_image_needs_1024_pixels_with_real_data_before_loading(tmp_path):
    config = tiny_config('image', data_dir=str(tmp_path), max_length=1000)
    for check in (config_lib.validate, data.load_task):
        message = _one_line_error(data.ConfigError, check, config)
        assert message.startswith('config.max_length=1000 is not allowed: 1024 for the image task')
    config.data.source = 'synthetic'
    config_lib.validate(config)


@pytest.mark.parametrize('value', [0, -5])
def test_synthetic_examples_must_be_positive(value):
    config = tiny_config('text', 'synthetic', **{'data.synthetic_examples': value})
    message = _one_line_error(data.ConfigError, config_lib.validate, config)
    assert message.startswith(f'config.data.synthetic_examples={value} is not allowed')
