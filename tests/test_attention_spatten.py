"""SpAtten: schedules, Algorithm 2 vs numpy, cascade pruning, quantization, cost model, models."""

import collections
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from lra_sparse import attention, config_lib
from lra_sparse.attention import base, cost, spatten
from lra_sparse.models import transformer

E, H = 16, 2
Info = collections.namedtuple('Info', 'name num_classes seq_len vocab_size pair_inputs')


def make_cfg(impl='xla', **overrides):
    cfg = config_lib.attention_config('spatten', impl, overrides.pop('apply', 'train_and_eval'))
    for key, value in overrides.items():
        cfg[key] = value
    return ml_collections.FrozenConfigDict(cfg)


PLAIN = dict(quant='none', value_keep_ratio=1.0, head_keep_final=1.0)


def make_layers(num_layers, impl='xla', heads=H, emb=E, seed=0, **overrides):
    cfg = make_cfg(impl, **overrides)
    rngs = nnx.Rngs(params=seed)
    return [spatten.SpAttenAttention(
        base.AttentionDims(emb_dim=emb, qkv_dim=emb, num_heads=heads, max_len=64, layer_index=i,
                           num_layers=num_layers), cfg, rngs=rngs) for i in range(num_layers)]


def copy_weights(src, dst):
    for a, b in zip(src, dst):
        for proj in ('query', 'key', 'value', 'out'):
            getattr(b, proj).kernel[...] = getattr(a, proj).kernel[...]


def run_stack(layers, x, mask):
    """Runs the layers through the encoder's loop (``transformer.run_blocks``), each block being
    the bare attention layer: every layer sees the same x, gathered with the carry's select (as
    ``transformer.Block`` gathers before its feed-forward).

    Returns:
      ([(AttentionOutput, mask entering the layer)] per layer, the last carry).
    """
    def block(layer):
        def run(x, mask, carry, *, deterministic, rng):
            out = layer(x, mask, carry, deterministic=deterministic, rng=rng)
            if out.carry.select is not None:
                x = jnp.take_along_axis(x, out.carry.select[:, :, None], axis=1)
            return x, out
        return run

    batch, length = mask.shape
    carry = base.LayerCarry(positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                                       (batch, length)))
    _, _, carry, trace = transformer.run_blocks([block(layer) for layer in layers], x, mask,
                                                carry, deterministic=True,
                                                keys=[None] * len(layers))
    return trace, carry


def random_inputs(lengths, length, emb=E, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(lengths), length, emb)).astype(np.float32)
    mask = np.arange(length)[None] < np.asarray(lengths)[:, None]
    return jnp.asarray(x), jnp.asarray(mask)


