"""Pallas kernels: one conformance suite for both kernels, helpers, selection, bad input, wiring.

The conformance suite runs every kernel against its jnp reference (forward output and dq/dk/dv)
over a small grid of shapes, dtypes, block sizes, densities, padding masks and random index lists,
in interpret mode on CPU; the ``gpu``-marked twins run the compiled Triton kernels and skip
without a GPU. Shapes stay tiny: interpret mode runs the grid sequentially and every new shape
compiles anew.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import _common
from pallas_kernels import block_sparse as bs
from pallas_kernels import nm_sparse as nm

ON_GPU = jax.default_backend() == 'gpu'
MODES = ['interpret', pytest.param('compiled', marks=pytest.mark.gpu)]
# Max error relative to the largest reference entry, by dtype (output; gradients).
TOL = {'float32': {'out': 2e-5, 'grad': 1e-4}, 'bfloat16': {'out': 2e-2, 'grad': 5e-2}}


@pytest.fixture(scope='module', autouse=True)
def fast_compile():
    """Interpret-mode kernels are XLA programs: skip most optimizations to compile faster."""
    old = jax.config.read('jax_disable_most_optimizations')
    jax.config.update('jax_disable_most_optimizations', True)
    yield
    jax.config.update('jax_disable_most_optimizations', old)


def interpret_flag(mode):
    if mode == 'compiled' and not ON_GPU:
        pytest.skip('compiled Pallas-Triton kernels need a GPU')
    return mode == 'interpret'


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    dtype: str
    batch: int
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    block_q: int
    block_k: int
    density: float  # block kernel: fraction of key blocks each list keeps
    pattern: tuple  # N:M kernel: (n, m)
    masks: str  # 'none' | 'keys' | 'both'
    shared_lists: bool  # block kernel: one list table for the whole batch (leading axis 1)


KERNELS = ['block_sparse', 'nm_sparse']
CASES = [
    Case('f32-masks-sparse', 'float32', 2, 128, 128, 2, 32, 32, 16, 0.4, (2, 4), 'both', False),
    Case('bf16-all-kept', 'bfloat16', 1, 64, 64, 2, 16, 16, 32, 1.0, (1, 2), 'none', False),
    Case('f32-cross-head24', 'float32', 2, 32, 128, 1, 24, 16, 32, 0.25, (2, 4), 'keys', True),
]


def qkv(rng, case):
    shapes = [(case.batch, case.q_len, case.heads, case.head_dim)] + [
        (case.batch, case.kv_len, case.heads, case.head_dim)] * 2
    return tuple(jnp.asarray(rng.normal(size=s), case.dtype) for s in shapes)


def padding_masks(rng, case):
    """(q_valid, k_valid): padded tails, random holes, a key block with no valid key."""
    if case.masks == 'none':
        return None, None
    k_valid = rng.random((case.batch, case.kv_len)) > 0.2
    k_valid[0, -7:] = False
    k_valid[-1, :case.block_k] = False  # a whole key block of padding
    q_valid = None
    if case.masks == 'both':
        q_valid = rng.random((case.batch, case.q_len)) > 0.1
        q_valid[0, -5:] = False
    return (None if q_valid is None else jnp.asarray(q_valid)), jnp.asarray(k_valid)


def random_lists(rng, case):
    """Random index lists: shuffled blocks, random counts, garbage in the unused slots."""
    nqb, nkb = case.q_len // case.block_q, case.kv_len // case.block_k
    lead = (1 if case.shared_lists else case.batch, case.heads, nqb)
    keep = max(1, round(case.density * nkb))
    idx = np.full((*lead, nkb), nkb + 7, np.int32)  # out of range: must be ignored
    cnt = np.zeros(lead, np.int32)
    for pos in np.ndindex(*lead):
        cnt[pos] = nkb if case.density == 1.0 else rng.integers(1, keep + 1)
        idx[pos][:cnt[pos]] = rng.permutation(nkb)[:cnt[pos]]
    if case.density < 1.0:
        cnt[0, 0, 0] = 0  # a query block with nothing kept
    return jnp.asarray(idx), jnp.asarray(cnt)


def kernel_pair(kernel, case, rng, interpret):
    """(kernel fn, reference fn, empty_rows) with every non-qkv argument bound."""
    q_valid, k_valid = padding_masks(rng, case)
    if kernel == 'block_sparse':
        idx, cnt = random_lists(rng, case)
        sizes = bs.BlockSizes(case.block_q, case.block_k)
        kw = dict(block_sizes=sizes)
        args = (idx, cnt, q_valid, k_valid)
        run = functools.partial(bs.block_sparse_attention, interpret=interpret)
        ref = bs.block_sparse_attention_reference
        empty = np.repeat(np.asarray(cnt) == 0, case.block_q, axis=-1)  # [B', H, Lq]
        empty = np.broadcast_to(np.moveaxis(empty, 1, 2), (case.batch, case.q_len, case.heads))
    else:
        n, m = case.pattern
        sizes = nm.BlockSizes(case.block_q, max(case.block_k, 16 * m))
        kw = dict(block_sizes=sizes, n=n, m=m)
        args = (q_valid, k_valid)
        run = functools.partial(nm.nm_sparse_attention, interpret=interpret)
        ref = nm.nm_sparse_attention_reference
        empty = np.zeros((case.batch, case.q_len, case.heads), bool)
    if q_valid is not None:
        empty = empty | ~np.asarray(q_valid)[:, :, None]

    def bind(fn):
        return lambda q, k, v: fn(q, k, v, *args, **kw)

    return bind(run), bind(ref), empty


@functools.partial(jax.jit, static_argnums=0)
def out_and_grads(fn, q, k, v, cot):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cot)


def assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f'{what}: not finite'
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err <= tol, f'{what}: max error {err:.2e} (relative to max |ref|) > {tol:.0e}'


# -- the conformance suite ----------------------------------------------------------------------
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('case', CASES, ids=lambda c: c.name)
@pytest.mark.parametrize('kernel', KERNELS)
def test_kernel_matches_reference(kernel, case, mode):
    interpret = interpret_flag(mode)
    rng = np.random.default_rng(10 * CASES.index(case) + KERNELS.index(kernel))
    q, k, v = qkv(rng, case)
    run, ref, empty = kernel_pair(kernel, case, rng, interpret)
    cot = jnp.asarray(rng.normal(size=q.shape), case.dtype)
    out, grads = out_and_grads(run, q, k, v, cot)
    want, want_grads = out_and_grads(ref, q, k, v, cot)
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = TOL[case.dtype]
    assert_close(out, want, tol['out'], 'output')
    for name, g, w, x in zip(('dq', 'dk', 'dv'), grads, want_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert_close(g, w, tol['grad'], name)
    # Padded query rows and query blocks with nothing kept give exact zeros, never NaN.
    out_np = np.asarray(out, np.float32)
    zero_rows = (np.asarray(want, np.float32) == 0).all(-1)  # [B, Lq, H]
    assert empty.any() == (case.masks == 'both' or kernel == 'block_sparse' and case.density < 1)
    assert zero_rows[empty].all() and (out_np[zero_rows] == 0).all()
    # Deterministic: a second run is bit-identical.
    out2, grads2 = out_and_grads(run, q, k, v, cot)
    np.testing.assert_array_equal(np.asarray(out2, np.float32), out_np)
    for g, g2 in zip(grads, grads2):
        np.testing.assert_array_equal(np.asarray(g2, np.float32), np.asarray(g, np.float32))


@pytest.mark.parametrize('mode', ['interpret', pytest.param('compiled', marks=pytest.mark.tpu)])
def test_block_sparse_tpu_lowering_matches_reference(mode):
    """The Mosaic TPU kernels (scalar-prefetched lists) in TPU interpret mode on CPU."""
    if mode == 'compiled' and jax.default_backend() != 'tpu':
        pytest.skip('compiled Mosaic kernels need a TPU')
    case = Case('tpu', 'float32', 2, 32, 64, 1, 16, 16, 16, 0.5, (2, 4), 'both', True)
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, case)
    idx, cnt = random_lists(rng, case)
    q_valid, k_valid = padding_masks(rng, case)
    sizes = bs.BlockSizes(case.block_q, case.block_k)

    def run(q, k, v):
        return bs.block_sparse_attention(q, k, v, idx, cnt, q_valid, k_valid, block_sizes=sizes,
                                         backend='tpu', interpret=mode == 'interpret')

    def ref(q, k, v):
        return bs.block_sparse_attention_reference(q, k, v, idx, cnt, q_valid, k_valid,
                                                   block_sizes=sizes)

    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    (out, grads), (want, want_grads) = (out_and_grads(f, q, k, v, cot) for f in (run, ref))
    assert_close(out, want, TOL['float32']['out'], 'output')
    for name, g, w in zip(('dq', 'dk', 'dv'), grads, want_grads):
        assert_close(g, w, TOL['float32']['grad'], name)
    assert (np.asarray(out)[0, :case.block_q] == 0).all()  # list (0, 0, 0) is empty


# -- index-list helpers -------------------------------------------------------------------------
def test_block_mask_to_indices_hand_checked():
    mask = jnp.asarray([[[[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]]]], bool)
    idx, cnt = bs.block_mask_to_indices(mask)
    assert idx.dtype == cnt.dtype == jnp.int32
    np.testing.assert_array_equal(cnt[0, 0], [2, 0, 4, 1])
    np.testing.assert_array_equal(idx[0, 0], [[0, 2, 2, 2], [0, 0, 0, 0], [0, 1, 2, 3],
                                              [3, 3, 3, 3]])
    idx, cnt = bs.block_mask_to_indices(mask, max_blocks=2)  # truncates to the first two
    np.testing.assert_array_equal(cnt[0, 0], [2, 0, 2, 1])
    np.testing.assert_array_equal(idx[0, 0], [[0, 2], [0, 0], [0, 1], [3, 3]])
    idx, cnt = bs.block_mask_to_indices(mask, max_blocks=6)  # more slots than blocks
    np.testing.assert_array_equal(idx[0, 0, 2], [0, 1, 2, 3, 3, 3])
    # Round trip, and clamping of out-of-range values in the mask builder.
    np.testing.assert_array_equal(bs.indices_to_block_mask(*bs.block_mask_to_indices(mask), 4),
                                  mask)
    rebuilt = bs.indices_to_block_mask(jnp.asarray([[9, -3, 1]]), jnp.asarray([5]), 4)
    np.testing.assert_array_equal(rebuilt, [[True, True, False, True]])


def test_block_mask_to_indices_random_round_trip():
    rng = np.random.default_rng(0)
    mask = rng.random((2, 3, 5, 7)) < 0.3
    idx, cnt = bs.block_mask_to_indices(jnp.asarray(mask))
    np.testing.assert_array_equal(cnt, mask.sum(-1))
    for pos in np.ndindex(*mask.shape[:3]):
        np.testing.assert_array_equal(np.asarray(idx[pos])[:cnt[pos]], np.flatnonzero(mask[pos]))
    np.testing.assert_array_equal(bs.indices_to_block_mask(idx, cnt, 7), mask)


# -- N:M selection --------------------------------------------------------------------------------
@pytest.mark.parametrize('n,m', [(1, 2), (2, 4)])
def test_nm_selection_equals_dfss_nm_keep(n, m):
    from lra_sparse.attention import dfss

    rng = np.random.default_rng(n)
    scores = rng.normal(size=(2, 3, 8, 32)).astype(np.float32)
    scores[0, 0, 0, :8] = 0.5  # ties: lowest index wins
    scores[1, 2, 3, 4:8] = np.array([1.0, 2.0, 2.0, 1.0])
    valid = rng.random((2, 1, 8, 32)) > 0.3
    valid[0, 0, 1] = False  # a padded query row
    got = nm.nm_keep_mask(jnp.asarray(scores), jnp.asarray(valid), n, m)
    want = dfss.nm_keep(jnp.asarray(scores), jnp.asarray(valid), n, m)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(nm.nm_keep_mask(jnp.asarray(scores), None, n, m),
                                  dfss.nm_keep(jnp.asarray(scores), jnp.ones((), bool), n, m))


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('n,m', [(1, 2), (2, 4)])
def test_nm_kernel_selection_equals_dfss_nm_keep(n, m, mode):
    """With V = identity the kernel outputs its probability rows: their support is the selection."""
    from lra_sparse.attention import dfss

    interpret = interpret_flag(mode)
    rng = np.random.default_rng(10 + m)
    b, length, h = 2, 64, 1
    q = rng.normal(size=(b, length, h, length)).astype(np.float32) * 0.2
    k = rng.normal(size=(b, length, h, length)).astype(np.float32) * 0.2
    k[:, 1::m] = k[:, 0::m]  # exact score ties inside every group
    eye = np.broadcast_to(np.eye(length, dtype=np.float32)[None, :, None], (b, length, h, length))
    q_valid = np.arange(length)[None] < np.array([[length], [length - 9]])
    k_valid = rng.random((b, length)) > 0.25
    probs = nm.nm_sparse_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(eye), jnp.asarray(q_valid),
        jnp.asarray(k_valid), n=n, m=m, block_sizes=nm.BlockSizes(16, 16 * m),
        interpret=interpret)
    kept = np.moveaxis(np.asarray(probs) != 0, 2, 1)  # [B, H, L, L]
    valid = (q_valid[:, :, None] & k_valid[:, None, :])[:, None]
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=jax.lax.Precision.HIGHEST)
    want = np.asarray(dfss.nm_keep(scores, jnp.asarray(valid), n, m))
    np.testing.assert_array_equal(kept, want)
    assert want.any() and not want[1, :, length - 9:].any()


def test_nm_stats_match_reference_and_give_the_kept_mass():
    rng = np.random.default_rng(3)
    case = CASES[0]
    q, k, v = qkv(rng, case)
    q_valid, k_valid = padding_masks(rng, case)
    kw = dict(n=2, m=4, block_sizes=nm.BlockSizes(32, 64), return_stats=True)
    _, stats = nm.nm_sparse_attention(q, k, v, q_valid, k_valid, **kw)
    _, want = nm.nm_sparse_attention_reference(q, k, v, q_valid, k_valid, **kw)
    for got, ref in zip(stats, want):
        live = np.isfinite(np.asarray(ref))
        np.testing.assert_array_equal(np.isfinite(np.asarray(got)), live)
        np.testing.assert_allclose(np.asarray(got)[live], np.asarray(ref)[live], rtol=1e-5,
                                   atol=1e-5)
    live = np.isfinite(np.asarray(stats.lse_all))
    mass = np.exp(np.asarray(stats.lse_kept)[live] - np.asarray(stats.lse_all)[live])
    assert (mass > 0.5 - 1e-6).all() and (mass <= 1 + 1e-6).all()  # top-2 of 4 keeps >= half


# -- bad input ------------------------------------------------------------------------------------
def _bad_inputs():
    f32 = np.float32
    q = np.ones((1, 64, 2, 16), f32)
    idx, cnt = np.zeros((1, 2, 4, 2), np.int32), np.ones((1, 2, 4), np.int32)
    bsz = bs.BlockSizes(16, 16)
    blk = functools.partial(bs.block_sparse_attention, block_sizes=bsz)
    nmk = functools.partial(nm.nm_sparse_attention, block_sizes=nm.BlockSizes(16, 64))
    return [
        ('block_q 24', lambda: bs.block_sparse_attention(q, q, q, idx, cnt,
                                                         block_sizes=bs.BlockSizes(24, 16)),
         r'block_q=24 must be a power of two'),
        ('block_k 8', lambda: bs.block_sparse_attention(q, q, q, idx, cnt,
                                                        block_sizes=bs.BlockSizes(16, 8)),
         r'block_k=8 must be a power of two >= 16'),
        ('length', lambda: blk(q[:, :40], q[:, :40], q[:, :40], idx, cnt),
         r'q_len.*\(1, 40, 2, 16\).*multiple of block_sizes.block_q=16'),
        ('head dims', lambda: blk(q, q, q[..., :8], idx, cnt), r'v.shape=\(1, 64, 2, 8\)'),
        ('rank', lambda: blk(q[0], q, q, idx, cnt), r'q must be \[batch.*\(64, 2, 16\)'),
        ('int dtype', lambda: blk(q.astype(np.int32), q, q, idx, cnt), r'q.dtype=int32'),
        ('mixed dtype', lambda: blk(q, q.astype(jnp.bfloat16), q, idx, cnt),
         r'share one dtype'),
        ('head too wide', lambda: blk(*[np.ones((1, 64, 1, 512), f32)] * 3, idx[:, :1],
                                      cnt[:, :1]), r'head_dim=512'),
        ('table shape', lambda: blk(q, q, q, idx[:, :, :3], cnt), r'block_indices must be.*'
                                                                  r'q_blocks=4.*\(1, 2, 3, 2\)'),
        ('count shape', lambda: blk(q, q, q, idx, cnt[..., :2]), r'block_counts must be'),
        ('table dtype', lambda: blk(q, q, q, idx.astype(f32), cnt), r'block_indices.dtype'),
        ('index range', lambda: blk(q, q, q, idx + 4, cnt), r'block_indices must lie in \[0, '
                                                            r'k_blocks=4\).*got 4'),
        ('count range', lambda: blk(q, q, q, idx, cnt * 3), r'block_counts must lie in'),
        ('mask shape', lambda: blk(q, q, q, idx, cnt, np.ones((1, 63), bool)),
         r'q_valid must be \[batch=1, length=64\]'),
        ('nm pattern', lambda: nmk(q, q, q, n=2, m=8), r'n:m=2:8 is not supported'),
        ('nm n >= m', lambda: nmk(q, q, q, n=2, m=2), r'n:m=2:2 is not supported'),
        ('nm block_k', lambda: nm.nm_sparse_attention(q, q, q, block_sizes=nm.BlockSizes(16, 32)),
         r'block_k=32 must be >= 16·M=64'),
        ('nm length', lambda: nmk(q[:, :48], q[:, :48], q[:, :48]),
         r'kv_len.*multiple of block_sizes.block_k=64'),
    ]


@pytest.mark.parametrize('name,call,match', _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_bad_input_raises_value_error_before_launch(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


class _CompiledLaunch(Exception):
    """Raised by the spy instead of lowering a compiled kernel (no GPU needed)."""


def _kernel_launch(monkeypatch, backend, interpret):
    """Runs the N:M kernel while JAX reports ``backend``; records each launch's interpret flag.

    Returns:
      (flags: the ``interpret`` of every ``pallas_call`` of the trace, out or None when a
      compiled launch was stopped, the reference output).
    """
    flags = []
    pallas_call = _common.pl.pallas_call

    def spy(*args, **kwargs):
        flags.append(bool(kwargs['interpret']))
        if not kwargs['interpret']:
            raise _CompiledLaunch
        return pallas_call(*args, **kwargs)

    monkeypatch.setattr(_common.pl, 'pallas_call', spy)
    monkeypatch.setattr(jax, 'default_backend', lambda: backend)
    jax.clear_caches()  # trace anew, so every launch goes through the spy
    rng = np.random.default_rng(21)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 64, 3, 8)), jnp.float32) for _ in range(3))
    sizes = nm.BlockSizes(16, 64)
    want = nm.nm_sparse_attention_reference(q, k, v, n=1, m=2, block_sizes=sizes)
    try:
        out = nm.nm_sparse_attention(q, k, v, n=1, m=2, block_sizes=sizes, interpret=interpret)
    except _CompiledLaunch:
        out = None
    return flags, out, want


def test_interpret_mode_is_automatic_on_cpu(monkeypatch):
    flags, out, want = _kernel_launch(monkeypatch, 'cpu', interpret=None)
    assert flags and all(flags), 'a kernel launched without interpret mode on CPU'
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


def test_compiled_launch_on_gpu_unless_interpret_is_asked(monkeypatch):
    flags, out, _ = _kernel_launch(monkeypatch, 'gpu', interpret=None)
    assert flags == [False] and out is None  # stopped at the first (compiled) launch
    flags, out, want = _kernel_launch(monkeypatch, 'gpu', interpret=True)
    assert flags and all(flags)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


# -- wiring into the attention methods -----------------------------------------------------------
E, H = 32, 2


def _layer(module, name, impl, **overrides):
    from lra_sparse import config_lib
    from lra_sparse.attention import base

    cfg = config_lib.attention_config(name, impl, 'train_and_eval')
    for key, value in overrides.items():
        cfg[key] = value
    dims = base.AttentionDims(emb_dim=E, qkv_dim=E, num_heads=H, max_len=64)
    return module(dims, ml_collections.FrozenConfigDict(cfg), rngs=nnx.Rngs(params=0))


def _inputs(length=30, lengths=(23, 11), seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(len(lengths), length, E)), jnp.float32)
    mask = jnp.asarray(np.arange(length)[None] < np.asarray(lengths)[:, None])
    return x, mask


def _call_and_grads(layer, x, mask):
    from lra_sparse.attention import base

    graphdef, state = nnx.split(layer)
    carry = base.LayerCarry(positions=jnp.broadcast_to(jnp.arange(x.shape[1]), mask.shape))

    def loss(state):
        out = nnx.merge(graphdef, state)(x, mask, carry)
        return jnp.sum(out.y ** 2) + sum(out.aux_losses.values()), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return out, grads


def _assert_layers_agree(ref, pal, x, mask):
    out_r, g_r = _call_and_grads(ref, x, mask)
    out_p, g_p = _call_and_grads(pal, x, mask)
    np.testing.assert_allclose(out_p.y, out_r.y, rtol=1e-5, atol=1e-5)
    assert set(out_p.stats) == set(out_r.stats)
    for name in out_r.stats:
        np.testing.assert_allclose(out_p.stats[name], out_r.stats[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_r)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dsa_block_granularity_pallas_equals_reference():
    from lra_sparse.attention import dsa

    kw = dict(granularity='block', block_q=16, block_k=16, sparsity=0.5, precision='oracle')
    x, mask = _inputs()  # L=30: the layer pads to the 16-tiles; example 1 has 11 tokens
    _assert_layers_agree(_layer(dsa.DSAAttention, 'dsa', 'reference', **kw),
                         _layer(dsa.DSAAttention, 'dsa', 'pallas', **kw), x, mask)


@pytest.mark.parametrize('pattern', ['2:4', '1:2'])
def test_dfss_pallas_equals_reference(pattern):
    from lra_sparse.attention import dfss

    x, mask = _inputs(seed=1)
    _assert_layers_agree(_layer(dfss.DFSSAttention, 'dfss', 'reference', pattern=pattern),
                         _layer(dfss.DFSSAttention, 'dfss', 'pallas', pattern=pattern), x, mask)


@pytest.mark.parametrize('overrides,field', [
    ({'attention': 'dsa', 'attention.granularity': 'element'}, 'attention.granularity'),
    ({'attention': 'dsa', 'attention.granularity': 'vector'}, 'attention.granularity'),
    ({'attention': 'dsa', 'attention.granularity': 'block', 'attention.block_q': 24},
     'attention.block_q'),
    ({'attention': 'dsa', 'attention.granularity': 'block', 'attention.block_k': 8},
     'attention.block_k'),
    ({'attention': 'dfss', 'model.attention_dropout_rate': 0.1}, 'model.attention_dropout_rate'),
    ({'attention': 'spatten'}, 'attention.impl'),
])
def test_pallas_rejected_where_unsupported(overrides, field):
    from conftest import tiny_config

    from lra_sparse import config_lib
    from lra_sparse.attention import base

    overrides = dict(overrides)
    config = tiny_config('listops', f'attention={overrides.pop("attention")},impl=pallas',
                         **{'model.attention_dropout_rate': 0.0, **overrides})
    with pytest.raises(base.ConfigError, match=rf'config\.{field}=.*not allowed'):
        config_lib.validate(config)


# -- backward sub-tiles, transposed lists, TPU dK/dV walk, launch checks ------------------------
@pytest.mark.parametrize('kernel,sizes', [
    ('block_sparse', dict(block_q=64, block_k=64, block_q_bwd=16, block_k_bwd=32)),
    ('block_sparse', dict(block_q=32, block_k=64, block_q_bwd=32, block_k_bwd=16)),
    ('nm_sparse', dict(block_q=64, block_k=128, block_q_bwd=16, block_k_bwd=64)),
])
def test_backward_sub_tiles_match_reference(kernel, sizes):
    """Backward tiles smaller than the forward tiles (each listed tile split into sub-tiles)."""
    case = Case('sub', 'float32', 2, 128, 128, 2, 32, sizes['block_q'], sizes['block_k'], 0.4,
                (2, 4), 'both', False)
    rng = np.random.default_rng(21)
    q, k, v = qkv(rng, case)
    q_valid, k_valid = padding_masks(rng, case)
    block_sizes = _common.BlockSizes(**sizes)
    if kernel == 'block_sparse':
        idx, cnt = random_lists(rng, case)
        args, kw = (idx, cnt, q_valid, k_valid), {}
        run, ref = bs.block_sparse_attention, bs.block_sparse_attention_reference
    else:
        args, kw = (q_valid, k_valid), dict(n=2, m=4)
        run, ref = nm.nm_sparse_attention, nm.nm_sparse_attention_reference
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    out, grads = out_and_grads(
        lambda q, k, v: run(q, k, v, *args, block_sizes=block_sizes, **kw), q, k, v, cot)
    want, want_grads = out_and_grads(
        lambda q, k, v: ref(q, k, v, *args, block_sizes=block_sizes, **kw), q, k, v, cot)
    assert_close(out, want, TOL['float32']['out'], 'output')
    for name, g, w in zip(('dq', 'dk', 'dv'), grads, want_grads):
        assert_close(g, w, TOL['float32']['grad'], name)


def test_transposed_lists_list_every_pair_once():
    rng = np.random.default_rng(5)
    nkb = 6
    idx = jnp.asarray(rng.integers(-2, nkb + 2, size=(2, 3, 5, 4)), jnp.int32)  # clamped
    cnt = jnp.asarray(rng.integers(0, 6, size=(2, 3, 5)), jnp.int32)  # clamped to [0, 4]
    q_blocks, start, count = bs.transposed_lists(idx, cnt, nkb)
    mask = np.asarray(bs.indices_to_block_mask(idx, cnt, nkb))  # [2, 3, 5, nkb]
    assert q_blocks.shape == (2, 3, 20) and start.shape == count.shape == (2, 3, nkb)
    for b, h, j in np.ndindex(2, 3, nkb):
        run = np.asarray(q_blocks[b, h, start[b, h, j]:start[b, h, j] + count[b, h, j]])
        assert list(run) == sorted(run)
        assert set(run.tolist()) == set(np.flatnonzero(mask[b, h, :, j]).tolist())
    np.testing.assert_array_equal(np.asarray(start)[..., 1:],
                                  np.cumsum(np.asarray(count), -1)[..., :-1])


def test_block_sparse_tpu_walk_with_unlisted_key_blocks_matches_reference():
    """TPU interpret mode: key blocks no query lists get zero dK/dV; ragged counts."""
    case = Case('tpu-sparse', 'float32', 2, 64, 128, 2, 16, 16, 16, 0.25, (2, 4), 'keys', False)
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng, case)
    idx, cnt = random_lists(rng, case)
    _, k_valid = padding_masks(rng, case)
    sizes = bs.BlockSizes(case.block_q, case.block_k)
    listed = np.asarray(bs.indices_to_block_mask(idx, cnt, 8)).any(axis=2)  # [B, H, nkb]
    assert not listed.all()

    def run(q, k, v):
        return bs.block_sparse_attention(q, k, v, idx, cnt, None, k_valid, block_sizes=sizes,
                                         backend='tpu', interpret=True)

    def ref(q, k, v):
        return bs.block_sparse_attention_reference(q, k, v, idx, cnt, None, k_valid,
                                                   block_sizes=sizes)

    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    (out, grads), (want, want_grads) = (out_and_grads(f, q, k, v, cot) for f in (run, ref))
    assert_close(out, want, TOL['float32']['out'], 'output')
    for name, g, w in zip(('dq', 'dk', 'dv'), grads, want_grads):
        assert_close(g, w, TOL['float32']['grad'], name)
    dk = np.asarray(grads[1]).reshape(2, 8, 16, 2, 16)  # [B, nkb, block, H, D]
    assert (dk.transpose(0, 3, 1, 2, 4)[~listed] == 0).all()


def _bad_launches():
    q = np.ones((1, 64, 2, 16), np.float32)
    idx, cnt = np.zeros((1, 2, 2, 1), np.int32), np.ones((1, 2, 2), np.int32)
    blk = functools.partial(bs.block_sparse_attention, q, q, q, idx, cnt)
    nmk = functools.partial(nm.nm_sparse_attention, q, q, q)
    return [
        ('bwd tile too big', lambda: blk(block_sizes=bs.BlockSizes(32, 32, block_q_bwd=64)),
         r'block_sizes.block_q_bwd=64 must be a power of two in \[16, block_sizes.block_q=32\]'),
        ('bwd tile not pow2', lambda: blk(block_sizes=bs.BlockSizes(32, 32, block_k_bwd=24)),
         r'block_sizes.block_k_bwd=24 must be a power of two'),
        ('warps', lambda: blk(block_sizes=bs.BlockSizes(32, 32, num_warps=3)),
         r'block_sizes.num_warps=3 must be one of \(1, 2, 4, 8, 16\)'),
        ('bwd stages', lambda: blk(block_sizes=bs.BlockSizes(32, 32, num_stages_bwd=0)),
         r'block_sizes.num_stages_bwd=0 must be an integer >= 1 or None'),
        ('precision', lambda: blk(block_sizes=bs.BlockSizes(32, 32), precision='tf32'),
         r"precision='tf32' is not supported: 'default'"),
        ('nm bwd block_k', lambda: nmk(block_sizes=nm.BlockSizes(16, 64, block_k_bwd=32)),
         r'block_k_bwd=32 must be >= 16·M=64'),
        ('nm tpu', lambda: nmk(block_sizes=nm.BlockSizes(16, 64), backend='tpu'),
         r"backend='tpu' is not supported by nm_sparse_attention"),
        ('platform', lambda: _common.lowering_platform('metal').__enter__(),
         r"platform='metal' is not supported"),
    ]


@pytest.mark.parametrize('name,call,match', _bad_launches(), ids=[b[0] for b in _bad_launches()])
def test_bad_launch_parameters_raise_value_error_before_launch(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_lowering_platform_sets_the_defaults_inside_the_block_only():
    default = jax.default_backend()
    with _common.lowering_platform('cuda'):
        assert _common.target_platform() == 'gpu' and not _common.default_interpret()
        assert _common.resolve_backend(None) == 'triton'
        with _common.lowering_platform('tpu'):
            assert _common.resolve_backend(None) == 'tpu' and not _common.default_interpret()
        assert _common.target_platform() == 'gpu'
    assert _common.target_platform() == default
