"""DFSS: N:M selection vs numpy, compressed SDDMM/SpMM, bf16 selection, gradients, configs, runs."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from lra_sparse import config_lib
from lra_sparse.attention import base, cost, dfss

PATTERNS = [('1:2', 1, 2), ('2:4', 2, 4)]
B, L, E, H = 3, 30, 32, 2  # L=30 is not a multiple of 4: the internal key padding is exercised


# -- numpy references ---------------------------------------------------------------------------
def np_nm_keep(scores, valid, n, m):
    """Top-N of every M consecutive keys by stable argsort (lowest index first on ties)."""
    scores = np.asarray(scores, np.float64)
    valid = np.broadcast_to(np.asarray(valid), scores.shape)
    keep = np.zeros(scores.shape, bool)
    lk = scores.shape[-1]
    for row in np.ndindex(scores.shape[:-1]):
        for g0 in range(0, lk, m):
            cols = np.arange(g0, min(g0 + m, lk))
            key = np.where(valid[row][cols], scores[row][cols], -np.inf)
            order = np.argsort(-key, kind='stable')[:n]
            for c in cols[order]:
                keep[row + (c,)] = valid[row + (c,)]
    return keep


def np_masked_attention(q, k, v, keep):
    """Softmax over kept entries (scaled after selection) and AV; rows with nothing -> zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
    s = np.where(keep, s, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    e = np.where(keep, np.exp(s - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
    den = e.sum(-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)
    return np.einsum('bhqk,bkhd->bqhd', p, v), p


def random_mask(rng, batch, length, fully_padded=False):
    lengths = rng.integers(1, length + 1, size=batch)
    mask = np.arange(length)[None] < lengths[:, None]
    mask &= rng.random((batch, length)) > 0.15  # random holes too, not just a padded tail
    mask[:, 0] = True
    if fully_padded:
        mask[-1] = False
    return mask


def qkv(rng, batch=B, length=L, heads=H, dim=16, dtype=np.float32):
    return tuple(jnp.asarray(rng.normal(size=(batch, length, heads, dim)).astype(dtype))
                 for _ in range(3))


def make_layer(pattern='2:4', impl='xla', dtype='float32', seed=0, dropout=0.0, apply=None):
    cfg = ml_collections.ConfigDict({'name': 'dfss', 'impl': impl,
                                     'apply': apply or 'train_and_eval',
                                     **dict(dfss.default_config().to_dict(), pattern=pattern)})
    dims = base.AttentionDims(emb_dim=E, qkv_dim=E, num_heads=H, max_len=64,
                              attention_dropout_rate=dropout, dtype=dtype)
    return dfss.DFSSAttention(dims, ml_collections.FrozenConfigDict(cfg),
                              rngs=nnx.Rngs(params=seed))


def call(layer, x, mask, **kw):
    carry = base.LayerCarry(positions=jnp.broadcast_to(jnp.arange(x.shape[1]), mask.shape))
    return layer(x, jnp.asarray(mask), carry, **kw)


# -- selection ----------------------------------------------------------------------------------
@pytest.mark.parametrize('pattern,n,m', PATTERNS)
@pytest.mark.parametrize('case', ['random', 'ties', 'padding'])
def test_selection_matches_argsort_reference(pattern, n, m, case):
    rng = np.random.default_rng([n, m, ['random', 'ties', 'padding'].index(case)])
    shape = (2, H, 12, 30)
    if case == 'ties':  # small integers: most groups hold exact ties, some all-equal groups
        scores = rng.integers(-2, 3, size=shape).astype(np.float32)
        scores[0, 0, 0] = 1.0
    else:
        scores = rng.normal(size=shape).astype(np.float32) * 3
    valid = np.ones(shape, bool)
    if case == 'padding':
        qm, km = random_mask(rng, 2, 12, fully_padded=True), random_mask(rng, 2, 30)
        valid = (qm[:, :, None] & km[:, None, :])[:, None]
        scores = np.where(np.broadcast_to(valid, shape), scores, 1e4)  # padding scores are huge
    keep = np.asarray(dfss.nm_keep(jnp.asarray(scores), jnp.asarray(valid), n, m))
    expected = np_nm_keep(scores, valid, n, m)
    np.testing.assert_array_equal(keep, expected)
    # Exactly min(N, valid keys) per group; padding is never kept.
    full_valid = np.broadcast_to(valid, shape)
    assert not (keep & ~full_valid).any()
    pad = dfss.padded_length(30, m) - 30
    groups = lambda a: np.pad(a, [(0, 0)] * 3 + [(0, pad)]).reshape(*shape[:3], -1, m).sum(-1)
    np.testing.assert_array_equal(groups(keep), np.minimum(n, groups(full_valid)))
    if case == 'ties':  # the all-ones group of row 0 keeps its first N entries
        np.testing.assert_array_equal(keep[0, 0, 0, :m], np.arange(m) < n)


def test_selection_is_scale_invariant_and_ignores_padding_values():
    rng = np.random.default_rng(1)
    scores = jnp.asarray(rng.normal(size=(2, 1, 8, 16)), jnp.float32)
    valid = jnp.asarray(rng.random((2, 1, 8, 16)) > 0.3)
    keep = dfss.nm_keep(scores, valid, 2, 4)
    np.testing.assert_array_equal(keep, dfss.nm_keep(scores * 0.125, valid, 2, 4))
    noisy = jnp.where(valid, scores, 1e30)
    np.testing.assert_array_equal(keep, dfss.nm_keep(noisy, valid, 2, 4))


# -- the layer equals numpy masked-softmax attention -----------------------------------------------
@pytest.mark.parametrize('pattern,n,m', PATTERNS)
@pytest.mark.parametrize('impl', ['reference', 'xla'])
def test_layer_equals_numpy_masked_attention(pattern, n, m, impl):
    rng = np.random.default_rng(2)
    layer = make_layer(pattern, impl)
    x = jnp.asarray(rng.normal(size=(B, L, E)), jnp.float32)
    mask = random_mask(rng, B, L, fully_padded=True)
    out = call(layer, x, mask)
    q, k, v = layer.project_qkv(x)
    valid = (mask[:, :, None] & mask[:, None, :])[:, None]
    scores = np.einsum('bqhd,bkhd->bhqk', np.asarray(q, np.float64), np.asarray(k, np.float64))
    keep = np_nm_keep(scores, valid, n, m)
    o, p = np_masked_attention(q, k, v, keep)
    w_out = np.asarray(layer.out.kernel[...], np.float64)
    expected = o.reshape(B, L, E) @ w_out
    np.testing.assert_allclose(np.asarray(out.y), expected, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(out.y)[-1]).max() == 0.0  # fully padded example: zeros, not NaN
    # Statistics: achieved sparsity over valid pairs and the full softmax mass kept.
    full_valid = np.broadcast_to(valid, keep.shape)
    np.testing.assert_allclose(float(out.stats['sparsity']),
                               1 - keep.sum() / full_valid.sum(), rtol=1e-6)
    _, dense_p = np_masked_attention(q, k, v, full_valid)
    rows = full_valid.any(-1)
    kept_mass = (dense_p * keep).sum(-1)[rows].mean()
    np.testing.assert_allclose(float(out.stats['kept_mass']), kept_mass, rtol=1e-5)
    assert 0.5 <= float(out.stats['kept_mass']) <= 1.0  # top-N of M keeps >= N/M of each group
    for value in out.stats.values():
        assert value.dtype == jnp.float32 and value.shape == ()


@pytest.mark.parametrize('pattern,n,m', PATTERNS)
def test_sparsity_is_exactly_one_minus_n_over_m_on_aligned_lengths(pattern, n, m):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 32, E)), jnp.float32)
    mask = np.arange(32)[None] < np.array([[32], [16]])
    for impl in ('reference', 'xla'):
        out = call(make_layer(pattern, impl), x, mask)
        assert float(out.stats['sparsity']) == pytest.approx(1 - n / m, abs=1e-7)


