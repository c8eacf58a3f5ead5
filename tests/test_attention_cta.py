"""CTA: hashing, clustering, overflow rule, aggregation vs numpy, exactness, stats, training."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from lra_sparse import config_lib, data, metrics, train
from lra_sparse.attention import base, cost, cta, dense
from lra_sparse.models import transformer

E, H, L = 16, 2, 24
IMPLS = ('reference', 'xla')
CLUSTERINGS = ('shared', 'per_head')
FINE = dict(query_bucket_width=1e-4, key_bucket_width=1e-4, residual_bucket_width=1e-4,
            query_capacity=1.0, key_capacity=1.0, residual_capacity=1.0)


def make_cfg(impl='xla', **overrides):
    c = ml_collections.ConfigDict({'name': 'cta', 'impl': impl, 'apply': 'train_and_eval'})
    c.update(cta.default_config())
    for key, value in overrides.items():
        c[key] = value
    return ml_collections.FrozenConfigDict(c)


def make_layer(impl='xla', seed=0, emb=E, heads=H, dropout=0.0, **overrides):
    dims = base.AttentionDims(emb_dim=emb, qkv_dim=emb, num_heads=heads, max_len=64,
                              attention_dropout_rate=dropout)
    return cta.CTAAttention(dims, make_cfg(impl, **overrides), rngs=nnx.Rngs(params=seed))


def dense_twin(layer):
    cfg = ml_collections.FrozenConfigDict({'name': 'dense', 'impl': 'reference',
                                           'apply': 'train_and_eval'})
    twin = dense.DenseAttention(layer.dims, cfg, rngs=nnx.Rngs(params=99))
    for proj in ('query', 'key', 'value', 'out'):
        getattr(twin, proj).kernel[...] = getattr(layer, proj).kernel[...]
    return twin


def call(layer, x, mask, **kwargs):
    batch, length = mask.shape
    carry = base.LayerCarry(positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                                       (batch, length)))
    return layer(x, mask, carry, **kwargs)


def random_inputs(lengths, length=L, emb=E, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(lengths), length, emb)).astype(np.float32)
    mask = np.arange(length)[None] < np.asarray(lengths)[:, None]
    return jnp.asarray(x), jnp.asarray(mask)


def repeated_inputs(lengths, distinct, length=L, emb=E, seed=0):
    """Each valid position holds one of ``distinct`` random vectors (all of them used)."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(distinct, emb)).astype(np.float32)
    x = rng.normal(size=(len(lengths), length, emb)).astype(np.float32) * 3  # padding: noise
    for b, n in enumerate(lengths):
        pick = np.concatenate([np.arange(distinct), rng.integers(0, distinct, n - distinct)])
        x[b, :n] = protos[rng.permutation(pick)]
    mask = np.arange(length)[None] < np.asarray(lengths)[:, None]
    return jnp.asarray(x), jnp.asarray(mask)


def valid_rows(y, mask):
    return np.asarray(y)[np.asarray(mask)]


def stats_of(out):
    return {k: float(v) for k, v in out.stats.items()}


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize('clustering', CLUSTERINGS)
@pytest.mark.parametrize('impl', IMPLS)
def test_every_token_its_own_cluster_equals_exact_attention(impl, clustering):
    layer = make_layer(impl, diagnostics=True, clustering=clustering, **FINE)
    x, mask = random_inputs([L, 13], seed=1)
    out = call(layer, x, mask)
    np.testing.assert_allclose(out.y, call(dense_twin(layer), x, mask)[0], rtol=1e-5, atol=1e-5)
    s = stats_of(out)
    assert s['k0'] == s['k1'] == (L + 13) / 2 and s['k2'] == 1.0 and s['overflow'] == 0.0
    assert s['rel_error'] < 1e-5 and s['kept_fraction'] == 0.0 and s['sparsity'] == 1.0
    # Every slot is computed: cap0 (cap1 + cap2) = L * 2L centroid pairs per example.
    np.testing.assert_allclose(s['effective_pairs'], 2 * (2 * L * L) / (L * L + 13 * 13),
                               rtol=1e-6)
    assert np.abs(np.asarray(out.y)[1, 13:]).max() == 0.0


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('distinct', [1, 3])
def test_repeated_distinct_tokens_are_exact(impl, distinct):
    """Centroids of identical tokens are exact, so CTA is exact attention (float error only).

    k0 = k1 = k2 = #distinct cannot hold at once: when LSH_1 separates the distinct tokens the
    residuals are all 0 (one LSH_2 cluster). So: (a) fine LSH_1 -> k1 = D, k2 = 1; (b) one coarse
    LSH_1 cluster -> the residuals carry the distinction, k2 = D. k0 = D in both.
    """
    lengths = [L, 11]
    x, mask = repeated_inputs(lengths, distinct, seed=distinct)
    fine = dict(query_bucket_width=0.5, key_bucket_width=0.5, residual_bucket_width=0.5)
    coarse = dict(fine, key_bucket_width=1e6)
    for widths, k1, k2 in ((fine, distinct, 1), (coarse, 1, distinct)):
        layer = make_layer(impl, seed=distinct, diagnostics=True, **widths)
        out = call(layer, x, mask)
        y = np.asarray(out.y)
        assert np.isfinite(y).all()
        np.testing.assert_allclose(y, call(dense_twin(layer), x, mask)[0], rtol=1e-5, atol=1e-5)
        s = stats_of(out)
        assert (s['k0'], s['k1'], s['k2'], s['overflow']) == (distinct, k1, k2, 0.0), s
        assert s['rel_error'] < 1e-5
        n2 = sum(n * n for n in lengths)
        np.testing.assert_allclose(s['ra'], len(lengths) * distinct * (k1 + k2) / n2, rtol=1e-6)
        np.testing.assert_allclose(s['rl'], len(lengths) * (distinct + 2 * (k1 + k2))
                                   / (3 * sum(lengths)), rtol=1e-6)
        assert s['kept_fraction'] == 0.0 and s['sparsity'] == 1.0
        caps = cta.capacities(layer.cfg, L)
        np.testing.assert_allclose(s['effective_pairs'], 2 * caps[0] * (caps[1] + caps[2]) / n2,
                                   rtol=1e-6)


