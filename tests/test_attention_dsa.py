"""DSA: prediction path, quantizers, selection, granularities, xla vs reference, loss, training."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from lra_sparse import attention, config_lib, data, metrics, train
from lra_sparse.attention import base, cost, dsa

B, L, E, H = 2, 30, 32, 2  # L not a multiple of 4/8: partial vector groups and tiles
D = E // H


def build(impl='reference', seed=0, dims=None, **overrides):
    cfg = config_lib.attention_config('dsa', impl, 'train_and_eval')
    for key, value in overrides.items():
        cfg[key] = value
    dims = dims or base.AttentionDims(emb_dim=E, qkv_dim=E, num_heads=H, max_len=L)
    return dsa.DSAAttention(dims, ml_collections.FrozenConfigDict(cfg),
                            rngs=nnx.Rngs(params=seed))


def supported_impls(overrides):
    """The implementations whose table entry runs the default config with ``overrides``."""
    cfg = {**dsa.default_config(), **overrides}
    return [name for name, entry in dsa.METHOD.impls.items()
            if all(r.accepts(cfg[f]) for f, r in entry.settings.items())]


def inputs(seed=0, lengths=(L - 7, 13), length=L):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(lengths), length, E)).astype(np.float32)
    mask = np.arange(length)[None] < np.asarray(lengths)[:, None]
    return jnp.asarray(x), jnp.asarray(mask)


def call(layer, x, mask, deterministic=True, rng=None):
    carry = base.LayerCarry(positions=jnp.broadcast_to(
        jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2]))
    return layer(x, mask, carry, deterministic=deterministic, rng=rng)


def copy_qkvo(src, dst):
    for proj in ('query', 'key', 'value', 'out'):
        getattr(dst, proj).kernel[...] = getattr(src, proj).kernel[...]


def np_attention(q, k, v, keep):
    """numpy softmax attention restricted to keep [B, H, L, L]; empty rows give zeros."""
    s = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
    s = np.where(keep, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(keep, np.exp(s - m), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
    return np.einsum('bhqk,bkhd->bqhd', p, v)


# -- prediction path ----------------------------------------------------------------------------
def test_projection_values_scale_and_density():
    k = 16
    p = np.asarray(dsa.sparse_projection(jax.random.key(3), 256, 4, k))
    assert p.shape == (256, 4, k) and p.dtype == np.float32
    scale = math.sqrt(2.0 / k)
    np.testing.assert_allclose(np.unique(p), [-scale, 0.0, scale], rtol=1e-6)
    n = p.size  # 16384 entries: 4 sigma of a fraction is about 0.016
    assert abs(np.mean(p == 0) - 0.5) < 0.02
    assert abs(np.mean(p > 0) - 0.25) < 0.02 and abs(np.mean(p < 0) - 0.25) < 0.02
    np.testing.assert_allclose(np.mean(p ** 2), 1.0 / k, rtol=0.05)
    # Norm preservation (E[P²] = 1/k per entry): ||x P^h|| ≈ ||x|| on average.
    x = np.random.default_rng(0).normal(size=(64, 256))
    ratio = np.linalg.norm(x @ p[:, 0], axis=1) / np.linalg.norm(x, axis=1)
    assert abs(np.mean(ratio ** 2) - 1.0) < 0.15, n


def test_predictor_shapes_and_width():
    layer = build(sigma=0.25)
    k = round(0.25 * D)
    assert layer.k == k == 4
    assert layer.projection[...].shape == (E, H, k)
    assert layer.pred_query[...].shape == layer.pred_key[...].shape == (H, k, k)
    assert isinstance(layer.projection, base.Buffer)
    assert isinstance(layer.pred_query, nnx.Param) and isinstance(layer.pred_key, nnx.Param)
    assert build(sigma=0.1).k == 2  # 1.6 rounds to 2
    x, mask = inputs()
    qt, kt, s_pred = layer.predict(x, mask)
    assert qt.shape == kt.shape == (B, L, H, k) and s_pred.shape == (B, H, L, L)
    assert np.abs(np.asarray(qt)[~np.asarray(mask)]).max() == 0.0
    # No predictor (and no parameters for it) for random / oracle.
    for prec in ('random', 'oracle'):
        assert not hasattr(build(precision=prec), 'pred_query')


def test_projection_is_fixed_and_survives_state_round_trip():
    layer = build(precision='fp32')
    p0 = np.asarray(layer.projection[...])
    x, mask = inputs(1)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    assert 'projection' not in params.to_pure_dict(), 'P must not be trainable'
    grads = jax.grad(lambda p: call(nnx.merge(graphdef, p, rest), x, mask).aux_losses['dsa_mse'])(
        params)
    assert np.abs(np.asarray(grads['pred_query'][...])).max() > 0
    y0 = call(layer, x, mask).y
    np.testing.assert_array_equal(np.asarray(layer.projection[...]), p0)  # unchanged by calls
    other = build(seed=5, precision='fp32')
    assert not np.array_equal(np.asarray(other.projection[...]), p0)  # a real random draw
    nnx.update(other, nnx.state(layer))  # checkpoint-like restore
    np.testing.assert_array_equal(np.asarray(other.projection[...]), p0)
    np.testing.assert_array_equal(np.asarray(call(other, x, mask).y), np.asarray(y0))


# -- quantizers (the shared quantizer itself: tests/test_attention_quant.py) -----------------------
@pytest.mark.parametrize('precision', ['int2', 'int4', 'int8', 'bf16'])
def test_straight_through_gradient_is_identity(precision):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7)).astype(np.float32))
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32))
    g = jax.grad(lambda x: jnp.sum(w * dsa.round_precision(x, precision, (1,))))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    out = np.asarray(dsa.round_precision(x, precision, (1,)))
    assert not np.array_equal(out, np.asarray(x))  # it does round
    if precision == 'bf16':
        np.testing.assert_array_equal(out, np.asarray(x.astype(jnp.bfloat16), np.float32))
    np.testing.assert_array_equal(np.asarray(dsa.round_precision(x, 'fp32', (1,))), x)


# -- selection ----------------------------------------------------------------------------------
def test_keep_counts():
    assert dsa.static_keep_count(20, 0.9) == 2 and dsa.static_keep_count(27, 0.9) == 3
    assert dsa.static_keep_count(1, 0.99) == 1 and dsa.static_keep_count(0, 0.5) == 0
    assert dsa.static_keep_count(30, 0.0) == 30 and dsa.static_keep_count(100, 0.95) == 5
    n = np.arange(0, 300)
    for s in (0.0, 0.5, 0.8, 0.9, 0.95, 0.99):
        got = np.asarray(dsa.keep_count(jnp.asarray(n), s))
        want = [dsa.static_keep_count(int(i), s) for i in n]
        np.testing.assert_array_equal(got, want)


def _np_topk(scores, key_valid, count):
    keep = np.zeros(scores.shape, bool)
    for b, h, r in np.ndindex(*scores.shape[:3]):
        s = np.where(key_valid[b], scores[b, h, r], -np.inf)
        keep[b, h, r, np.argsort(-s, kind='stable')[:count[b]]] = True
    return keep & key_valid[:, None, None, :]


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_topk_matches_numpy_argsort_with_padding(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(3, 2, 9, 17)).astype(np.float32)
    scores[0, 0, 0, :4] = 0.5  # ties: lowest index wins in both
    key_valid = rng.random((3, 17)) < 0.7  # scattered padding, not only at the end
    key_valid[2] = False  # a fully padded example
    count = np.asarray(dsa.keep_count(jnp.asarray(key_valid.sum(1)), 0.6))
    want = _np_topk(scores, key_valid, count)
    got = np.asarray(dsa.topk_keep(jnp.asarray(scores), jnp.asarray(key_valid),
                                   jnp.asarray(count)))
    np.testing.assert_array_equal(got, want)
    idx, ok = dsa.topk_indices(jnp.asarray(scores), jnp.asarray(key_valid), jnp.asarray(count),
                               dsa.static_keep_count(17, 0.6))
    idx, ok = np.asarray(idx), np.asarray(ok)
    from_idx = np.zeros_like(want)
    for pos in np.ndindex(*idx.shape):
        if ok[pos]:
            from_idx[pos[:3] + (idx[pos],)] = True
    np.testing.assert_array_equal(from_idx, want)
    assert not got[2].any() and not ok[2].any()
    assert (got.sum(-1) == count[:, None, None]).all()


def test_threshold_keeps_scores_above_plus_each_rows_best():
    s = jnp.asarray([[[[0.5, 2.0, -1.0, 3.0], [0.1, 0.2, 0.3, 9.0]]]])
    valid = jnp.asarray([[True, True, True, False]])
    keep = np.asarray(dsa.threshold_keep(s, valid, 1.0))[0, 0]
    np.testing.assert_array_equal(keep, [[False, True, False, False],
                                         [False, False, True, False]])  # row 1: only its best


def test_prediction_accuracy_hand_made():
    s = jnp.asarray([[[[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]]])
    keep = jnp.asarray([[[[True, False, True, False], [False, False, True, True]]]])
    valid = jnp.ones((1, 1, 2, 4), bool)
    # Row 0 predicts {0, 2}, oracle top-2 = {0, 1}: 1 hit. Row 1 predicts {2, 3} = oracle: 2.
    assert float(dsa.prediction_accuracy(s, keep, valid)) == pytest.approx(0.75)
    # The same rows as index lists on sampled rows (lax.top_k, no sort): q_r·k_j gives s above.
    q = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])[None, :, None]
    k = jnp.asarray([[4.0, 1.0], [3.0, 2.0], [2.0, 3.0], [1.0, 4.0]])[None, :, None]
    keys = jnp.asarray([[[[0, 2], [3, 2]]]])
    live = jnp.ones((1, 1, 2, 2), bool)
    rows, row_ok = jnp.asarray([[0, 1]]), jnp.ones((1, 2), bool)
    mask = jnp.ones((1, 4), bool)
    assert float(dsa.row_accuracy(q, k, mask, rows, row_ok, keys, live, 2)) == pytest.approx(0.75)
    # A row left out of the sample does not count: row 0 alone has 1 hit of 2.
    assert float(dsa.row_accuracy(q, k, mask, rows, jnp.asarray([[True, False]]), keys, live,
                                  2)) == pytest.approx(0.5)


# -- granularities ------------------------------------------------------------------------------
@pytest.mark.parametrize('size', [4, 8])
def test_vector_rows_of_a_group_share_keys(size):
    layer = build(granularity='vector', vector_size=size, sparsity=0.8)
    x, mask = inputs(4)
    kept = np.asarray(layer.inspect_maps(x, mask, None)['kept'])
    m = np.asarray(mask)
    for b in range(B):
        n = m[b].sum()
        assert not kept[b][:, :, ~m[b]].any() and not kept[b][:, ~m[b]].any()
        assert (kept[b][:, m[b]].sum(-1) == dsa.static_keep_count(int(n), 0.8)).all()
        for g0 in range(0, L, size):
            rows = [r for r in range(g0, min(g0 + size, L)) if m[b, r]]
            for r in rows[1:]:
                np.testing.assert_array_equal(kept[b, :, r], kept[b, :, rows[0]])
    # Not all groups pick the same keys (the selection is dynamic).
    assert len({kept[0, 0, r].tobytes() for r in range(0, 20, size)}) > 1


def test_block_indices_match_block_mask():
    bq, bk, s = 8, 4, 0.6
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(B, H, L, L)).astype(np.float32)
    _, mask = inputs()
    idx, ok, keep = dsa.block_select(jnp.asarray(scores), mask, mask, bq, bk, s, 'topk', 0.0)
    idx, ok, keep, m = np.asarray(idx), np.asarray(ok), np.asarray(keep), np.asarray(mask)
    nqb, nkb = -(-L // bq), -(-L // bk)
    assert idx.shape[:3] == (B, H, nqb) and idx.shape[3] == dsa.static_keep_count(nkb, s)
    rebuilt = np.zeros((B, H, nqb * bq, nkb * bk), bool)
    for b, h, qb, slot in np.ndindex(*idx.shape):
        if ok[b, h, qb, slot]:
            kb = idx[b, h, qb, slot]
            rebuilt[b, h, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk] = True
    rebuilt = rebuilt[:, :, :L, :L] & (m[:, :, None] & m[:, None, :])[:, None]
    np.testing.assert_array_equal(keep, rebuilt)
    for b in range(B):
        valid_kb = -(-m[b].sum() // bk)
        want = dsa.static_keep_count(int(valid_kb), s)
        for qb in range(nqb):
            if m[b, qb * bq:(qb + 1) * bq].any():
                assert (ok[b, :, qb].sum(-1) == want).all()
                # The kept tiles are the best by mean score over their valid pairs.
                means = []
                for kb in range(nkb):
                    pair = (m[b, qb * bq:(qb + 1) * bq, None] & m[b, None, kb * bk:(kb + 1) * bk])
                    tile = scores[b, :, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
                    means.append(np.where(pair.any(), (tile * pair).sum((1, 2))
                                          / max(pair.sum(), 1), -np.inf))
                best = np.argsort(-np.stack(means, -1), axis=-1, kind='stable')[:, :want]
                np.testing.assert_array_equal(np.sort(idx[b, :, qb, :want], -1),
                                              np.sort(best, -1))
            else:
                assert not ok[b, :, qb].any()


def test_block_layer_equals_masked_attention_on_its_mask():
    layer = build(granularity='block', block_q=8, block_k=4, sparsity=0.7, precision='fp32')
    x, mask = inputs(6)
    kept = np.asarray(layer.inspect_maps(x, mask, None)['kept'])
    q, k, v = (np.asarray(t) for t in layer.project_qkv(x))
    want = np.asarray(layer.project_out(jnp.asarray(np_attention(q, k, v, kept))))
    want = np.where(np.asarray(mask)[..., None], want, 0.0)
    settings = dict(granularity='block', block_q=8, block_k=4, sparsity=0.7, precision='fp32')
    for impl in supported_impls(settings):  # the reference (xla has no block path)
        lay = build(impl, **settings)
        np.testing.assert_allclose(call(lay, x, mask).y, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('overrides,field', [({'selection': 'threshold'}, 'selection')])
def test_xla_refuses_settings_it_does_not_run(overrides, field):
    config = tiny_config('listops', 'attention=dsa,impl=xla',
                         **{f'attention.{k}': v for k, v in overrides.items()})
    value = overrides[field]
    pattern = (rf"config\.attention\.{field}='{value}' is not allowed with "
               rf"attention\.impl='xla': dsa xla supports {field} .*impl reference")
    with pytest.raises(base.ConfigError, match=pattern) as err:
        config_lib.validate(config)
    assert '\n' not in str(err.value)
    with pytest.raises(base.ConfigError, match=pattern):
        build('xla', **overrides)


# -- xla == reference ---------------------------------------------------------------------------
VARIANTS = [
    {}, {'granularity': 'vector', 'vector_size': 4}, {'granularity': 'vector', 'vector_size': 8},
    {'precision': 'oracle', 'sparsity': 0.8}, {'precision': 'random'},
    {'precision': 'bf16', 'sparsity': 0.5}, {'precision': 'int2', 'sparsity': 0.95},
    {'granularity': 'block', 'block_q': 8, 'block_k': 4, 'sparsity': 0.7, 'precision': 'fp32'},
    {'granularity': 'block', 'block_q': 16, 'block_k': 8, 'sparsity': 0.5},
    {'granularity': 'block', 'block_q': 4, 'block_k': 4, 'precision': 'oracle', 'sparsity': 0.6},
    {'granularity': 'block', 'precision': 'random', 'sparsity': 0.6},
    {'granularity': 'vector', 'vector_size': 4, 'precision': 'random'},
]


@pytest.mark.parametrize('overrides', VARIANTS, ids=lambda o: ','.join(map(str, o.values())))
def test_xla_equals_reference(overrides):
    x, mask = inputs(7)
    ref, xla = build('reference', **overrides), build('xla', **overrides)
    out_r, out_x = call(ref, x, mask), call(xla, x, mask)
    np.testing.assert_allclose(out_x.y, out_r.y, rtol=1e-5, atol=1e-5)
    assert set(out_r.stats) == set(out_x.stats) and set(out_r.aux_losses) == set(out_x.aux_losses)
    for name in out_r.stats:
        np.testing.assert_allclose(out_x.stats[name], out_r.stats[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    for name in out_r.aux_losses:
        np.testing.assert_allclose(out_x.aux_losses[name], out_r.aux_losses[name], rtol=1e-4)

    def grads(layer):
        graphdef, state = nnx.split(layer)

        def loss(state):
            out = call(nnx.merge(graphdef, state), x, mask)
            return jnp.sum(out.y ** 2) + sum(out.aux_losses.values())
        return jax.grad(loss)(state)

    g_r, g_x = grads(ref), grads(xla)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)


def test_xla_training_mode_with_dropout_is_finite():
    dims = base.AttentionDims(emb_dim=E, qkv_dim=E, num_heads=H, max_len=L,
                              attention_dropout_rate=0.1)
    x, mask = inputs(8)
    for gran in ('element', 'vector'):
        out = call(build('xla', dims=dims, granularity=gran), x, mask, deterministic=False,
                   rng=jax.random.key(1))
        assert np.isfinite(np.asarray(out.y)).all()


# -- loss ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('impl', ['reference', 'xla'])
def test_mse_value_matches_numpy(impl):
    layer = build(impl, precision='int8', mse_weight=0.3)
    x, mask = inputs(9)
    q, k, _ = (np.asarray(t, np.float64) for t in layer.project_qkv(x))
    qt, kt, s_pred = (np.asarray(t, np.float64) for t in layer.predict(x, mask))
    s = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(D)
    st = np.einsum('bqhd,bkhd->bhqk', qt, kt)
    m = np.asarray(mask)
    valid = np.broadcast_to((m[:, :, None] & m[:, None, :])[:, None], s.shape)
    want = np.mean((s - st)[valid] ** 2)
    out = call(layer, x, mask)
    np.testing.assert_allclose(float(out.stats['mse']), want, rtol=2e-4)
    # Eq. 6: the squared error summed over heads and valid pairs of each example, / B examples.
    per_example = [np.sum((s - st)[b][valid[b]] ** 2) for b in range(B)]
    np.testing.assert_allclose(float(out.aux_losses['dsa_mse']), 0.3 * np.mean(per_example),
                               rtol=2e-4)
    old = call(build(impl, precision='int8', mse_weight=0.3, mse_normalization='pair_mean'),
               x, mask)  # the earlier normalisation: the mean over heads and valid pairs
    np.testing.assert_allclose(float(old.aux_losses['dsa_mse']), 0.3 * want, rtol=2e-4)
    # The selection scores are the same S~ (product of the quantized Q~, K~, 1/sqrt(k) scale).
    np.testing.assert_allclose(s_pred, st, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('precision', ['int2', 'int4', 'int8'])
def test_integer_predictor_levels_and_jit_stable_selection(precision):
    layer = build(precision=precision)
    x, mask = inputs(17)
    qt, kt, s_pred = layer.predict(x, mask)
    qmax = 2 ** (dsa.PRECISION_BITS[precision] - 1) - 1
    m = np.asarray(mask)
    for t in (np.asarray(qt)[m], np.asarray(kt)[m]):  # [tokens, heads, k], one scale per token
        amax = np.abs(t).max(-1, keepdims=True)
        if precision != 'int2':
            assert (amax > 0).all(), 'every valid token keeps a non-zero code'
        assert (amax > 0).mean() > 0.5
        codes = t / np.where(amax > 0, amax, 1.0) * qmax
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        assert np.abs(np.round(codes)).max() == qmax
    if precision == 'int2':
        np.testing.assert_array_equal(np.unique(np.round(codes)), [-1, 0, 1])  # ternary
    graphdef, state = nnx.split(layer)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s).predict(x, mask)[2])(state, x)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(s_pred))


@pytest.mark.parametrize('impl', ['reference', 'xla'])
def test_mse_gradient_reaches_predictor_and_qk(impl):
    x, mask = inputs(10)
    for weight in (0.5, 0.0):
        layer = build(impl, mse_weight=weight)
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
        def aux(p, graphdef=graphdef, rest=rest):
            return call(nnx.merge(graphdef, p, rest), x, mask).aux_losses['dsa_mse']

        g = jax.grad(aux)(params)
        mag = {n: float(np.abs(np.asarray(g[n]['kernel'] if n in ('query', 'key', 'value')
                                         else g[n][...])).max())
               for n in ('pred_query', 'pred_key', 'query', 'key', 'value')}
        if weight:
            assert min(mag['pred_query'], mag['pred_key'], mag['query'], mag['key']) > 0, mag
        else:
            assert max(mag.values()) == 0.0, mag
        assert mag['value'] == 0.0  # the MSE does not involve V


# -- equivalences and edge cases -----------------------------------------------------------------
@pytest.mark.parametrize('impl', ['reference', 'xla'])
@pytest.mark.parametrize('precision', ['oracle', 'int4', 'random'])
def test_sparsity_zero_equals_dense(impl, precision):
    layer = build(impl, precision=precision, sparsity=0.0)
    dense = attention.get_method('dense').module(layer.dims, ml_collections.FrozenConfigDict(
        config_lib.attention_config('dense', 'reference', 'train_and_eval')),
        rngs=nnx.Rngs(params=0))
    copy_qkvo(layer, dense)
    x, mask = inputs(11)
    np.testing.assert_allclose(call(layer, x, mask).y, call(dense, x, mask).y, rtol=1e-5,
                               atol=1e-5)
    assert float(call(layer, x, mask).stats['sparsity']) == 0.0


@pytest.mark.parametrize('impl', ['reference', 'xla'])
def test_oracle_equals_numpy_topk_attention(impl):
    s_req = 0.75
    layer = build(impl, precision='oracle', sparsity=s_req)
    x, mask = inputs(12)
    q, k, v = (np.asarray(t) for t in layer.project_qkv(x))
    scores = np.einsum('bqhd,bkhd->bhqk', q, k)
    m = np.asarray(mask)
    keep = np.zeros(scores.shape, bool)
    for b in range(B):
        c = math.ceil((1 - s_req) * m[b].sum())
        for h, r in np.ndindex(H, L):
            if m[b, r]:
                keep[b, h, r, np.argsort(-np.where(m[b], scores[b, h, r], -np.inf))[:c]] = True
    o = np_attention(q, k, v, keep)
    want = np.asarray(layer.project_out(jnp.asarray(o)))
    np.testing.assert_allclose(call(layer, x, mask).y, want, rtol=2e-5, atol=2e-5)
    maps = layer.inspect_maps(x, mask, None)
    np.testing.assert_array_equal(np.asarray(maps['kept']), keep)
    np.testing.assert_array_equal(np.asarray(maps['oracle']), keep)


PADDING_CASES = [
    {}, {'granularity': 'vector', 'vector_size': 8}, {'granularity': 'block'},
    {'selection': 'threshold', 'threshold': 0.5}, {'precision': 'random'},
    {'precision': 'oracle'}]


@pytest.mark.parametrize('impl,overrides', [
    (impl, o) for impl in ('reference', 'xla') for o in PADDING_CASES
    if impl in supported_impls(o)], ids=str)
def test_padded_rows_and_fully_padded_examples_are_zero(impl, overrides):
    layer = build(impl, **overrides)
    x, mask = inputs(13, lengths=(L - 9, 0))
    out = call(layer, x, mask)
    y, m = np.asarray(out.y), np.asarray(mask)
    assert np.isfinite(y).all() and np.abs(y[~m]).max() == 0.0
    assert np.abs(y[m]).max() > 0
    for value in list(out.stats.values()) + list(out.aux_losses.values()):
        assert np.isfinite(float(value))


@pytest.mark.parametrize('gran', ['element', 'vector'])
@pytest.mark.parametrize('s_req', [0.9, 0.95])
def test_achieved_sparsity_equals_requested_on_unpadded_input(gran, s_req):
    x, mask = inputs(14, lengths=(40, 40), length=40)
    for impl in ('reference', 'xla'):
        out = call(build(impl, sparsity=s_req, granularity=gran), x, mask)
        assert float(out.stats['sparsity']) == pytest.approx(s_req, abs=1e-6)
        assert 0.0 <= float(out.stats['prediction_accuracy']) <= 1.0


def test_random_mask_fixed_at_eval_fresh_in_training():
    layer = build(precision='random', sparsity=0.8)
    x, mask = inputs(15)
    a, b = call(layer, x, mask).y, call(layer, x, mask).y
    np.testing.assert_array_equal(a, b)
    t1 = call(layer, x, mask, deterministic=False, rng=jax.random.key(1)).y
    t2 = call(layer, x, mask, deterministic=False, rng=jax.random.key(2)).y
    assert not np.allclose(t1, t2)
    out = call(layer, x, mask)
    assert float(out.stats['prediction_accuracy']) < 0.5  # no information in a random mask


def test_threshold_selection_follows_predicted_scores():
    layer = build(selection='threshold', threshold=0.3, precision='fp32')
    x, mask = inputs(16)
    maps = layer.inspect_maps(x, mask, None)
    kept, sel = np.asarray(maps['kept']), np.asarray(maps['predicted_scores'])
    m = np.asarray(mask)
    valid = (m[:, :, None] & m[:, None, :])[:, None]
    assert (kept <= valid).all()
    assert (kept[(sel >= 0.3) & valid]).all()
    extra = kept & (sel < 0.3)  # only a row's best key may lie below the threshold
    assert (extra.sum(-1) <= 1).all()
    assert (kept.sum(-1)[np.broadcast_to(m[:, None], kept.shape[:3])] >= 1).all()


# -- config, cost model ------------------------------------------------------------------------
BAD = [
    ('sigma', 0.0), ('sigma', 1.5), ('sigma', 0.001), ('sparsity', 1.0), ('sparsity', -0.1),
    ('precision', 'int3'), ('selection', 'topp'), ('granularity', 'row'), ('vector_size', 3),
    ('block_q', 0), ('block_k', -4), ('threshold', float('nan')), ('mse_weight', -1.0),
    ('mse_weight', float('inf')),
]


@pytest.mark.parametrize('field,value', BAD)
def test_bad_config_raises_one_clear_error(field, value):
    config = tiny_config('listops', 'attention=dsa')
    config.attention[field] = value
    with pytest.raises(base.ConfigError, match=rf'config\.attention\.{field}=') as err:
        config_lib.validate(config)
    assert 'not allowed' in str(err.value) and '\n' not in str(err.value)
    with pytest.raises(base.ConfigError, match=rf'attention\.{field}'):
        build(**{field: value})


def test_random_precision_requires_topk():
    config = tiny_config('listops', 'attention=dsa')
    config.attention.precision, config.attention.selection = 'random', 'threshold'
    with pytest.raises(base.ConfigError, match='attention.selection'):
        config_lib.validate(config)


def test_defaults_and_sweeps():
    cfg = dsa.default_config()
    assert (cfg.sigma, cfg.precision, cfg.sparsity, cfg.granularity) == (0.25, 'int4', 0.9,
                                                                         'element')
    sweeps = dsa.METHOD.sweeps
    assert [p['sigma'] for p in sweeps['table2_sigma']] == [0.1, 0.16, 0.2, 0.25, 0.33]
    assert [p['precision'] for p in sweeps['table2_precision']] == [
        'random', 'int2', 'int4', 'int8', 'fp32']
    assert [p['sparsity'] for p in sweeps['fig3_sparsity']] == [0.9, 0.95, 0.99]
    config = tiny_config('text', 'attention=dsa,synthetic')
    for sweep in sweeps.values():
        for point in sweep:
            c = config.copy_and_resolve_references()
            c.attention.update(point)
            config_lib.validate(c)


def test_layer_cost_counts_what_each_path_runs():
    dims = base.AttentionDims(emb_dim=64, qkv_dim=64, num_heads=4, max_len=40)
    cfg = ml_collections.ConfigDict({**dsa.default_config().to_dict(), 'impl': 'xla'})
    k_max = dsa.static_keep_count(40, cfg.sparsity)  # 4
    layer = dsa.layer_cost(dims, cfg, 40)
    assert (layer.tokens, layer.tokens_out, layer.qkv_width) == (40, 40, 64)
    # element on xla: the dense QKᵀ and AV, the softmax on the kept entries only
    kept = 4 * 40 * k_max
    assert layer.attention['scores'] == (cost.matmul(40, 16, 40, batch=4) + 4 * 40 * 40
                                         + kept * dsa._GATHER_OPS)
    assert layer.attention['softmax'] == kept * 10
    assert 'predictor' in layer.attention
    cfg.granularity, cfg.block_q, cfg.block_k = 'block', 8, 8
    block = dsa.layer_cost(dims, cfg, 40).attention
    kept_keys = dsa.static_keep_count(5, cfg.sparsity) * 8  # 1 of 5 key blocks, whole tiles
    assert block['values'] == cost.matmul(8, kept_keys, 16, batch=4 * 5)
    cfg.impl = 'reference'
    reference = dsa.layer_cost(dims, cfg, 40).attention
    assert reference['values'] == cost.matmul(40, 40, 16, batch=4)  # masked dense attention
    cfg.precision = 'oracle'
    assert 'predictor' not in dsa.layer_cost(dims, cfg, 40).attention
    with_accuracy = dsa.layer_cost(dims, cfg, 40).attention['statistics']
    cfg.accuracy_stat = 'off'
    assert dsa.layer_cost(dims, cfg, 40).attention['statistics'] < with_accuracy


COST_SETTINGS = [
    ('xla', {'granularity': 'vector', 'vector_size': 4}),
    ('xla', {'granularity': 'vector', 'vector_size': 8, 'precision': 'fp32'}),
    ('xla', {'granularity': 'block', 'block_q': 16, 'block_k': 32}),
    ('xla', {'precision': 'oracle'}),
    ('xla', {'pipeline': 'project_first', 'precision': 'int8', 'accuracy_stat': 'off'}),
    ('reference', {'selection': 'threshold'}),
    ('reference', {'granularity': 'vector', 'precision': 'random'}),
    ('reference', {'granularity': 'block', 'selection': 'threshold', 'precision': 'bf16'}),
]


@pytest.mark.parametrize('seq_len', [64, 256])
@pytest.mark.parametrize('impl,overrides', COST_SETTINGS)
def test_cost_formula_matches_xla_for_other_settings(impl, overrides, seq_len):
    """Non-default granularities, selections and precisions, checked as tests/test_cost.py does."""
    from test_cost import (
        ATTENTION_TOLERANCE,
        IMPL_SETTINGS,
        build_layer,
        layer_forward_ops,
        projection_ops,
    )

    saved = IMPL_SETTINGS.get(('dsa', impl))
    IMPL_SETTINGS[('dsa', impl)] = overrides
    try:
        layer, dims, cfg = build_layer('dsa', impl, seq_len)
    finally:
        IMPL_SETTINGS.pop(('dsa', impl))
        if saved is not None:
            IMPL_SETTINGS[('dsa', impl)] = saved
    formula = attention.get_method('dsa').layer_cost(dims, cfg, seq_len)
    counted = layer_forward_ops(layer, seq_len) - projection_ops(formula)
    assert formula.attention_ops == pytest.approx(counted, rel=ATTENTION_TOLERANCE), (
        f'{impl} {overrides} L={seq_len}: {dict(formula.attention)} vs XLA {counted:.0f}')


@pytest.mark.parametrize('length', [64, 128])
def test_pallas_cost_is_the_whole_kernel_at_one_grid_step(length):
    """The Pallas interpreter is a loop XLA counts once: with one head and one tile of
    ``length × length`` the grid is one program looping over one kept tile, so XLA's count is
    the whole layer."""
    from test_cost import ATTENTION_TOLERANCE, layer_forward_ops, projection_ops

    cfg = ml_collections.FrozenConfigDict({
        **dsa.default_config().to_dict(), 'name': 'dsa', 'impl': 'pallas',
        'apply': 'train_and_eval', 'granularity': 'block', 'block_q': length,
        'block_k': length})
    dims = base.AttentionDims(emb_dim=64, qkv_dim=64, num_heads=1, max_len=length)
    layer = dsa.DSAAttention(dims, cfg, rngs=nnx.Rngs(params=0))
    formula = attention.get_method('dsa').layer_cost(dims, cfg, length)
    assert formula.attention['scores'] == cost.matmul(length, 64, length)  # one program, one tile
    counted = layer_forward_ops(layer, length) - projection_ops(formula)
    assert formula.attention_ops == pytest.approx(counted, rel=ATTENTION_TOLERANCE)


# -- training -----------------------------------------------------------------------------------
SMOKE = {'num_train_steps': 3, 'log_every_steps': 1, 'eval_every_steps': 3,
         'checkpoint_every_steps': 3, 'batch_size': 4, 'num_eval_steps': 1,
         'model.num_layers': 1, 'max_length': 60, 'data.listops_max_length': 60,
         'data.listops_num_train': 64, 'data.listops_num_val': 16, 'data.listops_num_test': 16}


def test_tiny_listops_trains_with_dsa(tmp_path):
    config = tiny_config('listops', 'attention=dsa,impl=xla', **SMOKE)
    results = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(results['test']['loss']) and results['attention'] == 'dsa'
    events = [e for e in metrics.read_metrics(str(tmp_path)) if e['split'] == 'train']
    assert len(events) == 3
    for e in events:
        assert np.isfinite(e['loss']) and e['aux_loss'] > 0
        assert e['sparsity'] == pytest.approx(0.9, abs=0.05)
        assert np.isfinite(e['mse'])
        assert 'prediction_accuracy' not in e  # accuracy_stat='eval': off the training step
    evals = [e for e in metrics.read_metrics(str(tmp_path)) if e['split'] != 'train']
    assert evals and all(0.0 <= e['prediction_accuracy'] <= 1.0 for e in evals)


def test_init_from_dense_loads_dense_weights_and_fresh_predictor(tmp_path):
    dense = tiny_config('listops', 'attention=dense', **SMOKE)
    train.train_and_evaluate(dense, str(tmp_path / 'dense'))
    config = tiny_config('listops', 'attention=dsa', **SMOKE)
    _, state, _ = train.init_state(config, data.task_info(config))
    fresh = _flat(state.params.to_pure_dict())
    loaded = _flat(train.init_from_workdir(state, str(tmp_path / 'dense')).params.to_pure_dict())
    source = {k.removesuffix('/value'): v
              for k, v in _flat(train.restore_params(str(tmp_path / 'dense'))).items()}
    predictor = [key for key in loaded if 'pred_' in key]
    assert predictor and not any(key in source for key in predictor)
    for key in predictor:
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(fresh[key]))
    assert set(source) < set(loaded)
    for key, value in source.items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value), err_msg=key)


def _flat(tree, prefix=''):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f'{prefix}{k}/'))
        else:
            out[f'{prefix}{k}'] = v
    return out


# -- pooled selection, the xla block path, the accuracy sample -------------------------------------
@pytest.mark.parametrize('seed', [0, 1])
def test_pooled_selection_equals_dense_selection_on_untied_inputs(seed):
    rng = np.random.default_rng(seed)
    fq = rng.normal(size=(B, L, H, 3)).astype(np.float32)
    fk = rng.normal(size=(B, L, H, 3)).astype(np.float32)
    _, mask = inputs()
    m = np.asarray(mask)
    fq, fk = (np.where(m[:, :, None, None], f, 0.0) for f in (fq, fk))
    dense = jnp.asarray(np.einsum('bqhf,bkhf->bhqk', fq, fk))
    fq, fk = jnp.asarray(fq), jnp.asarray(fk)
    for size in (2, 4, 8):
        pooled = dsa.pooled_group_scores(fq, fk, mask, size)
        np.testing.assert_allclose(pooled, dsa.group_scores(dense, mask, size), rtol=1e-5,
                                   atol=1e-6)
        count = dsa.keep_count(jnp.sum(mask, axis=1), 0.7)
        np.testing.assert_array_equal(dsa.topk_keep(pooled, mask, count),
                                      dsa.topk_keep(dsa.group_scores(dense, mask, size), mask,
                                                    count))
    for bq, bk in ((8, 4), (4, 8), (16, 16)):
        pooled = dsa.pooled_tile_means(fq, fk, mask, mask, bq, bk)
        want = dsa.tile_means(dense, mask, mask, bq, bk)
        np.testing.assert_array_equal(np.isinf(pooled), np.isinf(want))
        finite = np.isfinite(np.asarray(want))
        np.testing.assert_allclose(np.asarray(pooled)[finite], np.asarray(want)[finite],
                                   rtol=1e-5, atol=1e-6)
        for args in ((0.6, 'topk', 0.0), (0.0, 'threshold', 0.2)):
            got = dsa.select_tiles(pooled, mask, bk, *args)
            ref = dsa.select_tiles(want, mask, bk, *args)
            np.testing.assert_array_equal(dsa.tiles_keep(*got, mask, mask, bq, bk),
                                          dsa.tiles_keep(*ref, mask, mask, bq, bk))


def _shapes(jaxpr):
    """Every intermediate's shape in a jaxpr, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        out += [v.aval.shape for v in eqn.outvars if hasattr(v.aval, 'shape')]
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, 'subjaxprs') else ():
            out += _shapes(sub)
        for param in eqn.params.values():
            inner = getattr(param, 'jaxpr', None)
            if inner is not None and hasattr(inner, 'eqns'):
                out += _shapes(inner)
            elif hasattr(param, 'eqns'):
                out += _shapes(param)
    return out


