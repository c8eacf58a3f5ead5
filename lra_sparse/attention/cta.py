"""CTA: compressed token attention (LSH clustering, attention among centroids, aggregation).

CTA (Wang, Xu, Wang, Han, "CTA: Hardware-Software Co-design for Compressed Token Attention
Mechanism", HPCA 2023, Section III) clusters tokens that encode similar features, computes
attention among the cluster centroids only and recovers every token's output by probability
aggregation. For the layer-normalised block input X [batch, n, emb] (before the Q/K/V
projections) and its mask [batch, n], one layer:

1. hashes X with three E2LSH families (eq. 1), ``floor((A x + b) / w)`` with ``A`` [l, emb] ~
   N(0, I), ``b`` ~ U(0, w) (Buffers ``lsh_a`` [3, l, emb], ``lsh_b`` [3, l]): LSH_0 for queries
   (``query_bucket_width``), LSH_1 for keys/values (``key_bucket_width``), LSH_2 for the residuals
   ``X - C1[CT1]`` (``residual_bucket_width``);
2. clusters tokens with equal codes (padding in none); centroids are the members' means;
   ``X ~ C0[CT0]`` for queries, ``X ~ C1[CT1] + C2[CT2]`` for keys/values (eq. 2);
3. computes, per head, scores among centroids [k0, k1 + k2], aggregates the token probabilities
   onto both centroids of each key token (Fig. 6) and gives each query token its cluster's output
   (eqs. 3-8): exact softmax attention of the approximated tokens.

Static shapes: each family has at most ``ceil(capacity * n)`` clusters (``query_capacity``,
``key_capacity``, ``residual_capacity``, default 0.75: above the realised counts at the default
widths on the text and image models); the tokens of clusters beyond it (smallest first) join the
nearest kept centroid in the family's LSH projection space and are counted in ``overflow``.
:data:`PREVIOUS_DEFAULTS` restores the earlier 0.5 / 0.5 / 0.25 with the token-path aggregation.

``clustering='per_head'`` gives each head its own three families (``lsh_a`` [heads, 3, l, emb],
``lsh_b`` [heads, 3, l]): head h runs steps 1-3 on its own clusters of X, with its own capacities,
overflow and aggregation (:func:`compress_per_head`, heads folded into the batch axis); the
default ``'shared'`` clusters once for all heads.

Implementations: ``xla`` is the compressed computation (hash codes packed into one sort key,
``segment_sum`` centroids, attention among centroids, probability aggregation by token
probabilities or factorised over key-cluster pair counts (``aggregation``), output projection on
the k0 query centroids, gather back to tokens); ``reference`` is the dense twin (pairwise code
equality, one-hot assignment matrices, full softmax attention of the approximated tokens). They
agree to float tolerance without attention dropout (which each applies at its own level of
probabilities). Hashing and clustering see ``stop_gradient(X)``; gradients flow through the
centroids.

Statistics (pooled over the batch, n = valid tokens, k = non-empty clusters, cap = capacities):
``kept_fraction`` = 0 (CTA approximates every score; no exact pair contributes),
``effective_pairs`` = cap0 (cap1 + cap2) / n² (centroid score pairs computed per valid token
pair), ``ra`` = k0 (k1 + k2) / n², ``rl`` = (k0 + 2 k1 + 2 k2) / 3n, means per example of
``k0``, ``k1``, ``k2``, ``overflow``, ``overflow_fraction`` = merged tokens / (3 n) over the three
families, and with ``diagnostics`` ``rel_error`` against exact attention. Per head, each
statistic pools the (example, head) rows the way it pools examples. The cost of a layer is
:func:`layer_cost`.

The overflow rule in full, the bucket widths, and how the paper's open points are resolved:
``docs/methods/cta.md``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from lra_sparse.attention import base, cost

NUM_FAMILIES = 3  # LSH_0 (queries), LSH_1 (keys/values), LSH_2 (residuals)
_HIGHEST = jax.lax.Precision.HIGHEST
_WIDTH_FIELDS = ('query_bucket_width', 'key_bucket_width', 'residual_bucket_width')
_CAPACITY_FIELDS = ('query_capacity', 'key_capacity', 'residual_capacity')
AGGREGATIONS = ('auto', 'factorized', 'tokens')
CLUSTERINGS = ('shared', 'per_head')
# The defaults before the capacities were sized to the realised cluster counts: these overrides
# reproduce earlier runs exactly (same clusters, same merges, same token-path aggregation).
PREVIOUS_DEFAULTS = {'query_capacity': 0.5, 'key_capacity': 0.5, 'residual_capacity': 0.25,
                     'aggregation': 'tokens'}
# 'auto' takes the factorised aggregation when its matmul MACs 2 k0 k1 k2 are at most this many
# times the k0 n gathered token probabilities of the token path (a matmul MAC is far cheaper on
# CPU than a gather, exp and scatter of one token probability).
FACTORIZED_MAC_RATIO = 16.0


def default_config() -> ml_collections.ConfigDict:
    """CTA's fields (see the module docstring for the rules they feed)."""
    c = ml_collections.ConfigDict()
    c.hash_length = 6  # l: hash functions per LSH family (paper: 6), an integer >= 1
    c.query_bucket_width = 16.0  # w of LSH_0 (queries), in units of the LN'd block input X
    # (|x| ~ sqrt(emb_dim), so a.x ~ N(0, emb_dim)); a number > 0; larger = fewer clusters
    c.key_bucket_width = 16.0  # w of LSH_1 (keys/values), a number > 0
    c.residual_bucket_width = 8.0  # w of LSH_2 (residuals X - C1[CT1]), a number > 0
    c.query_capacity = 0.75  # static max query clusters k0 = ceil(fraction * n), in (0, 1]
    c.key_capacity = 0.75  # static max key/value clusters k1 = ceil(fraction * n), in (0, 1]
    c.residual_capacity = 0.75  # static max residual clusters k2 = ceil(fraction * n), in (0, 1]
    c.aggregation = 'auto'  # probability aggregation (Fig. 6): 'tokens' (k0 x n token
    # probabilities, the original path), 'factorized' (pair counts and two matmuls, k0 k1 k2 per
    # head) or 'auto' (the cheaper of the two for the static shapes); the token path runs
    # whenever attention dropout acts (it drops token probabilities)
    c.clustering = 'shared'  # 'shared': one clustering of the block input for all heads;
    # 'per_head': each head hashes the block input with its own LSH parameters, so clusters,
    # capacities, overflow and aggregation are per head (heads x the clustering work)
    c.diagnostics = False  # True: also run exact attention with the same weights and report
    # 'rel_error' = |y_cta - y_dense| / |y_dense| over valid tokens (costs a dense pass)
    return c