# -- compressed form ----------------------------------------------------------------------------
@pytest.mark.parametrize('pattern,n,m', PATTERNS)
def test_sddmm_spmm_equals_dense_masked_path(pattern, n, m):
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng)
    mask = random_mask(rng, B, L, fully_padded=True)
    valid = base.pair_mask(jnp.asarray(mask), jnp.asarray(mask))
    values, indices = dfss.sddmm_nm(q, k, valid, n, m)
    lp = dfss.padded_length(L, m)
    assert values.shape == indices.shape == (B, H, L, lp * n // m)
    assert values.dtype == jnp.float32 and indices.dtype == jnp.uint8
    idx = np.asarray(indices).astype(int)
    assert idx.min() >= 0 and idx.max() < m
    # Decode the metadata by hand: slot g*N+s -> key g*M + idx, ascending within each group.
    scores = np.asarray(base.attention_scores(q, k))
    keep = np_nm_keep(scores, valid, n, m)
    cols = (np.arange(lp * n // m) // n) * m + idx
    assert (np.diff(cols.reshape(*cols.shape[:-1], -1, n), axis=-1) > 0).all()
    vals = np.asarray(values)
    real = vals > base.MASK_VALUE
    b, h, qi, s = np.nonzero(real)
    np.testing.assert_array_equal(scores[b, h, qi, cols[b, h, qi, s]], vals[b, h, qi, s])
    assert keep[b, h, qi, cols[b, h, qi, s]].all() and real.sum() == keep.sum()
    dense_scores = dfss.decompress_nm(values, indices, n, m, L, fill=base.MASK_VALUE)
    np.testing.assert_array_equal(np.asarray(dense_scores), np.where(keep, scores, base.MASK_VALUE))
    # SDDMM -> softmax -> SpMM equals the dense-masked path.
    probs = dfss.softmax_nm(values, 1 / math.sqrt(q.shape[-1]))
    out = dfss.spmm_nm(probs, indices, v, n, m)
    ref, _ = base.masked_attention(q, k, v, jnp.asarray(keep))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(out)[-1]).max() == 0.0


@pytest.mark.parametrize('pattern,n,m', PATTERNS)
def test_spmm_with_identity_v_reproduces_kept_probabilities(pattern, n, m):
    rng = np.random.default_rng(5)
    q, k, _ = qkv(rng)
    mask = random_mask(rng, B, L)
    valid = base.pair_mask(jnp.asarray(mask), jnp.asarray(mask))
    values, indices = dfss.sddmm_nm(q, k, valid, n, m)
    probs = dfss.softmax_nm(values, 1 / math.sqrt(q.shape[-1]))
    eye = jnp.broadcast_to(jnp.eye(L)[None, :, None, :], (B, L, H, L))  # v[b, j, h] = e_j
    rows = np.moveaxis(np.asarray(dfss.spmm_nm(probs, indices, eye, n, m)), 2, 1)  # [B, H, L, L]
    keep = np_nm_keep(np.asarray(base.attention_scores(q, k)), valid, n, m)
    _, expected = np_masked_attention(q, k, eye, keep)
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-7)
    assert ((rows != 0) <= keep).all()
    np.testing.assert_allclose(rows.sum(-1)[keep.any(-1)], 1.0, rtol=1e-5)


def test_compressed_footprint_matches_the_paper():
    n_len = 1024
    fp = dfss.compressed_footprint(n_len, n_len, 1, 2, value_bytes=4)
    # Paper section 3.4: n^2 * 32 bit -> n^2/2 * 32 bit + n^2/16 * 32 bit (1:2, float32).
    assert fp['dense'] == n_len * n_len * 4
    assert fp['values'] == n_len * n_len // 2 * 4
    assert fp['packed_metadata'] == n_len * n_len // 16 * 4
    fp = dfss.compressed_footprint(10, 201, 2, 4, value_bytes=2)  # 201 keys pad to 204
    assert fp['values'] == 10 * 102 * 2 and fp['metadata'] == 10 * 102
    assert fp['packed_metadata'] == 10 * 51 // 2


# -- dtypes -------------------------------------------------------------------------------------
@pytest.mark.parametrize('pattern', ['1:2', '2:4'])
def test_bfloat16_selection_rarely_differs_from_float32(pattern):
    rng = np.random.default_rng(6)
    f32 = make_layer(pattern, dtype='float32')
    bf16 = make_layer(pattern, dtype='bfloat16')  # same seed: same float32 parameters
    x = jnp.asarray(rng.normal(size=(4, 64, E)), jnp.float32)
    mask = random_mask(rng, 4, 64)
    assert bf16.project_qkv(x)[0].dtype == jnp.bfloat16
    kept32 = np.asarray(f32.inspect_maps(x, jnp.asarray(mask), None)['kept'])
    kept16 = np.asarray(bf16.inspect_maps(x, jnp.asarray(mask), None)['kept'])
    valid = np.broadcast_to((mask[:, :, None] & mask[:, None, :])[:, None], kept32.shape)
    frac = float((kept32 != kept16)[valid].mean())
    print(f'dfss {pattern}: bf16 vs f32 selection mismatch fraction {frac:.2e}')
    assert frac <= 5e-3  # the released sddmm test's metadata tolerance
    out = call(bf16, x, mask)
    assert out.y.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out.y, np.float32)).all()
    ref = call(make_layer(pattern, 'reference', dtype='bfloat16'), x, mask)
    np.testing.assert_allclose(np.asarray(out.y, np.float32), np.asarray(ref.y, np.float32),
                               rtol=2e-2, atol=2e-2)