def test_xla_block_path_forms_no_length_by_length_array():
    length = 96
    settings = dict(granularity='block', block_q=16, block_k=16, sparsity=0.75)
    layer = build('xla', dims=base.AttentionDims(emb_dim=E, qkv_dim=E, num_heads=H,
                                                 max_len=length), **settings)
    x, mask = inputs(18, lengths=(length - 9, 50), length=length)
    graphdef, state = nnx.split(layer)

    def loss(state, deterministic):
        out = call(nnx.merge(graphdef, state), x, mask, deterministic=deterministic)
        return jnp.sum(out.y ** 2) + sum(out.aux_losses.values()) + sum(out.stats.values())
    for fn in (lambda s: loss(s, True), jax.grad(lambda s: loss(s, False))):
        shapes = _shapes(jax.make_jaxpr(fn)(state).jaxpr)
        assert shapes and not [s for s in shapes if list(s).count(length) >= 2]
    ref = build('reference', dims=layer.dims, **settings)
    nnx.update(ref, nnx.state(layer))
    np.testing.assert_allclose(call(layer, x, mask).y, call(ref, x, mask).y, rtol=1e-5,
                               atol=1e-5)


def test_prediction_accuracy_sample_and_every_row():
    length = 40
    dims = base.AttentionDims(emb_dim=E, qkv_dim=E, num_heads=H, max_len=length)
    x, mask = inputs(19, lengths=(length, 29), length=length)
    full = build(dims=dims, accuracy_rows=0, sparsity=0.8)
    q, k, _ = full.project_qkv(x)
    maps = full.inspect_maps(x, mask, None)
    valid = base.pair_mask(mask, mask)
    s = base.attention_scores(q, k) / math.sqrt(D)
    want = float(dsa.prediction_accuracy(s, maps['kept'], valid))  # the full-row statistic
    assert float(call(full, x, mask).stats['prediction_accuracy']) == pytest.approx(want)
    # A sample of 8 rows: the statistic over exactly those rows.
    sampled = build(dims=dims, accuracy_rows=8, sparsity=0.8)
    nnx.update(sampled, nnx.state(full))
    rows, row_ok = (np.asarray(t) for t in dsa.sample_rows(mask, 8))
    m = np.asarray(mask)
    for b in range(2):
        picked = rows[b][row_ok[b]]
        assert len(set(picked)) == len(picked) == 8 and m[b, picked].all()
    keep_rows = np.zeros(np.asarray(maps['kept']).shape, bool)
    for b in range(2):
        keep_rows[b, :, rows[b][row_ok[b]]] = True
    kept = np.asarray(maps['kept']) & keep_rows
    want = float(dsa.prediction_accuracy(s, jnp.asarray(kept), valid))
    assert float(call(sampled, x, mask).stats['prediction_accuracy']) == pytest.approx(want)
    # Off the training step by default; 'always' logs it there too; 'off' never.
    train_kw = dict(deterministic=False, rng=jax.random.key(0))
    assert 'prediction_accuracy' not in call(full, x, mask, **train_kw).stats
    assert 'prediction_accuracy' in call(build(dims=dims, accuracy_stat='always'), x, mask,
                                         **train_kw).stats
    assert 'prediction_accuracy' not in call(build(dims=dims, accuracy_stat='off'), x, mask).stats