@pytest.mark.parametrize('impl', IMPLS)
def test_identical_and_distinct_inputs_have_no_nan(impl):
    x_same = jnp.broadcast_to(jnp.asarray(np.random.default_rng(3).normal(size=(1, 1, E)),
                                          jnp.float32), (2, L, E))
    x_diff, _ = random_inputs([L, L], seed=4)
    mask = jnp.asarray(np.arange(L)[None] < np.array([[L], [1]]))
    for x, overrides in ((x_same, {}), (x_diff, FINE), (x_diff, dict(query_capacity=0.05))):
        layer = make_layer(impl, **overrides)
        out = call(layer, x, mask)
        assert np.isfinite(np.asarray(out.y)).all()
        assert all(np.isfinite(v) for v in stats_of(out).values())


# -- hashing --------------------------------------------------------------------------------------
def test_hash_codes_on_hand_picked_vectors():
    a = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = jnp.asarray([0.5, 0.25, 0.0])
    x = jnp.asarray([[[0.2, 0.1], [1.4, -0.3], [-0.6, 2.0]]])
    np.testing.assert_array_equal(cta.hash_codes(x, a, b, 1.0)[0],
                                  [[0, 0, 0], [1, -1, 1], [-1, 2, 1]])
    np.testing.assert_array_equal(cta.hash_codes(x, a, b, 2.0)[0],
                                  [[0, 0, 0], [0, -1, 0], [-1, 1, 0]])


def test_hash_parameters_are_stored_buffers():
    layer = make_layer(query_bucket_width=3.0, key_bucket_width=5.0, residual_bucket_width=0.5,
                       hash_length=4)
    assert isinstance(layer.lsh_a, base.Buffer) and isinstance(layer.lsh_b, base.Buffer)
    assert layer.lsh_a[...].shape == (3, 4, E) and layer.lsh_b[...].shape == (3, 4)
    b = np.asarray(layer.lsh_b[...])
    assert (b >= 0).all() and (b < np.array([[3.0], [5.0], [0.5]])).all()
    assert 'lsh_a' not in nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    assert set(nnx.to_pure_dict(nnx.state(layer, base.Buffer))) == {'lsh_a', 'lsh_b'}
    # Same seed, same hash parameters (they are part of the checkpointed state, not redrawn).
    again = make_layer(query_bucket_width=3.0, key_bucket_width=5.0, residual_bucket_width=0.5,
                       hash_length=4)
    np.testing.assert_array_equal(again.lsh_a[...], layer.lsh_a[...])


@pytest.mark.parametrize('impl', IMPLS)
def test_layer_clusters_are_equal_codes(impl):
    layer = make_layer(impl, query_bucket_width=12.0, key_bucket_width=12.0, query_capacity=1.0)
    x, mask = random_inputs([L, 15], seed=5)
    maps = layer.inspect_maps(x, mask, None)
    codes = np.asarray(cta.hash_codes(x, layer.lsh_a[0], layer.lsh_b[0], 12.0))
    ids, m = np.asarray(maps['query_clusters']), np.asarray(mask)
    assert (ids[~m] == -1).all()
    for b in range(2):
        valid = np.flatnonzero(m[b])
        for i in valid:
            for j in valid:
                assert (ids[b, i] == ids[b, j]) == bool((codes[b, i] == codes[b, j]).all())
    assert len(np.unique(ids[0][m[0]])) < m[0].sum(), 'width should give some shared clusters'


@pytest.mark.parametrize('impl', IMPLS)
def test_approx_probs_is_the_attention_of_the_approximated_tokens(impl):
    """inspect_maps' 'approx_probs' = softmax of the eq. 2 tokens' scores (what the output uses)."""
    layer = make_layer(impl, query_bucket_width=6.0, key_bucket_width=6.0,
                       residual_bucket_width=2.0, query_capacity=0.3)
    x, mask = random_inputs([L, 14], seed=19)
    maps = layer.inspect_maps(x, mask, None)
    fams = layer.clusters(x, mask, reference=True)

    def expand(fam):
        return jax.nn.one_hot(fam['ids'], fam['centroids'].shape[1]) @ fam['centroids']

    q = layer.split_heads(layer.query(expand(fams[0])))
    k = layer.split_heads(layer.key(expand(fams[1]) + expand(fams[2])))
    probs = base.masked_softmax(base.attention_scores(q, k) / math.sqrt(layer.dims.head_dim),
                                base.pair_mask(mask, mask))
    expected = np.where(np.asarray(mask)[:, None, :, None], np.asarray(probs), 0.0)
    assert maps['approx_probs'].dtype == jnp.float32
    assert maps['approx_probs'].shape == (2, H, L, L)
    np.testing.assert_allclose(maps['approx_probs'], expected, rtol=1e-5, atol=1e-6)
    v = layer.split_heads(layer.value(expand(fams[1]) + expand(fams[2])))
    y = layer.project_out(base.weighted_values(maps['approx_probs'], v))
    np.testing.assert_allclose(valid_rows(y, mask), valid_rows(call(layer, x, mask).y, mask),
                               rtol=1e-4, atol=1e-5)


