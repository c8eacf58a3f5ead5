"""ListOps: a generator faithful to LRA's ``data/listops.py``, an evaluator, the TSV files.

Generation (as the reference): a tree is drawn from depth 1; at depth < ``max_depth`` a node is an
operator with probability ``VALUE_P = 0.25`` (else a value 0-9), and an operator takes
``randint(2, max_args)`` children, then draws its operator from MIN, MAX, MED, SM. A tree's length
counts 1 per value and 2 per operator (its token and ``]``), which is its token count; it is kept
when ``min_length < length < max_length``. MED is ``int(np.median(values))`` (the floor of the
mean of the two middle values for an even count), SM is the sum mod 10.

Differences from the reference, none of which changes the distribution of kept trees:

* Determinism. The reference keeps unique trees in a Python ``set`` and splits them in set
  iteration order. Here the work is cut into chunks of ``CHUNK_SIZE`` kept trees; chunk ``c`` is
  drawn by its own ``random.Random`` seeded from (seed, generator parameters, c), the chunks are
  concatenated in order, duplicates are dropped keeping the first occurrence, and the first
  ``num_train`` / ``num_val`` / ``num_test`` unique trees form the splits. The result is a pure
  function of the seed and parameters, whatever the number of worker processes or the hash seed.
* Speed. A tree is abandoned as soon as its running length reaches ``max_length`` (it would be
  rejected anyway; draws are independent, so the kept trees are distributed as before).

Tokenisation (as the reference input pipeline): ``]`` becomes ``X``, parentheses are removed, the
rest is split on whitespace. The vocabulary is fixed and sorted (never built from a set, see
LRA.md §2.1): pad = 0, then ``VOCAB`` = ``0 1 ... 9 X [MAX [MED [MIN [SM`` (ids 1-15, ASCII order),
then OOV = 16, so ``VOCAB_SIZE = 17``.

Data (:func:`load`): the LRA release ``basic_{train,val,test}.tsv`` when ``config.data_dir`` (or
its ``listops-1000/``) holds them, else trees generated with the ``data.listops_*`` fields and
cached. :data:`TASK` declares the task and those fields.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import multiprocessing
import os
import random
import time

import numpy as np

from lra_sparse.data import common
from lra_sparse.errors import DataFormatError, DataNotFoundError, check, config_error

MIN = '[MIN'
MAX = '[MAX'
MED = '[MED'
SUM_MOD = '[SM'
END = ']'
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUES = range(10)
VALUE_P = 0.25

# Fixed, sorted vocabulary: ids 1..15 in this order; 0 is padding, 16 is OOV.
VOCAB = ('0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'X', '[MAX', '[MED', '[MIN', '[SM')
TOKEN_IDS = {token: i + 1 for i, token in enumerate(VOCAB)}
OOV_ID = len(VOCAB) + 1
VOCAB_SIZE = len(VOCAB) + 2
NUM_CLASSES = 10

CHUNK_SIZE = 500  # kept trees per deterministic generation chunk (part of the cache key)
GENERATOR_VERSION = 1  # bump when generation changes; part of the cache folder name
RELEASE_FILES = {'train': 'basic_train.tsv', 'validation': 'basic_val.tsv',
                 'test': 'basic_test.tsv'}
HEADER = 'Source\tTarget'

_log = logging.getLogger(__name__)


class _TooLong(Exception):
    """Raised inside generation once a tree's length reaches max_length."""


def _apply(op: str, values: list[int]) -> int:
    """Value of ``op`` on ``values`` (reference semantics)."""
    if op == MIN:
        return min(values)
    if op == MAX:
        return max(values)
    if op == MED:
        ordered = sorted(values)
        mid = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[mid]
        return (ordered[mid - 1] + ordered[mid]) // 2  # == int(np.median(values)) for values >= 0
    if op == SUM_MOD:
        return sum(values) % 10
    raise ValueError(f'unknown ListOps operator {op!r}')