# -- the low-precision pipelines against numpy -------------------------------------------------
def _np_codes(x, bits, axes):
    """Symmetric codes and scales (round half to even), one scale over ``axes``."""
    qmax = 2.0 ** (bits - 1) - 1
    amax = np.max(np.abs(x), axis=axes, keepdims=True)
    safe = np.where(amax > 0, amax, qmax)
    return np.clip(np.round(x * qmax / safe), -qmax, qmax), safe / qmax


def np_fig9_scores(x, p, wq, wk, bits):
    """Fig. 9 in numpy (float64): quantized X, one fused low-precision weight P·W̃ per path,
    integer GEMMs, Q̃/K̃ re-quantized per token and head; S̃ = codes dot × scales / sqrt(k)."""
    k = p.shape[-1]
    cx, sx = _np_codes(x, bits, (2,))  # [B, L, 1]
    out = []
    for w in (wq, wk):
        fused = np.einsum('ehk,hkj->ehj', p, w)
        cw, sw = _np_codes(fused, bits, (0,))  # [1, H, k]
        y = np.einsum('ble,ehj->blhj', cx, cw) * sw[0]
        cy, sy = _np_codes(y, bits, (3,))
        out.append((cy, sy[..., 0] * sx))
    (cq, sq), (ck, sk) = out
    return (np.einsum('bqhk,bshk->bhqs', cq, ck) * np.einsum('bqh,bsh->bhqs', sq, sk)
            / math.sqrt(k))