# -- clustering and the overflow rule -------------------------------------------------------------
HAND_CODES = np.array([[[0, 0], [1, 0], [0, 0], [2, 2], [1, 0], [1, 0], [5, 5], [0, 0]]],
                      np.float32)
HAND_VALID = np.array([[True] * 7 + [False]])


@pytest.mark.parametrize('fn', [cta.assign_clusters, cta.assign_clusters_reference])
def test_assign_clusters_ranks_by_size_then_first_occurrence(fn):
    codes, valid = jnp.asarray(HAND_CODES), jnp.asarray(HAND_VALID)
    # Sizes: code (1,0) 3 tokens, (0,0) 2, (2,2) 1 (first at 3), (5,5) 1 (first at 6).
    np.testing.assert_array_equal(fn(codes, valid, 4)[0], [1, 0, 1, 2, 0, 0, 3, 4])
    np.testing.assert_array_equal(fn(codes, valid, 8)[0], [1, 0, 1, 2, 0, 0, 3, 8])
    # Capacity 2: the two largest clusters are kept, the others overflow (-1); padding = cap.
    np.testing.assert_array_equal(fn(codes, valid, 2)[0], [1, 0, 1, -1, 0, 0, -1, 2])


def test_assign_clusters_implementations_agree_on_random_codes():
    rng = np.random.default_rng(6)
    codes = jnp.asarray(rng.integers(-2, 2, size=(3, 40, 3)).astype(np.float32))
    valid = jnp.asarray(rng.random((3, 40)) < 0.8)
    for cap in (1, 5, 17, 40):
        np.testing.assert_array_equal(cta.assign_clusters(codes, valid, cap),
                                      cta.assign_clusters_reference(codes, valid, cap))


@pytest.mark.parametrize('reference', [False, True])
def test_overflow_tokens_merge_into_nearest_kept_centroid(reference):
    # l = 1, emb = 1, a = 1, b = 0, w = 1: the projection is x and the code floor(x).
    x = jnp.asarray([[[0.1], [5.2], [0.3], [2.5], [5.0], [5.7], [9.0], [0.2]]])
    valid = jnp.asarray(HAND_VALID)
    a, b = jnp.ones((1, 1)), jnp.zeros((1,))
    fam = cta.cluster_tokens(x, valid, a, b, 1.0, 2, reference=reference)
    # Kept: code 5 (3 tokens, slot 0, centre 5.3) and code 0 (2 tokens, slot 1, centre 0.2).
    # 2.5 is nearer 0.2 (2.3) than 5.3 (2.8) -> slot 1; 9.0 -> slot 0. Padding -> 2 (no cluster).
    np.testing.assert_array_equal(fam['ids'][0], [1, 0, 1, 1, 0, 0, 0, 2])
    assert int(fam['overflow'][0]) == 2
    np.testing.assert_array_equal(fam['counts'][0], [4, 3])
    np.testing.assert_allclose(fam['centroids'][0, :, 0],
                               [(5.2 + 5.0 + 5.7 + 9.0) / 4, (0.1 + 0.3 + 2.5) / 3], rtol=1e-6)


@pytest.mark.parametrize('impl', IMPLS)
def test_capacity_overflow_is_counted_and_shares_cluster_rows(impl):
    layer = make_layer(impl, **dict(FINE, query_capacity=0.25))  # cap0 = 6 of 24
    x, mask = random_inputs([L, 13], seed=7)
    out = call(layer, x, mask)
    s = stats_of(out)
    assert s['k0'] == 6 and s['k1'] == (L + 13) / 2 and s['overflow'] == ((L - 6) + (13 - 6)) / 2
    np.testing.assert_allclose(s['overflow_fraction'], ((L - 6) + (13 - 6)) / (3 * (L + 13)),
                               rtol=1e-6)
    ids = np.asarray(layer.inspect_maps(x, mask, None)['query_clusters'])
    y, m = np.asarray(out.y), np.asarray(mask)
    for b in range(2):
        assert set(ids[b][m[b]]) == set(range(6))
        for c in range(6):
            rows = y[b][ids[b] == c]
            np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape), atol=1e-6)


@pytest.mark.parametrize('scale', [1.0, 1e4, 1e-3])
def test_packed_sort_key_gives_the_same_clusters(scale):
    """One packed key when the codes fit 30 bits, the lexsort otherwise: same clusters."""
    rng = np.random.default_rng(16)
    codes = np.round(rng.normal(size=(3, 40, 6)) * 2 * scale).astype(np.float32)
    valid = jnp.asarray(rng.random((3, 40)) < 0.8)
    key, fits = cta.packed_key(jnp.asarray(codes), valid)
    assert bool(fits) == (scale <= 1.0)
    if fits:  # equal keys exactly for equal codes; padding after every valid key
        k, m = np.asarray(key), np.asarray(valid)
        for b in range(3):
            same_code = (codes[b][:, None] == codes[b][None]).all(-1)
            both = m[b][:, None] & m[b][None]
            np.testing.assert_array_equal((k[b][:, None] == k[b][None])[both], same_code[both])
            assert k[b][~m[b]].min(initial=2**31 - 1) > k[b][m[b]].max()
    for cap in (1, 7, 40):
        np.testing.assert_array_equal(cta.assign_clusters(jnp.asarray(codes), valid, cap),
                                      cta.assign_clusters_reference(jnp.asarray(codes), valid,
                                                                    cap))


