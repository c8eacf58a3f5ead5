"""DSA: dynamic sparse attention with a trainable low-rank, low-precision prediction path.

DSA (Liu et al., "Dynamic Sparse Attention for Scalable Transformer Acceleration", IEEE TC 2022,
sections 3-5) computes only the attention weights a cheap predictor marks as important. For
x [batch, L, emb_dim] and its mask [batch, L], one layer:

1. **Predicts** the scores per head h (Eq. 5): ``S̃ʰ = (X Pʰ W̃_Qʰ)(X Pʰ W̃_Kʰ)ᵀ / sqrt(k)``
   [batch, heads, L, L], with a fixed sparse random projection ``Pʰ`` (Buffer ``projection``
   [emb_dim, heads, k]), trainable ``W̃_Qʰ, W̃_Kʰ`` (``pred_query``, ``pred_key`` [heads, k, k]) and
   ``k = round(sigma * head_dim)``, at ``precision``: fp32 | bf16 | int8 | int4 | int2. The
   integer ``pipeline`` is the paper's Fig. 9 by default (``fused``: X quantized, one fused
   low-precision weight ``P·W̃`` per path, exact integer GEMMs, Q̃/K̃ re-quantized for the S̃ GEMM)
   or ``project_first`` (X·P in float, then codes); fake quantization (:mod:`quant`) simulates the
   integer pipeline exactly in float32. ``random`` (a random mask, no predictor) and ``oracle``
   (the true scores) are the paper's controls.
2. **Selects** the keys to attend from the selection scores: ``topk`` keeps
   ``ceil((1 - sparsity) * n)`` valid keys per row (n = the example's valid length; ties to the
   lowest index), ``threshold`` the keys scoring >= threshold plus each row's best. Granularity
   ``element`` (per row), ``vector`` (``vector_size`` rows share keys, chosen on their mean
   score) or ``block`` (``block_q × block_k`` tiles ranked by mean score). Padding is never kept.
3. **Attends** over the kept keys only: softmax of the kept scores (scaled by 1/sqrt(head_dim)),
   AV; y [batch, L, emb_dim], zero on padded rows.
4. **Trains the predictor** (Eq. 6-7): ``aux_losses['dsa_mse'] = mse_weight * L_MSE``, with
   ``L_MSE`` the sum over heads and valid pairs of ``(S - S̃)²`` per example averaged over the
   batch (``mse_normalization='example_sum'``, Eq. 6) or the mean per pair (``pair_mean``),
   ``S = QKᵀ/sqrt(head_dim)``; gradients reach the predictor (straight-through) and Q/K.

Implementations (the table of :class:`DSAAttention`; other pairs are refused by validation):

* ``reference``: dense ``S̃`` and scores, a boolean keep mask, :func:`base.masked_attention`; every
  setting. The oracle of the tests.
* ``xla``: ``topk`` selection, every granularity. ``block``: the kept key blocks of each query
  block (the kernel's index lists, from pooled tile scores) gathered, batched matmuls, no L×L
  array. ``element``: the dense S̃ and its per-row ``lax.top_k``; ``vector``: ``lax.top_k`` over
  pooled group scores (no L×L S̃), each group's lists shared by its rows. Both read the kept scores
  from one ``QKᵀ``, softmax them and scatter them for one AV matmul. The MSE from Gram matrices.
* ``pallas``: ``block`` granularity (its default, with 64 × 64 tiles), tiles powers of two >= 16
  (>= 64 compiled for a GPU), no attention dropout: the kept tiles' index lists (pooled tile
  scores) go to the block-sparse kernel (``pallas_kernels.block_sparse``); interpret mode on CPU.

Group and tile scores of the bilinear S̃ = q̃·k̃ᵀ come from pooled q̃/k̃ (:class:`SelectionScores`)
in the xla and pallas paths, from the dense S̃ in the reference; equal up to float rounding.

Statistics (float32 scalars): ``kept_fraction`` (valid query-key pairs attended), ``mse`` (the
mean per head and pair, with a predictor), ``prediction_accuracy`` (``accuracy_stat``: at
evaluation by default, on ``accuracy_rows`` sampled rows per example with ``lax.top_k``:
|predicted ∩ oracle| / |predicted|, Fig. 6).

How the paper's open points are resolved (head mapping, the scale of ``S̃``, quantization scales
and the integer pipeline, random masks), the cost model and the sweeps: ``docs/methods/dsa.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lra_sparse.attention import base, cost, quant

PRECISIONS = ('fp32', 'bf16', 'int8', 'int4', 'int2', 'random', 'oracle')
PRECISION_BITS = {'fp32': 32, 'bf16': 16, 'int8': 8, 'int4': 4, 'int2': 2}
SELECTIONS = ('topk', 'threshold')
GRANULARITIES = ('element', 'vector', 'block')
VECTOR_SIZES = (2, 4, 8)
ACCURACY_STATS = ('eval', 'always', 'off')
PIPELINES = ('fused', 'project_first')
MSE_NORMALIZATIONS = ('example_sum', 'pair_mean')
_HIGHEST = jax.lax.Precision.HIGHEST


def default_config() -> ml_collections.ConfigDict:
    """DSA's fields (see the module docstring for what they feed)."""
    c = ml_collections.ConfigDict()
    c.sparsity = 0.9  # fraction of each row's valid keys NOT attended (top-k), in [0, 1)
    c.sigma = 0.25  # predictor width k = round(sigma * head_dim) per head, in (0, 1], k >= 1
    c.precision = 'int4'  # prediction path: fp32 | bf16 | int8 | int4 | int2 | random | oracle
    c.selection = 'topk'  # topk (ceil((1 - sparsity) * valid) keys per row) | threshold
    c.threshold = 0.0  # selection='threshold': keep keys with predicted score >= this (any float)
    c.granularity = 'element'  # element | vector (rows share keys) | block (tiles)
    c.vector_size = 4  # granularity='vector': consecutive query rows per group: 2 | 4 | 8
    c.block_q = 16  # granularity='block': query rows per tile, a positive integer
    c.block_k = 16  # granularity='block': keys per tile, a positive integer
    c.pipeline = 'fused'  # fused (Fig. 9: quantized X times one fused P·W~) | project_first
    c.mse_weight = 2.5e-8  # lambda of L = L_model + lambda * L_MSE (Eq. 7), a number >= 0
    c.mse_normalization = 'example_sum'  # L_MSE: example_sum (Eq. 6) | pair_mean
    c.accuracy_stat = 'eval'  # when to log 'prediction_accuracy': eval | always | off
    c.accuracy_rows = 64  # query rows sampled per example for it (0: every row)
    return c


# -- validation ---------------------------------------------------------------------------------
_check = base.check_field


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def predictor_width(sigma: float, head_dim: int) -> int:
    """Predictor width per head: round(sigma * head_dim), halves rounded up."""
    return int(math.floor(sigma * head_dim + 0.5))


