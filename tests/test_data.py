"""The data package: ListOps generator, evaluator, TSVs and cache; every task's loader; batching.

Real datasets are never needed: ListOps is generated small, IMDB and CIFAR-10 come from
``tfds.testing.mock_data`` (read with ``tfds.data_source``, no TensorFlow) or tiny raw-archive
fixtures, and AAN from tiny TSV fixtures written to ``tmp_path``.
"""

import hashlib
import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
import tarfile
import textwrap
import types

import numpy as np
import pytest
from conftest import tiny_config

from lra_sparse import config_lib, data
from lra_sparse.data import common, image, listops, retrieval, text
from lra_sparse.models import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small ListOps: 50/10/10 trees of 10 < length < 60 tokens, padded to 64.
SMALL_LISTOPS = {'data.listops_num_train': 50, 'data.listops_num_val': 10,
                 'data.listops_num_test': 10, 'data.listops_min_length': 10,
                 'data.listops_max_length': 60, 'max_length': 64}
SMALL_GEN = {'min_length': 10, 'max_length': 60, 'max_depth': 10, 'max_args': 10,
             'progress': False}


def small_listops_config(**overrides):
    return tiny_config('listops', **{**SMALL_LISTOPS, **overrides})


# ---------------------------------------------------------------------------------------------
# ListOps: the reference generator (LRA data/listops.py, with an explicit random stream)
# ---------------------------------------------------------------------------------------------


def _ref_generate_tree(rng, depth, max_depth, max_args):
    r = rng.random() if depth < max_depth else 1
    if r > listops.VALUE_P:
        return rng.choice(listops.VALUES), 1
    length = 2
    num_values = rng.randint(2, max_args)
    values = []
    for _ in range(num_values):
        sub_t, sub_l = _ref_generate_tree(rng, depth + 1, max_depth, max_args)
        values.append(sub_t)
        length += sub_l
    op = rng.choice(listops.OPERATORS)
    t = (op, values[0])
    for value in values[1:]:
        t = (t, value)
    return (t, listops.END), length


def _ref_to_string(t):
    if isinstance(t, str):
        return t
    if isinstance(t, int):
        return str(t)
    return '( ' + _ref_to_string(t[0]) + ' ' + _ref_to_string(t[1]) + ' )'


def _ref_to_value(t):
    if not isinstance(t, tuple):
        return t
    left, right = _ref_to_value(t[0]), _ref_to_value(t[1])
    if isinstance(left, str) and left in listops.OPERATORS:
        return (left, [right])
    if isinstance(right, str) and right == listops.END:
        op, values = left
        if op == listops.MIN:
            return min(values)
        if op == listops.MAX:
            return max(values)
        if op == listops.MED:
            return int(np.median(values))
        return int(np.sum(values) % 10)
    return (left[0], left[1] + [right])


def _parse(source):
    """Independent parser: (tree, token count, max node depth, arities, operators, values).

    A tree is an int (value) or (operator, [children]); the root has depth 1.
    """
    stack, root = [], None
    count, max_depth, arities, ops, values = 0, 0, [], set(), set()
    for token in source.replace('(', ' ').replace(')', ' ').split():
        count += 1
        depth = len(stack) + 1
        if token.startswith('['):
            ops.add(token)
            max_depth = max(max_depth, depth)
            stack.append((token, []))
        elif token == ']':
            node = stack.pop()
            arities.append(len(node[1]))
            if stack:
                stack[-1][1].append(node)
            else:
                root = node
        else:
            values.add(token)
            max_depth = max(max_depth, depth)
            if stack:
                stack[-1][1].append(int(token))
            else:
                root = int(token)
    assert not stack, source
    return root, count, max_depth, arities, ops, values


def _to_ref_tuple(tree):
    if isinstance(tree, int):
        return tree
    op, children = tree
    children = [_to_ref_tuple(c) for c in children]
    t = (op, children[0])
    for c in children[1:]:
        t = (t, c)
    return (t, listops.END)


# ---------------------------------------------------------------------------------------------
# ListOps: generator
# ---------------------------------------------------------------------------------------------


def test_listops_generate_tree_matches_the_reference_draw_for_draw():
    """Same random stream -> same string, value and length as LRA's generate_tree/to_string."""
    rng_ref, rng = random.Random(1234), random.Random(1234)
    for _ in range(300):
        ref_tree, ref_length = _ref_generate_tree(rng_ref, 1, 10, 10)
        source, value, length = listops.generate_tree(rng, 10, 10)
        assert source == _ref_to_string(ref_tree)
        assert value == _ref_to_value(ref_tree)
        assert length == ref_length
    assert rng.getstate() == rng_ref.getstate()
    # max_length only abandons trees the reference would reject (length >= max_length).
    for seed in range(300):
        ref_tree, ref_length = _ref_generate_tree(random.Random(seed), 1, 10, 10)
        got = listops.generate_tree(random.Random(seed), 10, 10, max_length=40)
        if ref_length >= 40:
            assert got is None
        else:
            assert got == (_ref_to_string(ref_tree), _ref_to_value(ref_tree), ref_length)


def test_listops_generate_is_deterministic_for_a_seed():
    a = listops.generate(30, 5, 5, seed=7, **SMALL_GEN)
    b = listops.generate(30, 5, 5, seed=7, **SMALL_GEN)
    c = listops.generate(30, 5, 5, seed=8, **SMALL_GEN)
    assert a == b
    assert a != c
    assert [len(a[s]) for s in ('train', 'validation', 'test')] == [30, 5, 5]
    sources = [s for split in a.values() for s, _ in split]
    assert len(set(sources)) == len(sources)  # unique across splits