def test_centroid_aggregation_matches_numpy_loop():
    rng = np.random.default_rng(8)
    values = rng.normal(size=(2, 12, 3)).astype(np.float32)
    cap = 5
    ids = rng.integers(0, cap, size=(2, 12)).astype(np.int32)
    ids[:, -3:] = cap  # padding: no cluster
    ids[0, :] = np.where(ids[0] == 2, 3, ids[0])  # an empty cluster
    expect = np.zeros((2, cap, 3))
    counts = np.zeros((2, cap))
    for b in range(2):  # Fig. 4 (b)
        for i in range(12):
            if ids[b, i] < cap:
                expect[b, ids[b, i]] += values[b, i]
                counts[b, ids[b, i]] += 1
        for c in range(cap):
            if counts[b, c]:
                expect[b, c] /= counts[b, c]
    for fn in (cta.segment_mean, cta.one_hot_mean):
        means, cnt = fn(jnp.asarray(values), jnp.asarray(ids), cap)
        np.testing.assert_allclose(means, expect, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(cnt, counts)


@pytest.mark.parametrize('reference', [False, True])
def test_two_level_compression_matches_numpy(reference):
    layer = make_layer(query_bucket_width=10.0, key_bucket_width=10.0, residual_bucket_width=3.0,
                       query_capacity=1.0, key_capacity=1.0, residual_capacity=1.0)
    x, mask = random_inputs([L, 17], seed=9)
    fams = cta.compress(x, mask, layer.lsh_a[...], layer.lsh_b[...], cta.widths(layer.cfg),
                        cta.capacities(layer.cfg, L), reference=reference)
    xn, m = np.asarray(x, np.float64), np.asarray(mask)
    ct1, ct2 = np.asarray(fams[1]['ids']), np.asarray(fams[2]['ids'])
    for b in range(2):
        c1 = {c: xn[b][(ct1[b] == c) & m[b]].mean(0) for c in set(ct1[b][m[b]])}
        resid = np.stack([xn[b, i] - c1[ct1[b, i]] if m[b, i] else np.zeros(E) for i in range(L)])
        c2 = {c: resid[(ct2[b] == c) & m[b]].mean(0) for c in set(ct2[b][m[b]])}
        for c, v in c1.items():
            np.testing.assert_allclose(fams[1]['centroids'][b, c], v, rtol=1e-5, atol=1e-5)
        for c, v in c2.items():
            np.testing.assert_allclose(fams[2]['centroids'][b, c], v, rtol=1e-5, atol=1e-5)
        resid32 = x[b] - fams[1]['centroids'][b][jnp.clip(fams[1]['ids'][b], 0, L - 1)]
        codes2 = np.asarray(cta.hash_codes(resid32[None], layer.lsh_a[2], layer.lsh_b[2], 3.0))[0]
        valid = np.flatnonzero(m[b])
        for i in valid:  # residual clusters = equal residual codes (no capacity overflow)
            for j in valid:
                assert (ct2[b, i] == ct2[b, j]) == bool((codes2[i] == codes2[j]).all())


# -- probability aggregation (eqs. 5-8, Fig. 6) ---------------------------------------------------
def np_cta_output(q_bar, k_bar, v_bar, ct1, ct2, valid, cap1):
    """Direct float64 eqs. 5-8 with Fig. 6's loop (no max-subtraction). Returns (AP, O)."""
    batch, k0, heads, d = q_bar.shape
    ap = np.zeros((batch, heads, k0, k_bar.shape[1]))
    for b in range(batch):
        for h in range(heads):
            s = q_bar[b, :, h] @ k_bar[b, :, h].T / math.sqrt(d)  # eq. 5
            for i in range(k0):
                for j in range(ct1.shape[1]):
                    if not valid[b, j]:
                        continue
                    e = math.exp(s[i, ct1[b, j]] + s[i, cap1 + ct2[b, j]])  # eq. 6
                    ap[b, h, i, ct1[b, j]] += e
                    ap[b, h, i, cap1 + ct2[b, j]] += e
    out = np.einsum('bhqk,bkhd->bqhd', ap, v_bar)  # eq. 8
    denom = ap.sum(-1) / 2
    out = out / np.where(denom > 0, denom, 1).transpose(0, 2, 1)[..., None]
    return ap, out


@pytest.mark.parametrize('score_scale', [1.0, 30.0])
def test_probability_aggregation_matches_numpy(score_scale):
    rng = np.random.default_rng(10)
    batch, k0, cap1, cap2, n, heads, d = 2, 3, 4, 3, 9, 2, 4
    q_bar = rng.normal(size=(batch, k0, heads, d)) * score_scale
    k_bar = rng.normal(size=(batch, cap1 + cap2, heads, d))
    v_bar = rng.normal(size=(batch, cap1 + cap2, heads, d))
    ct1 = rng.integers(0, cap1, size=(batch, n)).astype(np.int32)
    ct2 = rng.integers(0, cap2, size=(batch, n)).astype(np.int32)
    valid = np.arange(n)[None] < np.array([[n], [6]])
    ap_np, out_np = np_cta_output(q_bar, k_bar, v_bar, ct1, ct2, valid, cap1)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    s_bar = base.attention_scores(f32(q_bar), f32(k_bar)) / math.sqrt(d)
    p = cta.token_probabilities(s_bar, jnp.asarray(ct1), jnp.asarray(ct2), jnp.asarray(valid),
                                cap1)
    ap = np.asarray(cta.aggregate_probabilities(p, jnp.asarray(ct1), jnp.asarray(ct2), cap1,
                                                cap2))
    assert np.isfinite(ap).all()
    np.testing.assert_allclose(ap.sum(-1), 2 * np.asarray(p).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(ap / ap.sum(-1, keepdims=True),
                               ap_np / ap_np.sum(-1, keepdims=True), rtol=2e-4, atol=1e-6)
    out = cta.compressed_attention(f32(q_bar), f32(k_bar), f32(v_bar), jnp.asarray(ct1),
                                   jnp.asarray(ct2), jnp.asarray(valid), cap1)
    np.testing.assert_allclose(out, out_np, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('score_scale', [1.0, 8.0])
def test_factorized_aggregation_matches_numpy(score_scale):
    """exp(a + b) = exp(a) exp(b): pair counts and two matmuls give Fig. 6's AP."""
    rng = np.random.default_rng(17)
    batch, k0, cap1, cap2, n, heads, d = 2, 3, 4, 3, 11, 2, 4
    q_bar = rng.normal(size=(batch, k0, heads, d)) * score_scale
    k_bar = rng.normal(size=(batch, cap1 + cap2, heads, d))
    v_bar = rng.normal(size=(batch, cap1 + cap2, heads, d))
    ct1 = rng.integers(0, cap1 - 1, size=(batch, n)).astype(np.int32)  # slot cap1-1 empty
    ct2 = rng.integers(0, cap2, size=(batch, n)).astype(np.int32)
    valid = np.arange(n)[None] < np.array([[n], [5]])
    counts = np.asarray(cta.pair_counts(jnp.asarray(ct1), jnp.asarray(ct2), jnp.asarray(valid),
                                        cap1, cap2))
    for b in range(batch):
        expect = np.zeros((cap1, cap2))
        np.add.at(expect, (ct1[b][valid[b]], ct2[b][valid[b]]), 1)
        np.testing.assert_array_equal(counts[b], expect)
    ap_np, out_np = np_cta_output(q_bar, k_bar, v_bar, ct1, ct2, valid, cap1)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    s_bar = base.attention_scores(f32(q_bar), f32(k_bar)) / math.sqrt(d)
    ap = np.asarray(cta.factorized_probabilities(s_bar, jnp.asarray(counts)))
    np.testing.assert_allclose(ap, 2 * ap_np / ap_np.sum(-1, keepdims=True), rtol=2e-4,
                               atol=1e-6)
    for aggregation in ('factorized', 'auto'):
        out = cta.compressed_attention(f32(q_bar), f32(k_bar), f32(v_bar), jnp.asarray(ct1),
                                       jnp.asarray(ct2), jnp.asarray(valid), cap1,
                                       aggregation=aggregation)
        np.testing.assert_allclose(out, out_np, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('overrides', [{}, dict(query_bucket_width=6.0, key_bucket_width=6.0,
                                                residual_bucket_width=2.0, query_capacity=0.3,
                                                key_capacity=0.4, residual_capacity=0.2)])
def test_layer_aggregations_agree(overrides):
    x, mask = random_inputs([L, 14], seed=18)
    outs = [call(make_layer('xla', aggregation=a, **overrides), x, mask)
            for a in cta.AGGREGATIONS]
    for out in outs[1:]:
        np.testing.assert_allclose(out.y, outs[0].y, rtol=1e-5, atol=1e-5)
        assert stats_of(out) == stats_of(outs[0])


def test_use_factorized_rule():
    assert cta.use_factorized('auto', 50, 40, 200, 1000)  # 2 * 40 * 200 <= 16 * 1000
    assert not cta.use_factorized('auto', 50, 400, 200, 1000)
    assert cta.use_factorized('factorized', 50, 400, 200, 1000)
    assert not cta.use_factorized('tokens', 50, 4, 2, 1000)
    assert not cta.use_factorized('factorized', 50, 4, 2, 1000, dropout=True)


def test_compressed_attention_without_valid_keys_is_zero():
    z = jnp.ones((1, 2, 1, 4))
    ids = jnp.zeros((1, 5), jnp.int32)
    for aggregation in cta.AGGREGATIONS:
        out = cta.compressed_attention(z, jnp.ones((1, 3, 1, 4)), jnp.ones((1, 3, 1, 4)), ids,
                                       ids, jnp.zeros((1, 5), bool), 2, aggregation=aggregation)
        assert np.abs(np.asarray(out)).max() == 0.0


# -- implementations, padding, gradients ----------------------------------------------------------
@pytest.mark.parametrize('clustering', CLUSTERINGS)
@pytest.mark.parametrize('seed', [0, 1])
def test_xla_matches_reference_with_overflow(seed, clustering):
    overrides = dict(query_bucket_width=6.0, key_bucket_width=6.0, residual_bucket_width=2.0,
                     query_capacity=0.3, key_capacity=0.4, residual_capacity=0.2, diagnostics=True,
                     clustering=clustering)
    x, mask = random_inputs([L, 14], seed=20 + seed)
    ref, xla = (make_layer(impl, seed=seed, **overrides) for impl in IMPLS)
    out_ref, out_xla = call(ref, x, mask), call(xla, x, mask)
    np.testing.assert_allclose(out_xla.y, out_ref.y, rtol=1e-5, atol=1e-5)
    s_ref, s_xla = stats_of(out_ref), stats_of(out_xla)
    assert s_xla['overflow'] > 0
    for k in s_ref:
        np.testing.assert_allclose(s_xla[k], s_ref[k], rtol=1e-5, err_msg=k)
    maps_ref, maps_xla = ref.inspect_maps(x, mask, None), xla.inspect_maps(x, mask, None)
    for k in maps_ref:
        np.testing.assert_array_equal(maps_ref[k], maps_xla[k])


@pytest.mark.parametrize('clustering', CLUSTERINGS)
@pytest.mark.parametrize('impl', IMPLS)
def test_padding_never_affects_valid_outputs(impl, clustering):
    layer = make_layer(impl, query_bucket_width=6.0, key_bucket_width=6.0,
                       residual_bucket_width=2.0, query_capacity=0.3, key_capacity=0.3,
                       clustering=clustering)
    x, mask = random_inputs([L, 12], seed=11)
    out = call(layer, x, mask)
    # Padding replaced by copies of valid tokens (they would join clusters) or by large noise.
    copies = jnp.where(mask[..., None], x, jnp.roll(x, 12, axis=1))
    noise = jnp.where(mask[..., None], x, 50.0 * jax.random.normal(jax.random.key(1), x.shape))
    for x2 in (copies, noise):
        out2 = call(layer, x2, mask)
        np.testing.assert_allclose(valid_rows(out2.y, mask), valid_rows(out.y, mask),
                                   rtol=1e-5, atol=1e-6)
        assert stats_of(out2) == stats_of(out)
        assert np.abs(np.asarray(out2.y)[1, 12:]).max() == 0.0


@pytest.mark.parametrize('clustering', CLUSTERINGS)
@pytest.mark.parametrize('impl', IMPLS)
def test_gradients_finite_and_nonzero(impl, clustering):
    x_same = jnp.broadcast_to(jnp.linspace(-1, 1, E), (2, L, E))
    x_rand, mask = random_inputs([L, 9], seed=12)
    for x, overrides in ((x_same, {}), (x_rand, FINE), (x_rand, dict(query_capacity=0.2))):
        layer = make_layer(impl, clustering=clustering, **overrides)
        graphdef, state = nnx.split(layer)

        def loss(state, x, graphdef=graphdef):
            return jnp.sum(call(nnx.merge(graphdef, state), x, mask).y ** 2)

        g_state, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
        leaves = jax.tree.leaves(g_state) + [g_x]
        assert all(np.isfinite(np.asarray(v)).all() for v in leaves)
        assert np.abs(np.asarray(g_state['query']['kernel'][...])).max() > 0
        assert np.abs(np.asarray(g_x)).max() > 0


@pytest.mark.parametrize('clustering', CLUSTERINGS)
def test_dropout_only_while_training(clustering):
    layer = make_layer('xla', dropout=0.5, clustering=clustering)
    x, mask = random_inputs([L, 10], seed=13)
    det = call(layer, x, mask).y
    train_y = call(layer, x, mask, deterministic=False, rng=jax.random.key(0)).y
    assert np.isfinite(np.asarray(train_y)).all()
    assert np.abs(np.asarray(train_y) - np.asarray(det)).max() > 1e-4
    np.testing.assert_array_equal(det, call(layer, x, mask).y)


# -- per-head clustering --------------------------------------------------------------------------
def head_layer(layer, head):
    """A shared-clustering twin of a per-head layer that computes head ``head``'s contribution.

    It hashes with that head's LSH parameters and keeps only that head's rows of the output
    projection, so the per-head layer's output is the sum of the twins' outputs.
    """
    cfg = ml_collections.ConfigDict(layer.cfg.to_dict())
    cfg.clustering = 'shared'
    twin = cta.CTAAttention(layer.dims, ml_collections.FrozenConfigDict(cfg),
                            rngs=nnx.Rngs(params=7))
    for proj in ('query', 'key', 'value'):
        getattr(twin, proj).kernel[...] = getattr(layer, proj).kernel[...]
    rows = np.arange(layer.dims.qkv_dim) // layer.dims.head_dim == head
    twin.out.kernel[...] = jnp.where(rows[:, None], layer.out.kernel[...], 0.0)
    twin.lsh_a[...] = layer.lsh_a[...][head]
    twin.lsh_b[...] = layer.lsh_b[...][head]
    return twin


@pytest.mark.parametrize('aggregation', ['tokens', 'factorized'])
@pytest.mark.parametrize('impl', IMPLS)
def test_per_head_equals_shared_clustering_run_on_each_head(impl, aggregation):
    layer = make_layer(impl, heads=4, clustering='per_head', aggregation=aggregation,
                       query_bucket_width=6.0, key_bucket_width=6.0, residual_bucket_width=2.0,
                       query_capacity=0.3, key_capacity=0.4, residual_capacity=0.2)
    assert layer.lsh_a[...].shape == (4, 3, 6, E) and layer.lsh_b[...].shape == (4, 3, 6)
    x, mask = random_inputs([L, 15], seed=31)
    out, maps = call(layer, x, mask), layer.inspect_maps(x, mask, None)
    twins = [head_layer(layer, h) for h in range(4)]
    outs = [call(t, x, mask) for t in twins]
    np.testing.assert_allclose(out.y, sum(np.asarray(o.y) for o in outs), rtol=1e-5, atol=1e-5)
    # Heads cluster differently (else the test could not tell per-head from shared clusters).
    ids = np.asarray(maps['key_clusters'])
    assert all(not np.array_equal(ids[:, 0], ids[:, h]) for h in range(1, 4))
    for name in ('k0', 'k1', 'k2', 'overflow', 'overflow_fraction', 'ra', 'effective_pairs'):
        np.testing.assert_allclose(out.stats[name], np.mean([o.stats[name] for o in outs]),
                                   rtol=1e-5, err_msg=name)
    assert out.stats['overflow'] > 0
    for h, twin in enumerate(twins):
        twin_maps = twin.inspect_maps(x, mask, None)
        for name in ('query_clusters', 'key_clusters', 'residual_clusters'):
            assert maps[name].shape == (2, 4, L)
            np.testing.assert_array_equal(maps[name][:, h], twin_maps[name])
        np.testing.assert_allclose(maps['approx_probs'][:, h], twin_maps['approx_probs'][:, h],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('seq_len', [64, 128])
@pytest.mark.parametrize('impl,aggregation', [('reference', 'auto'), ('xla', 'tokens'),
                                              ('xla', 'factorized')])
def test_per_head_cost_formula_matches_xla(impl, aggregation, seq_len):
    """As tests/test_cost.py checks the default: the formula against XLA's count."""
    import test_cost

    dims = base.AttentionDims(emb_dim=test_cost.E, qkv_dim=test_cost.E, num_heads=test_cost.H,
                              max_len=seq_len, layer_index=0, num_layers=2)
    cfg = config_lib.attention_config('cta', impl, 'train_and_eval')
    cfg.update(clustering='per_head', aggregation=aggregation)
    cfg = ml_collections.FrozenConfigDict(cfg)
    layer = cta.CTAAttention(dims, cfg, rngs=nnx.Rngs(params=0))
    layer_cost = cta.METHOD.layer_cost(dims, cfg, seq_len)
    counted = (test_cost.layer_forward_ops(layer, seq_len)
               - test_cost.projection_ops(layer_cost))
    assert layer_cost.attention_ops == pytest.approx(counted, rel=test_cost.ATTENTION_TOLERANCE)
    shared = cta.METHOD.layer_cost(dims, ml_collections.FrozenConfigDict(
        {**cfg.to_dict(), 'clustering': 'shared'}), seq_len)
    heads = test_cost.H
    assert layer_cost.attention['hashing'] == heads * shared.attention['hashing']
    assert layer_cost.attention['values'] == shared.attention['values']


# -- config, cost model, registry -----------------------------------------------------------------
@pytest.mark.parametrize('field,value', [
    ('hash_length', 0), ('hash_length', 2.5), ('query_bucket_width', 0.0),
    ('key_bucket_width', -1.0), ('residual_bucket_width', float('inf')),
    ('query_capacity', 0.0), ('key_capacity', 1.5), ('residual_capacity', -0.1),
    ('diagnostics', 'yes'), ('clustering', 'per_query'),
])
def test_bad_fields_raise_naming_the_field(field, value):
    cfg = ml_collections.ConfigDict(make_cfg().to_dict(), type_safe=False)
    cfg[field] = value
    with pytest.raises(base.ConfigError, match=f'attention.{field}='):
        cta.validate(ml_collections.ConfigDict({'attention': cfg}))
    with pytest.raises(base.ConfigError, match=f'attention.{field}='):
        cta.CTAAttention(base.AttentionDims(emb_dim=E, qkv_dim=E, num_heads=H, max_len=L), cfg,
                         rngs=nnx.Rngs(params=0))


def first_layer_input(task: str, length: int):
    """The real model's first-layer input LN1(embed + positions) on synthetic tokens, and mask."""
    config = config_lib.load(f'configs/{task}.py:attention=cta,impl=xla')
    config.max_length = length
    info = data.task_info(config)
    model = transformer.build_model(config, info)
    image = task == 'image'
    tokens = data.synthetic_splits(info, 2, 0, min_token=0 if image else 1,
                                   full_length=image)['train']['inputs']
    encoder = model.encoder
    x, mask = encoder.embed(jnp.asarray(tokens, jnp.int32)), jnp.asarray(tokens > 0)
    if image:
        mask = jnp.ones_like(mask)
    if encoder.use_cls:
        cls = jnp.broadcast_to(encoder.cls[...], (x.shape[0], 1, x.shape[-1]))
        x, mask = jnp.concatenate([cls, x], axis=1), jnp.concatenate([mask[:, :1], mask], axis=1)
    x = x + encoder.pos_emb[...][:, :x.shape[1]]
    return encoder.blocks[0], encoder.blocks[0].ln1(x), mask


@pytest.mark.parametrize('task,length', [('text', 1000), ('text', 2000), ('text', 4000),
                                         ('image', 1024)])
def test_default_capacities_rarely_overflow_on_model_inputs(task, length):
    """Default widths and capacities: under 1% of tokens merged at the LRA lengths."""
    block, x, mask = first_layer_input(task, length)
    assert block.attention.cfg.query_capacity == cta.default_config().query_capacity
    fams = jax.jit(lambda x, m: block.attention.clusters(x, m, reference=False))(x, mask)
    merged = sum(int(jnp.sum(f['overflow'])) for f in fams)
    assert merged < 0.01 * 3 * int(jnp.sum(mask)), [np.asarray(f['overflow']) for f in fams]


def test_capacity_is_ceil_fraction_of_length_within_bounds():
    assert cta.capacity(0.5, 24) == 12 and cta.capacity(0.3, 24) == 8
    assert cta.capacity(1e-6, 24) == 1 and cta.capacity(1.0, 24) == 24
    assert cta.capacities(make_cfg(), 201) == (151, 151, 151)
    assert cta.capacities(make_cfg(**cta.PREVIOUS_DEFAULTS), 201) == (101, 101, 51)


def test_layer_cost_uses_capacities():
    dims = base.AttentionDims(emb_dim=64, qkv_dim=64, num_heads=4, max_len=200)
    caps = dict(hash_length=6, query_capacity=0.5, key_capacity=0.25, residual_capacity=0.125)
    c = cta.layer_cost(dims, make_cfg(aggregation='tokens', **caps), 200)
    k0, k1, k2 = 100, 50, 25
    assert (c.query_rows, c.kv_rows, c.out_rows, c.ffn_tokens, c.tokens_out) == (
        k0, k1 + k2, k0, 200, 200)
    assert c.attention['values'] == cost.matmul(k0, k1 + k2, 16, batch=4)
    assert c.attention['scores'] == cost.matmul(k0, 16, k1 + k2, batch=4) + 4 * k0 * (k1 + k2)
    assert c.attention['aggregation'] == 4 * k0 * (200 * 20 + k1 + k2)  # token path: k0 x n
    assert c.attention['hashing'] == 3 * (cost.matmul(200, 64, 6) + 3 * 200 * 6)
    factorized = cta.layer_cost(dims, make_cfg(aggregation='factorized', **caps), 200)
    assert factorized.attention['aggregation'] == (cost.matmul(k0, k2, k1, batch=8)
                                                   + 9 * 4 * k0 * (k1 + k2) + 200 + 2 * k1 * k2)
    dense_ops = cost.dense_layer_cost(dims, 200).attention_ops
    assert c.attention_ops < 0.5 * dense_ops
    full = cta.layer_cost(dims, make_cfg(**FINE), 200)  # capacity n: no merge traced
    assert 'overflow_merge' in c.attention and 'overflow_merge' not in full.attention
    assert full.attention['values'] == cost.matmul(200, 400, 16, batch=4)
    ref = cta.layer_cost(dims, make_cfg('reference', **FINE), 200)
    assert ref.query_rows == ref.kv_rows == 200
    assert ref.attention['scores'] == cost.matmul(200, 16, 200, batch=4)


def test_registry_entry_and_sweep():
    assert cta.METHOD.name == 'cta' and set(cta.METHOD.impls) == set(IMPLS)
    fields = set(cta.default_config())
    assert set(cta.METHOD.dense_equivalent) <= fields
    widths = [p['key_bucket_width'] for p in cta.METHOD.sweeps['bucket_width']]
    assert widths == sorted(widths) and len(widths) >= 3
    for point in cta.METHOD.sweeps['bucket_width']:
        assert set(point) <= fields
        cfg = ml_collections.ConfigDict(make_cfg().to_dict())
        cfg.update(point)
        cta.check_fields(cfg)


def test_default_config_fields_are_commented():
    import inspect

    source = inspect.getsource(cta.default_config)
    for field in cta.default_config():
        line = next(ln for ln in source.splitlines() if f'c.{field} =' in ln)
        assert '#' in line, field


# -- training -------------------------------------------------------------------------------------
def test_config_validation_through_config_lib():
    config = tiny_config('listops', 'attention=cta', **{'attention.key_capacity': 0.0})
    with pytest.raises(base.ConfigError, match='attention.key_capacity=0.0'):
        config_lib.validate(config)


@pytest.mark.parametrize('impl', ['xla'])
def test_tiny_listops_trains_with_cta(impl, tmp_path):
    config = tiny_config('listops', f'attention=cta,impl={impl}', **{
        'num_train_steps': 4, 'log_every_steps': 1, 'eval_every_steps': 4, 'batch_size': 8,
        'num_eval_steps': 1, 'model.num_layers': 1, 'checkpoint_every_steps': 4,
        'data.listops_num_train': 64, 'data.listops_num_val': 16, 'data.listops_num_test': 16})
    results = train.train_and_evaluate(config, str(tmp_path))
    events = [e for e in metrics.read_metrics(str(tmp_path)) if e['split'] == 'train']
    assert len(events) == 4
    for e in events:
        assert np.isfinite(e['loss'])
        for key in ('sparsity', 'kept_fraction', 'effective_pairs', 'ra', 'rl', 'k0', 'k1', 'k2',
                    'overflow', 'overflow_fraction'):
            assert np.isfinite(e[key]), key
        assert 0 < e['k0'] <= 201 and e['ra'] > 0
    assert np.isfinite(results['test']['loss'])