def check_fields(cfg, head_dim: int) -> None:
    """Raises ConfigError for any bad DSA field (needs only the head width)."""
    s = cfg.sparsity
    _check(_is_number(s) and 0.0 <= s < 1.0, 'sparsity', s, 'a fraction in [0, 1)')
    sigma = cfg.sigma
    _check(_is_number(sigma) and 0.0 < sigma <= 1.0, 'sigma', sigma, 'a number in (0, 1]')
    _check(predictor_width(sigma, head_dim) >= 1, 'sigma', sigma,
           f'a value with k = round(sigma * head_dim) >= 1 (head_dim={head_dim}: sigma >= '
           f'{0.5 / head_dim:.3g})')
    _check(cfg.precision in PRECISIONS, 'precision', cfg.precision,
           f'one of {", ".join(PRECISIONS)}')
    _check(cfg.selection in SELECTIONS, 'selection', cfg.selection,
           f'one of {", ".join(SELECTIONS)}')
    _check(not (cfg.precision == 'random' and cfg.selection != 'topk'), 'selection',
           cfg.selection, "topk when precision='random' (a random mask has no score scale)")
    thr = cfg.threshold
    _check(_is_number(thr) and math.isfinite(thr), 'threshold', thr, 'a finite number')
    _check(cfg.granularity in GRANULARITIES, 'granularity', cfg.granularity,
           f'one of {", ".join(GRANULARITIES)}')
    _check(cfg.vector_size in VECTOR_SIZES and not isinstance(cfg.vector_size, bool),
           'vector_size', cfg.vector_size, f'one of {", ".join(map(str, VECTOR_SIZES))}')
    for field in ('block_q', 'block_k'):
        _check(_is_pos_int(cfg[field]), field, cfg[field], 'a positive integer')
    lam = cfg.mse_weight
    _check(_is_number(lam) and math.isfinite(lam) and lam >= 0, 'mse_weight', lam,
           'a finite number >= 0')
    _check(cfg.pipeline in PIPELINES, 'pipeline', cfg.pipeline, f'one of {", ".join(PIPELINES)}')
    _check(cfg.mse_normalization in MSE_NORMALIZATIONS, 'mse_normalization',
           cfg.mse_normalization, f'one of {", ".join(MSE_NORMALIZATIONS)}')
    _check(cfg.accuracy_stat in ACCURACY_STATS, 'accuracy_stat', cfg.accuracy_stat,
           f'one of {", ".join(ACCURACY_STATS)}')
    rows = cfg.accuracy_rows
    _check(isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0, 'accuracy_rows',
           rows, 'an integer >= 0 (0: every row)')


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks DSA's fields against the full config (head width) before any compute."""
    m = config.model
    check_fields(config.attention, max(1, m.qkv_dim // max(1, m.num_heads)))


def _kernel_tile(value) -> bool:
    """A tile size the block-sparse kernel takes: a power of two >= 16, >= 64 for a GPU.

    Compiled for a GPU, 16- and 32-row tiles become m16 ``mma.sync`` programs with too little work
    each to beat dense flash attention at any density (docs/BENCHMARKS.md); interpret mode (CPU)
    and TPU take 16.
    """
    import pallas_kernels  # noqa: PLC0415  (jax-only, imported when used)

    smallest = 64 if pallas_kernels.target_platform() == 'gpu' else 16
    return value >= smallest and value & (value - 1) == 0


_KERNEL_TILES = 'a power of two >= 16 (>= 64 on a GPU)'


# -- counts, quantization, projection (pure functions, tested directly) ---------------------------
def static_keep_count(n: int, sparsity: float) -> int:
    """Keys kept per row out of ``n``: ceil((1 - sparsity) * n), at least 1 when n >= 1."""
    if n <= 0:
        return 0
    return max(1, min(n, math.ceil(n * (1.0 - sparsity) - 1e-4)))


def keep_count(n: jax.Array, sparsity: float) -> jax.Array:
    """Traced twin of :func:`static_keep_count`: int32 [...] counts for int [...] ``n``."""
    c = jnp.ceil(n.astype(jnp.float32) * (1.0 - sparsity) - 1e-4).astype(jnp.int32)
    return jnp.minimum(jnp.maximum(c, 1), n.astype(jnp.int32))


def sparse_projection(key: jax.Array, emb_dim: int, num_heads: int, k: int) -> jax.Array:
    """Sparse random projections, one per head.

    Returns:
      float32 [emb_dim, heads, k]; entries sqrt(2/k)·{-1, 0, +1} with probabilities 1/4, 1/2, 1/4
      (so E[P²] = 1/k and ||xPʰ|| ≈ ||x||).
    """
    u = jax.random.randint(key, (emb_dim, num_heads, k), 0, 4)
    sign = jnp.where(u == 0, -1.0, jnp.where(u == 1, 1.0, 0.0))
    return (sign * math.sqrt(2.0 / k)).astype(jnp.float32)


def round_precision(x: jax.Array, precision: str, axes: tuple[int, ...],
                    valid: jax.Array | None = None) -> jax.Array:
    """Rounds x to the prediction path's precision (fp32: unchanged), straight-through."""
    if precision == 'fp32':
        return x
    if precision == 'bf16':
        return quant.straight_through(x, x.astype(jnp.bfloat16).astype(jnp.float32))
    return quant.fake_quant(x, PRECISION_BITS[precision], axes, valid=valid)


# -- selection (pure functions, tested directly) --------------------------------------------------
def _masked_key(scores: jax.Array, key_valid: jax.Array) -> jax.Array:
    """float32 scores with invalid keys at -inf. scores [B, H, R, L]; key_valid bool [B, L]."""
    return jnp.where(key_valid[:, None, None, :], scores.astype(jnp.float32), -jnp.inf)


def topk_keep(scores: jax.Array, key_valid: jax.Array, count: jax.Array) -> jax.Array:
    """Per-row top-``count`` mask by explicit ranking (the reference selection).

    Args:
      scores: float [batch, heads, rows, L] selection scores.
      key_valid: bool [batch, L].
      count: int [batch] keys to keep per row (<= the example's valid keys).

    Returns:
      bool [batch, heads, rows, L]: the ``count`` highest-scoring valid keys of every row; ties go
      to the lowest key index; invalid keys never.
    """
    order = jnp.argsort(-_masked_key(scores, key_valid), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return (rank < count[:, None, None, None]) & key_valid[:, None, None, :]


def topk_indices(scores: jax.Array, key_valid: jax.Array, count: jax.Array,
                 k_max: int) -> tuple[jax.Array, jax.Array]:
    """The same selection as :func:`topk_keep`, as index lists (the xla path).

    Args:
      scores: float [batch, heads, rows, L]; key_valid: bool [batch, L]; count: int [batch].
      k_max: static slots per row (>= every count).

    Returns:
      (idx int32 [batch, heads, rows, k_max] key indices, best first; ok bool [..., k_max]: the
      slot holds a kept key).
    """
    _, idx = jax.lax.top_k(_masked_key(scores, key_valid), k_max)
    slot = jnp.arange(k_max, dtype=jnp.int32)
    ok = slot[None, None, None, :] < count[:, None, None, None]
    ok = ok & jnp.take_along_axis(
        jnp.broadcast_to(key_valid[:, None, None, :], scores.shape), idx, axis=-1)
    return idx.astype(jnp.int32), ok


def threshold_keep(scores: jax.Array, key_valid: jax.Array, threshold: float) -> jax.Array:
    """Valid keys with score >= threshold, plus each row's best valid key.

    Args:
      scores: float [batch, heads, rows, L]; key_valid: bool [batch, L].

    Returns:
      bool [batch, heads, rows, L].
    """
    s = _masked_key(scores, key_valid)
    best = jax.nn.one_hot(jnp.argmax(s, axis=-1), s.shape[-1], dtype=bool)
    return ((s >= threshold) | best) & key_valid[:, None, None, :]


def group_scores(scores: jax.Array, row_valid: jax.Array, size: int) -> jax.Array:
    """Mean selection score over the valid rows of each group of ``size`` consecutive rows.

    Args:
      scores: float [batch, heads, L_q, L]; row_valid: bool [batch, L_q].
      size: rows per group (the last group may be partial: L_q need not be a multiple).

    Returns:
      float32 [batch, heads, ceil(L_q / size), L] (0 for a group with no valid row).
    """
    b, h, lq, lk = scores.shape
    g = -(-lq // size)
    pad = g * size - lq
    s = jnp.where(row_valid[:, None, :, None], scores.astype(jnp.float32), 0.0)
    s = jnp.pad(s, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, h, g, size, lk)
    n = jnp.pad(row_valid, ((0, 0), (0, pad))).reshape(b, g, size).sum(-1)
    return s.sum(3) / jnp.maximum(n, 1)[:, None, :, None].astype(jnp.float32)


def expand_groups(keep_g: jax.Array, size: int, length: int) -> jax.Array:
    """[batch, heads, groups, L] -> [batch, heads, length, L]: each group's row repeated."""
    return jnp.repeat(keep_g, size, axis=2)[:, :, :length]


def _tile_counts(q_valid: jax.Array, k_valid: jax.Array, block_q: int,
                 block_k: int) -> tuple[jax.Array, jax.Array]:
    """Valid queries per query block and valid keys per key block: int32 [B, nqb], [B, nkb]."""
    def per_block(valid, size):
        n = -(-valid.shape[1] // size)
        padded = jnp.pad(valid, ((0, 0), (0, n * size - valid.shape[1])))
        return jnp.sum(padded.reshape(valid.shape[0], n, size), axis=-1, dtype=jnp.int32)
    return per_block(q_valid, block_q), per_block(k_valid, block_k)


def tile_means(scores: jax.Array, q_valid: jax.Array, k_valid: jax.Array, block_q: int,
               block_k: int) -> jax.Array:
    """Mean selection score over the valid pairs of every tile, from the dense scores.

    Args:
      scores: float [batch, heads, L_q, L_k]; q_valid: bool [batch, L_q]; k_valid: bool
        [batch, L_k]; block_q, block_k: tile size (edge tiles may be partial).

    Returns:
      float32 [batch, heads, q_blocks, k_blocks]; -inf for a tile without a valid pair.
    """
    b, h, lq, lk = scores.shape
    nqb, nkb = -(-lq // block_q), -(-lk // block_k)
    pq, pk = nqb * block_q - lq, nkb * block_k - lk
    qv = jnp.pad(q_valid, ((0, 0), (0, pq)))
    kv = jnp.pad(k_valid, ((0, 0), (0, pk)))
    pair = (qv[:, :, None] & kv[:, None, :]).reshape(b, nqb, block_q, nkb, block_k)
    s = jnp.pad(scores.astype(jnp.float32), ((0, 0), (0, 0), (0, pq), (0, pk)))
    s = s.reshape(b, h, nqb, block_q, nkb, block_k)
    tot = jnp.sum(jnp.where(pair[:, None], s, 0.0), axis=(3, 5))  # [B, H, nqb, nkb]
    cnt = jnp.sum(pair, axis=(2, 4))[:, None]  # [B, 1, nqb, nkb]
    return jnp.where(cnt > 0, tot / jnp.maximum(cnt, 1), -jnp.inf)


def pooled_tile_means(fq: jax.Array, fk: jax.Array, q_valid: jax.Array, k_valid: jax.Array,
                      block_q: int, block_k: int) -> jax.Array:
    """:func:`tile_means` of the bilinear scores ``S̃ = fq·fkᵀ`` without forming them.

    The mean of ``fq_i·fk_j`` over the valid pairs of a tile is (mean of the tile's valid fq rows)
    · (mean of its valid fk rows), so a tile costs one dot of pooled factors. Equal to
    :func:`tile_means` of the dense scores up to float rounding (the order of the sums differs).

    Args:
      fq, fk: float32 [batch, L, heads, f] score factors, zero on padded tokens.
      q_valid, k_valid: bool [batch, L]; block_q, block_k: tile size.

    Returns:
      float32 [batch, heads, q_blocks, k_blocks]; -inf for a tile without a valid pair.
    """
    nq, nk = _tile_counts(q_valid, k_valid, block_q, block_k)
    pq = _block_mean(fq, block_q, nq)
    pk = _block_mean(fk, block_k, nk)
    mean = jnp.einsum('bnhf,bmhf->bhnm', pq, pk, precision=_HIGHEST)
    ok = (nq[:, :, None] > 0) & (nk[:, None, :] > 0)
    return jnp.where(ok[:, None], mean, -jnp.inf)


def _block_mean(f: jax.Array, size: int, count: jax.Array) -> jax.Array:
    """Mean over the valid rows of each block: f [B, L, H, F] (zero on padding) -> [B, n, H, F]."""
    n = count.shape[1]
    f = jnp.pad(f.astype(jnp.float32), ((0, 0), (0, n * size - f.shape[1]), (0, 0), (0, 0)))
    total = jnp.sum(f.reshape(f.shape[0], n, size, *f.shape[2:]), axis=2)
    return total / jnp.maximum(count, 1)[:, :, None, None].astype(jnp.float32)


def select_tiles(mean: jax.Array, k_valid: jax.Array, block_k: int, sparsity: float,
                 selection: str, threshold: float) -> tuple[jax.Array, jax.Array]:
    """Kept tiles of each query block, as index lists (every implementation's tile selection).

    ``topk``: the ``ceil((1 - sparsity) * valid key blocks)`` best tiles by mean score (ties to
    the lowest key-block index, as ``lax.top_k`` breaks them); ``threshold``: the tiles with mean
    >= threshold plus the best one. Tiles without a valid pair never.

    Args:
      mean: float32 [batch, heads, q_blocks, k_blocks] tile scores, -inf where no valid pair.
      k_valid: bool [batch, L_k]; block_k: keys per tile.

    Returns:
      (block_idx int32 [batch, heads, q_blocks, kb] key-block indices, best first; block_ok bool
      [same]: the slot holds a kept tile). ``kb`` = the static top-k slot count (all key blocks
      for threshold).
    """
    nkb = mean.shape[-1]
    tile_valid = mean > -jnp.inf
    if selection == 'topk':
        kb = static_keep_count(nkb, sparsity)
        kv = jnp.pad(k_valid, ((0, 0), (0, nkb * block_k - k_valid.shape[1])))
        kblock_valid = jnp.any(kv.reshape(kv.shape[0], nkb, block_k), axis=-1)  # [B, nkb]
        count = keep_count(jnp.sum(kblock_valid, axis=-1), sparsity)  # [B]
        _, idx = jax.lax.top_k(mean, kb)
        ok = jnp.arange(kb)[None, None, None] < count[:, None, None, None]
    else:
        best = jnp.argmax(mean, axis=-1)
        chosen = (mean >= threshold) | jax.nn.one_hot(best, nkb, dtype=bool)
        idx = jnp.argsort(jnp.where(chosen, -mean, jnp.inf), axis=-1, stable=True)
        ok = jnp.take_along_axis(chosen, idx, axis=-1)
    ok = ok & jnp.take_along_axis(tile_valid, idx, axis=-1)
    return idx.astype(jnp.int32), ok


def tiles_keep(idx: jax.Array, ok: jax.Array, q_valid: jax.Array, k_valid: jax.Array,
               block_q: int, block_k: int) -> jax.Array:
    """The dense keep mask of kept tiles: bool [batch, heads, L_q, L_k] (valid pairs only)."""
    lq, lk = q_valid.shape[1], k_valid.shape[1]
    nkb = -(-lk // block_k)
    tiles = jnp.sum(jax.nn.one_hot(idx, nkb, dtype=jnp.int32) * ok[..., None], axis=-2) > 0
    keep = jnp.repeat(jnp.repeat(tiles, block_q, axis=2), block_k, axis=3)[:, :, :lq, :lk]
    return keep & (q_valid[:, :, None] & k_valid[:, None, :])[:, None]


def tile_kept_pairs(idx: jax.Array, ok: jax.Array, q_valid: jax.Array, k_valid: jax.Array,
                    block_q: int, block_k: int) -> jax.Array:
    """Valid (query, key) pairs inside the kept tiles, summed over batch and heads: float32 []."""
    nq, nk = _tile_counts(q_valid, k_valid, block_q, block_k)
    nk_slot = jnp.take_along_axis(jnp.broadcast_to(nk[:, None, None, :], idx.shape[:3]
                                                   + nk.shape[1:]), idx, axis=-1)
    return jnp.sum(jnp.where(ok, nq[:, None, :, None] * nk_slot, 0)).astype(jnp.float32)


def block_select(scores: jax.Array, q_valid: jax.Array, k_valid: jax.Array, block_q: int,
                 block_k: int, sparsity: float, selection: str,
                 threshold: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tile selection for the block granularity from dense scores (the reference).

    A tile's score is the mean selection score over its valid pairs (:func:`tile_means`); the
    kept tiles are those of :func:`select_tiles`.

    Args:
      scores: float [batch, heads, L_q, L_k].
      q_valid: bool [batch, L_q]; k_valid: bool [batch, L_k].
      block_q, block_k: tile size (the lengths need not be multiples: edge tiles are partial).

    Returns:
      (block_idx int32 [batch, heads, q_blocks, kb], block_ok bool [same] as in
      :func:`select_tiles`; keep bool [batch, heads, L_q, L_k] the pairs of the kept tiles that
      are valid).
    """
    mean = tile_means(scores, q_valid, k_valid, block_q, block_k)
    idx, ok = select_tiles(mean, k_valid, block_k, sparsity, selection, threshold)
    return idx, ok, tiles_keep(idx, ok, q_valid, k_valid, block_q, block_k)


def pooled_group_scores(fq: jax.Array, fk: jax.Array, row_valid: jax.Array,
                        size: int) -> jax.Array:
    """:func:`group_scores` of the bilinear scores ``S̃ = fq·fkᵀ`` without forming them.

    Args:
      fq, fk: float32 [batch, L, heads, f] score factors, zero on padded tokens.
      row_valid: bool [batch, L]; size: rows per group.

    Returns:
      float32 [batch, heads, ceil(L / size), L]: (mean of the group's valid fq rows)·fkᵀ, equal
      to the mean of the group's valid score rows up to float rounding.
    """
    g = -(-row_valid.shape[1] // size)
    count = jnp.sum(jnp.pad(row_valid, ((0, 0), (0, g * size - row_valid.shape[1])))
                    .reshape(row_valid.shape[0], g, size), axis=-1, dtype=jnp.int32)
    pooled = _block_mean(fq, size, count)
    return jnp.einsum('bghf,blhf->bhgl', pooled, fk.astype(jnp.float32), precision=_HIGHEST)


def prediction_accuracy(scores: jax.Array, keep: jax.Array, valid: jax.Array) -> jax.Array:
    """Fig. 6 metric: |predicted ∩ oracle| / |predicted| pooled over valid rows and heads.

    Args:
      scores: float [batch, heads, L, L] true scores S.
      keep: bool [batch, heads, L, L] predicted (attended) pairs.
      valid: bool [batch, 1, L, L] valid pairs.

    Returns:
      float32 scalar in [0, 1] (0 when nothing is predicted). The oracle of a row holds its
      ``|predicted row|`` largest valid true scores (ties all count as oracle).
    """
    count = jnp.sum(keep, axis=-1)  # [B, H, L]
    s = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    hits = jnp.sum(keep & (s >= _kth_largest(s, count)[..., None]), axis=-1)
    total = jnp.sum(count)
    return jnp.where(total > 0, jnp.sum(hits) / jnp.maximum(total, 1), 0.0).astype(jnp.float32)


def sample_rows(mask: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """Query rows the ``prediction_accuracy`` statistic is measured on.

    ``count`` rows spread evenly over each example's valid tokens (row ``floor(i·n/count)`` of
    its ``n`` valid positions, each row once); every valid row when ``count`` is 0 or >= n.

    Args:
      mask: bool [batch, L]; count: rows per example (0: all).

    Returns:
      (rows int32 [batch, R] positions, row_ok bool [batch, R] the slot holds a valid row not
      sampled before); R = L when count is 0 or >= L, else count.
    """
    b, length = mask.shape
    if count == 0 or count >= length:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length)), mask
    valid_pos = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True).astype(jnp.int32)
    n = jnp.sum(mask, axis=-1, dtype=jnp.int32)[:, None]  # [B, 1]
    i = jnp.arange(count, dtype=jnp.int32)[None]
    j = (i * n) // count  # [B, R], non-decreasing
    first = jnp.concatenate([jnp.ones((b, 1), bool), j[:, 1:] != j[:, :-1]], axis=1)
    rows = jnp.take_along_axis(valid_pos, jnp.minimum(j, length - 1), axis=1)
    return rows, first & (n > 0)


def row_accuracy(q: jax.Array, k: jax.Array, mask: jax.Array, rows: jax.Array,
                 row_ok: jax.Array, keys: jax.Array, live: jax.Array, k_bound: int) -> jax.Array:
    """Fig. 6 ``prediction_accuracy`` measured on sampled query rows, without sorting rows.

    For each sampled row, the oracle holds its ``|predicted row|`` largest valid true scores
    (ties all count as oracle, as in :func:`prediction_accuracy`); the ``count``-th largest comes
    from ``lax.top_k`` with ``k_bound`` slots.

    Args:
      q, k: [batch, L, heads, head_dim]; mask: bool [batch, L].
      rows, row_ok: from :func:`sample_rows`, [batch, R].
      keys: int32 [batch, heads, R, K] predicted key positions of each sampled row.
      live: bool [batch, heads, R, K] the slot holds an attended key.
      k_bound: static bound on the attended keys of a row (<= L).

    Returns:
      float32 [] = |predicted ∩ oracle| / |predicted| pooled over the sampled rows and heads
      (0 when nothing is predicted).
    """
    q_rows = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)  # [B, R, H, D]
    s = jnp.einsum('brhd,bkhd->bhrk', q_rows, k, preferred_element_type=jnp.float32)
    s = jnp.where(mask[:, None, None, :], s / math.sqrt(q.shape[-1]), -jnp.inf)
    live = live & row_ok[:, None, :, None]
    count = jnp.sum(live, axis=-1)  # [B, H, R]
    top, _ = jax.lax.top_k(s, min(k_bound, s.shape[-1]))
    kth = jnp.take_along_axis(top, jnp.maximum(count - 1, 0)[..., None], axis=-1)[..., 0]
    kth = jnp.where(count > 0, kth, jnp.inf)
    picked = jnp.take_along_axis(s, keys, axis=-1)
    hits = jnp.sum(live & (picked >= kth[..., None]))
    total = jnp.sum(count)
    return jnp.where(total > 0, hits / jnp.maximum(total, 1), 0.0).astype(jnp.float32)


def _kth_largest(s: jax.Array, count: jax.Array) -> jax.Array:
    """The ``count``-th largest entry of each row of s ([..., L]); +inf where count == 0."""
    desc = -jnp.sort(-s, axis=-1)
    kth = jnp.take_along_axis(desc, jnp.maximum(count - 1, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(count > 0, kth, jnp.inf)


# -- prediction path, loss, gathering (pure functions, tested through the layer) ------------------
def float_predictor(xp: jax.Array, weights: tuple[jax.Array, jax.Array],
                    precision: str) -> tuple[list, list, list]:
    """Q̃ and K̃ at ``fp32`` / ``bf16`` (values rounded, straight-through).

    Args:
      xp: float32 [batch, L, heads, k] projected input X·P.
      weights: (W̃_Q, W̃_K), float32 [heads, k, k] each.
      precision: 'fp32' or 'bf16'.

    Returns:
      (values, codes, scales): values [Q̃, K̃] float32 [batch, L, heads, k] (differentiable),
      codes the same without gradient, scales [1, 1] per token: float32 [batch, L, heads].
    """
    xp = round_precision(xp, precision, (3,))
    values = [round_precision(jnp.einsum('blhk,hkj->blhj', xp, round_precision(w, precision, ()),
                                         precision=_HIGHEST), precision, (3,))
              for w in weights]
    return values, [jax.lax.stop_gradient(y) for y in values], [jnp.ones(xp.shape[:3])] * 2


def integer_predictor(xp: jax.Array, weights: tuple[jax.Array, jax.Array],
                      bits: int) -> tuple[list, list, list]:
    """Q̃ and K̃ through the integer pipeline of Fig. 9, simulated exactly in float32.

    X·P gets one scale per token and head, each W̃ one per output column; the codes of
    Q̃ = (XP)·W̃ come from the exact integer product of the input and weight codes (the token
    scale cancels in the token's own code ratios), so they do not depend on float evaluation
    order (eager vs jit).

    Args:
      xp: float32 [batch, L, heads, k] projected input X·P.
      weights: (W̃_Q, W̃_K), float32 [heads, k, k] each.
      bits: code width (8, 4 or 2).

    Returns:
      (values, codes, scales): values [Q̃, K̃] float32 [batch, L, heads, k] = codes * scales
      (straight-through), codes float32 integers of the same shape, scales float32
      [batch, L, heads].
    """
    cx, sx = quant.quant_codes(xp, bits, (3,))  # a scale per token and head: [B, L, H, 1]
    xp_q = quant.straight_through(xp, cx * sx)
    values, codes, scales = [], [], []
    for w in weights:
        cw, sw = quant.quant_codes(w, bits, (1,))  # a scale per output column: [H, 1, k]
        y = jnp.einsum('blhk,hkj->blhj', xp_q, quant.straight_through(w, cw * sw))
        y_int = jnp.einsum('blhk,hkj->blhj', cx, cw, precision=_HIGHEST)
        cy, sy = quant.quant_codes(y_int * sw[None, :, 0][:, None], bits, (3,))
        sy = sy * sx  # y = sx * (y_int * sw): [B, L, H, 1]
        values.append(quant.straight_through(y, cy * sy))
        codes.append(cy)
        scales.append(sy[..., 0])  # [B, L, H]
    return values, codes, scales


def fused_weights(projection: jax.Array, weights: tuple[jax.Array, jax.Array]) -> list:
    """The fused prediction weights ``P·W̃`` of Fig. 9: float32 [emb_dim, heads, k] each.

    ``P = sqrt(2/k)·{-1, 0, 1}`` (:func:`sparse_projection`), so ``P·W̃ = sqrt(2/k)·(sign(P)·W̃)``
    with exact products summed in a fixed order: the weight scales, hence tied selection scores,
    do not depend on eager vs jit evaluation.

    Args:
      projection: float32 [emb_dim, heads, k], the fixed sparse projections Pʰ.
      weights: (W̃_Q, W̃_K), float32 [heads, k, k] each.
    """
    k = projection.shape[-1]
    sign = jnp.sign(projection)  # P = sqrt(2/k)·sign: the products below are exact

    def fuse(w):  # exact products summed in a fixed order: the same bits eagerly and under jit
        total = sign[:, :, 0, None] * w[None, :, 0, :]
        for i in range(1, k):
            total = total + sign[:, :, i, None] * w[None, :, i, :]
        return total * math.sqrt(2.0 / k)
    return [fuse(w) for w in weights]


def fused_float_predictor(x: jax.Array, projection: jax.Array,
                          weights: tuple[jax.Array, jax.Array],
                          precision: str) -> tuple[list, list, list]:
    """Q̃ and K̃ at ``fp32`` / ``bf16`` through the fused weight ``P·W̃`` (Fig. 9).

    The input X, the fused weight and Q̃, K̃ are rounded (bf16; fp32 leaves them unchanged).

    Args:
      x: float32 [batch, L, emb_dim]; projection: float32 [emb_dim, heads, k]; weights: (W̃_Q,
        W̃_K) float32 [heads, k, k]; precision: 'fp32' or 'bf16'.

    Returns:
      (values, codes, scales) as :func:`float_predictor`.
    """
    x = round_precision(x, precision, (2,))
    values = [round_precision(jnp.einsum('ble,ehj->blhj', x, round_precision(w, precision, ()),
                                         precision=_HIGHEST), precision, (3,))
              for w in fused_weights(projection, weights)]
    ones = jnp.ones(values[0].shape[:3])
    return values, [jax.lax.stop_gradient(y) for y in values], [ones, ones]


def fused_integer_predictor(x: jax.Array, projection: jax.Array,
                            weights: tuple[jax.Array, jax.Array],
                            bits: int) -> tuple[list, list, list]:
    """Q̃ and K̃ through the paper's low-precision pipeline (Fig. 9), simulated exactly in float32.

    1. X is quantized to ``bits``-bit codes with one scale per token (over emb_dim).
    2. The fused weight ``P·W̃`` [emb_dim, heads, k] is quantized with one scale per output
       column (head, j): one low-precision weight per path.
    3. The low-precision GEMM ``C_X · C_W`` is exact in integers; ``Q̃ = s_X · (C_X C_W) · s_W``.
    4. Q̃ and K̃ are re-quantized to ``bits`` bits, one scale per token and head, as the input of
       the low-precision GEMM for S̃ (the selection scores are ``C_Q̃ C_K̃ᵀ`` times the scales).

    Args:
      x: float32 [batch, L, emb_dim]; projection: float32 [emb_dim, heads, k]; weights: (W̃_Q,
        W̃_K) float32 [heads, k, k]; bits: 8, 4 or 2.

    Returns:
      (values, codes, scales) as :func:`integer_predictor` (values straight-through to x, P·W̃).
    """
    cx, sx = quant.quant_codes(x, bits, (2,))  # a scale per token: [B, L, 1]
    x_q = quant.straight_through(x, cx * sx)
    values, codes, scales = [], [], []
    for w in fused_weights(projection, weights):
        cw, sw = quant.quant_codes(w, bits, (0,))  # a scale per output column: [1, H, k]
        y = jnp.einsum('ble,ehj->blhj', x_q, quant.straight_through(w, cw * sw))
        y_int = jnp.einsum('ble,ehj->blhj', cx, cw, precision=_HIGHEST)
        cy, sy = quant.quant_codes(y_int * sw[0], bits, (3,))
        # y = sx * (y_int * sw): [B, L, H, 1]. The barrier keeps XLA from merging the two
        # divisions by the code range (a different rounding under jit than eagerly).
        sy, sx_b = jax.lax.optimization_barrier((sy, sx))
        sy = sy * sx_b[:, :, :, None]
        values.append(quant.straight_through(y, cy * sy))
        codes.append(cy)
        scales.append(sy[..., 0])  # [B, L, H]
    return values, codes, scales


def score_error(q: jax.Array, k: jax.Array, qt: jax.Array, kt: jax.Array, mask: jax.Array,
                gram: bool) -> tuple[jax.Array, jax.Array]:
    """Sum over heads and valid pairs of (S - S̃)², S = q·kᵀ/sqrt(head_dim), S̃ = q̃·k̃ᵀ.

    Args:
      q, k: [batch, L, heads, head_dim]; qt, kt: float32 [batch, L, heads, k]; mask: bool
        [batch, L].
      gram: from ``head_dim × k`` Gram matrices per example and head, ``||S - S̃||² =
        <QᵀQ, KᵀK> - 2<QᵀQ̃, KᵀK̃> + <Q̃ᵀQ̃, K̃ᵀK̃>`` (padded tokens are zero rows, so the masking
        is exact; no L×L array), instead of the dense score matrices.

    Returns:
      (squared error float32 [], differentiable in all four inputs; valid pairs float32 [] =
      heads · Σ_examples n²).
    """
    tok = mask[:, :, None, None]
    head_dim, heads = q.shape[-1], q.shape[2]
    a = jnp.where(tok, q.astype(jnp.float32), 0.0) * head_dim ** -0.25
    c = jnp.where(tok, k.astype(jnp.float32), 0.0) * head_dim ** -0.25
    n = jnp.sum(mask, axis=1).astype(jnp.float32)
    if gram:
        def inner(u, v):
            return jnp.einsum('blhi,blhj->bhij', u, v, precision=_HIGHEST)
        sq = (jnp.sum(inner(a, a) * inner(c, c)) - 2.0 * jnp.sum(inner(a, qt) * inner(c, kt))
              + jnp.sum(inner(qt, qt) * inner(kt, kt)))
        sq = jnp.maximum(sq, 0.0)
    else:
        s = jnp.einsum('bqhd,bshd->bhqs', a, c, precision=_HIGHEST)
        st = jnp.einsum('bqhk,bshk->bhqs', qt, kt, precision=_HIGHEST)
        sq = jnp.sum((s - st) ** 2)
    return sq, heads * jnp.sum(n * n)


def score_mse(q: jax.Array, k: jax.Array, qt: jax.Array, kt: jax.Array, mask: jax.Array,
              gram: bool) -> jax.Array:
    """Mean over heads and valid pairs of (S - S̃)² (:func:`score_error`); 0 without pairs."""
    sq, total = score_error(q, k, qt, kt, mask, gram)
    return jnp.where(total > 0, sq / jnp.maximum(total, 1.0), 0.0)


def mse_loss(sq: jax.Array, total: jax.Array, mask: jax.Array, normalization: str) -> jax.Array:
    """L_MSE from the squared error ``sq`` and the valid pairs ``total`` (:func:`score_error`).

    ``example_sum`` (Eq. 6): ``sq / B``, B = the examples with a valid token (the sum over heads
    and pairs of each example, averaged over the mini-batch). ``pair_mean``: ``sq / total``.
    """
    if normalization == 'pair_mean':
        return jnp.where(total > 0, sq / jnp.maximum(total, 1.0), 0.0)
    examples = jnp.sum(jnp.any(mask, axis=1)).astype(jnp.float32)
    return sq / jnp.maximum(examples, 1.0)


# -- cost model -----------------------------------------------------------------------------------
# Ops per element the passes below execute (XLA's count of jax 0.10, checked in
# tests/test_cost.py and tests/test_attention_dsa.py).
_QUANT_OPS = 7  # |x|, the group max, x·qmax, / max, round, clip (2)
_STRAIGHT_OPS = 3  # codes·scale, x - x, + (straight-through forward value)
_MASKED_SOFTMAX_OPS = 7  # select before, softmax (5), select after
_TOPK_MASK_OPS = 4  # -inf on invalid keys, negate, rank < count, & valid (two stable argsorts)
_THRESHOLD_OPS = 12  # -inf select, argmax (a reduce of 9), one-hot, >= threshold, |, & valid
_HITS_OPS = 4  # & sampled row, >= k-th, &, sum
# The reference's dense keep mask: & pair mask, its broadcast select around the softmax and the
# kept count, each consumer re-reading it through a fused select.
_REFERENCE_MASK_OPS = 7
# A threshold mask is elementwise in S̃, so XLA fuses it (and S̃'s scaling) into each consumer.
_THRESHOLD_REFETCH_OPS = 17
_SCATTER_OPS = 3  # the kept probabilities into a zero [L, L] matrix, per entry
_KERNEL_ENTRY_OPS = 8  # scale, pair mask, select, max, subtract, exp2, select, sum
_KERNEL_ROW_OPS = 6  # running max, its exp2, rescaled sum; at the end the guard, log2, lse
_GATHER_OPS = 7  # take_along_axis per entry: the index bounds checks of its 'fill' mode
RANDOM_OPS = 54  # a uniform float from the counter-based generator (threefry)


def _predictor_cost(dims: base.AttentionDims, cfg, length: int) -> float:
    """Ops of q̃ and k̃ (fused or project-first, integer or float) for one example."""
    e, h, k = dims.emb_dim, dims.num_heads, predictor_width(cfg.sigma, dims.head_dim)
    out, bits = length * h * k, cfg.precision in ('int8', 'int4', 'int2')
    ops = 0.0
    if cfg.pipeline == 'fused':
        ops += 2 * cost.elementwise(e * h * k, 2 * k)  # P·W̃ (sign products summed, scaled)
        inputs, width = length * e, e
    else:
        ops += cost.matmul(length, e, h * k)  # X·P
        inputs, width = out, k
    if bits:
        ops += cost.elementwise(inputs, _QUANT_OPS + _STRAIGHT_OPS)
        per_path = (cost.elementwise(width * h * k, _QUANT_OPS + _STRAIGHT_OPS)
                    + 2 * cost.matmul(length, width, h * k)  # values and exact integer codes
                    + cost.elementwise(out, 1 + _QUANT_OPS + _STRAIGHT_OPS))
    else:
        rounds = 0 if cfg.precision == 'fp32' else _STRAIGHT_OPS
        ops += cost.elementwise(inputs, rounds)
        per_path = (cost.elementwise(width * h * k, rounds) + cost.matmul(length, width, h * k)
                    + cost.elementwise(out, rounds))
    # masked and scaled q̃, k̃; masked codes; the factors of the pooled scores
    return ops + 2 * per_path + 2 * cost.elementwise(out, 5)


def _dense_scores_cost(dims: base.AttentionDims, cfg, length: int) -> float:
    """Ops of the dense selection scores [heads, L, L] (S̃ from codes and scales, S or noise)."""
    h, pairs = dims.num_heads, dims.num_heads * length * length
    if cfg.precision == 'oracle':  # the scale of QKᵀ, the product shared with the attention
        return cost.elementwise(pairs)
    if cfg.precision == 'random':
        return cost.elementwise(pairs, RANDOM_OPS)
    k = predictor_width(cfg.sigma, dims.head_dim)
    return cost.matmul(length, k, length, batch=h) + cost.elementwise(pairs, 3)


def _row_selection_cost(rows: int, length: int, cfg, k_max: int, index_lists: bool) -> float:
    """Ops of choosing keys for ``rows`` score rows of ``length`` keys (all heads together)."""
    if index_lists:  # lax.top_k index lists: -inf select, top_k, slot validity
        return (cost.elementwise(rows * length) + cost.top_k(rows, length, k_max)
                + cost.elementwise(rows * k_max, 2))
    if cfg.selection == 'threshold':
        return cost.elementwise(rows * length, _THRESHOLD_OPS)
    return cost.elementwise(rows * length, _TOPK_MASK_OPS) + 2 * cost.sort(rows, length)


def _attention_cost(rows: int, queries_per_row: int, keys: int, head_dim: int) -> dict:
    """Scores, scale, masked softmax and AV of ``rows`` query groups over ``keys`` keys each."""
    entries = rows * queries_per_row * keys
    return {'scores': cost.matmul(queries_per_row, head_dim, keys, batch=rows)
            + cost.elementwise(entries),
            'softmax': cost.elementwise(entries, _MASKED_SOFTMAX_OPS),
            'values': cost.matmul(queries_per_row, keys, head_dim, batch=rows)}


def _mse_cost(dims: base.AttentionDims, cfg, length: int, gram: bool) -> float:
    """Ops of the ``mse`` statistic: dense (S - S̃)² or the Gram-matrix identity."""
    h, d = dims.num_heads, dims.head_dim
    k = predictor_width(cfg.sigma, d)
    ops = 2 * cost.elementwise(length * h * d, 2)  # masked, scaled q and k
    if gram:
        grams = sum(2 * cost.matmul(u, length, w, batch=h) for u, w in ((d, d), (d, k), (k, k)))
        return ops + grams + cost.elementwise(h * (d * d + d * k + k * k), 2)
    pairs = h * length * length
    return (ops + cost.matmul(length, d, length, batch=h) + cost.matmul(length, k, length, batch=h)
            + cost.elementwise(pairs, 3))


def _accuracy_cost(dims: base.AttentionDims, cfg, length: int, keys: int, k_bound: int,
                   lookups: int) -> float:
    """Ops of the sampled ``prediction_accuracy`` statistic.

    ``keys``: the key slots of a row; ``lookups``: the entries per sampled row and head gathered
    to find its attended keys (:data:`_GATHER_OPS` each, as the picked true scores).
    """
    h, d = dims.num_heads, dims.head_dim
    rows = length if cfg.accuracy_rows in (0,) or cfg.accuracy_rows >= length else cfg.accuracy_rows
    ops = 0.0 if rows == length else cost.sort(1, length)
    ops += cost.matmul(rows, d, length, batch=h) + cost.elementwise(h * rows * length, 2)
    ops += cost.top_k(h * rows, length, min(k_bound, length))
    ops += cost.elementwise(rows * h * d + h * rows * (lookups + keys), _GATHER_OPS)
    return ops + cost.elementwise(h * rows * keys, _HITS_OPS + 1)


def _block_cost(dims: base.AttentionDims, cfg, length: int) -> tuple[dict, int]:
    """Components of block granularity and the key slots of a row, for every implementation."""
    h, d, bq, bk = dims.num_heads, dims.head_dim, cfg.block_q, cfg.block_k
    k = predictor_width(cfg.sigma, d)
    nqb, nkb = -(-length // bq), -(-length // bk)
    pairs = h * length * length
    kb = static_keep_count(nkb, cfg.sparsity) if cfg.selection == 'topk' else nkb
    if cfg.impl == 'reference' and cfg.precision != 'random':  # tile means of dense scores
        tiles = (_dense_scores_cost(dims, cfg, length) + cost.elementwise(length * length, 2)
                 + cost.elementwise(pairs, 2))
    elif cfg.precision == 'random':
        tiles = cost.elementwise(h * nqb * nkb, RANDOM_OPS)
    else:  # pooled factors: block sums and means, one dot per tile
        tiles = (2 * cost.elementwise(length * h * k) + cost.elementwise((nqb + nkb) * h * k)
                 + cost.matmul(nqb, k, nkb, batch=h))
    if cfg.selection == 'topk':
        select = cost.top_k(h * nqb, nkb, kb)
    else:
        select = cost.elementwise(h * nqb * nkb, _THRESHOLD_OPS) + cost.sort(h * nqb, nkb)
    parts = {'predictor_scores': tiles, 'selection': select + cost.elementwise(h * nqb * kb, 2)}
    if cfg.impl == 'reference':  # the dense keep mask, masked attention over every pair
        parts['masking'] = (cost.elementwise(h * nqb * kb * nkb, 3) + cost.elementwise(pairs, 2)
                            + cost.elementwise(length * length))
        parts.update(_attention_cost(h, length, length, d))
        return parts, length
    slots = kb * bk
    if cfg.impl == 'pallas':
        parts['selection'] += cost.sort(h * nqb, kb)  # kept slots first, for the kernel's lists
        parts.update(_kernel_cost(h * nqb, kb, bq, bk, d))
        return parts, slots
    parts['masking'] = cost.elementwise(h * nqb * bq * slots, 2)  # live: tile slots & query rows
    parts.update(_attention_cost(h * nqb, bq, slots, d))
    return parts, slots


def _kernel_cost(programs: int, steps: int, block_q: int, block_k: int, head_dim: int) -> dict:
    """Ops of the block-sparse kernel: ``programs`` query blocks, ``steps`` kept tiles each.

    Per tile: ``q·kᵀ`` and AV at the kernel's padded head width, per entry the scale, the pair
    mask and the online softmax (:data:`_KERNEL_ENTRY_OPS`), per row the running max and sum
    and the accumulator's rescaling; per row at the end the normalisation and the log-sum-exp.
    """
    from pallas_kernels import _common  # noqa: PLC0415  (jax-only, imported when used)

    d = _common.padded_head_dim(head_dim)
    tiles, rows = programs * steps, programs * block_q
    return {'scores': cost.matmul(block_q, d, block_k, batch=tiles),
            'softmax': (cost.elementwise(tiles * block_q * block_k, _KERNEL_ENTRY_OPS)
                        + cost.elementwise(tiles * block_q, _KERNEL_ROW_OPS + d)
                        + cost.elementwise(rows, _KERNEL_ROW_OPS + 2 * d)),
            'values': cost.matmul(block_q, block_k, d, batch=tiles)}


def layer_cost(dims: base.AttentionDims, cfg, seq_len: int) -> cost.LayerCost:
    """Ops of one DSA layer for one example, for the implementation ``cfg.impl`` chooses.

    Components: 'predictor' (q̃, k̃ through the configured pipeline and precision: input and
    weight quantization, the fused ``P·W̃``, the products for values and exact codes, the
    re-quantization; absent for random and oracle), 'predictor_scores' (the selection scores at
    the granularity the path needs: dense S̃ from codes and scales, pooled group or tile scores,
    the true scores for oracle, noise for random), 'selection' (two stable argsorts or a
    threshold pass for the reference, ``lax.top_k`` index lists on the xla and kernel paths),
    'masking' (keep masks and pair masks), 'scores', 'softmax', 'values' (over every pair for
    the reference, over the gathered kept key blocks on the xla block path, the dense ``QKᵀ``
    and AV with a softmax on the kept entries only for xla element and vector, the kept tiles
    for the kernel), 'statistics' (``kept_fraction``, the ``mse`` statistic from dense scores
    (reference) or Gram matrices, and the sampled ``prediction_accuracy`` unless
    ``accuracy_stat='off'``). Projections and tokens are dense's.
    """
    length, h, d = seq_len, dims.num_heads, dims.head_dim
    pairs = h * length * length
    k_max = static_keep_count(length, cfg.sparsity)
    size = cfg.vector_size if cfg.granularity == 'vector' else 1  # rows sharing one selection
    groups = -(-length // size)
    parts = {}
    if cfg.precision in PRECISION_BITS:
        parts['predictor'] = _predictor_cost(dims, cfg, length)
    if cfg.granularity == 'block':
        block, keys = _block_cost(dims, cfg, length)
        parts.update(block)
        k_bound = keys if cfg.selection == 'topk' else length
        # the reference reads its dense keep mask; the others a tile's slots and key validity
        lookups = length if cfg.impl == 'reference' else 2 * keys // cfg.block_k + keys
    elif cfg.impl == 'reference':
        if size > 1 and cfg.precision == 'random':
            parts['predictor_scores'] = cost.elementwise(h * groups * length, RANDOM_OPS)
        else:
            parts['predictor_scores'] = _dense_scores_cost(dims, cfg, length)
            if size > 1:  # group means of the dense scores
                parts['predictor_scores'] += cost.elementwise(pairs, 2) + cost.elementwise(
                    h * groups * length)
        parts['selection'] = _row_selection_cost(h * groups, length, cfg, k_max, False)
        parts['masking'] = (cost.elementwise(length * length)
                            + cost.elementwise(pairs, _REFERENCE_MASK_OPS))
        if cfg.selection == 'threshold':
            parts['selection'] += cost.elementwise(pairs, _THRESHOLD_REFETCH_OPS)
        parts.update(_attention_cost(h, length, length, d))
        keys = lookups = length
        k_bound = length if cfg.selection == 'threshold' else k_max
    else:  # xla element or vector: per-row index lists, the kept scores of one dense QKᵀ
        if size == 1:
            parts['predictor_scores'] = _dense_scores_cost(dims, cfg, length)
        elif cfg.precision == 'random':
            parts['predictor_scores'] = cost.elementwise(h * groups * length, RANDOM_OPS)
        else:  # pooled q̃ (block sums and means), one product per group and key
            f = d if cfg.precision == 'oracle' else predictor_width(cfg.sigma, d)
            parts['predictor_scores'] = (cost.elementwise(length * h * f)
                                         + cost.elementwise(groups * h * f)
                                         + cost.matmul(groups, f, length, batch=h))
        parts['selection'] = _row_selection_cost(h * groups, length, cfg, k_max, True)
        kept = h * length * k_max
        parts['masking'] = cost.elementwise(kept)
        parts['scores'] = (cost.matmul(length, d, length, batch=h) + cost.elementwise(pairs)
                           + cost.elementwise(kept, _GATHER_OPS))  # the kept scores, gathered
        parts['softmax'] = cost.elementwise(kept, _MASKED_SOFTMAX_OPS + _SCATTER_OPS)
        parts['values'] = cost.matmul(length, length, d, batch=h)
        keys = k_bound = k_max
        lookups = 2 * k_max
    statistics = cost.elementwise(h * length * keys, 2) + cost.elementwise(length * h * d)
    if cfg.precision in PRECISION_BITS:
        gram = cfg.impl != 'reference'
        statistics += _mse_cost(dims, cfg, length, gram)
    if cfg.accuracy_stat != 'off':
        statistics += _accuracy_cost(dims, cfg, length, keys, k_bound, lookups)
    parts['statistics'] = statistics
    return cost.LayerCost(attention=parts, tokens=length, qkv_width=dims.qkv_dim,
                          query_rows=length, kv_rows=length, out_rows=length, ffn_tokens=length,
                          tokens_out=length)


# -- the layer ----------------------------------------------------------------------------------
class SelectionScores(NamedTuple):
    """The selection scores of a layer, formed only at the granularity an implementation needs.

    Attributes:
      dense: () -> float32 [batch, heads, L, L], the element-wise scores (S̃, S or noise).
      fq, fk: float32 [batch, L, heads, f] factors with ``dense() = fq·fkᵀ`` up to float rounding
        (None for ``random``), zero on padded tokens, no gradient.
      noise_key: the PRNG key of ``random`` (None otherwise); group and tile scores are then drawn
        at their own shape (independent uniform scores rank like the means of uniform ones).
      heads: the number of heads (for the noise shapes of ``random``).
    """

    dense: Callable[[], jax.Array]
    fq: jax.Array | None
    fk: jax.Array | None
    noise_key: jax.Array | None = None
    heads: int = 0

    def groups(self, mask: jax.Array, size: int) -> jax.Array:
        """Scores of groups of ``size`` rows: float32 [batch, heads, ceil(L / size), L]."""
        if self.noise_key is not None:
            b, length = mask.shape
            return jax.random.uniform(jax.random.fold_in(self.noise_key, size),
                                      (b, self.heads, -(-length // size), length))
        return pooled_group_scores(self.fq, self.fk, mask, size)

    def tiles(self, mask: jax.Array, block_q: int, block_k: int) -> jax.Array:
        """Tile scores: float32 [batch, heads, q_blocks, k_blocks], -inf without a valid pair."""
        if self.noise_key is not None:
            nq, nk = _tile_counts(mask, mask, block_q, block_k)
            noise = jax.random.uniform(jax.random.fold_in(self.noise_key, 0xB10C),
                                       (mask.shape[0], self.heads)
                                       + nq.shape[1:] + nk.shape[1:])
            ok = (nq[:, :, None] > 0) & (nk[:, None, :] > 0)
            return jnp.where(ok[:, None], noise, -jnp.inf)
        return pooled_tile_means(self.fq, self.fk, mask, mask, block_q, block_k)


class _Attended(NamedTuple):
    """What an implementation of the sparse attention step returns.

    Attributes:
      o: [batch, L, heads, head_dim] attention output before the output projection.
      kept: float32 [] valid query-key pairs attended (summed over batch and heads).
      rows_kept: rows int32 [batch, R] -> (keys int32 [batch, heads, R, K], live bool [same]):
        the attended keys of the given query rows (for ``prediction_accuracy``).
      k_bound: static bound on the attended keys of one row.
      gram_mse: compute the MSE from Gram matrices (no L x L array) instead of dense scores.
    """

    o: jax.Array
    kept: jax.Array
    rows_kept: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    k_bound: int
    gram_mse: bool = False

    @classmethod
    def of_mask(cls, o: jax.Array, keep: jax.Array, k_bound: int) -> _Attended:
        """For a dense keep mask bool [B, H, L, L] (valid pairs only)."""
        def rows_kept(rows):
            live = jnp.take_along_axis(keep, rows[:, None, :, None], axis=2)
            keys = jnp.broadcast_to(jnp.arange(keep.shape[-1], dtype=jnp.int32), live.shape)
            return keys, live
        return cls(o, jnp.sum(keep).astype(jnp.float32), rows_kept, k_bound)


class DSAAttention(base.Attention):
    """DSA attention layer; see the module docstring.

    Variables (besides the shared query/key/value/out projections):
      projection: Buffer float32 [emb_dim, heads, k], the fixed sparse random projections Pʰ.
      pred_query, pred_key: Param float32 [heads, k, k], W̃_Qʰ and W̃_Kʰ.
    """

    def __init__(self, dims: base.AttentionDims, cfg: ml_collections.ConfigDict, *, rngs):
        super().__init__(dims, cfg, rngs=rngs)
        self.k = predictor_width(cfg.sigma, dims.head_dim)
        self.has_predictor = cfg.precision in PRECISION_BITS
        if self.has_predictor:
            self.projection = base.Buffer(
                sparse_projection(rngs.params(), dims.emb_dim, dims.num_heads, self.k))
            init = nnx.initializers.normal(stddev=dims.emb_dim ** -0.5)
            shape = (dims.num_heads, self.k, self.k)
            self.pred_query = nnx.Param(init(rngs.params(), shape, jnp.float32))
            self.pred_key = nnx.Param(init(rngs.params(), shape, jnp.float32))

    def check_config(self, cfg, dims):
        """Raises ConfigError for any bad DSA field."""
        check_fields(cfg, dims.head_dim)

    # -- prediction path -----------------------------------------------------------------------
    def _predictor_outputs(self, x: jax.Array) -> tuple[list, list, list]:
        """(values, codes, scales) of Q̃, K̃ for the configured pipeline and precision."""
        prec = self.cfg.precision
        x = x.astype(jnp.float32)
        weights = (self.pred_query[...].astype(jnp.float32),
                   self.pred_key[...].astype(jnp.float32))
        projection = self.projection[...]
        if self.cfg.pipeline == 'fused':
            if prec in ('fp32', 'bf16'):
                return fused_float_predictor(x, projection, weights, prec)
            return fused_integer_predictor(x, projection, weights, PRECISION_BITS[prec])
        xp = jnp.einsum('ble,ehk->blhk', x, projection)
        if prec in ('fp32', 'bf16'):
            return float_predictor(xp, weights, prec)
        return integer_predictor(xp, weights, PRECISION_BITS[prec])

    def prediction(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array,
                                                                 SelectionScores]:
        """Approximate queries and keys, and the predicted selection scores.

        Args:
          x: [batch, L, emb_dim]; mask: bool [batch, L].

        Returns:
          (q̃, k̃, scores): q̃, k̃ float32 [batch, L, heads, k], each already multiplied by
          k^(-1/4) so that ``S̃ = q̃·k̃ᵀ`` (differentiable, straight-through; padded tokens are
          zero); scores the :class:`SelectionScores` of S̃ without gradient. For integer
          precisions the dense S̃ is the exact integer dot of the codes (the low-precision GEMM)
          times the two tokens' scales, so equal code dots give equal scores and the selection
          does not depend on the float evaluation order (eager vs jit).
        """
        tok = mask[:, :, None, None]
        values, codes, scales = self._predictor_outputs(x)
        qt, kt = (jnp.where(tok, y, 0.0) * self.k ** -0.25 for y in values)
        cq, ck = (jax.lax.stop_gradient(jnp.where(tok, c, 0.0)) for c in codes)
        sq, sk = (jax.lax.stop_gradient(s) for s in scales)

        def dense():
            dot = jnp.einsum('bqhk,bshk->bhqs', cq, ck, precision=_HIGHEST)
            return dot * jnp.einsum('bqh,bsh->bhqs', sq, sk) / math.sqrt(self.k)
        factor = self.k ** -0.25
        return qt, kt, SelectionScores(dense, cq * sq[..., None] * factor,
                                       ck * sk[..., None] * factor)

    def predict(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """:meth:`prediction` with the dense S̃.

        Returns:
          (q̃, k̃ float32 [batch, L, heads, k], S̃ float32 [batch, heads, L, L]).
        """
        qt, kt, scores = self.prediction(x, mask)
        return qt, kt, scores.dense()

    def _selection_scores(self, q, k, predicted, mask, deterministic, rng) -> SelectionScores:
        """The :class:`SelectionScores` the mask is chosen from (never differentiated)."""
        prec = self.cfg.precision
        if prec == 'oracle':
            f = self.dims.head_dim ** -0.25
            fq, fk = (jax.lax.stop_gradient(jnp.where(mask[:, :, None, None], t, 0)
                                            .astype(jnp.float32) * f) for t in (q, k))
            return SelectionScores(lambda: jax.lax.stop_gradient(
                base.attention_scores(q, k) / math.sqrt(self.dims.head_dim)), fq, fk)
        if prec == 'random':
            if deterministic or rng is None:
                key = jax.random.fold_in(jax.random.key(0x5EED), self.dims.layer_index)
            else:
                key = jax.random.fold_in(rng, 0x5EED)
            b, length = mask.shape
            shape = (b, self.dims.num_heads, length, length)
            return SelectionScores(lambda: jax.random.uniform(key, shape), None, None, key,
                                   self.dims.num_heads)
        return predicted

    # -- selection -----------------------------------------------------------------------------
    def select_mask(self, scores: SelectionScores, mask: jax.Array) -> tuple[jax.Array, dict]:
        """Dense keep mask from the selection scores (the reference selection).

        Element, vector and block scores come from the dense scores (group and tile means of
        them), except for ``random``, whose group and tile scores are drawn at their shape.

        Args:
          scores: :class:`SelectionScores`; mask: bool [batch, L].

        Returns:
          (keep bool [batch, heads, L, L], extras: 'block_idx'/'block_ok' for block granularity).
        """
        cfg, length = self.cfg, mask.shape[1]
        random = scores.noise_key is not None
        if cfg.granularity == 'block':
            if random:
                mean = scores.tiles(mask, cfg.block_q, cfg.block_k)
            else:
                mean = tile_means(scores.dense(), mask, mask, cfg.block_q, cfg.block_k)
            idx, ok = select_tiles(mean, mask, cfg.block_k, cfg.sparsity, cfg.selection,
                                   cfg.threshold)
            keep = tiles_keep(idx, ok, mask, mask, cfg.block_q, cfg.block_k)
            return keep, {'block_idx': idx, 'block_ok': ok}
        size = cfg.vector_size if cfg.granularity == 'vector' else 1
        if size > 1:
            sel = scores.groups(mask, size) if random else group_scores(scores.dense(), mask,
                                                                        size)
        else:
            sel = scores.dense()
        if cfg.selection == 'topk':
            count = keep_count(jnp.sum(mask, axis=1), cfg.sparsity)
            keep = topk_keep(sel, mask, count)
        else:
            keep = threshold_keep(sel, mask, cfg.threshold)
        if size > 1:
            keep = expand_groups(keep, size, length)
        return keep & base.pair_mask(mask, mask), {}

    def _row_bound(self, length: int) -> int:
        """Static bound on the keys one row attends."""
        cfg = self.cfg
        if cfg.selection == 'threshold':
            return length
        if cfg.granularity == 'block':
            nkb = -(-length // cfg.block_k)
            return min(length, static_keep_count(nkb, cfg.sparsity) * cfg.block_k)
        return static_keep_count(length, cfg.sparsity)

    def _tile_selection(self, scores: SelectionScores,
                        mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Kept tiles from pooled tile scores (no L×L array).

        Returns:
          (idx int32, ok bool) [batch, heads, q_blocks, kb] as :func:`select_tiles`.
        """
        cfg = self.cfg
        mean = scores.tiles(mask, cfg.block_q, cfg.block_k)
        return select_tiles(mean, mask, cfg.block_k, cfg.sparsity, cfg.selection, cfg.threshold)

    def _tile_rows(self, idx: jax.Array, ok: jax.Array, mask: jax.Array):
        """The ``rows_kept`` function of the kept tiles (see :class:`_Attended`)."""
        bq, bk, length = self.cfg.block_q, self.cfg.block_k, mask.shape[1]

        def rows_kept(rows):
            blk = jnp.broadcast_to((rows // bq)[:, None, :, None], idx.shape[:2] + rows.shape[1:]
                                   + (1,))
            tiles = jnp.take_along_axis(idx, blk, axis=2)  # [B, H, R, kb]
            tiles_ok = jnp.take_along_axis(ok, blk, axis=2)
            keys = (tiles[..., None] * bk + jnp.arange(bk, dtype=jnp.int32))
            live = tiles_ok[..., None] & (keys < length)
            keys = jnp.minimum(keys, length - 1).reshape(*keys.shape[:3], -1)
            live = live.reshape(keys.shape) & jnp.take_along_axis(
                jnp.broadcast_to(mask[:, None, None, :], keys.shape[:3] + (length,)), keys, -1)
            return keys, live
        return rows_kept

    # -- attention (one function per implementation) -----------------------------------------
    def _masked(self, q, k, v, keep, deterministic, rng):
        """Softmax attention restricted to keep [B, H, L, L]; o [B, L, H, head_dim]."""
        scale = 1.0 / math.sqrt(self.dims.head_dim)
        probs = base.masked_softmax(base.attention_scores(q, k) * scale, keep)
        return base.weighted_values(self.drop_probs(probs, deterministic, rng), v)

    def _attend_reference(self, q, k, v, scores, mask, deterministic, rng) -> _Attended:
        """The reference: the dense keep mask of :meth:`select_mask` and masked attention.

        Every implementation takes q, k, v [batch, L, heads, head_dim], the
        :class:`SelectionScores`, mask bool [batch, L], and returns an :class:`_Attended`.
        """
        keep, _ = self.select_mask(scores, mask)
        o = self._masked(q, k, v, keep, deterministic, rng)
        return _Attended.of_mask(o, keep, self._row_bound(mask.shape[1]))

    def _attend_block_kernel(self, q, k, v, scores, mask, deterministic, rng) -> _Attended:
        """Block granularity on the block-sparse kernel (``pallas_kernels.block_sparse``).

        The kept tiles' index lists (``block_idx`` / ``block_ok``, int32 / bool [batch, heads,
        q_blocks, kb], chosen on pooled tile scores as in the xla block path) go to the kernel
        with the token mask; the sequence is padded to the tiles. The kernel has no dropout
        (validation refuses a rate > 0 with this implementation).
        """
        del deterministic, rng
        from pallas_kernels import block_sparse  # jax-only, imported when used

        idx, block_ok = self._tile_selection(scores, mask)
        bq, bk, length = self.cfg.block_q, self.cfg.block_k, q.shape[1]
        lq, lk = -(-length // bq) * bq, -(-length // bk) * bk
        pad = base.pad_sequence  # sequence axis to the tiles; the padded mask marks it invalid
        order = jnp.argsort(jnp.logical_not(block_ok), axis=-1, stable=True)  # kept slots first
        kernel_idx = jnp.take_along_axis(idx, order, axis=-1)
        count = jnp.sum(block_ok, axis=-1, dtype=jnp.int32)
        o = block_sparse.block_sparse_attention(
            pad(q, lq), pad(k, lk), pad(v, lk), kernel_idx, count, pad(mask, lq), pad(mask, lk),
            block_sizes=block_sparse.BlockSizes(bq, bk))
        kept = tile_kept_pairs(idx, block_ok, mask, mask, bq, bk)
        return _Attended(o[:, :length], kept, self._tile_rows(idx, block_ok, mask),
                         self._row_bound(length), gram_mse=True)

    def _attend_blocks(self, q, k, v, scores, mask, deterministic, rng) -> _Attended:
        """The xla block path: per query block, attention over the gathered kept key blocks.

        The kept tiles (the kernel's index lists, from pooled tile scores) give per query block
        ``kb`` key blocks; K and V are gathered to [batch, heads, q_blocks, kb·block_k, head_dim]
        and scores, softmax and AV are batched matmuls over those only. No L×L array.
        """
        cfg = self.cfg
        bq, bk = cfg.block_q, cfg.block_k
        b, length, h, d = q.shape
        idx, ok = self._tile_selection(scores, mask)
        nqb, nkb, kb = -(-length // bq), -(-length // bk), idx.shape[-1]

        def blocks(t, size, n):  # [B, L, H, D] -> [B, H, n, size, D]
            t = base.pad_sequence(t, n * size).reshape(b, n, size, h, d)
            return jnp.transpose(t, (0, 3, 1, 2, 4))
        q_b = blocks(q, bq, nqb)
        gather = jax.vmap(jax.vmap(lambda t, i: t[i]))  # [nkb, bk, D], [nqb, kb] -> [nqb, kb, ..]
        k_sel, v_sel = (gather(blocks(t, bk, nkb), idx).reshape(b, h, nqb, kb * bk, d)
                        for t in (k, v))
        k_valid = base.pad_sequence(mask, nkb * bk).reshape(b, nkb, bk)
        live = ok[..., None] & jax.vmap(lambda t, i: t[i])(k_valid, idx)  # [B, H, nqb, kb, bk]
        q_valid = base.pad_sequence(mask, nqb * bq).reshape(b, 1, nqb, bq, 1)
        live = live.reshape(b, h, nqb, 1, kb * bk) & q_valid
        s = jnp.einsum('bhnqd,bhnkd->bhnqk', q_b, k_sel,
                       preferred_element_type=jnp.float32) / math.sqrt(d)
        probs = self.drop_probs(base.masked_softmax(s, live), deterministic, rng)
        o = jnp.einsum('bhnqk,bhnkd->bhnqd', probs.astype(v.dtype), v_sel)
        o = jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(b, nqb * bq, h, d)[:, :length]
        kept = tile_kept_pairs(idx, ok, mask, mask, bq, bk)
        return _Attended(o, kept, self._tile_rows(idx, ok, mask), self._row_bound(length),
                         gram_mse=True)

    def _attend_xla(self, q, k, v, scores, mask, deterministic, rng) -> _Attended:
        """The xla path: kept key blocks for block granularity, per-row index lists otherwise."""
        if self.cfg.granularity == 'block':
            return self._attend_blocks(q, k, v, scores, mask, deterministic, rng)
        return self._attend_rows(q, k, v, scores, mask, deterministic, rng)

    def _attend_rows(self, q, k, v, scores, mask, deterministic, rng) -> _Attended:
        """The xla path for element and vector granularity: ``lax.top_k`` index lists per row.

        Element: every row's top-k of its own L predicted scores (the dense S̃, whose per-row
        ``lax.top_k`` sets the cost floor). Vector: every group's top-k of its pooled scores (no
        L×L S̃), shared by the group's rows. The kept scores are read from ``QKᵀ`` (one matmul) at
        the index lists, the softmax runs on the kept [batch, heads, L, k_max] entries only and
        the probabilities are scattered into a zero matrix for one AV matmul. On a CPU the two
        dense matmuls are faster than gathering K and V per row or group ([..., k_max,
        head_dim]): those small batched products run far below the rate of one large matmul.
        """
        cfg = self.cfg
        b, length, h, d = q.shape
        size = cfg.vector_size if cfg.granularity == 'vector' else 1
        sel = scores.groups(mask, size) if size > 1 else scores.dense()  # [B, H, G, L]
        k_max = static_keep_count(length, cfg.sparsity)
        count = jnp.minimum(keep_count(jnp.sum(mask, axis=1), cfg.sparsity), k_max)
        idx, ok = topk_indices(sel, mask, count, k_max)  # [B, H, G, k_max]
        if size > 1:  # each group's lists for its rows
            idx, ok = (jnp.repeat(t, size, axis=2)[:, :, :length] for t in (idx, ok))
        live = ok & mask[:, None, :, None]
        s = base.attention_scores(q, k) / math.sqrt(d)
        probs = base.masked_softmax(jnp.take_along_axis(s, idx, axis=-1), live)
        probs = self.drop_probs(probs, deterministic, rng)
        at = (jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
              jnp.arange(length)[None, None, :, None], idx)
        o = base.weighted_values(jnp.zeros(s.shape, probs.dtype).at[at].set(probs), v)

        def rows_kept(rows):
            def at_rows(t):  # [B, H, L, K] -> [B, H, R, K]
                return jnp.take_along_axis(t, rows[:, None, :, None], axis=2)
            return at_rows(idx), at_rows(live)
        return _Attended(o, jnp.sum(live).astype(jnp.float32), rows_kept, k_max, gram_mse=True)

    implementations = base.implementations(
        base.Implementation('reference', _attend_reference),
        base.Implementation('xla', _attend_xla, settings={'selection': base.one_of('topk')}),
        base.Implementation('pallas', _attend_block_kernel, settings={
            'granularity': base.one_of('block'),
            'block_q': base.Restriction(_kernel_tile, _KERNEL_TILES),
            'block_k': base.Restriction(_kernel_tile, _KERNEL_TILES)},
            attention_dropout=False, kernel=True,
            defaults={'granularity': 'block', 'block_q': 64, 'block_k': 64}),
    )

    def _accuracy_wanted(self, deterministic: bool) -> bool:
        """Whether this call logs ``prediction_accuracy`` (``accuracy_stat``)."""
        return self.cfg.accuracy_stat == 'always' or (self.cfg.accuracy_stat == 'eval'
                                                      and deterministic)

    def attend(self, x, mask, carry, *, deterministic, rng):
        """DSA layer; see ``base.Attention.__call__`` and the module docstring."""
        q, k, v = self.project_qkv(x)
        qt = kt = predicted = None
        if self.has_predictor:
            qt, kt, predicted = self.prediction(x, mask)
        scores = self._selection_scores(q, k, predicted, mask, deterministic, rng)
        attended = self.implementation.run(self, q, k, v, scores, mask, deterministic, rng)
        o = jnp.where(mask[:, :, None, None], attended.o, 0).astype(v.dtype)
        valid_pairs = self.dims.num_heads * jnp.sum(jnp.sum(mask, axis=1) ** 2)
        kept_fraction = jnp.where(valid_pairs > 0, attended.kept / jnp.maximum(valid_pairs, 1),
                                  1.0)
        stats, aux = {'kept_fraction': kept_fraction.astype(jnp.float32)}, {}
        if self.has_predictor:
            sq, total = score_error(q, k, qt, kt, mask, gram=attended.gram_mse)
            mse = jnp.where(total > 0, sq / jnp.maximum(total, 1.0), 0.0)
            stats['mse'] = jax.lax.stop_gradient(mse).astype(jnp.float32)
            loss = mse_loss(sq, total, mask, self.cfg.mse_normalization)
            aux['dsa_mse'] = (self.cfg.mse_weight * loss).astype(jnp.float32)
        if self._accuracy_wanted(deterministic):
            rows, row_ok = sample_rows(mask, self.cfg.accuracy_rows)
            keys, live = attended.rows_kept(rows)
            stats['prediction_accuracy'] = row_accuracy(
                jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), mask, rows, row_ok, keys,
                live, attended.k_bound)
        return base.AttentionOutput(self.project_out(o), carry, stats, aux)

    def inspect_maps(self, x, mask, carry):
        """Maps for notebooks (reference selection, deterministic).

        Returns:
          {'kept': bool [B, H, L, L] attended pairs, 'predicted_scores': float32 [B, H, L, L] the
          selection scores (S̃; the true scores for oracle; noise for random), 'oracle': bool
          [B, H, L, L] each row's top-|kept row| true scores}.
        """
        del carry
        q, k, _ = self.project_qkv(x)
        predicted = None
        if self.has_predictor:
            _, _, predicted = self.prediction(x, mask)
        scores = self._selection_scores(q, k, predicted, mask, True, None)
        keep, _ = self.select_mask(scores, mask)
        valid = base.pair_mask(mask, mask)
        s = base.attention_scores(q, k) / math.sqrt(self.dims.head_dim)
        s = jnp.where(valid, s, -jnp.inf)
        oracle = (s >= _kth_largest(s, jnp.sum(keep, axis=-1))[..., None]) & valid
        return {'kept': keep, 'predicted_scores': scores.dense(), 'oracle': oracle}


METHOD = base.AttentionMethod(
    name='dsa',
    module=DSAAttention,
    default_config=default_config,
    check=validate,
    cost=layer_cost,
    description='trainable low-rank, low-precision predictor picks the attention weights to '
                'compute (DSA)',
    dense_equivalent={'sparsity': 0.0, 'selection': 'topk', 'granularity': 'element'},
    sweeps={
        'sparsity': tuple({'sparsity': s} for s in (0.8, 0.9, 0.95, 0.99)),
        'fig3_sparsity': tuple({'sparsity': s} for s in (0.9, 0.95, 0.99)),
        'table2_sigma': tuple({'sigma': s, 'precision': 'fp32', 'sparsity': 0.9}
                              for s in (0.1, 0.16, 0.2, 0.25, 0.33)),
        'table2_precision': tuple({'precision': p, 'sigma': 0.25, 'sparsity': 0.9}
                                  for p in ('random', 'int2', 'int4', 'int8', 'fp32')),
        'granularity': ({'granularity': 'element'},
                        {'granularity': 'vector', 'vector_size': 4},
                        {'granularity': 'vector', 'vector_size': 8}),
    },
)
