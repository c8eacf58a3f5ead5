"""DSA: dynamic sparse attention with a trainable low-rank, low-precision prediction path.

DSA (Liu et al., "Dynamic Sparse Attention for Scalable Transformer Acceleration", IEEE TC 2022,
sections 3-5) computes only the attention weights a cheap predictor marks as important. For
x [batch, L, emb_dim] and its mask [batch, L], one layer:

1. **Predicts** the scores per head h (Eq. 5): ``S̃ʰ = (X Pʰ W̃_Qʰ)(X Pʰ W̃_Kʰ)ᵀ / sqrt(k)``
   [batch, heads, L, L], with a fixed sparse random projection ``Pʰ`` (Buffer ``projection``
   [emb_dim, heads, k]), trainable ``W̃_Qʰ, W̃_Kʰ`` (``pred_query``, ``pred_key`` [heads, k, k]) and
   ``k = round(sigma * head_dim)``, at ``precision``: fp32 | bf16 | int8 | int4 | int2 (symmetric
   fake quantization, :mod:`quant`, of ``XP``, ``W̃`` and ``Q̃, K̃``: an integer pipeline
   simulated exactly in float32). ``random`` (a random mask, no predictor) and ``oracle`` (the
   true scores) are the paper's controls.
2. **Selects** the keys to attend from the selection scores: ``topk`` keeps
   ``ceil((1 - sparsity) * n)`` valid keys per row (n = the example's valid length; ties to the
   lowest index), ``threshold`` the keys scoring >= threshold plus each row's best. Granularity
   ``element`` (per row), ``vector`` (``vector_size`` rows share keys, chosen on their mean
   score) or ``block`` (``block_q × block_k`` tiles ranked by mean score). Padding is never kept.
3. **Attends** over the kept keys only: softmax of the kept scores (scaled by 1/sqrt(head_dim)),
   AV; y [batch, L, emb_dim], zero on padded rows.
4. **Trains the predictor** (Eq. 6-7): ``aux_losses['dsa_mse'] = mse_weight * MSE``, the mean
   over heads and valid pairs of ``(S - S̃)²`` with ``S = QKᵀ/sqrt(head_dim)``; gradients reach
   the predictor (straight-through) and the Q/K projections.

Implementations (the table of :class:`DSAAttention`; other pairs are refused by validation):

* ``reference``: dense ``S̃`` and scores, a boolean keep mask, :func:`base.masked_attention`; every
  setting. The oracle of the tests.
* ``xla``: ``topk`` with ``element`` / ``vector`` granularity. ``lax.top_k`` index lists per row
  group, gathered K and V [batch, heads, groups, k_max, head_dim], attention on those only; the
  MSE from ``head_dim × k`` Gram matrices. No L×L attention score matrix (``S̃`` still is L×L at
  width k).
* ``pallas``: ``block`` granularity (its default, with 64 × 64 tiles), tiles powers of two >= 16
  (>= 64 compiled for a GPU), no attention dropout: the kept
  tiles' index lists go to the block-sparse kernel (``pallas_kernels.block_sparse``); interpret
  mode on CPU.

Statistics (float32 scalars): ``sparsity`` (valid query-key pairs not attended), ``mse`` (with a
predictor), ``prediction_accuracy`` (with ``accuracy_stat``: |predicted ∩ oracle| / |predicted|
over valid rows, Fig. 6; needs the full score matrix).

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

from lra_sparse.attention import base, quant

PRECISIONS = ('fp32', 'bf16', 'int8', 'int4', 'int2', 'random', 'oracle')
PRECISION_BITS = {'fp32': 32, 'bf16': 16, 'int8': 8, 'int4': 4, 'int2': 2}
SELECTIONS = ('topk', 'threshold')
GRANULARITIES = ('element', 'vector', 'block')
VECTOR_SIZES = (2, 4, 8)
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
    c.mse_weight = 0.1  # lambda of L = L_model + lambda * MSE(S, S~), a number >= 0
    c.accuracy_stat = True  # log 'prediction_accuracy' (needs the full L x L score matrix)
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
    _check(isinstance(cfg.accuracy_stat, bool), 'accuracy_stat', cfg.accuracy_stat,
           'True or False')


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


def block_select(scores: jax.Array, q_valid: jax.Array, k_valid: jax.Array, block_q: int,
                 block_k: int, sparsity: float, selection: str,
                 threshold: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tile selection for the block granularity.

    A tile's score is the mean selection score over its valid pairs; per query block the
    ``ceil((1 - sparsity) * valid key blocks)`` best tiles are kept (``topk``), or the tiles with
    mean >= threshold plus the best one (``threshold``). Tiles without a valid pair never.

    Args:
      scores: float [batch, heads, L_q, L_k].
      q_valid: bool [batch, L_q]; k_valid: bool [batch, L_k].
      block_q, block_k: tile size (the lengths need not be multiples: edge tiles are partial).

    Returns:
      (block_idx int32 [batch, heads, q_blocks, kb] key-block indices, best first; block_ok bool
      [same]: the slot holds a kept tile; keep bool [batch, heads, L_q, L_k] the pairs of the kept
      tiles that are valid). ``kb`` = the static top-k slot count (all key blocks for threshold).
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
    tile_valid = cnt > 0
    mean = jnp.where(tile_valid, tot / jnp.maximum(cnt, 1), -jnp.inf)
    kblock_valid = jnp.any(kv.reshape(b, nkb, block_k), axis=-1)  # [B, nkb]
    if selection == 'topk':
        kb = static_keep_count(nkb, sparsity)
        count = keep_count(jnp.sum(kblock_valid, axis=-1), sparsity)  # [B]
        _, idx = jax.lax.top_k(mean, kb)
        ok = jnp.arange(kb)[None, None, None] < count[:, None, None, None]
    else:
        best = jnp.argmax(mean, axis=-1)
        chosen = (mean >= threshold) | jax.nn.one_hot(best, nkb, dtype=bool)
        idx = jnp.argsort(jnp.where(chosen, -mean, jnp.inf), axis=-1, stable=True)
        ok = jnp.take_along_axis(chosen, idx, axis=-1)
    ok = ok & jnp.take_along_axis(jnp.broadcast_to(tile_valid, mean.shape), idx, axis=-1)
    tiles = jnp.sum(jax.nn.one_hot(idx, nkb, dtype=jnp.int32) * ok[..., None], axis=-2) > 0
    keep = jnp.repeat(jnp.repeat(tiles, block_q, axis=2), block_k, axis=3)[:, :, :lq, :lk]
    keep = keep & (q_valid[:, :, None] & k_valid[:, None, :])[:, None]
    return idx.astype(jnp.int32), ok, keep


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


def gathered_accuracy(scores: jax.Array, idx: jax.Array, live: jax.Array,
                      valid: jax.Array) -> jax.Array:
    """:func:`prediction_accuracy` of an index-list selection (the xla path), same value.

    Args:
      scores: float [batch, heads, L, L] true scores; valid: bool [batch, 1, L, L].
      idx: int32 [batch, heads, groups, k_max] kept keys of each group of ``size`` rows.
      live: bool [batch, heads, groups, size, k_max] attended (row, slot) pairs.

    Returns:
      float32 scalar.
    """
    b, h, length, lk = scores.shape
    g, size, k_max = live.shape[2:]
    s = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    s = jnp.pad(s, ((0, 0), (0, 0), (0, g * size - length), (0, 0)),
                constant_values=-jnp.inf).reshape(b, h, g, size, lk)
    count = jnp.sum(live, axis=-1)  # [B, H, G, size]
    picked = jnp.take_along_axis(
        s, jnp.broadcast_to(idx[:, :, :, None, :], (b, h, g, size, k_max)), axis=-1)
    hits = jnp.sum(live & (picked >= _kth_largest(s, count)[..., None]))
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


def score_mse(q: jax.Array, k: jax.Array, qt: jax.Array, kt: jax.Array, mask: jax.Array,
              gram: bool) -> jax.Array:
    """Mean over heads and valid pairs of (S - S̃)², S = q·kᵀ/sqrt(head_dim), S̃ = q̃·k̃ᵀ.

    Args:
      q, k: [batch, L, heads, head_dim]; qt, kt: float32 [batch, L, heads, k]; mask: bool
        [batch, L].
      gram: from ``head_dim × k`` Gram matrices, ``||S - S̃||² = <QᵀQ, KᵀK> - 2<QᵀQ̃, KᵀK̃> +
        <Q̃ᵀQ̃, K̃ᵀK̃>`` (no L×L array), instead of the dense score matrices.

    Returns:
      float32 [] (0 without valid pairs), differentiable in all four inputs.
    """
    tok = mask[:, :, None, None]
    head_dim, heads = q.shape[-1], q.shape[2]
    a = jnp.where(tok, q.astype(jnp.float32), 0.0) * head_dim ** -0.25
    c = jnp.where(tok, k.astype(jnp.float32), 0.0) * head_dim ** -0.25
    n = jnp.sum(mask, axis=1).astype(jnp.float32)
    total = heads * jnp.sum(n * n)
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
    return jnp.where(total > 0, sq / jnp.maximum(total, 1.0), 0.0)


def gather_kept_keys(k: jax.Array, v: jax.Array, sel: jax.Array, mask: jax.Array, size: int,
                     sparsity: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Top-k selection per group of ``size`` rows as index lists, and the kept K and V.

    Args:
      k, v: [batch, L, heads, head_dim].
      sel: float32 [batch, heads, L, L] selection scores.
      mask: bool [batch, L].
      size: query rows per group (1 for element granularity).
      sparsity: fraction of each row's valid keys not kept.

    Returns:
      (k_sel, v_sel [batch, heads, G, k_max, head_dim], idx int32 [batch, heads, G, k_max] kept
      keys best first, ok bool [batch, heads, G, k_max] the slot holds a kept key), G =
      ceil(L / size), k_max = the kept count of a fully valid row.
    """
    length = k.shape[1]
    if size > 1:
        sel = group_scores(sel, mask, size)
    k_max = static_keep_count(length, sparsity)
    count = jnp.minimum(keep_count(jnp.sum(mask, axis=1), sparsity), k_max)
    idx, ok = topk_indices(sel, mask, count, k_max)
    gather = jax.vmap(jax.vmap(lambda t, i: t[i]))  # [L, D], [G, K] -> [G, K, D]
    k_sel, v_sel = (gather(jnp.swapaxes(t, 1, 2), idx) for t in (k, v))
    return k_sel, v_sel, idx, ok