# -- numpy reference of one layer -----------------------------------------------------------------
def np_probs(layer, x, mask, heads=None):
    """float64 probabilities [batch, H, n, n] and per-head outputs [batch, n, H, D]."""
    x = np.asarray(x, np.float64)
    h, d = layer.dims.num_heads, layer.dims.head_dim
    projs = (layer.query, layer.key, layer.value)
    q, k, v = (np.einsum('ble,ef->blf', x, np.asarray(p.kernel[...], np.float64))
               .reshape(x.shape[0], x.shape[1], h, d) for p in projs)
    s = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(d)
    valid = (np.asarray(mask)[:, :, None] & np.asarray(mask)[:, None, :])[:, None]
    s = np.where(valid, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    p = np.where(valid, p / np.maximum(p.sum(-1, keepdims=True), 1e-300), 0.0)
    return p, np.einsum('bhqk,bkhd->bqhd', p, v)


def np_topk(scores, valid, keep):
    """Algorithm 2's top-k with index 0 forced and ties to the lowest index."""
    cand = [i for i in range(len(scores)) if valid[i] and i != 0]
    cand.sort(key=lambda i: (-scores[i], i))
    head = [0] if valid[0] else []
    return sorted(head + cand[:keep - len(head)])


# -- schedules and validation -------------------------------------------------------------------
def test_schedules_follow_the_rules():
    cfg = make_cfg()
    np.testing.assert_allclose(spatten.token_keep_schedule(cfg, 4), [1, 5 / 6, 2 / 3, 0.5])
    assert spatten.token_keep_schedule(cfg, 1) == (1.0,)
    late = make_cfg(token_prune_start_layer=2, token_keep_final=0.25)
    np.testing.assert_allclose(spatten.token_keep_schedule(late, 4), [1, 1, 0.625, 0.25])
    explicit = make_cfg(token_keep_ratios=(1.0, 0.9, 0.4))
    assert spatten.token_keep_schedule(explicit, 3) == (1.0, 0.9, 0.4)
    assert spatten.head_keep_schedule(cfg, 8, 4) == (8, 8, 8, 6)
    assert spatten.head_keep_schedule(cfg, 16, 24) == (16,) * 16 + (12,) * 8
    assert spatten.head_keep_schedule(cfg, 4, 2) == (4, 3)
    assert spatten.head_keep_schedule(cfg, 8, 1) == (8,)
    assert spatten.capacity_chain(101, (1, 5 / 6, 2 / 3, 0.5), 3) == 51  # 101 -> 85 -> 68 -> 51


BAD = [
    ('token_keep_ratios', (1.0, 1.5)), ('token_keep_ratios', (1.0, 0.0)),
    ('token_keep_ratios', (1.0, 0.5, 0.25)), ('token_keep_ratios', (0.5, 0.5)),
    ('token_keep_final', 0.0),
    ('token_keep_final', 1.2), ('token_prune_start_layer', 0), ('token_prune_start_layer', 3),
    ('head_keep_counts', (4, 5)), ('head_keep_counts', (4,)), ('head_keep_counts', (5, 4)),
    ('head_keep_counts', (4, 0)), ('head_keep_final', 0.0), ('value_keep_ratio', 0.0),
    ('value_keep_ratio', 1.1), ('quant', 'dynamic'), ('msb_bits', 5), ('msb_bits', 16),
    ('lsb_bits', 2), ('requant_threshold', -0.1), ('requant_threshold', 1.5),
]


@pytest.mark.parametrize('field,value', BAD)
def test_bad_inputs_name_the_field(field, value):
    config = tiny_config('listops', 'attention=spatten')  # 2 layers, 4 heads
    config.attention[field] = value
    with pytest.raises(base.ConfigError, match=f'attention.{field}'):
        config_lib.validate(config)


def test_increasing_ratios_rejected_and_defaults_valid():
    config = tiny_config('listops', 'attention=spatten', **{'model.num_layers': 3})
    config_lib.validate(config)
    config.attention.token_keep_ratios = (1.0, 0.5, 0.7)
    with pytest.raises(base.ConfigError, match='token_keep_ratios'):
        config_lib.validate(config)


# -- selection ----------------------------------------------------------------------------------
def test_select_tokens_topk_ties_cls_and_padding():
    scores = jnp.asarray([[0.0, 5.0, 2.0, 2.0, 2.0, 9.0, 7.0, 1.0],
                          [0.0, 1.0, 1.0, 1.0, 1.0, 3.0, 0.0, 0.0],
                          [4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    valid = jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0],
                         [0, 0, 0, 0, 0, 0, 0, 0]], bool)
    keep = jnp.asarray([5, 3, 0], jnp.int32)
    select, kept = spatten.select_tokens(scores, valid, keep, capacity=5)
    # Row 0: CLS (lowest score) forced, then 9, 7, 5 and the first of the tied 2s (index 2).
    assert select[0].tolist() == [0, 1, 2, 5, 6]
    # Row 1: CLS, 3.0 (index 5), first of the tied 1s (index 1); padding 6, 7 fills the capacity.
    assert select[1].tolist() == [0, 1, 5, 6, 7]
    assert np.asarray(kept[1]).nonzero()[0].tolist() == [0, 1, 5]
    # A fully padded example keeps index 0 and padding only.
    assert select[2].tolist() == [0, 1, 2, 3, 4] and not np.asarray(kept[2]).any()


def test_select_keeps_invalid_first_position_in_place():
    scores = jnp.asarray([[0.0, 1.0, 3.0, 2.0, 0.0, 0.0]])
    valid = jnp.asarray([[0, 1, 1, 1, 0, 0]], bool)  # image: pixel 0 is padding, so is CLS
    select, kept = spatten.select_tokens(scores, valid, jnp.asarray([2]), capacity=4)
    assert select[0].tolist() == [0, 2, 3, 4]
    assert np.asarray(kept[0]).nonzero()[0].tolist() == [2, 3]


def test_top_heads_lowest_dropped_ties_to_lowest_id():
    head_scores = jnp.asarray([[3.0, 1.0, 3.0, 7.0]])
    keep = spatten.top_heads(head_scores, jnp.asarray([[0, 1, 2, 3]]), 2)
    assert keep.tolist() == [[0, 3]]
    keep = spatten.top_heads(head_scores, jnp.asarray([[1, 2]]), 1)
    assert keep.tolist() == [[2]]


# -- Algorithm 2 against numpy --------------------------------------------------------------------
def test_cumulative_scores_match_numpy_algorithm2():
    lengths, length = [16, 11], 16
    layers = make_layers(3, token_keep_ratios=(1.0, 0.75, 0.5), length_adaptive=False, **PLAIN)
    x, mask = random_inputs(lengths, length)
    outs, _ = run_stack(layers, x, mask)
    xs, masks = np.asarray(x), np.asarray(mask)
    for b in range(2):
        s = np.zeros(length)
        pos = np.arange(length)
        n = length
        for layer_index, ratio in enumerate([0.75, 2 / 3]):
            xb, mb = xs[b][pos], masks[b][pos]
            p, _ = np_probs(layers[layer_index], xb[None], mb[None])
            s = s + p[0].sum(axis=(0, 1))
            v = int(mb.sum())
            keep = math.ceil(v * ratio - 1e-9)
            n_next = math.ceil(n * ratio - 1e-9)
            kept = np_topk(s, mb, keep)
            pad = [i for i in range(n) if not mb[i] and i not in kept]
            sel = sorted(kept + pad[:n_next - len(kept)])
            carry = outs[layer_index][0].carry
            assert carry.select[b].tolist() == sel
            np.testing.assert_allclose(carry.state['token_scores'][b], s[sel], rtol=1e-5,
                                       atol=1e-5)
            s, pos, n = s[sel], pos[sel], n_next
            assert carry.positions[b].tolist() == pos.tolist()
            new_mask = np.asarray(outs[layer_index + 1][1][b])
            assert new_mask.sum() == keep and new_mask[0]
    # Tokens kept by the numpy rule in the last frame: 8 of 16 and 6 of 11.
    assert [int(m.sum()) for m in np.asarray(outs[2][1])] == [8, 6]


def test_pruned_tokens_never_reappear_and_cls_survives():
    layers = make_layers(4, token_keep_final=0.25, length_adaptive=False)
    x, mask = random_inputs([40, 23], 40, seed=3)
    outs, carry = run_stack(layers, x, mask)
    for out, _ in outs:
        pos = np.asarray(out.carry.positions)
        assert np.all(pos[:, 0] == 0) and np.all(np.diff(pos, axis=1) > 0)
    assert carry.positions.shape == (2, 10)
    for b in range(2):
        previous = set(range(40))
        for i in range(1, 4):
            pos = np.asarray(outs[i - 1][0].carry.positions)[b]
            valid = np.asarray(outs[i][1])[b]
            now = set(pos[valid].tolist())
            assert now <= previous, 'a pruned token reappeared'
            assert 0 in now, 'CLS pruned'
            previous = now
    assert [int(m.sum()) for m in np.asarray(outs[3][1])] == [10, 6]  # ceil chain of 0.25


def test_cls_kept_even_with_the_lowest_score():
    layers = make_layers(2, token_keep_ratios=(1.0, 0.25), **PLAIN)
    x, mask = random_inputs([16, 16], 16, seed=4)
    # Make every query ignore position 0: a huge negative key for it.
    x = x.at[:, 0].set(-x[:, 1] * 30)
    outs, _ = run_stack(layers, x, mask)
    scores = np.asarray(outs[0][0].carry.state['token_scores'])
    assert np.asarray(outs[0][0].carry.select)[:, 0].tolist() == [0, 0]
    assert np.all(np.asarray(outs[1][1])[:, 0])
    assert scores.shape == (2, 4)


def test_length_adaptive_budget():
    x, mask = random_inputs([32, 10], 32, seed=5)
    fixed = make_layers(2, token_keep_ratios=(1.0, 0.5), length_adaptive=False, **PLAIN)
    adaptive = make_layers(2, token_keep_ratios=(1.0, 0.5), length_adaptive=True, **PLAIN)
    copy_weights(fixed, adaptive)
    fixed_outs, _ = run_stack(fixed, x, mask)
    adaptive_outs, _ = run_stack(adaptive, x, mask)
    # Same fraction of each example's length vs a 16-token budget (short inputs unpruned).
    assert np.asarray(fixed_outs[1][1]).sum(1).tolist() == [16, 5]
    assert np.asarray(adaptive_outs[1][1]).sum(1).tolist() == [16, 10]
    assert float(adaptive_outs[1][0].stats['tokens_kept']) == pytest.approx(26 / 42)


# -- reference (dense-masked) vs xla (physical gather) -------------------------------------------
@pytest.mark.parametrize('quant', ['none', 'progressive'])
def test_reference_and_xla_layers_agree(quant):
    kw = dict(token_keep_ratios=(1.0, 0.6, 0.3), head_keep_counts=(4, 3, 2), quant=quant,
              requant_threshold=0.2, value_keep_ratio=0.5)
    ref = make_layers(3, 'reference', heads=4, **kw)
    xla = make_layers(3, 'xla', heads=4, **kw)
    copy_weights(ref, xla)
    x, mask = random_inputs([30, 17], 30, seed=6)
    ref_outs, _ = run_stack(ref, x, mask)
    xla_outs, _ = run_stack(xla, x, mask)
    for (r, _), (p, _) in zip(ref_outs, xla_outs):
        assert r.carry.select is None
        for key in r.stats:
            np.testing.assert_allclose(r.stats[key], p.stats[key], rtol=1e-5, atol=1e-6,
                                       err_msg=key)
    # Map xla outputs back to original positions and compare on surviving valid tokens.
    for i in range(3):
        positions = (np.asarray(xla_outs[i - 1][0].carry.positions) if i else
                     np.broadcast_to(np.arange(30), (2, 30)))
        valid = np.asarray(xla_outs[i][1])
        ry, py = np.asarray(ref_outs[i][0].y), np.asarray(xla_outs[i][0].y)
        for b in range(2):
            np.testing.assert_allclose(py[b][valid[b]], ry[b][positions[b][valid[b]]],
                                       rtol=2e-4, atol=2e-5)
            alive = np.asarray(ref_outs[i][1][b] & ref_outs[i - 1][0].carry.state['alive'][b]
                               if i else ref_outs[i][1][b])
            assert sorted(positions[b][valid[b]].tolist()) == np.nonzero(alive)[0].tolist()


# -- head pruning ---------------------------------------------------------------------------------
def test_head_pruning_drops_lowest_output_heads_and_runs():
    layers = make_layers(2, heads=4, head_keep_counts=(4, 2), token_keep_ratios=(1.0, 1.0),
                         quant='none', value_keep_ratio=1.0)
    x, mask = random_inputs([12, 7], 12, seed=7)
    outs, _ = run_stack(layers, x, mask)
    _, o = np_probs(layers[0], x, mask)
    importance = np.abs(o).sum(axis=(1, 3))  # [batch, heads]
    expected = np.sort(np.argsort(-importance, kind='stable')[:, :2], axis=1)
    head_keep = np.asarray(outs[0][0].carry.state['head_keep'])
    assert head_keep.tolist() == expected.tolist()
    np.testing.assert_allclose(outs[0][0].carry.state['head_scores'], importance, rtol=1e-4)
    # Layer 1 = attention with only the kept heads (numpy, pruned heads contribute nothing).
    y = np.asarray(outs[1][0].y)
    assert np.isfinite(y).all() and float(outs[1][0].stats['heads_kept']) == 0.5
    _, o1 = np_probs(layers[1], x, mask)
    w_out = np.asarray(layers[1].out.kernel[...], np.float64).reshape(4, E // 4, E)
    for b in range(2):
        kept = head_keep[b]
        want = np.einsum('lhd,hde->le', o1[b][:, kept], w_out[kept])
        np.testing.assert_allclose(y[b], want, rtol=1e-4, atol=1e-5)


# -- quantization ---------------------------------------------------------------------------------
def np_codes(x, mask, bits):
    x = np.asarray(x, np.float64)
    amax = np.max(np.where(np.asarray(mask)[:, :, None, None], np.abs(x), 0), axis=(1, 3),
                  keepdims=True)
    qmax = 2.0 ** (bits - 1) - 1
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.round(x / scale), -qmax, qmax), scale


def test_msb_lsb_quant_matches_numpy():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(2, 6, 2, 4)).astype(np.float32))
    mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [4]]))
    msb, full = spatten.msb_lsb_quant(x, mask, 6, 4, rounding='floor')
    codes, scale = np_codes(x, mask, 10)
    np.testing.assert_allclose(full, codes * scale, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(msb, np.floor(codes / 16) * 16 * scale, rtol=1e-6, atol=1e-7)
    assert np.abs(np.floor(codes / 16)).max() <= 2 ** 5  # fits in 6 signed bits
    # Straight-through gradient.
    g = jax.grad(lambda x: jnp.sum(spatten.msb_lsb_quant(x, mask, 6, 4, 'floor')[0] * 3.0))(x)
    np.testing.assert_allclose(g, 3.0)


# The former progressive mode: floor MSBs, Q and K only, absolute threshold.
OLD_PROGRESSIVE = dict(msb_rounding='floor', quant_values=False, requant_reference_length=0)


def quant_layer(**kw):
    return make_layers(1, token_keep_ratios=(1.0,), head_keep_final=1.0, value_keep_ratio=1.0,
                       **kw)[0]


def test_progressive_threshold_zero_and_one():
    x, mask = random_inputs([20, 13], 20, seed=9)
    carry = base.LayerCarry(positions=jnp.zeros((2, 20), jnp.int32))
    none = quant_layer(quant='progressive', requant_threshold=0.0, **OLD_PROGRESSIVE)
    all_rows = quant_layer(quant='progressive', requant_threshold=1.0, **OLD_PROGRESSIVE)
    static12 = quant_layer(quant='static', static_bits=12, quant_values=False)
    copy_weights([none], [all_rows])
    copy_weights([none], [static12])
    out0, out1 = none(x, mask, carry), all_rows(x, mask, carry)
    assert float(out0.stats['lsb_refetch_fraction']) == 0.0
    assert float(out0.stats['average_bits']) == 8.0
    assert float(out1.stats['lsb_refetch_fraction']) == 1.0
    assert float(out1.stats['average_bits']) == 12.0
    # Every row refetched = the MSB+LSB (12-bit) computation.
    np.testing.assert_allclose(out1.y, static12(x, mask, carry).y, rtol=1e-5, atol=1e-6)
    # No row refetched = the MSB-only computation, checked in numpy.
    q, k, v = none.project_qkv(x)
    (cq, sq), (ck, sk) = np_codes(q, mask, 12), np_codes(k, mask, 12)
    qm, km = np.floor(cq / 16) * 16 * sq, np.floor(ck / 16) * 16 * sk
    s = np.einsum('bqhd,bkhd->bhqk', qm, km) / math.sqrt(8)
    valid = (np.asarray(mask)[:, :, None] & np.asarray(mask)[:, None, :])[:, None]
    s = np.where(valid, s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True)) * valid
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
    o = np.einsum('bhqk,bkhd->bqhd', p, np.asarray(v, np.float64)).reshape(2, 20, E)
    want = o @ np.asarray(none.out.kernel[...], np.float64)
    np.testing.assert_allclose(out0.y, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(out0.y, out1.y, atol=1e-6)


def test_dominated_row_is_not_refetched():
    layer = quant_layer(quant='progressive', requant_threshold=0.5, **OLD_PROGRESSIVE)
    n, d = 8, 8
    k = np.zeros((1, n, 1, d), np.float32)
    k[0, :, 0, :] = np.eye(d)[:n] * 0.1
    k[0, 3, 0, :] = 0.0
    k[0, 3, 0, 3] = 1.0
    q = np.full((1, n, 1, d), 0.01, np.float32)
    q[0, 0, 0, 3] = 40.0  # row 0: one key dominates
    mask = jnp.ones((1, n), bool)
    row_ok = jnp.ones((1, 1, n), bool)
    layer.dims = base.AttentionDims(emb_dim=d, qkv_dim=d, num_heads=1, max_len=n)
    probs, stats = layer._probs(jnp.asarray(q), jnp.asarray(k), mask, row_ok)
    assert float(jnp.max(probs[0, 0, 0])) > 0.99
    assert float(stats['lsb_refetch_fraction']) == pytest.approx((n - 1) / n)


# -- one layer against numpy: the defaults and every former behaviour -----------------------------
def np_quant(x, mask, bits):
    """Per (example, head) symmetric linear quantization of [batch, n, heads, d], nearest."""
    codes, scale = np_codes(x, mask, bits)
    return codes * scale


def np_msb(x, mask, msb, lsb, rounding):
    """(MSB value, full value) of the (msb + lsb)-bit code; the MSB half a signed msb-bit int."""
    codes, scale = np_codes(x, mask, msb + lsb)
    step = 2.0 ** lsb
    high = np.floor(codes / step) if rounding == 'floor' else np.round(codes / step)
    high = np.clip(high, -2.0 ** (msb - 1), 2.0 ** (msb - 1) - 1)
    return high * step * scale, codes * scale


def np_softmax(q, k, mask):
    s = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
    valid = (np.asarray(mask)[:, :, None] & np.asarray(mask)[:, None, :])[:, None]
    s = np.where(valid, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    return np.where(valid, p / np.maximum(p.sum(-1, keepdims=True), 1e-300), 0.0)


def np_layer(layer, x, mask, *, quant='none', bits=12, quant_values=False, msb=8, lsb=4,
             rounding='nearest', threshold=0.05, reference_length=0, value_pruning='per_query',
             ratio=1.0):
    """One SpAtten layer (layer 0: no token or head pruning yet) in float64 numpy.

    Returns:
      (y [batch, n, emb], probs used in AV [batch, H, n, n], refetched rows [batch, H, n]).
    """
    x, mask = np.asarray(x, np.float64), np.asarray(mask)
    h, d = layer.dims.num_heads, layer.dims.head_dim
    q, k, v = (np.einsum('ble,ef->blf', x, np.asarray(p.kernel[...], np.float64))
               .reshape(x.shape[0], x.shape[1], h, d)
               for p in (layer.query, layer.key, layer.value))
    need = np.zeros((x.shape[0], h, x.shape[1]), bool)
    if quant == 'static':
        p = np_softmax(np_quant(q, mask, bits), np_quant(k, mask, bits), mask)
        v = np_quant(v, mask, bits) if quant_values else v
    elif quant == 'progressive':
        qm, qf = np_msb(q, mask, msb, lsb, rounding)
        km, kf = np_msb(k, mask, msb, lsb, rounding)
        p_msb, p_full = np_softmax(qm, km, mask), np_softmax(qf, kf, mask)
        keys = np.maximum(mask.sum(1), 1)[:, None, None]
        thr = threshold * reference_length / keys if reference_length else threshold
        need = (p_msb.max(-1) < thr) & mask[:, None, :]
        p = np.where(need[..., None], p_full, p_msb)
        v = np_quant(v, mask, msb + lsb) if quant_values else v
    else:
        p = np_softmax(q, k, mask)
    if ratio < 1.0:
        keep = np.zeros(p.shape, bool)
        for b in range(p.shape[0]):
            kv = math.ceil(ratio * mask[b].sum() - 1e-4)
            for hh in range(h):
                if value_pruning == 'per_head':  # one set per head by column mass, ties low id
                    mass = np.where(mask[b], p[b, hh].sum(0), -np.inf)
                    cols = np.argsort(-mass, kind='stable')[:kv]
                    keep[b, hh][:, cols] = True
                else:  # per query row: its own kv largest probabilities among valid keys
                    for i in range(p.shape[2]):
                        row = np.where(mask[b], p[b, hh, i], -1.0)
                        keep[b, hh, i, np.argsort(-row, kind='stable')[:kv]] = True
        p = np.where(keep, p, 0.0)
    o = np.einsum('bhqk,bkhd->bqhd', p, v).reshape(x.shape[0], x.shape[1], h * d)
    return o @ np.asarray(layer.out.kernel[...], np.float64), p, need


def one_layer(impl='xla', **kw):
    return make_layers(1, impl, heads=4, token_keep_ratios=(1.0,), head_keep_final=1.0, **kw)[0]


def layer_y(layer, x, mask):
    carry = base.LayerCarry(positions=jnp.zeros(mask.shape, jnp.int32))
    return layer(x, mask, carry)


@pytest.mark.parametrize('impl', ['reference', 'xla'])
def test_per_query_value_pruning_matches_numpy(impl):
    x, mask = random_inputs([24, 15], 24, seed=11)
    layer = one_layer(impl, quant='none', value_keep_ratio=0.3)
    out = layer_y(layer, x, mask)
    want, p, _ = np_layer(layer, x, mask, ratio=0.3)
    np.testing.assert_allclose(out.y, want, rtol=1e-4, atol=1e-5)
    # Every valid query row keeps exactly ceil(0.3 * valid) values (8 and 5), its own set.
    kept = (p > 0).sum(-1)
    assert set(kept[0].ravel()) == {8}
    assert set(kept[1][:, np.asarray(mask[1])].ravel()) == {5}
    assert len({tuple(np.nonzero(p[0, 0, i])[0]) for i in range(24)}) > 1
    assert float(out.stats['kept_fraction']) == pytest.approx(
        4 * (24 * 8 + 15 * 5) / (4 * (24 ** 2 + 15 ** 2)), rel=1e-6)
    # The per-query mask agrees with the helper given the same counts.
    mask_fn = spatten.per_query_value_mask(jnp.asarray(p[..., :], jnp.float32) + 0.0,
                                           mask, jnp.asarray([8, 5]), 8)
    assert ((np.asarray(mask_fn) > 0) == (p > 0)).all()


def test_per_query_keeps_more_mass_than_per_head():
    x, mask = random_inputs([32, 32], 32, seed=12)
    x = x * 3.0  # peaked rows, as after training
    per_query = one_layer(quant='none', value_keep_ratio=0.3)
    per_head = one_layer(quant='none', value_keep_ratio=0.3, value_pruning='per_head')
    copy_weights([per_query], [per_head])
    dense, _, _ = np_layer(per_query, x, mask)
    err_query = np.abs(np.asarray(layer_y(per_query, x, mask).y) - dense).mean()
    err_head = np.abs(np.asarray(layer_y(per_head, x, mask).y) - dense).mean()
    assert err_query < err_head


@pytest.mark.parametrize('impl', ['reference', 'xla'])
def test_per_head_option_is_the_former_rule(impl):
    x, mask = random_inputs([24, 15], 24, seed=13)
    layer = one_layer(impl, quant='none', value_keep_ratio=0.3, value_pruning='per_head')
    want, _, _ = np_layer(layer, x, mask, value_pruning='per_head', ratio=0.3)
    np.testing.assert_allclose(layer_y(layer, x, mask).y, want, rtol=1e-4, atol=1e-5)


def test_default_static_quantizes_q_k_v_at_12_bits():
    x, mask = random_inputs([24, 15], 24, seed=14)
    layer = one_layer(value_keep_ratio=1.0)  # defaults: static, 12 bits, V quantized
    out = layer_y(layer, x, mask)
    want, _, _ = np_layer(layer, x, mask, quant='static', bits=12, quant_values=True)
    np.testing.assert_allclose(out.y, want, rtol=1e-4, atol=1e-5)
    assert float(out.stats['average_bits']) == 12.0
    plain, _, _ = np_layer(layer, x, mask, quant='static', bits=12, quant_values=False)
    assert not np.allclose(want, plain, rtol=0, atol=1e-9)  # V really is quantized


@pytest.mark.parametrize('rounding,reference_length', [('nearest', 1024), ('floor', 0),
                                                       ('nearest', 0)])
def test_progressive_matches_numpy(rounding, reference_length):
    x, mask = random_inputs([24, 15], 24, seed=15)
    layer = one_layer(value_keep_ratio=1.0, quant='progressive', msb_bits=4,
                      msb_rounding=rounding, requant_threshold=0.08,
                      requant_reference_length=reference_length)
    out = layer_y(layer, x, mask)
    want, _, need = np_layer(layer, x, mask, quant='progressive', quant_values=True, msb=4,
                             rounding=rounding, threshold=0.08,
                             reference_length=reference_length)
    np.testing.assert_allclose(out.y, want, rtol=1e-4, atol=1e-5)
    rows = 4 * (24 + 15)
    assert float(out.stats['lsb_refetch_fraction']) == pytest.approx(need.sum() / rows)


def test_relative_threshold_refetches_fewer_rows_at_long_lengths():
    x, mask = random_inputs([256], 256, seed=16)
    absolute = one_layer(value_keep_ratio=1.0, quant='progressive', requant_reference_length=0)
    relative = one_layer(value_keep_ratio=1.0, quant='progressive', requant_reference_length=64)
    copy_weights([absolute], [relative])
    frac_abs = float(layer_y(absolute, x, mask).stats['lsb_refetch_fraction'])
    frac_rel = float(layer_y(relative, x, mask).stats['lsb_refetch_fraction'])
    assert frac_abs > 0.5 > frac_rel  # 0.05 absolute vs 0.05 * 64 / 256 = 0.0125


def test_nearest_msbs_are_unbiased_floor_is_not():
    rng = np.random.default_rng(17)
    x = jnp.asarray(rng.normal(size=(4, 64, 2, 16)).astype(np.float32))
    mask = jnp.ones((4, 64), bool)
    near, full = spatten.msb_lsb_quant(x, mask, 4, 4, 'nearest')
    floor, _ = spatten.msb_lsb_quant(x, mask, 4, 4, 'floor')
    want, _ = np_msb(x, mask, 4, 4, 'nearest')
    np.testing.assert_allclose(near, want, rtol=1e-6, atol=1e-7)
    codes, scale = np_codes(x, mask, 8)
    assert np.abs(np.round(np.asarray(near) / scale / 16)).max() <= 8  # signed 4-bit MSB half
    bias_near = float(jnp.mean(near - full))
    bias_floor = float(jnp.mean(floor - full))
    assert abs(bias_near) < abs(bias_floor) / 4 and bias_floor < 0


def test_former_defaults_layer_equals_the_old_formulas():
    """FORMER_DEFAULTS (per-head values, progressive 8+4 with floor MSBs on Q and K only, an
    absolute threshold) is the former default layer."""
    x, mask = random_inputs([24, 15], 24, seed=18)
    layer = one_layer(value_keep_ratio=0.3, requant_threshold=0.2, **spatten.FORMER_DEFAULTS)
    want, _, need = np_layer(layer, x, mask, quant='progressive', rounding='floor',
                             threshold=0.2, value_pruning='per_head', ratio=0.3)
    out = layer_y(layer, x, mask)
    np.testing.assert_allclose(out.y, want, rtol=1e-4, atol=1e-5)
    assert 0.0 < float(out.stats['lsb_refetch_fraction']) == pytest.approx(need.sum() / 156)


def test_cls_forcing_is_an_option():
    scores = jnp.asarray([[0.0, 5.0, 2.0, 9.0, 7.0, 1.0], [8.0, 1.0, 3.0, 2.0, 0.0, 0.0]])
    valid = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    select, kept = spatten.select_tokens(scores, valid, jnp.asarray([3, 2]), 3,
                                         force_first=False)
    assert select.tolist() == [[1, 3, 4], [0, 2, 4]]  # row 0: index 0 pruned
    assert np.asarray(kept).nonzero()[1].tolist() == [1, 3, 4, 0, 2]
    forced, _ = spatten.select_tokens(scores, valid, jnp.asarray([3, 2]), 3)
    assert forced.tolist() == [[0, 3, 4], [0, 2, 4]]
    # In a stack: without forcing, the kept tokens are exactly the top-k of Algorithm 2.
    x, mask = random_inputs([16, 16], 16, seed=4)
    free = make_layers(2, force_cls=False, token_keep_ratios=(1.0, 0.25), **PLAIN)
    outs, _ = run_stack(free, x, mask)
    select = np.asarray(outs[0][0].carry.select)
    full, _ = np_probs(free[0], x, mask)
    for b in range(2):
        s = full[b].sum(axis=(0, 1))
        assert select[b].tolist() == sorted(np.argsort(-s, kind='stable')[:4].tolist())


# -- cost model -----------------------------------------------------------------------------------
def test_layer_costs_follow_the_static_capacities():
    cfg = make_cfg(quant='none')  # tokens 1, 5/6, 2/3, 1/2; heads (8, 8, 8, 6); V 0.3 per query
    method = attention.get_method('spatten')
    e, heads, length = 64, 8, 101
    hand_tokens, hand_heads = [101, 85, 68, 51], [8, 8, 8, 6]
    dims = [base.AttentionDims(emb_dim=e, qkv_dim=e, num_heads=heads, max_len=length,
                               layer_index=i, num_layers=4) for i in range(4)]
    costs = method.chain_costs(dims, cfg, length)
    for i, c in enumerate(costs):
        n, h = hand_tokens[i], hand_heads[i]
        leaving = hand_tokens[i + 1] if i < 3 else n
        assert (c.tokens, c.qkv_width, c.ffn_tokens, c.tokens_out) == (n, h * 8, leaving, leaving)
        assert c.attention['scores'] == cost.matmul(n, 8, n, batch=h)
        assert c.attention['values'] == cost.matmul(n, n, 8, batch=h)  # masked, full width
        kv = math.ceil(0.3 * n)
        assert c.attention['value_selection'] == (cost.top_k(h * n, n, kv)
                                                  + cost.elementwise(h * n * n, 3))
        assert ('selection' in c.attention) == (i < 3)
    # Per head under xla gathers ceil(0.3 n) V vectors; the reference keeps every token and head.
    per_head = method.layer_cost(dims[1], make_cfg(quant='none', value_pruning='per_head'), 85)
    assert per_head.attention['values'] == cost.matmul(85, math.ceil(0.3 * 85), 8, batch=8)
    ref = method.chain_costs(dims, make_cfg('reference', quant='none'), length)
    assert [c.tokens for c in ref] == [101] * 4 and ref[3].qkv_width == e
    # Quantization passes and the progressive refetch are counted.
    static = method.layer_cost(dims[0], make_cfg(), length)
    assert static.attention['quantization'] == cost.elementwise(101 * 64, 27)
    progressive = method.layer_cost(dims[0], make_cfg(quant='progressive'), length)
    assert progressive.attention['refetch'] > progressive.attention['scores']


def test_inspect_maps_follow_the_layer():
    layers = make_layers(3, heads=4, token_keep_ratios=(1.0, 0.5, 0.25),
                         head_keep_counts=(4, 2, 2), value_keep_ratio=0.5)
    ref = make_layers(3, 'reference', heads=4, token_keep_ratios=(1.0, 0.5, 0.25),
                      head_keep_counts=(4, 2, 2), value_keep_ratio=0.5)
    copy_weights(layers, ref)
    x, mask = random_inputs([20, 11], 20, seed=19)
    for stack in (layers, ref):
        outs, _ = run_stack(stack, x, mask)
        carry = base.LayerCarry(positions=jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32),
                                                           (2, 20)))
        xi, mi = x, mask
        for i, layer in enumerate(stack):
            maps = layer.inspect_maps(xi, mi, carry)
            out = outs[i][0]
            next_mask = np.asarray(outs[i + 1][1]) if i < 2 else None
            kept_pos = np.asarray(maps['kept_positions'])
            if stack is layers and i < 2:  # xla: the surviving tokens, in the next frame
                np.testing.assert_array_equal(kept_pos >= 0, next_mask)
                np.testing.assert_array_equal(kept_pos[next_mask],
                                              np.asarray(out.carry.positions)[next_mask])
            heads = np.asarray(maps['kept_heads'])
            assert heads.shape == (2, 4) and heads.sum(1).tolist() == [[4, 2, 2][i]] * 2
            kept = np.asarray(maps['kept_values'])
            assert kept.shape[:2] == (2, 4) and (kept == np.asarray(maps['kept'])).all()
            assert not kept[~heads].any()
            # kept pairs / valid input pairs = the layer's kept_fraction.
            assert kept.sum() / (4 * (20 ** 2 + 11 ** 2)) == pytest.approx(
                float(out.stats['kept_fraction']), rel=1e-6)
            carry = out.carry
            if carry.select is not None:
                xi = jnp.take_along_axis(xi, carry.select[:, :, None], axis=1)
                mi = jnp.take_along_axis(mi, carry.select, axis=1)
                carry = carry.replace(select=None)