def generate_tree(rng: random.Random, max_depth: int, max_args: int,
                  max_length: int | None = None) -> tuple[str, int, int] | None:
    """Draws one tree as the reference ``generate_tree(1, max_depth, max_args)`` does.

    Args:
      rng: the random stream.
      max_depth: maximum depth (the root is depth 1; nodes at ``max_depth`` are values).
      max_args: maximum children of an operator (at least 2).
      max_length: abandon the tree (return None) once its length reaches this.

    Returns:
      (fully parenthesised string, value, length), or None if abandoned.
    """
    length = 0
    limit = max_length if max_length is not None else float('inf')
    random_, choice, randint = rng.random, rng.choice, rng.randint

    def node(depth: int) -> tuple[str, int]:
        nonlocal length
        if depth >= max_depth or random_() > VALUE_P:
            value = choice(VALUES)
            length += 1
            if length >= limit:
                raise _TooLong
            return str(value), value
        length += 2
        if length >= limit:
            raise _TooLong
        num_values = randint(2, max_args)
        children = [node(depth + 1) for _ in range(num_values)]
        op = choice(OPERATORS)
        # The reference nests ((((op, c0), c1), ...), END) and prints '( left right )'.
        text = ('( ' * (num_values + 1) + op + ' '
                + ' ) '.join(c[0] for c in children) + ' ) ] )')
        return text, _apply(op, [c[1] for c in children])

    try:
        text, value = node(1)
    except _TooLong:
        return None
    return text, value, length


def evaluate(expr: str) -> int:
    """Value of a ListOps expression in the reference string form (parenthesised or not).

    Args:
      expr: e.g. ``'( ( ( [MAX 2 ) 9 ) ] )'`` or ``'[MAX 2 9 ]'``.

    Returns:
      The value, an int in 0-9 (MED = int(np.median), SM = sum mod 10).
    """
    stack: list[tuple[str, list[int]]] = []
    result = None
    for token in expr.replace('(', ' ').replace(')', ' ').split():
        if token in OPERATORS:
            stack.append((token, []))
        elif token == END:
            if not stack:
                raise ValueError(f'unbalanced "]" in ListOps expression {expr[:80]!r}')
            op, values = stack.pop()
            if not values:
                raise ValueError(f'operator {op} without arguments in {expr[:80]!r}')
            value = _apply(op, values)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif token.isdigit() and len(token) == 1:
            if stack:
                stack[-1][1].append(int(token))
            else:
                result = int(token)
        else:
            raise ValueError(f'unknown token {token!r} in ListOps expression {expr[:80]!r}')
    if stack or result is None:
        raise ValueError(f'incomplete ListOps expression {expr[:80]!r}')
    return result


def tokenize(expr: str) -> list[str]:
    """Reference preprocessing: ``]`` -> ``X``, parentheses removed, whitespace split."""
    return expr.replace(']', 'X').replace('(', '').replace(')', '').split()


def encode(expr: str) -> list[int]:
    """Token ids of an expression with the fixed vocabulary (unknown tokens -> OOV_ID)."""
    return [TOKEN_IDS.get(t, OOV_ID) for t in tokenize(expr)]


# Fast path of encode_many: every token becomes one character, mapped by a 256-entry table.
_SINGLE_CHAR = {'[MAX': 'a', '[MED': 'b', '[MIN': 'c', '[SM': 'd'}
_LUT = np.full(256, OOV_ID, np.uint8)
for _tok, _id in TOKEN_IDS.items():
    _LUT[ord(_SINGLE_CHAR.get(_tok, _tok))] = _id