def test_listops_generate_does_not_depend_on_the_number_of_workers():
    """Two chunks of 500 trees, in a 2-process pool and in-process: the same splits."""
    kwargs = dict(min_length=200, max_length=2000, seed=3, progress=False)
    assert (listops.generate(500, 10, 10, workers=2, **kwargs)
            == listops.generate(500, 10, 10, workers=1, **kwargs))


UNGUARDED_SCRIPT = """
from lra_sparse.data import listops
listops.generate(40, 0, 0, min_length=200, max_length=400, workers=2, progress=False)
print('generated')
"""


@pytest.mark.parametrize('guarded', [False, True])
def test_listops_workers_in_a_script_without_main_guard_fail_clearly(guarded, tmp_path):
    """Spawned workers re-import the script: unguarded, one clear error instead of a hang."""
    body = UNGUARDED_SCRIPT
    if guarded:
        body = "if __name__ == '__main__':\n" + textwrap.indent(body, '    ')
    script = tmp_path / 'script.py'
    script.write_text(body)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    if guarded:
        assert run.returncode == 0 and 'generated' in run.stdout, run.stderr
    else:
        assert run.returncode != 0
        assert "if __name__ == '__main__':" in run.stderr.splitlines()[-1]


@pytest.mark.parametrize('min_length,max_length,max_depth,max_args',
                         [(10, 60, 10, 10), (0, 30, 3, 4), (5, 40, 5, 2), (20, 80, 8, 3)])
def test_listops_generated_trees_respect_the_constraints(min_length, max_length, max_depth,
                                                         max_args):
    splits = listops.generate(60, 10, 10, min_length=min_length, max_length=max_length,
                              max_depth=max_depth, max_args=max_args, seed=0, progress=False)
    for source, target in itertools.chain(*splits.values()):
        tree, count, depth, arities, ops, values = _parse(source)
        assert min_length < count < max_length, source
        assert depth <= max_depth, source
        assert all(2 <= a <= max_args for a in arities), source
        assert ops <= set(listops.OPERATORS), ops
        assert values <= {str(v) for v in range(10)}, values
        # The reference string form and value of the same tree.
        assert source == _ref_to_string(_to_ref_tuple(tree))
        assert target == _ref_to_value(_to_ref_tuple(tree)) == listops.evaluate(source)
        assert 0 <= target <= 9
        assert listops.OOV_ID not in listops.encode(source)
        assert len(listops.encode(source)) == count  # the length is the token count


# ---------------------------------------------------------------------------------------------
# ListOps: evaluator, vocabulary, encoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('expr,value', [
    ('7', 7),
    ('[MAX 2 9 ]', 9),
    ('( ( ( [MAX 2 ) 9 ) ] )', 9),
    ('[MIN 3 [MAX 7 0 ] 1 ]', 1),
    ('[MED 9 0 5 ]', 5),
    ('[MED 1 2 3 4 ]', 2),  # median 2.5 -> int() -> 2
    ('[MED 3 8 ]', 5),  # median 5.5 -> 5
    ('[MED 0 9 ]', 4),  # median 4.5 -> 4
    ('[SM 9 9 9 ]', 7),
    ('[SM [MAX 9 1 ] [MIN 8 9 ] 5 ]', 2),  # 9 + 8 + 5 = 22
    ('[MED [SM 5 6 ] [MAX 0 4 ] 3 7 ]', 3),  # MED(1, 4, 3, 7) = int(3.5)
    ('( ( ( ( [MIN ( ( ( [SM 4 ) 8 ) ] ) ) 5 ) ( ( ( [MED 6 ) 1 ) ] ) ) ] )', 2),  # MIN(2, 5, 3)
    ('[MAX [MIN [SM [MED 1 2 ] 9 ] 6 ] [MED 8 8 8 ] ]', 8),
])
def test_listops_evaluate_hand_written(expr, value):
    assert listops.evaluate(expr) == value


@pytest.mark.parametrize('expr', ['[MAX 1 2', '1 ]', '[FOO 1 ]', '[MAX ]', '[MIN 12 3 ]', ''])
def test_listops_evaluate_rejects_malformed(expr):
    with pytest.raises(ValueError):
        listops.evaluate(expr)


def test_listops_med_is_numpy_median_floored():
    rng = np.random.default_rng(0)
    for _ in range(500):
        values = rng.integers(0, 10, rng.integers(2, 11)).tolist()
        expr = '[MED ' + ' '.join(map(str, values)) + ' ]'
        assert listops.evaluate(expr) == int(np.median(values)), values
        expr = '[SM ' + ' '.join(map(str, values)) + ' ]'
        assert listops.evaluate(expr) == sum(values) % 10


def test_listops_vocabulary_is_fixed_and_sorted():
    assert listops.VOCAB == tuple(sorted(listops.VOCAB))
    assert set(listops.VOCAB) == {*map(str, range(10)), 'X', *listops.OPERATORS}
    assert sorted(listops.TOKEN_IDS.values()) == list(range(1, 16))
    assert listops.OOV_ID == 16 and listops.VOCAB_SIZE == 17
    assert data.task_info(tiny_config('listops')).vocab_size == 17
    assert listops.tokenize('( ( ( [MAX 2 ) 9 ) ] )') == ['[MAX', '2', '9', 'X']
    assert listops.encode('( ( ( [MAX 2 ) 9 ) ] )') == [12, 3, 10, 11]


def test_listops_encode_many_matches_encode_including_unknown_tokens():
    exprs = ['( ( ( [MAX 2 ) 9 ) ] )', '[SM [MIN 0 1 ] [MED 4 ] ]', '[MAX a b ]', '[MED 1 d ]',
             '[SM 1 foo ]', '[MIN 3 \u00e9 ]', '[MAX 1 2 ] extra tokens here', '']
    ids, lengths = listops.encode_many(exprs, 6)
    assert ids.dtype == np.uint8 and ids.shape == (len(exprs), 6)
    for row, length, expr in zip(ids, lengths, exprs):
        want = listops.encode(expr)
        assert length == len(want)
        np.testing.assert_array_equal(row, (want + [0] * 6)[:6], err_msg=expr)
    assert listops.encode('[MAX a b ]') == [12, 16, 16, 11]