def test_runtime_sparsity_and_token_stats():
    cfg = make_cfg(token_keep_ratios=(1.0, 0.5), value_keep_ratio=0.5, quant='none',
                   head_keep_counts=(2, 1), length_adaptive=False)
    rngs = nnx.Rngs(params=0)
    layers = [spatten.SpAttenAttention(base.AttentionDims(
        emb_dim=E, qkv_dim=E, num_heads=2, max_len=16, layer_index=i, num_layers=2), cfg,
        rngs=rngs) for i in range(2)]
    x, mask = random_inputs([16, 10], 16, seed=10)
    outs, _ = run_stack(layers, x, mask)
    assert 'flop_reduction' not in outs[0][0].stats  # MACs belong to the cost model
    # sparsity: layer 1 attends 1 head x 8 x 4 and 1 x 5 x 3 of 2 x (256 + 100) pairs.
    assert float(outs[1][0].stats['sparsity']) == pytest.approx(1 - (32 + 15) / 712, rel=1e-5)
    assert float(outs[1][0].stats['kept_fraction']) == pytest.approx((32 + 15) / 712, rel=1e-5)
    assert float(outs[1][0].stats['tokens_kept']) == pytest.approx(13 / 26)


# -- whole models ---------------------------------------------------------------------------------
INFO = Info('listops', 10, 40, 17, False)