# -- validation ---------------------------------------------------------------------------------
_check = base.check_field


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_fields(cfg) -> None:
    """Raises ConfigError for any bad CTA field."""
    length = cfg.hash_length
    _check(isinstance(length, int) and not isinstance(length, bool) and length >= 1,
           'hash_length', length,
           'an integer >= 1 (the paper uses 6)')
    for field in _WIDTH_FIELDS:
        w = cfg[field]
        _check(_is_number(w) and math.isfinite(w) and w > 0, field, w,
               'a finite number > 0 (bucket width w)')
    for field in _CAPACITY_FIELDS:
        f = cfg[field]
        _check(_is_number(f) and 0.0 < f <= 1.0, field, f,
               'a fraction of the sequence length in (0, 1] (clusters = ceil(fraction * n), '
               'always between 1 and n)')
    _check(cfg.aggregation in AGGREGATIONS, 'aggregation', cfg.aggregation,
           f'one of {", ".join(AGGREGATIONS)}')
    _check(cfg.clustering in CLUSTERINGS, 'clustering', cfg.clustering,
           f'one of {", ".join(CLUSTERINGS)}')
    _check(isinstance(cfg.diagnostics, bool), 'diagnostics', cfg.diagnostics, 'True or False')


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks CTA's fields before any compute."""
    check_fields(config.attention)


def capacity(fraction: float, length: int) -> int:
    """Static cluster capacity: ceil(fraction * length), clipped to [1, length]."""
    return max(1, min(length, math.ceil(float(fraction) * length - 1e-9)))


def capacities(cfg, length: int) -> tuple[int, int, int]:
    """(cap0, cap1, cap2) for a sequence of ``length`` tokens."""
    return tuple(capacity(cfg[f], length) for f in _CAPACITY_FIELDS)


def widths(cfg) -> tuple[float, float, float]:
    """Bucket widths of LSH_0, LSH_1, LSH_2."""
    return tuple(float(cfg[f]) for f in _WIDTH_FIELDS)


# -- hashing and clustering (pure functions, tested directly) -----------------------------------
def lsh_project(x: jax.Array, a: jax.Array, b: jax.Array, width: float) -> jax.Array:
    """Continuous E2LSH coordinates ``(A x + b) / w``; the hash code is their floor.

    Args:
      x: [batch, n, emb].
      a: [l, emb] directions.
      b: [l] offsets in [0, w).
      width: bucket width w > 0.

    Returns:
      float32 [batch, n, l].
    """
    proj = jnp.einsum('bne,le->bnl', x.astype(jnp.float32), a.astype(jnp.float32),
                      precision=_HIGHEST)
    return (proj + b.astype(jnp.float32)) / width


def hash_codes(x: jax.Array, a: jax.Array, b: jax.Array, width: float) -> jax.Array:
    """E2LSH codes (eq. 1): float32 [batch, n, l] of integers floor((A x + b) / w)."""
    return jnp.floor(lsh_project(x, a, b, width))


PACKED_KEY_BITS = 30  # codes whose ranges multiply to less than 2**30 share one int32 key