def test_listops_vocabulary_and_generation_are_stable_across_hash_seeds():
    """Another process with another PYTHONHASHSEED gets the same ids and the same split."""
    script = textwrap.dedent("""
        import hashlib, json
        from lra_sparse.data import listops
        splits = listops.generate(40, 5, 5, min_length=10, max_length=60, seed=3,
                                  progress=False)
        ids, _ = listops.encode_many([s for s, _ in splits['train']], 64)
        print(json.dumps({'hash': hash('listops'), 'token_ids': listops.TOKEN_IDS,
                          'splits': hashlib.sha256(repr(splits).encode()).hexdigest(),
                          'ids': hashlib.sha256(ids.tobytes()).hexdigest()}))
    """)
    outs = []
    for hash_seed in ('1', '2'):
        env = {**os.environ, 'PYTHONHASHSEED': hash_seed, 'JAX_PLATFORMS': 'cpu'}
        proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120, check=True)
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert outs[0]['hash'] != outs[1]['hash']  # the hash seeds really differ
    splits = listops.generate(40, 5, 5, min_length=10, max_length=60, seed=3, progress=False)
    ids, _ = listops.encode_many([s for s, _ in splits['train']], 64)
    here = {'token_ids': listops.TOKEN_IDS,
            'splits': hashlib.sha256(repr(splits).encode()).hexdigest(),
            'ids': hashlib.sha256(ids.tobytes()).hexdigest()}
    for out in outs:
        out.pop('hash')
        assert out == here


# ---------------------------------------------------------------------------------------------
# ListOps: TSV files, release files, cache, pipeline
# ---------------------------------------------------------------------------------------------


def test_listops_tsv_round_trip(tmp_path):
    examples = listops.generate(20, 1, 1, seed=1, **SMALL_GEN)['train']
    path = tmp_path / 'basic_train.tsv'
    listops.write_tsv(str(path), examples)
    lines = path.read_text().split('\n')
    assert lines[0] == 'Source\tTarget'
    assert lines[1] == f'{examples[0][0]}\t{examples[0][1]}'
    sources, targets = listops.read_tsv(str(path))
    assert targets.dtype == np.int32
    assert list(zip(sources, targets.tolist())) == examples
    # Windows line ends and blank lines are accepted.
    crlf = tmp_path / 'crlf.tsv'
    crlf.write_bytes(path.read_bytes().replace(b'\n', b'\r\n') + b'\r\n')
    sources2, targets2 = listops.read_tsv(str(crlf))
    assert sources2 == sources and targets2.tolist() == targets.tolist()


@pytest.mark.parametrize('content,line', [
    ('Src\tTgt\n[MAX 1 2 ]\t2\n', 1),
    ('Source\tTarget\n[MAX 1 2 ]\t2\n[MIN 1 2 ]\n', 3),
    ('Source\tTarget\n[MAX 1 2 ]\tx\n', 2),
    ('Source\tTarget\n[MAX 1 2 ]\t2\n\n[MAX 1 2 ]\t12\n', 4),
    ('Source\tTarget\n[MAX 1 2 ]\t2\textra\n', 2),
])
def test_listops_malformed_tsv_names_file_and_line(tmp_path, content, line):
    path = tmp_path / 'basic_val.tsv'
    path.write_text(content)
    with pytest.raises(data.DataFormatError) as e:
        listops.read_tsv(str(path))
    assert str(path) in str(e.value) and f'line {line}:' in str(e.value)


def _forbid_generation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('ListOps was generated although it should not have been')

    monkeypatch.setattr(listops, 'generate', fail)


@pytest.mark.parametrize('subfolder', ['', 'listops-1000'])
def test_listops_release_files_are_used_instead_of_generating(tmp_path, monkeypatch, subfolder):
    folder = tmp_path / 'data' / subfolder
    folder.mkdir(parents=True)
    generated = listops.generate(8, 3, 4, seed=5, **SMALL_GEN)
    long_expr = '[SM ' + ' '.join(['[MAX 1 2 ]'] * 20) + ' ]'  # 82 tokens > max_length 64
    generated['train'].append((long_expr, listops.evaluate(long_expr)))
    for split, filename in listops.RELEASE_FILES.items():
        listops.write_tsv(str(folder / filename), generated[split])
    _forbid_generation(monkeypatch)
    config = small_listops_config(data_dir=str(tmp_path / 'data'),
                                  cache_dir=str(tmp_path / 'cache'))
    task = data.load_task(config)
    assert not (tmp_path / 'cache').exists()
    for split in ('train', 'validation', 'test'):
        arrays = task.splits[split]
        assert arrays['inputs'].shape == (len(generated[split]), 64)
        assert arrays['targets'].tolist() == [t for _, t in generated[split]]
        for row, (source, _) in zip(arrays['inputs'], generated[split]):
            want = listops.encode(source)[:64]  # truncated to max_length
            np.testing.assert_array_equal(row, want + [0] * (64 - len(want)))
    assert len(listops.encode(long_expr)) > 64 and task.splits['train']['inputs'][-1].all()

    # A malformed release file: the error names the file and the line.
    (folder / 'basic_test.tsv').write_text('Source\tTarget\n[MAX 1 2 ]\t2\n[MAX 3 ]\tnine\n')
    with pytest.raises(data.DataFormatError, match=r'basic_test\.tsv, line 3:'):
        data.load_task(config)