def row_groups(t: jax.Array, size: int) -> jax.Array:
    """[batch, L, ...] -> [batch, G, size, ...], zero padded to G = ceil(L / size) groups."""
    g = -(-t.shape[1] // size)
    t = jnp.pad(t, [(0, 0), (0, g * size - t.shape[1])] + [(0, 0)] * (t.ndim - 2))
    return t.reshape(t.shape[0], g, size, *t.shape[2:])


# -- cost model -----------------------------------------------------------------------------------
def layer_macs(dims: base.AttentionDims, cfg, seq_len: int,
               mlp_dim: int) -> tuple[dict[str, float], int]:
    """MACs of one DSA layer for one example (Fig. 7 breakdown plus the prediction path).

    ``scores`` / ``attention_values`` count only kept pairs (``ceil((1 - sparsity) * n)`` keys per
    row; whole kept tiles for ``block``; ``threshold`` counts are data dependent and reported as
    dense, an upper bound). ``oracle`` needs every score (dense ``scores``). ``predictor`` = ``XP``
    + ``XP·W̃_Q, XP·W̃_K`` + ``S̃``, at ``predictor_bits`` (absent for random/oracle). Linear =
    qkv_proj + out_proj, attention = scores + attention_values, other = ffn.
    """
    n, e, h = seq_len, dims.emb_dim, dims.num_heads
    if cfg.selection == 'threshold':
        kept = n
    elif cfg.granularity == 'block':
        nkb = -(-n // cfg.block_k)
        kept = min(n, static_keep_count(nkb, cfg.sparsity) * cfg.block_k)
    else:
        kept = static_keep_count(n, cfg.sparsity)
    macs = base.layer_macs(dims, n, mlp_dim, value_pairs=n * kept,
                           score_pairs=n * (n if cfg.precision == 'oracle' else kept))
    if cfg.precision in PRECISION_BITS:
        k = predictor_width(cfg.sigma, dims.head_dim)
        macs['predictor'] = float(n * e * h * k + 2 * h * n * k * k + h * n * n * k)
        macs['predictor_bits'] = float(PRECISION_BITS[cfg.precision])
    return macs, seq_len


# -- the layer ----------------------------------------------------------------------------------
class _Attended(NamedTuple):
    """What an implementation of the sparse attention step returns.

    Attributes:
      o: [batch, L, heads, head_dim] attention output before the output projection.
      sparsity: float32 [] fraction of valid query-key pairs not attended.
      accuracy: true scores float32 [batch, heads, L, L] -> the ``prediction_accuracy`` of the
        selection (float32 []).
      gram_mse: compute the MSE from Gram matrices (no L x L array) instead of dense scores.
    """

    o: jax.Array
    sparsity: jax.Array
    accuracy: Callable[[jax.Array], jax.Array]
    gram_mse: bool = False

    @classmethod
    def of_mask(cls, o: jax.Array, keep: jax.Array, valid: jax.Array) -> _Attended:
        """For a dense keep mask [B, H, L, L] and the valid pairs [B, 1, L, L]."""
        return cls(o, base.pair_sparsity(keep, valid),
                   lambda scores: prediction_accuracy(scores, keep, valid))


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
    def predict(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Approximate queries, keys and scores at the configured precision.

        Args:
          x: [batch, L, emb_dim]; mask: bool [batch, L].

        Returns:
          (q̃, k̃, s̃): q̃, k̃ float32 [batch, L, heads, k], each already multiplied by k^(-1/4) so
          that ``S̃ = q̃·k̃ᵀ`` (differentiable, straight-through; padded tokens are zero); s̃ float32
          [batch, heads, L, L] = S̃ without gradient, the selection scores. For integer precisions
          s̃ is the exact integer dot of the codes (the low-precision GEMM) times the two tokens'
          scales, so equal code dots give equal scores and the selection does not depend on the
          float evaluation order (eager vs jit).
        """
        prec = self.cfg.precision
        tok = mask[:, :, None, None]
        xp = jnp.einsum('ble,ehk->blhk', x.astype(jnp.float32), self.projection[...])
        weights = (self.pred_query[...].astype(jnp.float32),
                   self.pred_key[...].astype(jnp.float32))
        if prec in ('fp32', 'bf16'):
            values, codes, scales = float_predictor(xp, weights, prec)
        else:
            values, codes, scales = integer_predictor(xp, weights, PRECISION_BITS[prec])
        qt, kt = (jnp.where(tok, y, 0.0) * self.k ** -0.25 for y in values)
        cq, ck = (jnp.where(tok, c, 0.0) for c in codes)
        dot = jnp.einsum('bqhk,bshk->bhqs', cq, ck, precision=_HIGHEST)
        outer = jnp.einsum('bqh,bsh->bhqs', scales[0], scales[1]) / math.sqrt(self.k)
        return qt, kt, jax.lax.stop_gradient(dot * outer)

    def _selection_scores(self, q, k, s_pred, mask, deterministic, rng):
        """float32 [batch, heads, L, L] scores the mask is chosen from (never differentiated)."""
        prec = self.cfg.precision
        if prec == 'oracle':
            s = base.attention_scores(q, k) / math.sqrt(self.dims.head_dim)
        elif prec == 'random':
            if deterministic or rng is None:
                key = jax.random.fold_in(jax.random.key(0x5EED), self.dims.layer_index)
            else:
                key = jax.random.fold_in(rng, 0x5EED)
            b, length = mask.shape
            s = jax.random.uniform(key, (b, self.dims.num_heads, length, length))
        else:
            s = s_pred
        return jax.lax.stop_gradient(s.astype(jnp.float32))

    # -- selection -----------------------------------------------------------------------------
    def select_mask(self, sel: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
        """Dense keep mask from selection scores (the reference selection).

        Args:
          sel: float32 [batch, heads, L, L]; mask: bool [batch, L].

        Returns:
          (keep bool [batch, heads, L, L], extras: 'block_idx'/'block_ok' for block granularity).
        """
        cfg, length = self.cfg, mask.shape[1]
        if cfg.granularity == 'block':
            idx, ok, keep = block_select(sel, mask, mask, cfg.block_q, cfg.block_k, cfg.sparsity,
                                         cfg.selection, cfg.threshold)
            return keep, {'block_idx': idx, 'block_ok': ok}
        size = cfg.vector_size if cfg.granularity == 'vector' else 1
        if size > 1:
            sel = group_scores(sel, mask, size)
        if cfg.selection == 'topk':
            count = keep_count(jnp.sum(mask, axis=1), cfg.sparsity)
            keep = topk_keep(sel, mask, count)
        else:
            keep = threshold_keep(sel, mask, cfg.threshold)
        if size > 1:
            keep = expand_groups(keep, size, length)
        return keep & base.pair_mask(mask, mask), {}

    # -- attention (one function per implementation) -----------------------------------------
    def _masked(self, q, k, v, keep, deterministic, rng):
        """Softmax attention restricted to keep [B, H, L, L]; o [B, L, H, head_dim]."""
        scale = 1.0 / math.sqrt(self.dims.head_dim)
        probs = base.masked_softmax(base.attention_scores(q, k) * scale, keep)
        return base.weighted_values(self.drop_probs(probs, deterministic, rng), v)

    def _attend_reference(self, q, k, v, sel, mask, deterministic, rng) -> _Attended:
        """The reference: the dense keep mask of :meth:`select_mask` and masked attention.

        Every implementation takes q, k, v [batch, L, heads, head_dim], the selection scores sel
        float32 [batch, heads, L, L], mask bool [batch, L], and returns an :class:`_Attended`.
        """
        keep, _ = self.select_mask(sel, mask)
        o = self._masked(q, k, v, keep, deterministic, rng)
        return _Attended.of_mask(o, keep, base.pair_mask(mask, mask))

    def _attend_block_kernel(self, q, k, v, sel, mask, deterministic, rng) -> _Attended:
        """Block granularity on the block-sparse kernel (``pallas_kernels.block_sparse``).

        The kept tiles' index lists (``block_idx`` / ``block_ok``, int32 / bool [batch, heads,
        q_blocks, kb]) go to the kernel with the token mask; the sequence is padded to the tiles.
        The kernel has no dropout (validation refuses a rate > 0 with this implementation).
        """
        del deterministic, rng
        from pallas_kernels import block_sparse  # jax-only, imported when used

        keep, extra = self.select_mask(sel, mask)
        bq, bk, length = self.cfg.block_q, self.cfg.block_k, q.shape[1]
        lq, lk = -(-length // bq) * bq, -(-length // bk) * bk
        pad = base.pad_sequence  # sequence axis to the tiles; the padded mask marks it invalid
        block_ok = extra['block_ok']
        order = jnp.argsort(jnp.logical_not(block_ok), axis=-1, stable=True)  # kept slots first
        idx = jnp.take_along_axis(extra['block_idx'], order, axis=-1)
        count = jnp.sum(block_ok, axis=-1, dtype=jnp.int32)
        o = block_sparse.block_sparse_attention(
            pad(q, lq), pad(k, lk), pad(v, lk), idx, count, pad(mask, lq), pad(mask, lk),
            block_sizes=block_sparse.BlockSizes(bq, bk))
        return _Attended.of_mask(o[:, :length], keep, base.pair_mask(mask, mask))

    def _attend_gathered(self, q, k, v, sel, mask, deterministic, rng) -> _Attended:
        """The xla path (topk, element/vector): attention over gathered kept keys only.

        ``lax.top_k`` gives per row group the kept key indices (:func:`gather_kept_keys`);
        scores, softmax and AV run on the gathered K and V; no L×L attention score matrix.
        """
        cfg = self.cfg
        b, length, h, d = q.shape
        size = cfg.vector_size if cfg.granularity == 'vector' else 1
        k_sel, v_sel, idx, ok = gather_kept_keys(k, v, sel, mask, size, cfg.sparsity)
        q_g = jnp.moveaxis(row_groups(q, size), 3, 1)  # [B, H, G, size, D]
        live = ok[:, :, :, None, :] & row_groups(mask, size)[:, None, :, :, None]  # [B,H,G,s,K]
        scores = jnp.einsum('bhgrd,bhgkd->bhgrk', q_g, k_sel,
                            preferred_element_type=jnp.float32) / math.sqrt(d)
        probs = self.drop_probs(base.masked_softmax(scores, live), deterministic, rng)
        o = jnp.einsum('bhgrk,bhgkd->bhgrd', probs.astype(v.dtype), v_sel)
        o = jnp.swapaxes(o.reshape(b, h, -1, d)[:, :, :length], 1, 2)
        valid = base.pair_mask(mask, mask)
        total = jnp.sum(valid) * h
        sparsity = jnp.where(total > 0, 1.0 - jnp.sum(live) / jnp.maximum(total, 1),
                             0.0).astype(jnp.float32)
        return _Attended(o, sparsity,
                         lambda scores: gathered_accuracy(scores, idx, live, valid), gram_mse=True)

    implementations = base.implementations(
        base.Implementation('reference', _attend_reference),
        base.Implementation('xla', _attend_gathered, settings={
            'granularity': base.one_of('element', 'vector'), 'selection': base.one_of('topk')}),
        base.Implementation('pallas', _attend_block_kernel, settings={
            'granularity': base.one_of('block'),
            'block_q': base.Restriction(_kernel_tile, _KERNEL_TILES),
            'block_k': base.Restriction(_kernel_tile, _KERNEL_TILES)},
            attention_dropout=False, kernel=True,
            defaults={'granularity': 'block', 'block_q': 64, 'block_k': 64}),
    )

    def attend(self, x, mask, carry, *, deterministic, rng):
        """DSA layer; see ``base.Attention.__call__`` and the module docstring."""
        q, k, v = self.project_qkv(x)
        qt = kt = s_pred = None
        if self.has_predictor:
            qt, kt, s_pred = self.predict(x, mask)
        sel = self._selection_scores(q, k, s_pred, mask, deterministic, rng)
        attended = self.implementation.run(self, q, k, v, sel, mask, deterministic, rng)
        o = jnp.where(mask[:, :, None, None], attended.o, 0).astype(v.dtype)
        stats, aux = {'sparsity': attended.sparsity}, {}
        if self.has_predictor:
            mse = score_mse(q, k, qt, kt, mask, gram=attended.gram_mse)
            stats['mse'] = jax.lax.stop_gradient(mse).astype(jnp.float32)
            aux['dsa_mse'] = (self.cfg.mse_weight * mse).astype(jnp.float32)
        if self.cfg.accuracy_stat:
            s = jax.lax.stop_gradient(base.attention_scores(q, k) / math.sqrt(self.dims.head_dim))
            stats['prediction_accuracy'] = attended.accuracy(s)
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
        s_pred = None
        if self.has_predictor:
            _, _, s_pred = self.predict(x, mask)
        sel = self._selection_scores(q, k, s_pred, mask, True, None)
        keep, _ = self.select_mask(sel, mask)
        valid = base.pair_mask(mask, mask)
        s = base.attention_scores(q, k) / math.sqrt(self.dims.head_dim)
        s = jnp.where(valid, s, -jnp.inf)
        oracle = (s >= _kth_largest(s, jnp.sum(keep, axis=-1))[..., None]) & valid
        return {'kept': keep, 'predicted_scores': sel, 'oracle': oracle}


METHOD = base.AttentionMethod(
    name='dsa',
    module=DSAAttention,
    default_config=default_config,
    check=validate,
    layer_macs=layer_macs,
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