def encode_many(exprs: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodes expressions into a padded id array.

    Args:
      exprs: N expressions.
      max_length: padded length; longer sequences are truncated (and counted).

    Returns:
      (ids uint8 [N, max_length] with 0 padding, true token counts int32 [N]).
    """
    out = np.zeros((len(exprs), max_length), np.uint8)
    lengths = np.zeros(len(exprs), np.int32)
    for i, expr in enumerate(exprs):
        s = expr.replace(']', 'X').replace('(', '').replace(')', '')
        # A literal placeholder character in the input would be taken for an operator.
        fast = not any(ch in s for ch in _SINGLE_CHAR.values())
        for tok, ch in _SINGLE_CHAR.items():
            s = s.replace(tok, ch)
        toks = s.split()
        joined = ''.join(toks)
        if fast and len(joined) == len(toks) and joined.isascii():
            ids = _LUT[np.frombuffer(joined.encode('ascii'), np.uint8)]
        else:  # some token is not in the vocabulary: the exact slow path
            ids = np.asarray(encode(expr), np.uint8)
        lengths[i] = len(ids)
        ids = ids[:max_length]
        out[i, :len(ids)] = ids
    return out, lengths


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _chunk_seed(seed: int, params: tuple, chunk: int) -> int:
    key = f'lra_sparse/listops/v{GENERATOR_VERSION}/{seed}/{params}/{chunk}'.encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:16], 'big')


def _generate_chunk(args: tuple) -> list[tuple[str, int]]:
    """``CHUNK_SIZE`` kept trees of chunk ``chunk``: a pure function of its arguments."""
    seed, params, chunk = args
    min_length, max_length, max_depth, max_args = params
    rng = random.Random(_chunk_seed(seed, params, chunk))
    kept = []
    while len(kept) < CHUNK_SIZE:
        tree = generate_tree(rng, max_depth, max_args, max_length)
        if tree is not None and tree[2] > min_length:
            kept.append((tree[0], tree[1]))
    return kept


_BROKEN_POOL = (
    'ListOps generation: the worker processes died before finishing. If this was called from a '
    "script, put the call under `if __name__ == '__main__':` (worker processes are started with "
    "'spawn' and import the script again); otherwise the worker's own error is printed above.")


def _num_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def generate(num_train: int, num_val: int, num_test: int, *, min_length: int = 500,
             max_length: int = 2000, max_depth: int = 10, max_args: int = 10, seed: int = 0,
             workers: int | None = None,
             progress: bool = True) -> dict[str, list[tuple[str, int]]]:
    """Generates the three ListOps splits (unique trees, deterministic for the arguments).

    Args:
      num_train: train examples.
      num_val: validation examples.
      num_test: test examples.
      min_length: trees are kept if ``min_length < length < max_length``.
      max_length: see ``min_length``.
      max_depth: maximum tree depth.
      max_args: maximum children per operator.
      seed: generation seed.
      workers: processes (None: all available cores; work below ~20k examples stays in-process).
        The result does not depend on it.
      progress: show a tqdm progress bar.

    Returns:
      {'train' | 'validation' | 'test': [(source string, target), ...]}.
    """
    if max_args < 2 or max_depth < 1:
        raise ValueError(f'need max_args >= 2 and max_depth >= 1, got {max_args}, {max_depth}')
    if max_length - min_length < 2:
        raise ValueError(f'no length fits min_length={min_length} < length < {max_length}')
    import tqdm  # noqa: PLC0415  (light, but only needed here)

    params = (min_length, max_length, max_depth, max_args)
    total = num_train + num_val + num_test
    workers = workers or _num_workers()
    if total < 20000 and min_length < 200:
        workers = 1
    seen: set[str] = set()
    examples: list[tuple[str, int]] = []
    next_chunk = 0
    bar = tqdm.tqdm(total=total, disable=not progress, desc='generating ListOps', unit='ex',
                    leave=False)
    pool_ctx = (concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn')) if workers > 1
        else contextlib.nullcontext())
    with pool_ctx as pool, bar:
        while len(examples) < total:
            needed = -(-(total - len(examples)) // CHUNK_SIZE)
            chunks = [(seed, params, c) for c in range(next_chunk, next_chunk + needed)]
            next_chunk += needed
            results = pool.map(_generate_chunk, chunks) if pool else map(_generate_chunk, chunks)
            try:
                for kept in results:
                    for source, target in kept:
                        if len(examples) < total and source not in seen:
                            seen.add(source)
                            examples.append((source, target))
                            bar.update(1)
            except concurrent.futures.process.BrokenProcessPool as e:
                raise RuntimeError(_BROKEN_POOL) from e
    return {'train': examples[:num_train],
            'validation': examples[num_train:num_train + num_val],
            'test': examples[num_train + num_val:total]}


# ---------------------------------------------------------------------------------------------
# TSV files
# ---------------------------------------------------------------------------------------------


def write_tsv(path: str, examples: list[tuple[str, int]]) -> None:
    r"""Writes ``Source\tTarget`` with a header, as the reference (no quoting is ever needed)."""
    with open(path, 'w', encoding='utf-8', newline='\n') as f:
        f.write(HEADER + '\n')
        for source, target in examples:
            f.write(f'{source}\t{target}\n')


def read_tsv(path: str, fix: str = '') -> tuple[list[str], np.ndarray]:
    r"""Reads a ``Source\tTarget`` TSV (header required; ``\r\n`` line ends accepted).

    Args:
      path: the file.
      fix: how to get an intact file (ends every error message), e.g. what to re-download.

    Returns:
      (N source strings, targets int32 [N]), N >= 1.

    Raises:
      DataFormatError: naming the file and line of a malformed line (a wrong header or field
        count, a bad target, bytes that are not UTF-8), or the file holds no example.
    """
    suffix = f'; {fix}' if fix else ''
    sources, targets = [], []
    lineno = 0
    with open(path, 'rb') as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode('utf-8').rstrip('\r\n')
            except UnicodeDecodeError as e:
                raise DataFormatError(
                    f'{path}, line {lineno}: byte {raw[e.start]:#04x} at column {e.start + 1} is '
                    f'not UTF-8 text{suffix}') from None
            if lineno == 1:
                if line != HEADER:
                    raise DataFormatError(f'{path}, line 1: expected the header {HEADER!r}, found '
                                          f'{line[:80]!r}{suffix}')
                continue
            if not line:
                continue
            fields = line.split('\t')
            try:
                if len(fields) != 2:
                    raise ValueError(f'expected 2 tab-separated fields, found {len(fields)}')
                target = int(fields[1])
                if not 0 <= target < NUM_CLASSES:
                    raise ValueError(f'target {target} is not in 0-9')
            except ValueError as e:
                raise DataFormatError(
                    f'{path}, line {lineno}: {e}: {line[:80]!r}{suffix}') from None
            sources.append(fields[0])
            targets.append(target)
    if not sources:
        found = 'is empty' if lineno == 0 else 'holds only the header, no example'
        raise DataFormatError(f'{path} {found}{suffix}')
    return sources, np.asarray(targets, np.int32)


def cache_folder(config) -> str:
    """The cache folder of the generated TSVs; its name encodes every generator parameter."""
    d = config.data
    name = (f'listops_v{GENERATOR_VERSION}_n{d.listops_num_train}-{d.listops_num_val}-'
            f'{d.listops_num_test}_len{d.listops_min_length}-{d.listops_max_length}_'
            f'depth{d.listops_max_depth}_args{d.listops_max_args}_chunk{CHUNK_SIZE}_'
            f'seed{generation_seed(config)}')
    return os.path.join(common.cache_root(config), 'listops', name)


def generation_seed(config) -> int:
    """Seed of the generated dataset: ``config.data.listops_seed`` if present, else 0.

    It is deliberately not ``config.seed``: like the LRA release, one fixed dataset is shared by
    every training seed, so runs that differ in seed differ only in init and data order.
    """
    return int(config.data.get('listops_seed', 0) or 0)


def release_folder(config) -> str | None:
    """``config.data_dir`` (or its ``listops-1000/`` subfolder) if it holds ``basic_*.tsv``.

    Returns None when no ``data_dir`` is set, or when it exists but holds none of the two layouts:
    ListOps is then generated locally (into the cache), exactly as without a ``data_dir``, since
    one ``data_dir`` may serve several tasks.

    Raises:
      DataNotFoundError: ``config.data_dir`` is set but does not exist (a mistyped path would
        otherwise silently train on generated data).
    """
    root = common.data_dir(config)
    if not root:
        return None
    if not os.path.isdir(root):
        raise DataNotFoundError(
            f'config.data_dir={config.data_dir!r} does not exist: point it at the folder that '
            f'holds the LRA release listops-1000/ (or its {", ".join(RELEASE_FILES.values())}), '
            'or leave it unset to generate ListOps locally.')
    for folder in (root, os.path.join(root, 'listops-1000')):
        if all(os.path.isfile(os.path.join(folder, f)) for f in RELEASE_FILES.values()):
            return folder
    return None


def ensure_generated(config, progress: bool = True) -> str:
    """Generates the TSVs into the cache unless present; returns their folder."""
    folder = cache_folder(config)
    if all(os.path.isfile(os.path.join(folder, f)) for f in RELEASE_FILES.values()):
        return folder
    d = config.data
    t0 = time.perf_counter()
    splits = generate(d.listops_num_train, d.listops_num_val, d.listops_num_test,
                      min_length=d.listops_min_length, max_length=d.listops_max_length,
                      max_depth=d.listops_max_depth, max_args=d.listops_max_args,
                      seed=generation_seed(config), progress=progress)

    def write(tmp_dir: str) -> None:
        for split, filename in RELEASE_FILES.items():
            write_tsv(os.path.join(tmp_dir, filename), splits[split])

    common.atomic_write_dir(folder, write)
    _log.info('generated ListOps in %.1fs into %s', time.perf_counter() - t0, folder)
    return folder


def load(config, info: common.TaskInfo) -> dict[str, dict[str, np.ndarray]]:
    """The three splits: release TSVs from ``config.data_dir`` if there, else generated (cached).

    Returns:
      {'train' | 'validation' | 'test': {'inputs': uint8 [N, seq_len], 'targets': int32 [N]}}.

    Raises:
      ConfigError: generated expressions would be longer than ``max_length``.
      DataNotFoundError: ``config.data_dir`` is set but does not exist.
      DataFormatError: a TSV is malformed (file and line named, with what to re-download or
        delete).
    """
    folder = release_folder(config)
    if folder is None:
        longest = config.data.listops_max_length - 1
        if longest > info.seq_len:
            raise config_error('data.listops_max_length', config.data.listops_max_length,
                               f'at most config.max_length+1={info.seq_len + 1}: generated '
                               f'expressions have up to {longest} tokens and would be truncated; '
                               'raise config.max_length or lower data.listops_max_length')
        folder = ensure_generated(config)
        fix = f'delete {folder} to generate it again'
    else:
        fix = f're-download {common.LRA_RELEASE_URL} and extract its listops-1000/ files again'
    splits = {}
    for split, filename in RELEASE_FILES.items():
        path = os.path.join(folder, filename)
        sources, targets = read_tsv(path, fix)
        inputs, lengths = encode_many(sources, info.seq_len)
        truncated = int((lengths > info.seq_len).sum())
        if truncated:
            _log.warning('%s: %d of %d expressions are longer than config.max_length=%d and were '
                         'truncated (longest %d tokens)', path, truncated, len(sources),
                         info.seq_len, int(lengths.max()))
        splits[split] = {'inputs': inputs, 'targets': targets}
    return splits


# ---------------------------------------------------------------------------------------------
# Task declaration
# ---------------------------------------------------------------------------------------------


def longest_tree(max_depth: int, max_args: int, cap: int) -> int:
    """Token count of the longest tree the generator can draw, or ``cap`` if that is more.

    Every node above ``max_depth`` an operator with ``max_args`` children: ``L(max_depth) = 1``,
    ``L(d) = 2 + max_args * L(d + 1)``, the root at depth 1.
    """
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
        if length >= cap:
            return cap
    return length


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(config) -> None:
    """ListOps' own fields, when data is generated or read (``data.source='real'``).

    Raises:
      ConfigError: a count is not positive, depth < 1, arguments < 2, or the lengths admit no
        tree (``min_length < length < max_length`` within the depth and argument limits) or
        exceed the positional table.
    """
    if config.data.source != 'real':
        return
    d = config.data
    for name in ('listops_num_train', 'listops_num_val', 'listops_num_test'):
        check(_is_int(d[name]) and d[name] > 0, f'data.{name}', d[name], 'a positive integer')
    check(_is_int(d.listops_max_depth) and d.listops_max_depth >= 1, 'data.listops_max_depth',
          d.listops_max_depth, 'an integer >= 1 (the root is depth 1)')
    check(_is_int(d.listops_max_args) and d.listops_max_args >= 2, 'data.listops_max_args',
          d.listops_max_args, 'an integer >= 2 (an operator takes 2 to max_args arguments)')
    check(_is_int(d.listops_max_length) and d.listops_max_length <= config.max_length + 1,
          'data.listops_max_length', d.listops_max_length,
          f'at most config.max_length+1={config.max_length + 1} (the positional table); '
          'longer expressions would be truncated: raise config.max_length')
    check(_is_int(d.listops_min_length) and 0 <= d.listops_min_length <= d.listops_max_length - 2,
          'data.listops_min_length', d.listops_min_length,
          f'an integer in 0..{d.listops_max_length - 2} (kept trees have min_length < length < '
          f'data.listops_max_length={d.listops_max_length})')
    longest = longest_tree(d.listops_max_depth, d.listops_max_args, d.listops_max_length)
    check(d.listops_min_length < longest, 'data.listops_min_length', d.listops_min_length,
          f'below {longest}, the longest tree of data.listops_max_depth={d.listops_max_depth} and '
          f'data.listops_max_args={d.listops_max_args} (no tree could be kept)')


TASK = common.Task(
    name='listops',
    num_classes=NUM_CLASSES,
    vocab_size=VOCAB_SIZE,
    load=load,
    max_length_limit=16384,
    max_length_note='8x the LRA length 2000',
    fields=(
        common.TaskField('data.listops_num_train', 96000, 'generated ListOps train examples'),
        common.TaskField('data.listops_num_val', 2000, 'generated ListOps validation examples'),
        common.TaskField('data.listops_num_test', 2000, 'generated ListOps test examples'),
        common.TaskField('data.listops_min_length', 500,
                         'generated expressions are kept if min < length < max'),
        common.TaskField('data.listops_max_length', 2000, 'see listops_min_length'),
        common.TaskField('data.listops_max_depth', 10,
                         'maximum nesting depth of generated expressions'),
        common.TaskField('data.listops_max_args', 10, 'maximum arguments per operator'),
    ),
    validate=validate,
)