def test_listops_generated_cache_is_reused(tmp_path, monkeypatch):
    config = small_listops_config(cache_dir=str(tmp_path / 'cache'))
    folder = listops.cache_folder(config)
    assert folder.startswith(str(tmp_path / 'cache'))
    first = data.load_task(config)
    paths = [os.path.join(folder, f) for f in listops.RELEASE_FILES.values()]
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    # The cached files hold exactly the generator's output for the config's parameters.
    want = listops.generate(50, 10, 10, seed=listops.generation_seed(config), **SMALL_GEN)
    for split, filename in listops.RELEASE_FILES.items():
        sources, targets = listops.read_tsv(os.path.join(folder, filename))
        assert list(zip(sources, targets.tolist())) == want[split]
    assert os.listdir(os.path.dirname(folder)) == [os.path.basename(folder)]  # no *.tmp* left

    _forbid_generation(monkeypatch)
    second = data.load_task(config)
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes
    for split in first.splits:
        for key in first.splits[split]:
            np.testing.assert_array_equal(first.splits[split][key], second.splits[split][key])
    # Other generator parameters are another cache entry.
    other = small_listops_config(cache_dir=str(tmp_path / 'cache'),
                                 **{'data.listops_max_depth': 5})
    assert listops.cache_folder(other) != folder


def test_listops_default_cache_is_under_xdg_cache_home(private_cache):
    config = small_listops_config()
    assert config.cache_dir is None
    assert listops.cache_folder(config).startswith(os.path.join(str(private_cache), 'lra_sparse'))


def test_listops_pipeline_shapes_padding_and_labels():
    config = small_listops_config()
    task = data.load_task(config)
    assert task.info == common.TaskInfo('listops', 10, 64, 17, False)
    folder = listops.ensure_generated(config, progress=False)
    for split, n in (('train', 50), ('validation', 10), ('test', 10)):
        arrays = task.splits[split]
        assert arrays['inputs'].shape == (n, 64) and arrays['inputs'].dtype == np.uint8
        assert arrays['targets'].shape == (n,) and arrays['targets'].dtype == np.int32
        sources, targets = listops.read_tsv(os.path.join(folder, listops.RELEASE_FILES[split]))
        np.testing.assert_array_equal(arrays['targets'], targets)
        for row, source, target in zip(arrays['inputs'], sources, targets):
            length = len(listops.encode(source))
            assert 10 < length < 60
            assert (row[:length] > 0).all() and (row[length:] == 0).all()  # padding after
            assert listops.evaluate(source) == target
    batch = next(data.train_batches(task.splits['train'], 8, seed=0))
    assert set(batch) == {'inputs', 'targets', 'weights'}
    assert batch['inputs'].shape == (8, 64) and batch['inputs'].dtype == np.int32
    assert batch['targets'].shape == (8,) and batch['targets'].dtype == np.int32
    assert batch['weights'].dtype == np.float32 and (batch['weights'] == 1).all()


def test_listops_too_long_expressions_for_max_length_are_a_config_error():
    config = small_listops_config(max_length=32)
    with pytest.raises(ValueError, match='data.listops_max_length'):
        data.load_task(config)


# ---------------------------------------------------------------------------------------------
# Text (IMDB)
# ---------------------------------------------------------------------------------------------


def _byte_row(raw, length):
    ids = [b + 1 for b in raw[:length]]
    return np.array(ids + [0] * (length - len(ids)))


def _imdb_fixture(root):
    """aclImdb/{train,test}/{neg,pos}/*.txt plus files the loader must ignore."""
    docs = {
        ('train', 'neg', '0_3.txt'): 'Dull.',
        ('train', 'neg', '10_1.txt'): 'x' * 300,  # longer than max_length 128
        ('train', 'pos', '1_9.txt'): 'Caf\u00e9 \u2615 great <br /> film',
        ('train', 'pos', '2_8.txt'): 'Loved it',
        ('test', 'neg', '0_2.txt'): 'Bad',
        ('test', 'pos', '0_10.txt'): 'Good ' * 40,
        ('test', 'pos', '5_7.txt'): 'Fine',
    }
    for (split, label, name), body in docs.items():
        folder = root / 'aclImdb' / split / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(body.encode('utf-8'))
    (root / 'aclImdb' / 'train' / 'unsup').mkdir()
    (root / 'aclImdb' / 'train' / 'unsup' / '0_0.txt').write_text('unlabelled')
    (root / 'aclImdb' / 'train' / 'urls_pos.txt').write_text('http://example.com')
    (root / 'aclImdb' / 'README').write_text('readme')
    order = {'train': [('neg', '0_3.txt'), ('neg', '10_1.txt'), ('pos', '1_9.txt'),
                       ('pos', '2_8.txt')],
             'test': [('neg', '0_2.txt'), ('pos', '0_10.txt'), ('pos', '5_7.txt')]}
    return {split: ([docs[(split, lab, name)].encode('utf-8') for lab, name in items],
                    [int(lab == 'pos') for lab, _ in items])
            for split, items in order.items()}


def _check_text(task, expected):
    assert task.info == common.TaskInfo('text', 2, 128, 257, False)
    for split, source in (('train', 'train'), ('validation', 'test'), ('test', 'test')):
        docs, labels = expected[source]
        arrays = task.splits[split]
        assert arrays['inputs'].shape == (len(docs), 128)
        assert arrays['inputs'].dtype == np.uint16 and arrays['targets'].dtype == np.int32
        assert arrays['targets'].tolist() == labels
        for row, doc in zip(arrays['inputs'], docs):
            np.testing.assert_array_equal(row, _byte_row(doc, 128))


def test_text_raw_folder_and_archive(tmp_path):
    folder_dir = tmp_path / 'folder'
    expected = _imdb_fixture(folder_dir)
    _check_text(data.load_task(tiny_config('text', data_dir=str(folder_dir))), expected)
    archive_dir = tmp_path / 'archive'
    archive_dir.mkdir()
    with tarfile.open(archive_dir / text.ARCHIVE, 'w:gz') as tar:
        tar.add(folder_dir / 'aclImdb', arcname='aclImdb')
    _check_text(data.load_task(tiny_config('text', data_dir=str(archive_dir))), expected)