def packed_key(codes: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The l hash codes of each token as one int32 mixed-radix key (padding sorts last).

    Args:
      codes: [batch, n, l] integer-valued hash codes.
      valid: bool [batch, n].

    Returns:
      (key int32 [batch, n], fits bool scalar). Per example and hash function the codes are
      offset by their minimum over valid tokens; digit i has radix r_i = its range + 1. The key
      is exact (equal keys <=> equal codes) when prod r_i < 2**30 in every example (``fits``);
      otherwise it may wrap and must not be used.
    """
    big = jnp.float32(2.0 ** PACKED_KEY_BITS)
    lo = jnp.min(jnp.where(valid[..., None], codes, big), axis=1)  # [batch, l]
    hi = jnp.max(jnp.where(valid[..., None], codes, -big), axis=1)
    radix = jnp.clip(hi - lo + 1.0, 1.0, big)  # [batch, l]; 1 for a sequence without tokens
    fits = jnp.all(jnp.sum(jnp.log2(radix), axis=-1) < PACKED_KEY_BITS - 0.01)
    digits = jnp.clip(codes - lo[:, None], 0.0, big).astype(jnp.int32)
    radix_i = radix.astype(jnp.int32)
    key = digits[..., 0]
    for i in range(1, codes.shape[-1]):
        key = key * radix_i[:, i:i + 1] + digits[..., i]
    end = jnp.prod(radix_i, axis=-1, keepdims=True)  # one past every valid key
    return jnp.where(valid, key, end), fits


def sort_order(codes: jax.Array, valid: jax.Array) -> jax.Array:
    """Token order that makes equal codes adjacent and puts padding last.

    One single-key sort of :func:`packed_key` when the codes fit 30 bits (the common case: an
    LSH family has a few buckets per hash function), else a lexicographic sort of the l codes.

    Args:
      codes: [batch, n, l] integer-valued float codes (no -0.0); valid: bool [batch, n].

    Returns:
      int32 [batch, n] permutation of each row.
    """
    hash_len = codes.shape[-1]
    key, fits = packed_key(codes, valid)

    def by_key():
        return jnp.argsort(key, axis=-1).astype(jnp.int32)

    def by_codes():  # lexsort: the last key is primary
        keys = [codes[..., i] for i in reversed(range(hash_len))] + [(~valid).astype(jnp.int32)]
        return jnp.lexsort(keys, axis=-1).astype(jnp.int32)

    return jax.lax.cond(fits, by_key, by_codes)


def assign_clusters(codes: jax.Array, valid: jax.Array, cap: int) -> jax.Array:
    """Cluster slots from hash codes, sort based (the xla path).

    Args:
      codes: [batch, n, l] hash codes (any dtype with exact equality).
      valid: bool [batch, n].
      cap: static number of slots.

    Returns:
      int32 [batch, n]: the slot in [0, cap) of a token whose cluster is kept, -1 for a valid
      token whose cluster overflowed the capacity, ``cap`` for padding. Clusters are ranked by
      size (descending), ties by first occurrence; the first ``cap`` are kept.
    """
    batch, n, _ = codes.shape
    idx = jnp.arange(n, dtype=jnp.int32)
    codes = jnp.where(codes == 0, jnp.zeros_like(codes), codes)  # -0.0 sorts apart from 0.0
    order = sort_order(codes, valid)
    s_codes = jnp.take_along_axis(codes, order[..., None], axis=1)
    s_valid = jnp.take_along_axis(valid, order, axis=1)
    change = jnp.any(s_codes[:, 1:] != s_codes[:, :-1], axis=-1) | (s_valid[:, 1:]
                                                                      != s_valid[:, :-1])
    new = jnp.concatenate([jnp.ones((batch, 1), bool), change], axis=1)
    s_group = jnp.cumsum(new, axis=1, dtype=jnp.int32) - 1  # [batch, n] in [0, n)
    group = jnp.zeros((batch, n), jnp.int32).at[jnp.arange(batch)[:, None], order].set(s_group)
    size = jax.vmap(lambda v, g: jax.ops.segment_sum(v, g, n))(valid.astype(jnp.int32), group)
    first = jax.vmap(lambda v, g: jax.ops.segment_min(v, g, n))(
        jnp.where(valid, idx[None], n), group)
    g_order = jnp.lexsort((first, -size), axis=-1)  # groups by size desc, first occurrence asc
    rank = jnp.zeros((batch, n), jnp.int32).at[jnp.arange(batch)[:, None], g_order].set(
        jnp.broadcast_to(idx, (batch, n)))
    t_rank = jnp.take_along_axis(rank, group, axis=1)
    return jnp.where(valid, jnp.where(t_rank < cap, t_rank, -1), cap).astype(jnp.int32)


def assign_clusters_reference(codes: jax.Array, valid: jax.Array, cap: int) -> jax.Array:
    """Same contract as :func:`assign_clusters`, from a dense pairwise code-equality matrix."""
    n = codes.shape[1]
    idx = jnp.arange(n, dtype=jnp.int32)
    same = valid[:, :, None] & valid[:, None, :]
    for i in range(codes.shape[-1]):
        same = same & (codes[:, :, None, i] == codes[:, None, :, i])  # [batch, n, n]
    size = jnp.sum(same, axis=2)  # members of my cluster
    first = jnp.min(jnp.where(same, idx[None, None], n), axis=2)  # its first member
    leader = valid & (first == idx[None])
    # Rank of my cluster = number of clusters (leaders j) ahead of it.
    ahead = leader[:, None, :] & ((size[:, None, :] > size[:, :, None])
                                  | ((size[:, None, :] == size[:, :, None])
                                     & (idx[None, None, :] < first[:, :, None])))
    rank = jnp.sum(ahead, axis=2)
    return jnp.where(valid, jnp.where(rank < cap, rank, -1), cap).astype(jnp.int32)


def segment_mean(values: jax.Array, ids: jax.Array, cap: int) -> tuple[jax.Array, jax.Array]:
    """Cluster means by ``segment_sum`` (Fig. 4 b); ids outside [0, cap) belong to no cluster.

    Args:
      values: [batch, n, dim].
      ids: int32 [batch, n].
      cap: number of clusters.

    Returns:
      (means float32 [batch, cap, dim] (zeros for empty clusters), counts float32 [batch, cap]).
    """
    ok = (ids >= 0) & (ids < cap)
    ids = jnp.where(ok, ids, cap)  # out of range: dropped by segment_sum
    sums = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, cap))(values.astype(jnp.float32), ids)
    counts = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, cap))(ok.astype(jnp.float32), ids)
    return sums / jnp.maximum(counts, 1.0)[..., None], counts


def one_hot_mean(values: jax.Array, ids: jax.Array, cap: int) -> tuple[jax.Array, jax.Array]:
    """Same contract as :func:`segment_mean` with an explicit one-hot assignment matrix."""
    assign = jax.nn.one_hot(ids, cap, dtype=jnp.float32)  # out-of-range ids: all-zero rows
    counts = jnp.sum(assign, axis=1)
    sums = jnp.einsum('bnc,bnd->bcd', assign, values.astype(jnp.float32), precision=_HIGHEST)
    return sums / jnp.maximum(counts, 1.0)[..., None], counts


def merge_overflow(proj: jax.Array, slots: jax.Array, cap: int, mean_fn=segment_mean) -> jax.Array:
    """Overflow rule: tokens with slot -1 join the kept cluster nearest in projection space.

    Args:
      proj: float32 [batch, n, l] LSH coordinates (:func:`lsh_project`).
      slots: int32 [batch, n] from :func:`assign_clusters` (-1 = overflow, cap = padding).
      cap: number of slots.
      mean_fn: :func:`segment_mean` or :func:`one_hot_mean`.

    Returns:
      int32 [batch, n]: slots with every -1 replaced by the slot of the kept centroid (mean of
      the kept members' coordinates) at the smallest squared distance; ties: the lower slot.
    """
    proj = jax.lax.stop_gradient(proj)
    centre, counts = mean_fn(proj, slots, cap)  # [batch, cap, l]
    d2 = (jnp.sum(proj * proj, axis=-1)[:, :, None]
          - 2.0 * jnp.einsum('bnl,bcl->bnc', proj, centre, precision=_HIGHEST)
          + jnp.sum(centre * centre, axis=-1)[:, None, :])
    d2 = jnp.where(counts[:, None, :] > 0, d2, jnp.inf)
    nearest = jnp.argmin(d2, axis=-1).astype(jnp.int32)
    return jnp.where(slots == -1, nearest, slots)


def cluster_tokens(x: jax.Array, valid: jax.Array, a: jax.Array, b: jax.Array, width: float,
                   cap: int, reference: bool = False) -> dict[str, jax.Array]:
    """One LSH family: hash, cluster (with the overflow rule), centroids.

    Args:
      x: [batch, n, emb] tokens to cluster (hashed through ``stop_gradient``).
      valid: bool [batch, n].
      a, b, width: the family's hash parameters.
      cap: static capacity.
      reference: dense pairwise / one-hot implementation instead of sort / segment_sum.

    Returns:
      {'ids': int32 [batch, n] cluster of each token (``cap`` for padding),
       'centroids': float32 [batch, cap, emb] (differentiable in x),
       'counts': float32 [batch, cap] members per cluster,
       'overflow': int32 [batch] tokens merged because of the capacity}.
    """
    proj = lsh_project(jax.lax.stop_gradient(x), a, b, width)
    return cluster_projected(x, proj, valid, cap, reference)


def cluster_projected(x: jax.Array, proj: jax.Array, valid: jax.Array, cap: int,
                      reference: bool = False) -> dict[str, jax.Array]:
    """:func:`cluster_tokens` given the tokens' E2LSH coordinates.

    Args:
      x: [batch, n, emb] tokens to average into centroids.
      proj: [batch, n, l] their continuous coordinates (A x + b) / w (codes = floor).
      valid: bool [batch, n].
      cap: static capacity.
      reference: dense pairwise / one-hot implementation instead of sort / segment_sum.

    Returns:
      The dict of :func:`cluster_tokens`.
    """
    codes = jnp.floor(proj)
    assign = assign_clusters_reference if reference else assign_clusters
    mean_fn = one_hot_mean if reference else segment_mean
    slots = assign(codes, valid, cap)
    overflow = jnp.sum(slots == -1, axis=1).astype(jnp.int32)
    ids = merge_overflow(proj, slots, cap, mean_fn) if cap < x.shape[1] else slots
    centroids, counts = mean_fn(x, ids, cap)
    return {'ids': ids, 'centroids': centroids, 'counts': counts, 'overflow': overflow}


def compress(x: jax.Array, valid: jax.Array, a: jax.Array, b: jax.Array,
             widths_: tuple[float, float, float], caps: tuple[int, int, int],
             reference: bool = False) -> tuple[dict, dict, dict]:
    """Token compression (Section III-B): LSH_0 on queries, LSH_1 then LSH_2 on residuals.

    Args:
      x: [batch, n, emb] block input.
      valid: bool [batch, n].
      a: [3, l, emb], b: [3, l] hash parameters of the three families.
      widths_: bucket widths (w0, w1, w2).
      caps: capacities (cap0, cap1, cap2).
      reference: use the dense/one-hot clustering.

    Returns:
      Three :func:`cluster_tokens` dicts (queries, keys/values, residuals).
    """
    def project(tokens, family):
        return lsh_project(jax.lax.stop_gradient(tokens), a[family], b[family], widths_[family])

    return _two_level(x.astype(jnp.float32), valid, project, caps, reference)


def compress_per_head(x: jax.Array, valid: jax.Array, a: jax.Array, b: jax.Array,
                      widths_: tuple[float, float, float], caps: tuple[int, int, int],
                      reference: bool = False) -> tuple[dict, dict, dict]:
    """:func:`compress` once per head, each head with its own hash parameters.

    Heads are folded into the batch axis (row ``i * heads + h`` is example i, head h), so the
    clustering, overflow rule and centroids run unchanged on [batch * heads, n, ...].

    Args:
      x: [batch, n, emb] block input.
      valid: bool [batch, n].
      a: [heads, 3, l, emb], b: [heads, 3, l] hash parameters of each head's three families.
      widths_, caps, reference: as for :func:`compress`.

    Returns:
      Three :func:`cluster_tokens` dicts with leading axis batch * heads.
    """
    heads = a.shape[0]

    def project(tokens, family):  # tokens [batch * heads, n, d] -> [batch * heads, n, l]
        t = jax.lax.stop_gradient(tokens)
        t = t.reshape(-1, heads, *t.shape[1:])
        proj = jnp.einsum('bhne,hle->bhnl', t, a[:, family].astype(jnp.float32),
                          precision=_HIGHEST)
        proj = (proj + b[:, family][None, :, None, :].astype(jnp.float32)) / widths_[family]
        return proj.reshape(-1, *proj.shape[2:])

    x = jnp.repeat(x.astype(jnp.float32), heads, axis=0)
    return _two_level(x, jnp.repeat(valid, heads, axis=0), project, caps, reference)


def _two_level(x, valid, project, caps, reference) -> tuple[dict, dict, dict]:
    """LSH_0 and LSH_1 on x [batch, n, emb], LSH_2 on the residuals; ``project(t, family)``."""
    fam0 = cluster_projected(x, project(x, 0), valid, caps[0], reference)
    fam1 = cluster_projected(x, project(x, 1), valid, caps[1], reference)
    c1 = jnp.take_along_axis(fam1['centroids'], jnp.clip(fam1['ids'], 0, caps[1] - 1)[..., None],
                             axis=1)
    residual = jnp.where(valid[..., None], x - c1, 0.0)
    fam2 = cluster_projected(residual, project(residual, 2), valid, caps[2], reference)
    return fam0, fam1, fam2


# -- attention among compressed tokens ----------------------------------------------------------
def token_probabilities(s_bar: jax.Array, ct1: jax.Array, ct2: jax.Array, kv_valid: jax.Array,
                        cap1: int) -> jax.Array:
    """Unnormalised probabilities of every query cluster on every key token (eq. 6, Fig. 6).

    Args:
      s_bar: float [batch, heads, k0, cap1 + cap2] scaled compressed scores (eq. 5).
      ct1, ct2: int32 [batch, n] key clusters of LSH_1 and LSH_2 (any value on padding).
      kv_valid: bool [batch, n].
      cap1: number of LSH_1 slots (column offset of the C2 block).

    Returns:
      float32 [batch, heads, k0, n]: exp(Sb[i, CT1[j]] + Sb[i, cap1 + CT2[j]] - m_i), 0 on
      padding, with m_i the max over valid j (so each row with a valid key has max 1).
    """
    s_bar = s_bar.astype(jnp.float32)
    cap2 = s_bar.shape[-1] - cap1
    i1 = jnp.clip(ct1, 0, cap1 - 1)[:, None, None, :]
    i2 = jnp.clip(ct2, 0, cap2 - 1)[:, None, None, :]
    shape = s_bar.shape[:3] + (ct1.shape[1],)
    g = (jnp.take_along_axis(s_bar[..., :cap1], jnp.broadcast_to(i1, shape), axis=-1)
         + jnp.take_along_axis(s_bar[..., cap1:], jnp.broadcast_to(i2, shape), axis=-1))
    keep = kv_valid[:, None, None, :]
    g = jnp.where(keep, g, base.MASK_VALUE)
    m = jax.lax.stop_gradient(jnp.max(g, axis=-1, keepdims=True))
    return jnp.where(keep, jnp.exp(g - m), 0.0)


def _segment_sum_last(p: jax.Array, ids: jax.Array, num: int) -> jax.Array:
    """[batch, h, q, n] summed over n into ``num`` segments by ids [batch, n] (others dropped)."""
    ids = jnp.where((ids >= 0) & (ids < num), ids, num)

    def one(pb, ib):  # pb [h, q, n]
        return jnp.moveaxis(jax.ops.segment_sum(jnp.moveaxis(pb, -1, 0), ib, num), 0, -1)

    return jax.vmap(one)(p, ids)


def aggregate_probabilities(p: jax.Array, ct1: jax.Array, ct2: jax.Array, cap1: int,
                            cap2: int) -> jax.Array:
    """Aggregated attention probabilities AP (Fig. 6): p_ij added to both of j's centroids.

    Args:
      p: float32 [batch, heads, k0, n] from :func:`token_probabilities` (0 on padding).
      ct1, ct2: int32 [batch, n] key clusters (padding: out of range or with p = 0).
      cap1, cap2: slots of LSH_1 and LSH_2.

    Returns:
      float32 [batch, heads, k0, cap1 + cap2]; each row sums to 2 * sum_j p_ij.
    """
    return jnp.concatenate([_segment_sum_last(p, ct1, cap1), _segment_sum_last(p, ct2, cap2)],
                           axis=-1)


def pair_counts(ct1: jax.Array, ct2: jax.Array, kv_valid: jax.Array, cap1: int,
                cap2: int) -> jax.Array:
    """Key tokens per (LSH_1 cluster, LSH_2 cluster) pair: the deduplicated key table.

    Args:
      ct1, ct2: int32 [batch, n] key clusters; kv_valid: bool [batch, n].
      cap1, cap2: slots of LSH_1 and LSH_2.

    Returns:
      float32 [batch, cap1, cap2]; N[c1, c2] = #valid j with CT1[j] = c1 and CT2[j] = c2.
    """
    ok = kv_valid & (ct1 >= 0) & (ct1 < cap1) & (ct2 >= 0) & (ct2 < cap2)
    pair = jnp.where(ok, ct1 * cap2 + ct2, cap1 * cap2)  # out of range: dropped
    counts = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, cap1 * cap2))(
        ok.astype(jnp.float32), pair)
    return counts.reshape(ct1.shape[0], cap1, cap2)


def factorized_probabilities(s_bar: jax.Array, counts: jax.Array) -> jax.Array:
    """Normalised AP (Fig. 6) without token probabilities: exp(a + b) = exp(a) exp(b).

    Every key token j of the pair (c1, c2) has p_ij = E1[i, c1] E2[i, c2] with E = exp of the
    centroid scores, so AP[i, c1] = E1[i, c1] (E2 Nᵀ)[i, c1] and AP[i, k1 + c2] =
    E2[i, c2] (E1 N)[i, c2], for the pair counts N: two [k0, k2] x [k2, k1] matmuls per head
    instead of k0 x n gathers, exps and scatters. Rows are shifted by the maxima m1, m2 of the
    two score blocks over clusters with members, so no factor exceeds 1; the largest pair term is
    at least exp(-min(range1, range2)) of the row's score ranges, which underflows float32 only
    beyond a range of ~80 in both blocks.

    Args:
      s_bar: float [batch, heads, k0, cap1 + cap2] scaled compressed scores (eq. 5).
      counts: float32 [batch, cap1, cap2] from :func:`pair_counts`.

    Returns:
      float32 [batch, heads, k0, cap1 + cap2] with AP / (sum AP / 2): each row sums to 2 (0 for
      a sequence without valid keys).
    """
    cap1 = counts.shape[1]
    s_bar = s_bar.astype(jnp.float32)
    s1, s2 = s_bar[..., :cap1], s_bar[..., cap1:]
    used1 = (jnp.sum(counts, axis=2) > 0)[:, None, None, :]  # [batch, 1, 1, cap1]
    used2 = (jnp.sum(counts, axis=1) > 0)[:, None, None, :]

    def shifted_exp(s, used):
        m = jnp.max(jnp.where(used, s, base.MASK_VALUE), axis=-1, keepdims=True)
        return jnp.where(used, jnp.exp(s - jax.lax.stop_gradient(m)), 0.0)

    e1, e2 = shifted_exp(s1, used1), shifted_exp(s2, used2)
    ap1 = e1 * jnp.einsum('bhqk,bck->bhqc', e2, counts, precision=_HIGHEST)
    ap2 = e2 * jnp.einsum('bhqc,bck->bhqk', e1, counts, precision=_HIGHEST)
    denom = jnp.sum(ap1, axis=-1, keepdims=True)  # = sum(AP) / 2 = sum_j p_ij
    inv = jnp.where(denom > 0, 1.0 / jnp.maximum(denom, 1e-30), 0.0)
    return jnp.concatenate([ap1, ap2], axis=-1) * inv


def use_factorized(aggregation: str, k0: int, cap1: int, cap2: int, n: int,
                   dropout: bool = False) -> bool:
    """Whether the layer aggregates by :func:`factorized_probabilities` (static decision).

    Never while attention dropout acts (it drops token probabilities, which only the token path
    forms); otherwise 'factorized' always, and 'auto' when 2 k0 k1 k2 <= FACTORIZED_MAC_RATIO k0 n.
    """
    del k0  # both paths scale with k0
    if dropout or aggregation == 'tokens':
        return False
    return aggregation == 'factorized' or 2.0 * cap1 * cap2 <= FACTORIZED_MAC_RATIO * n


def compressed_attention(q_bar: jax.Array, k_bar: jax.Array, v_bar: jax.Array, ct1: jax.Array,
                         ct2: jax.Array, kv_valid: jax.Array, cap1: int,
                         drop=None, aggregation: str = 'tokens') -> jax.Array:
    """Eqs. 5-8 per head: scores among centroids, AP aggregation, Ob = AP Vb / (sum AP / 2).

    Everything before it (hashing, clustering) is selection work; this is the compute a kernel
    would replace, given the centroid projections and the cluster tables.

    Args:
      q_bar: [batch, k0, heads, head_dim] compressed queries.
      k_bar, v_bar: [batch, cap1 + cap2, heads, head_dim] compressed keys / values.
      ct1, ct2: int32 [batch, n] key clusters; kv_valid: bool [batch, n].
      cap1: LSH_1 slots.
      drop: optional function applied to the normalised token probabilities (dropout).
      aggregation: 'tokens' (token probabilities [batch, heads, k0, n], gathered and summed onto
        the centroids), 'factorized' (:func:`factorized_probabilities`) or 'auto'
        (:func:`use_factorized`). Equal up to float rounding.

    Returns:
      [batch, k0, heads, head_dim] in v_bar's dtype; rows of a sequence without valid keys are 0.
    """
    scale = 1.0 / math.sqrt(q_bar.shape[-1])
    s_bar = base.attention_scores(q_bar, k_bar) * scale  # [batch, heads, k0, cap1 + cap2]
    cap2, n = k_bar.shape[1] - cap1, ct1.shape[1]
    if use_factorized(aggregation, q_bar.shape[1], cap1, cap2, n, drop is not None):
        ap = factorized_probabilities(s_bar, pair_counts(ct1, ct2, kv_valid, cap1, cap2))
        return base.weighted_values(ap, v_bar)
    p = token_probabilities(s_bar, ct1, ct2, kv_valid, cap1)
    denom = jnp.sum(p, axis=-1, keepdims=True)  # = sum(AP) / 2
    p = p * jnp.where(denom > 0, 1.0 / jnp.maximum(denom, 1e-30), 0.0)
    if drop is not None:
        p = drop(p)
    ap = aggregate_probabilities(p, ct1, ct2, cap1, cap2)
    return base.weighted_values(ap, v_bar)


# -- cost model -----------------------------------------------------------------------------------
def _family_ops(n: int, emb: int, hash_len: int, cap: int, reference: bool) -> dict[str, float]:
    """Ops of one LSH family (:func:`cluster_tokens`) for one example of n tokens."""
    nl = n * hash_len
    hashing = cost.matmul(n, emb, hash_len) + cost.elementwise(nl, 3)  # + b, / w, floor
    if reference:  # pairwise code equality, one-hot means
        clustering = cost.elementwise(n * n, 3 * hash_len + 14)
        centroids = cost.matmul(cap, n, emb) + cost.elementwise(n * cap, 2)
    else:  # packed key (or lexsort) and segment sums
        clustering = (cost.sort(1, n) * 2 + cost.elementwise(nl, 12 + 2 * hash_len)
                      + cost.elementwise(n, 30))
        centroids = cost.elementwise(n * emb + cap * emb, 1) + cost.elementwise(n + cap, 2)
    ops = {'hashing': hashing, 'clustering': clustering, 'centroids': centroids}
    if cap < n:  # nearest kept centroid in the l-dim projection space
        merge = cost.matmul(n, hash_len, cap) + cost.elementwise(n * cap, 16)
        merge += (cost.matmul(cap, n, hash_len) + cost.elementwise(n * cap, 2) if reference
                  else cost.elementwise(nl, 1))
        ops['overflow_merge'] = merge
    return ops


def layer_cost(dims: base.AttentionDims, cfg, seq_len: int) -> cost.LayerCost:
    """Ops one CTA layer executes for one example at the static capacities (``cost.py`` units).

    Both implementations hash, cluster and average three families (:func:`_family_ops`: the
    E2LSH projection, the clustering, the centroid sums, and the overflow merge when a capacity
    is below n). ``xla`` then projects k0 query and k1 + k2 key/value centroids, forms scores
    [heads, k0, k1 + k2], aggregates them ('tokens': the k0 x n token probabilities, gathered,
    exponentiated, normalised and summed onto both centroids; 'factorized': the pair counts and
    two [k0, k2] x [k2, k1] matmuls per head, :func:`use_factorized` decides) and AV among the
    centroids; the output projection runs on the k0 query centroids. ``reference`` rebuilds the
    n approximated tokens from one-hot matrices and runs dense masked attention over them.

    With ``clustering='per_head'`` the clustering (and the reference's expansion) runs once per
    head, and ``xla`` gathers each head's output back to its n tokens before the output
    projection (``out_rows`` = n); the attention among centroids is per head in both cases.
    """
    n, emb = seq_len, dims.emb_dim
    heads, head_dim = dims.num_heads, dims.head_dim
    caps = capacities(cfg, n)
    reference = cfg.impl == 'reference'
    groups = heads if cfg.clustering == 'per_head' else 1  # clusterings per example
    parts: dict[str, float] = {}
    for cap in caps:
        for name, ops in _family_ops(n, emb, int(cfg.hash_length), cap, reference).items():
            parts[name] = parts.get(name, 0.0) + groups * ops
    parts['centroids'] += groups * cost.elementwise(n * emb, 2)  # residuals X - C1[CT1], select
    if reference:
        parts['expansion'] = groups * (sum(cost.matmul(n, cap, emb) + cost.elementwise(n * cap)
                                           for cap in caps) + cost.elementwise(n * emb))
        attention = cost.dense_attention(heads, head_dim, n, 'reference')
        return cost.LayerCost(attention={**parts, **attention}, tokens=n,
                              qkv_width=dims.qkv_dim, query_rows=n, kv_rows=n, out_rows=n,
                              ffn_tokens=n, tokens_out=n)
    k0, k1, k2 = caps
    rows, cols = heads * k0, k1 + k2
    parts['scores'] = cost.matmul(k0, head_dim, cols, batch=heads) + cost.elementwise(rows * cols)
    if use_factorized(cfg.aggregation, k0, k1, k2, n):
        parts['aggregation'] = (cost.matmul(k0, k2, k1, batch=2 * heads)
                                + cost.elementwise(rows * cols, 9)
                                + groups * cost.elementwise(n + 2 * k1 * k2))
    else:
        parts['aggregation'] = cost.elementwise(rows * n, 20) + cost.elementwise(rows * cols)
    parts['values'] = cost.matmul(k0, cols, head_dim, batch=heads)
    parts['output'] = cost.elementwise(n * emb)  # padding select after the gather
    return cost.LayerCost(attention=parts, tokens=n, qkv_width=dims.qkv_dim, query_rows=k0,
                          kv_rows=k1 + k2, out_rows=n if groups > 1 else k0, ffn_tokens=n,
                          tokens_out=n)


# -- the layer ----------------------------------------------------------------------------------
class CTAAttention(base.Attention):
    """CTA attention layer; see the module docstring for what it computes.

    Extra state: ``lsh_a`` Buffer float32 [3, l, emb] (directions ~ N(0, I)) and ``lsh_b`` Buffer
    float32 [3, l] (offsets ~ U(0, w) of each family's width); with ``clustering='per_head'``
    one set per head, [heads, 3, l, emb] and [heads, 3, l].
    """

    def __init__(self, dims: base.AttentionDims, cfg: ml_collections.ConfigDict, *, rngs):
        super().__init__(dims, cfg, rngs=rngs)
        hash_len = int(cfg.hash_length)
        key_a, key_b = jax.random.split(rngs.params())
        sets = (dims.num_heads,) if self.per_head else ()
        self.lsh_a = base.Buffer(jax.random.normal(
            key_a, sets + (NUM_FAMILIES, hash_len, dims.emb_dim), jnp.float32))
        w = jnp.asarray(widths(cfg), jnp.float32)
        self.lsh_b = base.Buffer(
            jax.random.uniform(key_b, sets + (NUM_FAMILIES, hash_len), jnp.float32) * w[:, None])

    @property
    def per_head(self) -> bool:
        """Whether each head clusters with its own hash parameters (``clustering='per_head'``)."""
        return self.cfg.clustering == 'per_head'

    def check_config(self, cfg, dims):
        """Raises ConfigError for a bad CTA field."""
        check_fields(cfg)

    def clusters(self, x: jax.Array, mask: jax.Array,
                 reference: bool) -> tuple[dict, dict, dict]:
        """The three families' :func:`cluster_tokens` results for x [batch, n, emb].

        ``reference``: dense pairwise / one-hot clustering instead of sort / ``segment_sum``.
        Per head (:func:`compress_per_head`) the leading axis is batch * heads.
        """
        if self.per_head:
            return compress_per_head(x, mask, self.lsh_a[...], self.lsh_b[...], widths(self.cfg),
                                     capacities(self.cfg, x.shape[1]), reference=reference)
        return compress(x, mask, self.lsh_a[...], self.lsh_b[...], widths(self.cfg),
                        capacities(self.cfg, x.shape[1]), reference=reference)

    def attend(self, x, mask, carry, *, deterministic, rng):
        """CTA layer; see ``base.Attention.__call__`` and the module docstring."""
        drop = None
        if not deterministic and self.dims.attention_dropout_rate > 0.0:
            def drop(p):
                return self.drop_probs(p, deterministic, rng)
        y, (fam0, fam1, fam2) = self.implementation.run(self, x, mask, drop)
        stats = self._stats(self._rows_mask(mask), fam0, fam1, fam2)
        if self.cfg.diagnostics:
            y_dense = self.dense(x, mask, True, None)[0].astype(jnp.float32)
            err = jnp.where(mask[..., None], y.astype(jnp.float32) - y_dense, 0.0)
            ref = jnp.where(mask[..., None], y_dense, 0.0)
            num, den = jnp.sqrt(jnp.sum(err * err)), jnp.sqrt(jnp.sum(ref * ref))
            stats['rel_error'] = jax.lax.stop_gradient(
                jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0.0)).astype(jnp.float32)
        return base.AttentionOutput(y, carry, stats, {})

    def _cast(self, c: jax.Array) -> jax.Array:
        return c.astype(jnp.dtype(self.dims.dtype))

    def _rows_mask(self, mask: jax.Array) -> jax.Array:
        """The mask of the clustering rows: [batch, n], or [batch * heads, n] per head."""
        return jnp.repeat(mask, self.dims.num_heads, axis=0) if self.per_head else mask

    def _head_project(self, proj, tokens: jax.Array) -> jax.Array:
        """Each head's slice of a projection on that head's tokens.

        Args:
          proj: ``self.query``, ``self.key`` or ``self.value``.
          tokens: [batch * heads, rows, emb] (row i * heads + h: head h's tokens).

        Returns:
          [batch, rows, heads, head_dim]: head h from tokens of head h only.
        """
        heads, head_dim = self.dims.num_heads, self.dims.head_dim
        t = self._cast(tokens).reshape(-1, heads, *tokens.shape[1:])
        w = proj.kernel[...].reshape(-1, heads, head_dim).astype(t.dtype)
        return jnp.einsum('bhre,ehd->brhd', t, w)

    def _centroid_qkv(self, fams: tuple[dict, dict, dict]) -> tuple[jax.Array, ...]:
        """Compressed Q, K, V (eq. 3) in the layout of :func:`compressed_attention`.

        Returns:
          (q_bar [b, k0, h, head_dim], k_bar, v_bar [b, cap1 + cap2, h, head_dim]); shared:
          b = batch, h = heads; per head: b = batch * heads (row i * heads + h), h = 1.
        """
        fam0, fam1, fam2 = fams
        cat = jnp.concatenate([fam1['centroids'], fam2['centroids']], axis=1)
        if not self.per_head:
            cat = self._cast(cat)
            return (self.split_heads(self.query(self._cast(fam0['centroids']))),
                    self.split_heads(self.key(cat)), self.split_heads(self.value(cat)))

        def fold(t):  # [batch, rows, heads, d] -> [batch * heads, rows, 1, d]
            return jnp.swapaxes(t, 1, 2).reshape(-1, t.shape[1], 1, t.shape[3])

        return (fold(self._head_project(self.query, fam0['centroids'])),
                fold(self._head_project(self.key, cat)), fold(self._head_project(self.value, cat)))

    def _compressed(self, x, mask, drop) -> tuple[jax.Array, tuple[dict, dict, dict]]:
        """The xla path: sort-based clusters; projections, scores and AV among centroids only.

        Args:
          x: [batch, n, emb]; mask: bool [batch, n]; drop: None or the dropout function.

        Returns:
          (y [batch, n, emb], the three families of :meth:`clusters`).
        """
        fam0, fam1, fam2 = fams = self.clusters(x, mask, reference=False)
        cap0, cap1 = fam0['centroids'].shape[1], fam1['centroids'].shape[1]
        q_bar, k_bar, v_bar = self._centroid_qkv(fams)
        o_bar = compressed_attention(q_bar, k_bar, v_bar, fam1['ids'], fam2['ids'],
                                     self._rows_mask(mask), cap1, drop, self.cfg.aggregation)
        rows = jnp.clip(fam0['ids'], 0, cap0 - 1)[..., None, None]
        if self.per_head:  # gather each head's output to its tokens, then project n rows
            o = jnp.take_along_axis(o_bar, rows, axis=1)  # [batch * heads, n, 1, head_dim]
            o = o.reshape(mask.shape[0], self.dims.num_heads, mask.shape[1], o.shape[-1])
            y = self.project_out(jnp.swapaxes(o, 1, 2))
        else:
            y_bar = self.project_out(o_bar)  # [batch, k0, emb]: output projection on centroids
            y = jnp.take_along_axis(y_bar, rows[..., 0], axis=1)
        return jnp.where(mask[..., None], y, 0).astype(y.dtype), fams

    def _reference(self, x, mask, drop) -> tuple[jax.Array, tuple[dict, dict, dict]]:
        """The reference path: dense clustering, full attention of the approximated tokens.

        The approximated tokens come from explicit one-hot assignment matrices; same arguments
        and result as :meth:`_compressed`.
        """
        fam0, fam1, fam2 = fams = self.clusters(x, mask, reference=True)

        def expand(fam):  # [batch, n, emb] = one_hot(ids) @ centroids
            cap = fam['centroids'].shape[1]
            return jnp.einsum('bnc,bce->bne', jax.nn.one_hot(fam['ids'], cap, dtype=jnp.float32),
                              fam['centroids'], precision=_HIGHEST)

        x_q, x_kv = expand(fam0), expand(fam1) + expand(fam2)
        if self.per_head:  # rows batch * heads: head h from its own approximated tokens
            q = self._head_project(self.query, x_q)
            k, v = self._head_project(self.key, x_kv), self._head_project(self.value, x_kv)
        else:
            x_q, x_kv = self._cast(x_q), self._cast(x_kv)
            q = self.split_heads(self.query(x_q))
            k, v = self.split_heads(self.key(x_kv)), self.split_heads(self.value(x_kv))
        scale = 1.0 / math.sqrt(self.dims.head_dim)
        probs = base.masked_softmax(base.attention_scores(q, k) * scale, base.pair_mask(mask, mask))
        if drop is not None:
            probs = drop(probs)
        return self.project_out(base.weighted_values(probs, v)), fams

    implementations = base.implementations(
        base.Implementation('reference', _reference),
        base.Implementation('xla', _compressed),
    )

    def _stats(self, mask, fam0, fam1, fam2) -> dict[str, jax.Array]:
        """Pooled-over-batch statistics (see the module docstring for the definitions)."""
        f32 = jnp.float32
        n = jnp.sum(mask, axis=1).astype(f32)  # [batch]
        k0, k1, k2 = (jnp.sum(f['counts'] > 0, axis=1).astype(f32) for f in (fam0, fam1, fam2))
        cap0, cap1, cap2 = (f['counts'].shape[1] for f in (fam0, fam1, fam2))
        examples = jnp.maximum(jnp.sum(n > 0).astype(f32), 1.0)

        def frac(num, den):
            return jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0.0).astype(f32)

        overflow = sum(f['overflow'] for f in (fam0, fam1, fam2)).astype(f32)
        computed_pairs = jnp.sum(jnp.where(n > 0, float(cap0 * (cap1 + cap2)), 0.0))
        stats = {
            'kept_fraction': jnp.zeros((), f32),  # no exact pair: every score is approximated
            'effective_pairs': frac(computed_pairs, jnp.sum(n * n)),
            'ra': frac(jnp.sum(k0 * (k1 + k2)), jnp.sum(n * n)),
            'rl': frac(jnp.sum(k0 + 2.0 * (k1 + k2)), jnp.sum(3.0 * n)),
            'k0': jnp.sum(k0) / examples,
            'k1': jnp.sum(k1) / examples,
            'k2': jnp.sum(k2) / examples,
            'overflow': jnp.sum(overflow) / examples,
            'overflow_fraction': frac(jnp.sum(overflow), 3.0 * jnp.sum(n)),
        }
        return {k: jax.lax.stop_gradient(v).astype(f32) for k, v in stats.items()}

    def inspect_maps(self, x, mask, carry):
        """Cluster ids per token and the attention map CTA's output corresponds to.

        Returns:
          {'query_clusters', 'key_clusters', 'residual_clusters': int32 [batch, n] (-1 on
           padding; [batch, heads, n] with ``clustering='per_head'``), 'approx_probs': float32
           [batch, heads, n, n]: row i is the softmax over valid keys j of S[CT0[i], CT1[j]] +
           S[CT0[i], k1 + CT2[j]] (eq. 6, with head h's clusters per head), i.e. exact attention
           of the approximated tokens (eq. 2); 0 on padded rows and columns}.
        """
        del carry
        _, fams = self.implementation.run(self, x, mask, None)
        names = ('query_clusters', 'key_clusters', 'residual_clusters')
        ids = [f['ids'] for f in fams]
        if self.per_head:
            ids = [i.reshape(mask.shape[0], self.dims.num_heads, -1) for i in ids]
        ids_mask = mask[:, None] if self.per_head else mask
        maps = {name: jnp.where(ids_mask, i, -1) for name, i in zip(names, ids)}
        maps['approx_probs'] = self.approx_probs(fams, mask)
        return maps

    def approx_probs(self, fams: tuple[dict, dict, dict], mask: jax.Array) -> jax.Array:
        """Token-level probabilities float32 [batch, heads, n, n] rebuilt from the clusters."""
        fam0, fam1, _ = fams
        cap0, cap1 = fam0['centroids'].shape[1], fam1['centroids'].shape[1]
        q_bar, k_bar, _ = self._centroid_qkv(fams)
        s_bar = base.attention_scores(q_bar, k_bar)
        p = token_probabilities(s_bar / math.sqrt(self.dims.head_dim), fam1['ids'], fams[2]['ids'],
                                self._rows_mask(mask), cap1)  # [b, h, k0, n] (see _centroid_qkv)
        p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
        rows = jnp.clip(fam0['ids'], 0, cap0 - 1)[:, None, :, None]  # [b, 1, n, 1]
        batch, n = mask.shape
        probs = jnp.take_along_axis(p, jnp.broadcast_to(rows, p.shape[:2] + (n, n)), axis=2)
        probs = probs.reshape(batch, self.dims.num_heads, n, n)
        return jnp.where(mask[:, None, :, None], probs, 0.0).astype(jnp.float32)


def _widths(w: float) -> dict[str, float]:
    return {'query_bucket_width': w, 'key_bucket_width': w, 'residual_bucket_width': w / 2}


METHOD = base.AttentionMethod(
    name='cta',
    module=CTAAttention,
    default_config=default_config,
    check=validate,
    cost=layer_cost,
    description='LSH clustering of tokens, attention among centroids, probability aggregation '
                '(CTA)',
    # Tiny widths and full capacity: every distinct token is its own cluster (residuals are then
    # exactly 0, one LSH_2 cluster), so CTA is exact attention up to float rounding.
    dense_equivalent={**_widths(1e-4), 'query_capacity': 1.0, 'key_capacity': 1.0,
                      'residual_capacity': 1.0},
    sweeps={'bucket_width': tuple(_widths(w) for w in (4.0, 8.0, 16.0, 32.0, 64.0))},
)