def np_project_first_scores(x, p, wq, wk, bits):
    """The earlier pipeline in numpy: X·P in float, then codes of XP (per token and head), of W̃
    (per output column) and of Q̃/K̃ (per token and head)."""
    k = p.shape[-1]
    xp = np.einsum('ble,ehk->blhk', x, p)
    cx, sx = _np_codes(xp, bits, (3,))
    out = []
    for w in (wq, wk):
        cw, sw = _np_codes(w, bits, (1,))  # [H, 1, k]
        y = np.einsum('blhk,hkj->blhj', cx, cw) * sw[None, :, 0]
        cy, sy = _np_codes(y, bits, (3,))
        out.append((cy, (sy * sx)[..., 0]))
    (cq, sq), (ck, sk) = out
    return (np.einsum('bqhk,bshk->bhqs', cq, ck) * np.einsum('bqh,bsh->bhqs', sq, sk)
            / math.sqrt(k))


def _np_topk_mask(scores, m, sparsity):
    keep = np.zeros(scores.shape, bool)
    for b in range(scores.shape[0]):
        c = math.ceil((1 - sparsity) * m[b].sum() - 1e-4)
        for h, r in np.ndindex(*scores.shape[1:3]):
            if m[b, r]:
                row = np.where(m[b], scores[b, h, r], -np.inf)
                keep[b, h, r, np.argsort(-row, kind='stable')[:c]] = True
    return keep