def test_text_tfds_mock_data_without_tensorflow():
    tfds = pytest.importorskip('tensorflow_datasets')
    config = tiny_config('text')
    with tfds.testing.mock_data(num_examples=6):
        task = data.load_task(config)
        records = {split: [tfds.data_source('imdb_reviews', split=split)[i] for i in range(6)]
                   for split in ('train', 'test')}
    expected = {split: ([r['text'].encode('utf-8') if isinstance(r['text'], str)
                         else bytes(r['text']) for r in recs],
                        [int(r['label']) for r in recs])
                for split, recs in records.items()}
    _check_text(task, expected)
    if 'tensorflow' not in sys.modules:  # really read without TensorFlow
        assert not any(m == 'tensorflow' or m.startswith('tensorflow.') for m in sys.modules)


# ---------------------------------------------------------------------------------------------
# Retrieval (AAN)
# ---------------------------------------------------------------------------------------------

AAN_ROWS = {
    'train': [('1.0', 'a1', 'b1', 'first doc', 'second doc'),
              ('0.0', 'a2', 'b2', 'q' * 200, 'caf\u00e9'),
              ('1', 'a3', 'b3', 'x', 'y' * 128)],
    'eval': [('0', 'c1', 'd1', 'eval one', 'eval two')],
    'test': [('1.0', 'e1', 'e2', 'test one', 'test two'),
             ('0.0', 'e3', 'e4', '"quoted" text', 'tab-free')],
}


def _write_aan(folder, rows=AAN_ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        with open(folder / f'new_aan_pairs.{split}.tsv', 'w', encoding='utf-8') as f:
            for item in items:
                f.write('\t'.join(item) + '\n')


def test_retrieval_pairs_from_tsv_fixture(tmp_path):
    _write_aan(tmp_path / 'tsv_data')
    task = data.load_task(tiny_config('retrieval', data_dir=str(tmp_path)))
    assert task.info == common.TaskInfo('retrieval', 2, 128, 257, True)
    for split, source in (('train', 'train'), ('validation', 'eval'), ('test', 'test')):
        arrays = task.splits[split]
        rows = AAN_ROWS[source]
        assert set(arrays) == {'inputs1', 'inputs2', 'targets'}
        assert arrays['targets'].dtype == np.int32
        assert arrays['targets'].tolist() == [int(float(r[0])) for r in rows]
        for key, col in (('inputs1', 3), ('inputs2', 4)):
            assert arrays[key].shape == (len(rows), 128) and arrays[key].dtype == np.uint16
            for row, r in zip(arrays[key], rows):
                np.testing.assert_array_equal(row, _byte_row(r[col].encode('utf-8'), 128))
    batch = next(data.eval_batches(task.splits['train'], 4))
    assert set(batch) == {'inputs1', 'inputs2', 'targets', 'weights'}
    assert batch['inputs1'].shape == batch['inputs2'].shape == (4, 128)
    assert batch['inputs1'].dtype == np.int32 and batch['targets'].tolist() == [1, 0, 1, 1]
    assert batch['weights'].tolist() == [1, 1, 1, 0]


def test_retrieval_raw_text_is_cut_to_10000_bytes(tmp_path):
    path = tmp_path / 'pairs.tsv'
    path.write_text('1.0\ta\tb\t' + 'z' * 12000 + '\tshort\n')
    arrays = retrieval.read_tsv(str(path), 11000)
    assert (arrays['inputs1'][0, :10000] == ord('z') + 1).all()
    assert (arrays['inputs1'][0, 10000:] == 0).all()


@pytest.mark.parametrize('line,message', [
    ('2.0\ta\tb\tx\ty', 'is not 0 or 1'),
    ('1.0\ta\tb\tx', 'expected 5 tab-separated fields'),
    ('yes\ta\tb\tx\ty', 'could not convert'),
])
def test_retrieval_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / 'new_aan_pairs.train.tsv'
    path.write_text('1.0\ta\tb\tx\ty\n' + line + '\n')
    with pytest.raises(data.DataFormatError) as e:
        retrieval.read_tsv(str(path), 16)
    assert f'{path}, line 2:' in str(e.value) and message in str(e.value)


# ---------------------------------------------------------------------------------------------
# Image (CIFAR-10)
# ---------------------------------------------------------------------------------------------


def _numpy_grayscale(rgb):
    """tf.image.rgb_to_grayscale's rule as the module documents it, written independently.

    uint8 -> float32 * float32(1/255); tensordot with float32 weights (0.2989, 0.5870, 0.1140);
    * float32(255.5); cast (truncation) to integers.
    """
    flt = rgb.astype(np.float32) * np.float32(1 / 255)
    weights = np.array([0.2989, 0.5870, 0.1140], np.float32)
    gray = np.tensordot(flt, weights, axes=([-1], [-1])).astype(np.float32)
    return (gray * np.float32(255.5)).astype(np.int64)


def test_rgb_to_grayscale_matches_the_tf_rule():
    fixed = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                      [1, 1, 1], [128, 128, 128]], np.uint8)
    assert image.rgb_to_grayscale(fixed).tolist() == [0, 255, 76, 149, 29, 1, 128]
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 256, (200_000, 3)).astype(np.uint8)
    got = image.rgb_to_grayscale(colors)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, _numpy_grayscale(colors))


def _cifar_records(rng, n):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    planes = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    planes[:, :, :4, :] = 0  # black rows: pixel value 0
    planes[:, :, 4, :] = 255
    records = np.concatenate([labels[:, None], planes.reshape(n, -1)], axis=1)
    return records.tobytes(), labels.astype(np.int32), planes.transpose(0, 2, 3, 1)