def model_config(arg='attention=spatten', **overrides):
    fields = {'max_length': INFO.seq_len, 'model.num_layers': 3, 'model.emb_dim': 32,
              'model.qkv_dim': 32, 'model.mlp_dim': 32, 'model.num_heads': 4}
    fields.update({f'attention.{k}': v for k, v in overrides.pop('attention', {}).items()})
    fields.update(overrides)
    return tiny_config('listops', arg, **fields)


def batch_of(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    lengths = np.array([INFO.seq_len, 13])[:batch]
    tokens = rng.integers(1, INFO.vocab_size, (batch, INFO.seq_len))
    tokens[np.arange(INFO.seq_len)[None] >= lengths[:, None]] = 0
    return {'inputs': tokens.astype(np.int32)}


@pytest.mark.parametrize('impl', ['reference', 'xla'])
def test_everything_at_one_equals_dense_end_to_end(impl):
    method = attention.get_method('spatten')
    cfg = model_config(f'attention=spatten,impl={impl}', attention=dict(method.dense_equivalent))
    sp = transformer.build_model(cfg, INFO)
    dense = transformer.build_model(model_config('attention=dense'), INFO)
    batch = batch_of()
    a, aux = sp(batch)
    b, _ = dense(batch)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(aux['stats']['sparsity']) == 0.0 and aux['positions'].shape == (2, 41)


def test_models_reference_and_xla_same_logits_and_pruning_is_physical():
    kw = dict(attention={'token_keep_final': 0.3, 'requant_threshold': 0.2})
    ref = transformer.build_model(model_config('attention=spatten,impl=reference', **kw), INFO)
    xla = transformer.build_model(model_config('attention=spatten,impl=xla', **kw), INFO)
    batch = batch_of(1)
    a, aux_a = ref(batch)
    b, aux_b = xla(batch)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key in aux_a['stats']:
        if key.endswith(('attention_cost', 'model_cost')):  # what each implementation runs
            continue
        np.testing.assert_allclose(aux_a['stats'][key], aux_b['stats'][key], rtol=1e-4,
                                   atol=1e-6, err_msg=key)
    # The reference computes every head over the full length; xla the kept ones only.
    assert float(aux_a['stats']['model_cost']) > float(aux_b['stats']['model_cost'])
    assert float(aux_b['stats']['model_cost']) < 1.0
    # 41 tokens -> ceil(41 * 0.65) = 27 -> ceil(27 * 0.3 / 0.65) = 13 in the last layer.
    assert aux_b['positions'].shape == (2, 13) and aux_a['positions'].shape == (2, 41)
    stats = aux_b['stats']
    assert float(stats['layer2/heads_kept']) == 0.75
    assert float(stats['layer0/tokens_kept']) == 1.0 > float(stats['layer2/tokens_kept'])
    assert 0.0 < float(stats['sparsity']) < 1.0 and 8.0 <= float(stats['average_bits']) <= 12.0


def test_training_gradients_and_eval_only():
    cfg = model_config('attention=spatten')
    model = transformer.build_model(cfg, INFO)
    batch = batch_of(2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params, rest)(batch, deterministic=False,
                                                      rng=jax.random.key(0))
        return jnp.sum(logits ** 2)

    grads = jax.grad(loss)(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # eval_only: dense (no selection) while training, pruned at evaluation.
    eval_only = transformer.build_model(
        model_config('attention=spatten,apply=eval_only,impl=xla'), INFO)
    dense = transformer.build_model(model_config('attention=dense'), INFO)
    train_logits, aux = eval_only(batch, deterministic=False, rng=jax.random.key(1))
    dense_logits, _ = dense(batch, deterministic=False, rng=jax.random.key(1))
    np.testing.assert_allclose(train_logits, dense_logits, rtol=1e-5, atol=1e-5)
    assert aux['positions'].shape == (2, 41)
    _, aux = eval_only(batch)
    assert aux['positions'].shape[1] < 41 and float(aux['stats']['tokens_kept']) < 1.0


@pytest.mark.parametrize('task', ['retrieval', 'image'])
def test_other_tasks_run(task):
    info = Info(task, 2 if task == 'retrieval' else 10, 24, 257 if task == 'retrieval' else 256,
                task == 'retrieval')
    config = tiny_config(task, 'attention=spatten', **{
        'max_length': 24, 'model.emb_dim': 16, 'model.qkv_dim': 16, 'model.mlp_dim': 16})
    model = transformer.build_model(config, info)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, info.vocab_size, (2, 24)).astype(np.int32)
    tokens[1, 10:] = 0
    batch = ({'inputs1': tokens, 'inputs2': tokens[::-1].copy()} if info.pair_inputs
             else {'inputs': tokens})
    logits, aux = model(batch)
    assert np.isfinite(np.asarray(logits)).all()
    assert 'tokens_kept' in aux['stats']


# -- training runs (need the data modules) --------------------------------------------------------
def _train(tmp_path, arg, steps):
    pytest.importorskip('lra_sparse.data')
    from lra_sparse import data, train
    if not hasattr(data, 'load_task'):
        pytest.skip('data modules not available yet')
    config = config_lib.load(f'configs/listops.py:{arg},tiny')
    config.num_train_steps = steps
    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    return train.train_and_evaluate(config, str(tmp_path))


def test_eval_only_pruning_of_dense_tiny_run(tmp_path):
    results = _train(tmp_path, 'attention=spatten,apply=eval_only', 20)
    assert math.isfinite(results['validation']['loss'])
    assert results['validation']['tokens_kept'] < 1.0