@pytest.mark.parametrize('pipeline', ['fused', 'project_first'])
@pytest.mark.parametrize('precision', ['int8', 'int4', 'int2'])
def test_pipeline_equals_numpy_and_gives_the_same_mask(pipeline, precision):
    bits = dsa.PRECISION_BITS[precision]
    layer = build(precision=precision, pipeline=pipeline, sparsity=0.75)
    x, mask = inputs(20)
    m = np.asarray(mask)
    args = (np.where(m[..., None], np.asarray(x, np.float64), 0.0),
            np.asarray(layer.projection[...], np.float64),
            np.asarray(layer.pred_query[...], np.float64),
            np.asarray(layer.pred_key[...], np.float64), bits)
    want = (np_fig9_scores if pipeline == 'fused' else np_project_first_scores)(*args)
    valid = np.broadcast_to((m[:, :, None] & m[:, None, :])[:, None], want.shape)
    _, _, got = layer.predict(x, mask)
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=1e-5, atol=1e-6)
    # Untied rows (the kept count's score differs from the next one) get identical masks.
    untied = np.zeros(want.shape[:3], bool)
    for b, h, r in np.ndindex(*want.shape[:3]):
        row = np.sort(want[b, h, r][m[b]])[::-1]
        c = math.ceil(0.25 * m[b].sum() - 1e-4)
        untied[b, h, r] = m[b, r] and (c == len(row) or row[c - 1] - row[c] > 1e-6)
    assert untied[m[:, None, :].repeat(H, 1)].mean() > 0.3, 'too few untied rows to compare'
    kept = np.asarray(layer.inspect_maps(x, mask, None)['kept'])
    np.testing.assert_array_equal(kept[untied], _np_topk_mask(want, m, 0.75)[untied])
    for impl in ('xla',):  # the xla path keeps the same pairs
        other = build(impl, precision=precision, pipeline=pipeline, sparsity=0.75)
        nnx.update(other, nnx.state(layer))
        np.testing.assert_allclose(call(other, x, mask).y, call(layer, x, mask).y, rtol=1e-5,
                                   atol=1e-5)