def _cifar_fixture(folder, rng, per_batch=4, n_test=3):
    """cifar-10-batches-bin/ with 5 train batches of ``per_batch`` records and a test batch."""
    folder.mkdir(parents=True)
    train_labels, train_images = [], []
    for name in image.TRAIN_FILES:
        raw, labels, images = _cifar_records(rng, per_batch)
        (folder / name).write_bytes(raw)
        train_labels.append(labels)
        train_images.append(images)
    raw, test_labels, test_images = _cifar_records(rng, n_test)
    (folder / image.TEST_FILE).write_bytes(raw)
    (folder / 'batches.meta.txt').write_text('airplane\n')
    labels, images = np.concatenate(train_labels), np.concatenate(train_images)
    cut = len(labels) * 9 // 10  # first 90% / last 10% of train, in file order
    return {'train': (images[:cut], labels[:cut]), 'validation': (images[cut:], labels[cut:]),
            'test': (test_images, test_labels)}


def _check_image(task, expected, pixel0_is_padding):
    shift = 0 if pixel0_is_padding else 1
    assert task.info == common.TaskInfo('image', 10, 1024, 256 + shift, False)
    _check_image_arrays(task, expected, pixel0_is_padding)
    inputs = task.splits['train']['inputs']
    assert (inputs[:, :4 * 32] == shift).all()  # the black rows: 0 (padding) or 1
    assert (inputs[:, 4 * 32:5 * 32] == 255 + shift).all()


@pytest.mark.parametrize('pixel0_is_padding', [True, False])
def test_image_raw_archive_and_folder(tmp_path, pixel0_is_padding):
    rng = np.random.default_rng(1)
    expected = _cifar_fixture(tmp_path / 'folder' / image.BATCH_DIR, rng)
    assert [len(v[1]) for v in expected.values()] == [18, 2, 3]
    overrides = {'data.image_pixel0_is_padding': pixel0_is_padding}
    task = data.load_task(tiny_config('image', data_dir=str(tmp_path / 'folder'), **overrides))
    _check_image(task, expected, pixel0_is_padding)
    (tmp_path / 'archive').mkdir()
    with tarfile.open(tmp_path / 'archive' / image.ARCHIVE, 'w:gz') as tar:
        tar.add(tmp_path / 'folder' / image.BATCH_DIR, arcname=image.BATCH_DIR)
    task = data.load_task(tiny_config('image', data_dir=str(tmp_path / 'archive'), **overrides))
    _check_image(task, expected, pixel0_is_padding)
    batch = next(data.train_batches(task.splits['train'], 16, seed=0))
    assert batch['inputs'].shape == (16, 1024) and batch['inputs'].dtype == np.int32


def test_image_binary_errors_name_the_file(tmp_path):
    with pytest.raises(data.DataFormatError, match='data_batch_1.bin: 100 bytes'):
        image.parse_binary(b'\0' * 100, 'data_batch_1.bin')
    folder = tmp_path / image.BATCH_DIR
    folder.mkdir()
    (folder / 'data_batch_1.bin').write_bytes(b'\0' * image.RECORD_BYTES)
    with pytest.raises(data.DataFormatError, match='lacks data_batch_2.bin'):
        data.load_task(tiny_config('image', data_dir=str(tmp_path)))


@pytest.mark.parametrize('pixel0_is_padding', [True, False])
def test_image_tfds_mock_data(pixel0_is_padding):
    tfds = pytest.importorskip('tensorflow_datasets')
    config = tiny_config('image', **{'data.image_pixel0_is_padding': pixel0_is_padding})
    with tfds.testing.mock_data(num_examples=5):
        task = data.load_task(config)
        expected = {}
        for split, spec in image.TFDS_SPLITS.items():
            source = tfds.data_source('cifar10', split=spec)
            records = [source[i] for i in range(len(source))]
            expected[split] = (np.stack([r['image'] for r in records]),
                               np.array([int(r['label']) for r in records]))
    _check_image_arrays(task, expected, pixel0_is_padding)


def _check_image_arrays(task, expected, pixel0_is_padding):
    shift = 0 if pixel0_is_padding else 1
    assert task.info.vocab_size == (256 if pixel0_is_padding else 257)
    for split, (images, labels) in expected.items():
        arrays = task.splits[split]
        assert arrays['inputs'].shape == (len(images), 1024)
        assert arrays['targets'].dtype == np.int32
        assert arrays['targets'].tolist() == labels.tolist()
        want = _numpy_grayscale(images).reshape(len(images), 1024) + shift  # row-major pixels
        np.testing.assert_array_equal(arrays['inputs'], want)
        assert arrays['inputs'].max() < task.info.vocab_size


# ---------------------------------------------------------------------------------------------
# Missing data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('task,needles', [
    ('text', [text.ARCHIVE_URL, text.ARCHIVE, 'aclImdb/', "'imdb_reviews'"]),
    ('image', [image.ARCHIVE_URL, image.ARCHIVE, 'cifar-10-batches-bin/', "'cifar10'"]),
    ('retrieval', [common.LRA_RELEASE_URL, 'new_aan_pairs.train.tsv', 'tsv_data/']),
])
def test_missing_data_says_what_to_download_and_where(tmp_path, task, needles):
    with pytest.raises(data.DataNotFoundError) as e:
        data.load_task(tiny_config(task, data_dir=str(tmp_path)))
    message = str(e.value)
    for needle in [*needles, f'--config.data_dir={tmp_path}']:
        assert needle in message, (needle, message)


def test_missing_retrieval_without_data_dir_says_so():
    with pytest.raises(data.DataNotFoundError, match='no data_dir is set'):
        data.load_task(tiny_config('retrieval'))