# -- gradients ----------------------------------------------------------------------------------
def _xla_attention(q, k, v, valid, n, m):
    values, indices = dfss.sddmm_nm(q, k, valid, n, m)
    return dfss.spmm_nm(dfss.softmax_nm(values, 1 / math.sqrt(q.shape[-1])), indices, v, n, m)


@pytest.mark.parametrize('pattern,n,m', PATTERNS)
def test_gradients_flow_through_kept_entries_only(pattern, n, m):
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng)
    mask = jnp.asarray(random_mask(rng, B, L))
    valid = base.pair_mask(mask, mask)
    keep = dfss.nm_keep(base.attention_scores(q, k), valid, n, m)
    cot = jnp.asarray(rng.normal(size=(B, L, H, 16)), jnp.float32)

    def loss_of(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    fixed = loss_of(lambda q, k, v: base.masked_attention(q, k, v, keep)[0])
    expected = jax.jit(jax.grad(fixed, argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.grad(loss_of(lambda q, k, v: _xla_attention(q, k, v, valid, n, m)),
                           argnums=(0, 1, 2)))(q, k, v)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    # One query row: K and V rows of keys it did not keep get exactly zero gradient.
    q1 = q[:, :1]
    valid1 = valid[:, :, :1]
    keep1 = np.asarray(dfss.nm_keep(base.attention_scores(q1, k), valid1, n, m))[:, :, 0]
    gk, gv = jax.jit(jax.grad(
        lambda k, v: jnp.sum(_xla_attention(q1, k, v, valid1, n, m) * cot[:, :1]),
        argnums=(0, 1)))(k, v)
    gk, gv = np.moveaxis(np.asarray(gk), 2, 1), np.moveaxis(np.asarray(gv), 2, 1)  # [B, H, L, D]
    assert (np.abs(gv).sum(-1)[~keep1] == 0).all() and (np.abs(gk).sum(-1)[~keep1] == 0).all()
    assert (np.abs(gv).sum(-1)[keep1] > 0).all() and (np.abs(gk).sum(-1)[keep1] > 0).all()


@pytest.mark.parametrize('impl', ['reference', 'xla'])
def test_layer_gradients_finite_with_dropout(impl):
    rng = np.random.default_rng(8)
    layer = make_layer('2:4', impl, dropout=0.1)
    x = jnp.asarray(rng.normal(size=(B, L, E)), jnp.float32)
    mask = random_mask(rng, B, L, fully_padded=True)
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        out = call(nnx.merge(graphdef, state), x, mask, deterministic=False,
                   rng=jax.random.key(0))
        return jnp.sum(out.y ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# -- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize('bad', ['3:4', '2:8', '1:4', '2/4', '', 2, None, (2, 4)])
def test_bad_pattern_is_one_clear_error(bad):
    config = ml_collections.ConfigDict({'attention': {'pattern': bad}})
    with pytest.raises(base.ConfigError, match=r"config\.attention\.pattern=.*'1:2', '2:4'"):
        dfss.validate(config)
    with pytest.raises(base.ConfigError, match='attention.pattern'):
        make_layer(bad)
    if isinstance(bad, str):  # the full validation (CLI, sweeps) stops before any compute
        config = tiny_config('listops', 'attention=dfss')
        config.attention.pattern = bad
        with pytest.raises(base.ConfigError, match='attention.pattern'):
            config_lib.validate(config)


def test_cost_counts_every_score_so_attention_cost_is_at_least_one():
    dims = base.AttentionDims(emb_dim=64, qkv_dim=64, num_heads=4, max_len=201)
    dense = cost.dense_layer_cost(dims, 201, 'xla')
    for impl in ('reference', 'xla', 'pallas'):
        for pattern, _, m in PATTERNS:
            cfg = ml_collections.ConfigDict({'pattern': pattern, 'impl': impl})
            layer = dfss.layer_cost(dims, cfg, 201)
            keys = {'xla': dfss.padded_length(201, m), 'reference': 201,
                    'pallas': dfss.pallas_tiles(201, m)[2]}[impl]
            rows = dfss.pallas_tiles(201, m)[2] if impl == 'pallas' else 201
            d = 16
            assert layer.attention['scores'] == cost.matmul(rows, d, keys, batch=4)
            assert layer.attention_ops > dense.attention_ops  # selection is extra work
            assert (layer.tokens_out, layer.ffn_tokens, layer.qkv_width) == (201, 201, 64)
    auto = ml_collections.ConfigDict({'pattern': 'auto', 'impl': 'xla'})
    assert dfss.layer_cost(dims, auto, 201) == dfss.layer_cost(
        dims, ml_collections.ConfigDict({'pattern': '1:2', 'impl': 'xla'}), 201)


@pytest.mark.parametrize('pattern,n,m', PATTERNS)
def test_pallas_cost_is_one_kernel_step_times_the_steps(pattern, n, m):
    """The Pallas interpreter is a loop XLA counts once: at one head and L <= 128 the grid is one
    step, so XLA's count is the whole layer; at L = 256 it counts one of the four steps."""
    from test_cost import ATTENTION_TOLERANCE, layer_forward_ops, projection_ops

    from lra_sparse import attention
    method = attention.get_method('dfss')
    for length, steps in ((64, 1), (128, 1), (256, 4)):
        cfg = ml_collections.FrozenConfigDict({**dfss.default_config().to_dict(), 'name': 'dfss',
                                               'impl': 'pallas', 'apply': 'train_and_eval',
                                               'pattern': pattern})
        dims = base.AttentionDims(emb_dim=64, qkv_dim=64, num_heads=1, max_len=length)
        _, bk, lp = dfss.pallas_tiles(length, m)
        assert steps == (lp // min(128, lp)) * (lp // bk)
        layer = dfss.DFSSAttention(dims, cfg, rngs=nnx.Rngs(params=0))
        formula = method.layer_cost(dims, cfg, length)
        counted = layer_forward_ops(layer, length) - projection_ops(formula)
        assert formula.attention_ops / steps == pytest.approx(counted, rel=ATTENTION_TOLERANCE)


def test_registered_with_default_pattern_for_every_task_and_sweeps():
    from lra_sparse import attention, sweep
    method = attention.get_method('dfss')
    assert method.dense_equivalent is None
    for task in config_lib.TASKS:
        config = tiny_config(task, 'attention=dfss')
        assert config.attention.pattern == 'auto'
        config_lib.validate(config)
    assert [p['pattern'] for p in method.sweeps['pattern']] == ['1:2', '2:4']
    points = sweep.sweep_points('configs/listops.py:attention=dfss,tiny', 'pattern',
                                extra={'model.dtype': 'bfloat16'})
    configs = [sweep.point_config('configs/listops.py:attention=dfss,tiny', p) for p in points]
    assert [(c.attention.pattern, c.model.dtype) for c in configs] == [
        ('1:2', 'bfloat16'), ('2:4', 'bfloat16')]


@pytest.mark.parametrize('dtype,pattern', [('float32', '1:2'), ('bfloat16', '2:4')])
def test_default_pattern_follows_the_compute_dtype_as_the_paper_pairs_them(dtype, pattern):
    assert dfss.default_config().pattern == 'auto'
    assert dfss.resolve_pattern('auto', dtype) == pattern
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(B, L, E)), jnp.float32)
    mask = random_mask(rng, B, L)
    auto = call(make_layer('auto', dtype=dtype), x, mask)
    explicit = call(make_layer(pattern, dtype=dtype), x, mask)  # same seed: same weights
    np.testing.assert_array_equal(np.asarray(auto.y), np.asarray(explicit.y))
    assert float(auto.stats['group_size']) == dfss.PATTERNS[pattern][1]
    config = tiny_config('listops', 'attention=dfss', **{'model.dtype': dtype})
    config_lib.validate(config)
    from lra_sparse import data
    from lra_sparse.models import transformer
    model = transformer.build_model(config, data.task_info(config))
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, dfss.DFSSAttention)]
    assert layers and all((m.n, m.m) == dfss.PATTERNS[pattern] for m in layers)