# ---------------------------------------------------------------------------------------------
# Task metadata, synthetic data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('task,vocab,pairs', [('listops', 17, False), ('text', 257, False),
                                              ('retrieval', 257, True), ('image', 256, False)])
def test_task_info_of_the_lra_tasks(task, vocab, pairs):
    config = tiny_config(task)
    info = data.task_info(config)
    assert (info.name, info.seq_len) == (task, config.max_length)
    assert (info.vocab_size, info.pair_inputs) == (vocab, pairs)


@pytest.mark.parametrize('task', list(data.REGISTRY))
def test_synthetic_splits_of_every_task(task):
    config = tiny_config(task, 'synthetic')
    info = data.task_info(config)
    loaded = data.load_task(config)
    assert loaded.info == info
    n = config.data.synthetic_examples
    for split, size in (('train', n), ('validation', n // 4), ('test', n // 4)):
        arrays = loaded.splits[split]
        assert set(arrays) == {*info.input_keys, 'targets'}
        for key in info.input_keys:
            assert arrays[key].shape == (size, info.seq_len)
            assert arrays[key].max() < info.vocab_size
            if data.REGISTRY[task].full_length_inputs:
                assert (arrays[key] > 0).all()
        assert arrays['targets'].shape == (size,)
        assert 0 <= arrays['targets'].min() and arrays['targets'].max() < info.num_classes
    again = data.load_task(config)
    for key in info.input_keys:
        np.testing.assert_array_equal(loaded.splits['train'][key], again.splits['train'][key])


def test_task_info_image_pixel0_option():
    config = tiny_config('image', **{'data.image_pixel0_is_padding': False})
    assert data.task_info(config).vocab_size == 257


# ---------------------------------------------------------------------------------------------
# Task registry
# ---------------------------------------------------------------------------------------------


def test_registry_order_names_and_lookup():
    assert list(data.REGISTRY)[:4] == ['listops', 'text', 'retrieval', 'image']
    assert config_lib.TASKS == tuple(data.REGISTRY)
    for name, task in data.REGISTRY.items():
        assert task.name == name and data.get_task(name) is task
        assert task.num_classes >= 2 and task.max_length_limit > 0
    with pytest.raises(data.ConfigError, match='registered tasks are listops, text'):
        data.get_task('pathfinder')


@pytest.mark.parametrize('task', list(data.REGISTRY))
def test_task_fields_are_only_in_their_own_config(task):
    """A task's declared fields are in its config with their defaults, and in no other config."""
    config = config_lib.load(f'configs/{task}.py')
    mine = {field.name for field in data.REGISTRY[task].fields}
    for field in data.REGISTRY[task].fields:
        assert field.doc and field.name.startswith('data.')
        assert config.data[field.name.split('.')[1]] == field.default
    for other in data.REGISTRY.values():
        for field in other.fields:
            if field.name not in mine:
                assert field.name.split('.')[1] not in config.data, (task, field.name)


def _fail_if_called(*args, **kwargs):
    raise AssertionError('data was touched before validation')


@pytest.mark.parametrize('task', list(data.REGISTRY))
def test_max_length_beyond_the_task_bound_is_refused_before_any_data(task, monkeypatch):
    limit = data.REGISTRY[task].max_length_limit
    config = tiny_config(task, 'synthetic', max_length=limit + 1)
    monkeypatch.setattr(data, 'synthetic_splits', _fail_if_called)
    for check in (config_lib.validate, data.load_task):
        with pytest.raises(data.ConfigError,
                           match=rf'config\.max_length={limit + 1} .* at most {limit} for task '):
            check(config)


TOY_TASK = '''
"""A toy task: a sequence's class is its token sum mod 3 (declared by a test)."""
import numpy as np

from lra_sparse.data import common
from lra_sparse.errors import check


def load(config, info):
    rng = np.random.default_rng(config.data.toy_seed)
    splits = {}
    for name, n in (('train', 24), ('validation', 8), ('test', 8)):
        inputs = rng.integers(1, info.vocab_size, (n, info.seq_len)).astype(np.uint16)
        splits[name] = {'inputs': inputs, 'targets': (inputs.sum(1) % 3).astype(np.int32)}
    return splits


def validate(config):
    check(config.data.toy_vocab >= 2, 'data.toy_vocab', config.data.toy_vocab, 'at least 2')


TASK = common.Task(
    name='toy', num_classes=3, vocab_size=lambda config: config.data.toy_vocab, load=load,
    max_length_limit=64, max_length_note='a toy',
    fields=(common.TaskField('data.toy_vocab', 11, 'token ids are 1..toy_vocab-1'),
            common.TaskField('data.toy_seed', 5, 'seed of the toy data')),
    validate=validate)
'''

TOY_CONFIG = '''
"""Toy task config."""
from lra_sparse import config_lib

REFERENCE = {'max_length': 32, 'num_train_steps': 10, 'eval_every_steps': 5,
             'model.emb_dim': 16, 'model.qkv_dim': 16, 'model.mlp_dim': 32,
             'model.num_heads': 2, 'model.num_layers': 1}
TINY = {'max_length': 16, 'batch_size': 4}


def get_config(arg=None):
    return config_lib.make_config('toy', REFERENCE, TINY, arg)
'''


def _import_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_task_declared_in_one_module_works_end_to_end(tmp_path, monkeypatch):
    """One data module plus one config file: config, validation, metadata, data, batches, model."""
    (tmp_path / 'toy_task.py').write_text(TOY_TASK)
    (tmp_path / 'toy.py').write_text(TOY_CONFIG)
    toy = _import_file(tmp_path / 'toy_task.py', 'toy_task').TASK
    monkeypatch.setattr(data, 'REGISTRY', types.MappingProxyType({**data.REGISTRY, 'toy': toy}))

    config = config_lib.load(f'{tmp_path / "toy.py"}:tiny,attention=dsa')
    assert (config.task, config.max_length, config.data.toy_vocab) == ('toy', 16, 11)
    assert 'listops_max_depth' not in config.data  # other tasks' fields stay out
    config_lib.validate(config)
    info = data.task_info(config)
    assert info == common.TaskInfo('toy', 3, 16, 11, False)
    task = data.load_task(config)
    assert task.info == info
    inputs = task.splits['train']['inputs']
    assert inputs.shape == (24, 16) and inputs.max() < 11
    np.testing.assert_array_equal(task.splits['train']['targets'], inputs.sum(1) % 3)
    batch = next(data.train_batches(task.splits['train'], 4, seed=0))
    logits, _ = transformer.build_model(config, info)(batch)
    assert logits.shape == (4, 3)
    config.data.source = 'synthetic'
    synthetic = data.load_task(config).splits['train']['inputs']
    assert synthetic.shape == (config.data.synthetic_examples, 16)

    # The task's own fields: its vocabulary follows them, its validator guards them.
    config.data.toy_vocab = 5
    assert data.task_info(config).vocab_size == 5
    config.data.toy_vocab = 1
    for check in (config_lib.validate, data.load_task):
        with pytest.raises(data.ConfigError, match=r'config\.data\.toy_vocab=1 .* at least 2'):
            check(config)
    config = config_lib.load(f'{tmp_path / "toy.py"}:tiny')
    config.max_length = 65
    with pytest.raises(data.ConfigError, match=r'at most 64 for task toy \(a toy\)'):
        config_lib.validate(config)


# ---------------------------------------------------------------------------------------------
# Batch iterators
# ---------------------------------------------------------------------------------------------


def _split(n=23, length=5, pairs=False):
    """Example i holds the id i + 1 everywhere, so a batch row tells which example it is."""
    rows = np.repeat(np.arange(1, n + 1, dtype=np.uint16)[:, None], length, axis=1)
    split = {'inputs1': rows, 'inputs2': rows * 2} if pairs else {'inputs': rows}
    split['targets'] = (np.arange(n) % 3).astype(np.int32)
    return split


def _ids(batch):
    key = 'inputs1' if 'inputs1' in batch else 'inputs'
    return (batch[key][:, 0] - 1).tolist()


def test_train_batches_are_a_pure_function_of_seed_and_step():
    split = _split()
    run = list(itertools.islice(data.train_batches(split, 8, seed=3), 10))
    again = list(itertools.islice(data.train_batches(split, 8, seed=3), 10))
    resumed = list(itertools.islice(data.train_batches(split, 8, seed=3, start_step=4), 6))
    other = list(itertools.islice(data.train_batches(split, 8, seed=4), 10))
    for a, b in zip(run, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(run[4:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert [_ids(b) for b in run] != [_ids(b) for b in other]
    for batch in run:
        assert batch['inputs'].shape == (8, 5) and batch['inputs'].dtype == np.int32
        assert batch['targets'].dtype == np.int32 and batch['weights'].dtype == np.float32
        assert (batch['weights'] == 1).all()
        np.testing.assert_array_equal(batch['targets'], np.array(_ids(batch)) % 3)
    # The stream is a sequence of epochs: each run of 23 positions is a permutation.
    stream = sum((_ids(b) for b in run), [])
    for epoch in range(3):
        assert sorted(stream[epoch * 23:(epoch + 1) * 23]) == list(range(23))
    assert stream[:23] != stream[23:46]
    for step in range(10):
        assert _ids(run[step]) == data.step_indices(23, 8, 3, step).tolist()


def test_train_batches_with_pairs_keep_the_documents_together():
    batch = next(data.train_batches(_split(pairs=True), 8, seed=0))
    assert set(batch) == {'inputs1', 'inputs2', 'targets', 'weights'}
    np.testing.assert_array_equal(batch['inputs2'], batch['inputs1'] * 2)


@pytest.mark.parametrize('n,batch_size', [(23, 8), (16, 8), (3, 8)])
def test_eval_batches_cover_every_example_once(n, batch_size):
    split = _split(n)
    batches = list(data.eval_batches(split, batch_size))
    assert len(batches) == -(-n // batch_size)
    ids, weights = [], []
    for batch in batches:
        assert batch['inputs'].shape == (batch_size, 5) and batch['inputs'].dtype == np.int32
        assert batch['weights'].dtype == np.float32
        ids += _ids(batch)
        weights += batch['weights'].tolist()
    weights = np.array(weights)
    assert weights.sum() == n
    assert np.array(ids)[weights == 1].tolist() == list(range(n))  # in order, once
    assert (weights[n:] == 0).all() and all(i == 0 for i in ids[n:])  # padding: copies of 0


def test_process_slices_partition_the_global_batch():
    split = _split()
    glob_train = list(itertools.islice(data.train_batches(split, 8, seed=1), 5))
    glob_eval = list(data.eval_batches(split, 8))
    for count in (2, 4):
        parts_train = [list(itertools.islice(
            data.train_batches(split, 8, seed=1, process_index=i, process_count=count), 5))
            for i in range(count)]
        parts_eval = [list(data.eval_batches(split, 8, process_index=i, process_count=count))
                      for i in range(count)]
        for globs, parts in ((glob_train, parts_train), (glob_eval, parts_eval)):
            for step, glob in enumerate(globs):
                for key in glob:
                    local = [p[step][key] for p in parts]
                    assert all(len(x) == 8 // count for x in local)
                    np.testing.assert_array_equal(np.concatenate(local), glob[key])
    with pytest.raises(ValueError, match='not divisible'):
        next(data.train_batches(split, 8, seed=0, process_index=0, process_count=3))
    with pytest.raises(ValueError, match='not divisible'):
        next(data.eval_batches(split, 8, process_index=0, process_count=3))