@pytest.mark.parametrize('impl', ['reference', 'xla'])
def test_old_default_2_4_with_float32_is_reachable_and_unchanged(impl):
    """pattern='2:4' with float32 (the earlier default) equals the earlier compressed pipeline."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(B, L, E)), jnp.float32)
    mask = random_mask(rng, B, L, fully_padded=True)
    layer = make_layer('2:4', impl)
    assert (layer.n, layer.m) == (2, 4)
    out = call(layer, x, mask)
    q, k, v = layer.project_qkv(x)
    valid = base.pair_mask(jnp.asarray(mask), jnp.asarray(mask))
    earlier = layer.project_out(_xla_attention(q, k, v, valid, 2, 4))
    np.testing.assert_allclose(np.asarray(out.y), np.asarray(earlier), rtol=1e-5, atol=1e-6)
    keep = dfss.nm_keep(base.attention_scores(q, k), valid, 2, 4)
    np.testing.assert_allclose(float(out.stats['sparsity']),
                               1.0 - float(base.kept_fraction(keep, valid)), rtol=1e-6)
    assert float(out.stats['group_size']) == 4.0


# -- models and training ------------------------------------------------------------------------
def _train(tmp_path, arg, steps, **overrides):
    from lra_sparse import data, train
    config = tiny_config('listops', arg, **{
        'num_train_steps': steps, 'eval_every_steps': steps, 'checkpoint_every_steps': steps,
        'log_every_steps': max(1, steps // 4), **overrides})
    results = train.train_and_evaluate(config, str(tmp_path))
    targets = data.load_task(config).splits['validation']['targets']
    return results, np.bincount(targets).max() / len(targets)


def test_tiny_listops_runs_and_eval_only_on_dense_model(tmp_path):
    small = {'data.listops_num_train': 64, 'data.listops_num_val': 32,
             'data.listops_num_test': 32, 'batch_size': 8, 'model.num_layers': 1}
    results, _ = _train(tmp_path / 'dfss', 'attention=dfss,impl=xla', 3, **small)
    assert math.isfinite(results['validation']['loss'])
    assert results['validation']['sparsity'] == pytest.approx(0.5, abs=0.05)
    assert 0.5 <= results['validation']['kept_mass'] <= 1.0
    # eval_only: a dense model while training, DFSS 1:2 at evaluation.
    results, _ = _train(tmp_path / 'eval_only', 'attention=dfss,apply=eval_only', 3,
                        **{**small, 'attention.pattern': '1:2'})
    assert math.isfinite(results['validation']['loss'])
    assert results['validation']['sparsity'] == pytest.approx(0.5, abs=0.05)
