"""DFSS: dynamic fine-grained structured (N:M) sparse attention.

DFSS (Chen et al., "Dynamic N:M Fine-grained Structured Sparse Attention Mechanism", PPoPP'23,
sections 2.3-3) prunes the score matrix on the fly to the pattern that sparse
tensor cores accept: in every row of ``QKᵀ``, in each group of M consecutive keys, only the N
largest scores are kept (``1:2`` or ``2:4``, both 50% sparsity). There is no predictor and no
hyperparameter besides the pattern, so it is a drop-in replacement of full attention and can also
be applied to a dense-trained model at evaluation (``apply='eval_only'``, the paper's "w/o
finetune" columns). The default ``pattern='auto'`` is the paper's pairing with the compute dtype
(``config.model.dtype``): 1:2 with float32, 2:4 with bfloat16; both are selectable.

What one layer does (the order of operations of the released code, ``apuaaChen/DFSS``
``BertSelfAttentionDFSS``):

1. ``s = q·kᵀ`` (float32 accumulators, also for bfloat16 Q/K, like the GEMM epilogue that prunes).
2. Padding mask applied **before** selection: padded keys (and every key of a padded query row)
   score ``-inf`` for the selection, so a group never keeps padding over a valid key.
3. Selection (:func:`nm_keep`): per row and group of M consecutive keys keep the N largest;
   ties go to the lowest index (the released epilogue's strict ``>`` over pairs in index order).
4. Scaling by ``1/sqrt(head_dim)`` **after** selection (selection is scale-invariant).
5. Softmax over the kept entries only; AV over the kept entries only.

Compressed form (the paper's ``dspattn.bmm`` / ``dspattn.spmv`` API, ``sddmm``/``spmm`` in the
released package): :func:`sddmm_nm` returns ``(values, indices)``, both ``[.., Lq, Lp·N/M]``
where ``Lp = ceil(Lk / M) · M``: the key axis is padded internally to a multiple of M with masked
keys, so any length works (tiny ListOps has 201 tokens with CLS). ``values`` are the kept raw
(unscaled) scores, N per group in ascending key order, float32; a slot whose key is not valid
(a group with fewer than N valid keys) holds :data:`base.MASK_VALUE`, as the released code's
additive mask leaves it. ``indices`` are the in-group positions (uint8 in ``[0, M)``, the
metadata). :func:`softmax_nm` is the softmax over the compressed values; :func:`spmm_nm` is AV.
:func:`compressed_footprint` gives the memory the paper states (half the values plus 4 bits of
metadata per group). These functions document the paper's dataflow; no implementation runs them.

Implementations:

* ``reference``: dense scores, the N:M keep mask of :func:`nm_keep` and
  :func:`base.masked_attention` (the oracle of the tests).
* ``xla``: one fused pass in dense form (``DFSSAttention._fused_attention``): keys padded to a
  multiple of M, scores, the N:M ranks on the score rows, softmax over the kept entries and AV,
  with no L × L array beyond the scores and the weights that AV reads. Every score is computed
  and AV multiplies zeros where pruned: without N:M hardware it cannot beat dense attention.
* ``pallas``: the fused kernel (``pallas_kernels.nm_sparse``) selects N:M inside every score
  tile and never writes the dense score matrix; the statistics come from its per-row log-sum-exps
  and the padding mask (``DFSSAttention._pallas_attention``). The sequence is padded to the
  kernel tiles. Interpret mode on CPU. No attention dropout (refused by validation unless
  ``apply='eval_only'``).

Statistics: ``kept_fraction`` = fraction of valid query-key pairs attended (exactly ``N/M`` when
every valid length is a multiple of M; a group with fewer than N valid keys keeps all of them, so
it is higher otherwise); ``kept_mass`` = mean over valid query rows (and heads) of the
probability mass of the full softmax (same scores, padding masked) that the kept entries carry;
``group_size`` = M of the pattern that ran. Cost: :func:`layer_cost` (every score is computed, so
``attention_cost`` is at least 1).
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import ml_collections

from lra_sparse.attention import base, cost

PATTERNS = {'1:2': (1, 2), '2:4': (2, 4)}
# pattern='auto': the pattern the paper pairs with each compute dtype (its sparse tensor cores
# take 1:2 for float32 and 2:4 for 16-bit types, section 2.3).
AUTO_PATTERNS = {'float32': '1:2', 'bfloat16': '2:4'}
AUTO = 'auto'


def default_config() -> ml_collections.ConfigDict:
    """DFSS's one field (the computation dtype is ``config.model.dtype``)."""
    c = ml_collections.ConfigDict()
    c.pattern = AUTO  # N:M pruning of every score row: 'auto' (the paper's pairing: 1:2 with
    # float32, 2:4 with bfloat16) | '1:2' (the larger of each pair) | '2:4' (the 2 largest of
    # each group of 4 consecutive keys); all 50% sparsity
    return c


def resolve_pattern(pattern, dtype: str = 'float32') -> str:
    """The N:M pattern that runs: ``pattern`` itself, or for 'auto' the one of ``dtype``.

    Raises:
      ConfigError: naming ``attention.pattern`` for anything but 'auto', '1:2', '2:4'.
    """
    if pattern == AUTO and isinstance(pattern, str):
        return AUTO_PATTERNS.get(dtype, '2:4')
    if not isinstance(pattern, str) or pattern not in PATTERNS:
        raise base.config_error('attention.pattern', pattern,
                                f'one of {", ".join(repr(p) for p in (AUTO, *PATTERNS))} (N:M, '
                                'a string)')
    return pattern


def parse_pattern(pattern, dtype: str = 'float32') -> tuple[int, int]:
    """'2:4' -> (2, 4); 'auto' -> the pattern of ``dtype`` (:func:`resolve_pattern`)."""
    return PATTERNS[resolve_pattern(pattern, dtype)]


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for a bad DFSS field (before any compute)."""
    resolve_pattern(config.attention.pattern)


def padded_length(length: int, m: int) -> int:
    """Key length padded to a multiple of the group size M."""
    return -(-length // m) * m


# -- selection ----------------------------------------------------------------------------------
def _group_keep(key: jax.Array, n: int) -> jax.Array:
    """Top-N of each group with lowest-index tie-break.

    Args:
      key: float [..., groups, M] selection keys (-inf for padding).
      n: kept per group.

    Returns:
      bool [..., groups, M] with exactly N True per group: entry i is kept iff fewer than N
      other entries j beat it (``key_j >= key_i`` for ``j < i``, ``key_j > key_i`` for
      ``j > i``). One compare per ordered pair of a group: M - 1 per entry, plus the count.
    """
    m = key.shape[-1]
    cols = [key[..., i] for i in range(m)]
    keep = []
    for i in range(m):
        beaten = [(cols[j] >= cols[i]) if j < i else (cols[j] > cols[i])
                  for j in range(m) if j != i]
        if n == 1:  # kept iff nothing beats it
            keep.append(~functools.reduce(operator.or_, beaten))
        else:
            keep.append(sum(b.astype(jnp.int32) for b in beaten) < n)
    return jnp.stack(keep, axis=-1)


def _kept_positions(keep: jax.Array, n: int) -> jax.Array:
    """Kept positions: bool [..., groups, M] (N True each) -> int32 [..., groups, N] ascending."""
    m = keep.shape[-1]
    cum = jnp.cumsum(keep.astype(jnp.int32), axis=-1)
    pos = jnp.arange(m, dtype=jnp.int32)
    return jnp.stack([jnp.sum(jnp.where(keep & (cum == s + 1), pos, 0), axis=-1)
                      for s in range(n)], axis=-1)


def _grouped_keys(scores: jax.Array, valid: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """Mask padding (-inf), pad the key axis to a multiple of M, split it into groups.

    Returns:
      (key float32 [..., Lp/M, M], valid bool [..., Lp/M, M]); pad keys are invalid.
    """
    lk = scores.shape[-1]
    pad = padded_length(lk, m) - lk
    valid = jnp.broadcast_to(valid, scores.shape)
    key = jnp.where(valid, jax.lax.stop_gradient(scores).astype(jnp.float32), -jnp.inf)
    widths = [(0, 0)] * (scores.ndim - 1) + [(0, pad)]
    key = jnp.pad(key, widths, constant_values=-jnp.inf)
    valid = jnp.pad(valid, widths, constant_values=False)
    shape = (*key.shape[:-1], key.shape[-1] // m, m)
    return key.reshape(shape), valid.reshape(shape)


def nm_keep(scores: jax.Array, valid: jax.Array, n: int, m: int) -> jax.Array:
    """The N:M keep mask of DFSS (dense form).

    Args:
      scores: float [..., q_len, kv_len] raw scores (any positive scale gives the same mask).
      valid: bool broadcastable to ``scores``, True for valid query-key pairs; invalid keys are
        never kept (a group keeps fewer than N when it has fewer than N valid keys).
      n, m: the pattern (keep N of every M consecutive keys).

    Returns:
      bool [..., q_len, kv_len]; kv_len need not be a multiple of M (the last group is short).
    """
    lk = scores.shape[-1]
    key, valid_g = _grouped_keys(scores, valid, m)
    keep = _group_keep(key, n) & valid_g
    return keep.reshape(*keep.shape[:-2], -1)[..., :lk]


# -- compressed form ----------------------------------------------------------------------------
def _sddmm(q, k, mask, n, m):
    """sddmm_nm plus the dense float32 scores it computed (for the kept-mass statistic)."""
    scores = base.attention_scores(q, k)  # [B, H, Lq, Lk] float32
    if mask is None:
        mask = jnp.ones((), bool)
    key, valid_g = _grouped_keys(scores, mask, m)
    idx = _kept_positions(_group_keep(key, n), n)  # [B, H, Lq, G, N]
    pad = key.shape[-2] * m - scores.shape[-1]
    grouped = jnp.pad(scores, [(0, 0)] * 3 + [(0, pad)]).reshape(key.shape)
    values = jnp.take_along_axis(grouped, idx, axis=-1)
    values = jnp.where(jnp.take_along_axis(valid_g, idx, axis=-1), values, base.MASK_VALUE)
    flat = (*values.shape[:-2], -1)
    return values.reshape(flat), idx.astype(jnp.uint8).reshape(flat), scores


def sddmm_nm(q: jax.Array, k: jax.Array, mask: jax.Array | None, n: int,
              m: int) -> tuple[jax.Array, jax.Array]:
    """Scores q·kᵀ pruned to N:M and compressed (the paper's SDDMM with the pruning epilogue).

    Args:
      q: [batch, q_len, heads, head_dim].
      k: [batch, kv_len, heads, head_dim].
      mask: bool broadcastable to [batch, heads, q_len, kv_len], True for valid pairs (e.g.
        ``base.pair_mask(mask, mask)``), applied before selection; None = all valid.
      n, m: the pattern.

    Returns:
      (values float32 [batch, heads, q_len, Lp·N/M], indices uint8 [batch, heads, q_len, Lp·N/M])
      with ``Lp = ceil(kv_len / M) · M``. Slot ``g·N + s`` holds the s-th kept key (ascending) of
      group g: key ``g·M + indices``, raw (unscaled) score ``values``; slots of invalid keys hold
      ``base.MASK_VALUE``.
    """
    values, indices, _ = _sddmm(q, k, mask, n, m)
    return values, indices


def softmax_nm(values: jax.Array, scale: float) -> jax.Array:
    """Softmax over the compressed kept scores of each row.

    Args:
      values: float32 [..., q_len, K] from :func:`sddmm_nm` (``base.MASK_VALUE`` = not kept).
      scale: score scale applied before the softmax (``1/sqrt(head_dim)``).

    Returns:
      float32 [..., q_len, K] probabilities; 0 at ``MASK_VALUE`` slots; rows with no kept entry
      (padded queries) are all zeros.
    """
    return base.masked_softmax(values * scale, values > base.MASK_VALUE)


def decompress_nm(values: jax.Array, indices: jax.Array, n: int, m: int, kv_len: int,
                  fill: float = 0.0) -> jax.Array:
    """Scatter-free decompression of an N:M matrix.

    Args:
      values: [..., q_len, G·N] compressed entries.
      indices: int [..., q_len, G·N] in-group positions (metadata).
      n, m: the pattern.
      kv_len: dense length to return (at most G·M; the internal padding is cut off).
      fill: value of the pruned entries.

    Returns:
      [..., q_len, kv_len] dense matrix in ``values``' dtype.
    """
    groups = values.shape[-1] // n
    vals = values.reshape(*values.shape[:-1], groups, n)
    idx = indices.astype(jnp.int32).reshape(vals.shape)
    cols = []
    for j in range(m):  # select over the M in-group positions: what the sparse MMA's mux does
        hit = idx == j
        col = jnp.sum(jnp.where(hit, vals, jnp.zeros((), vals.dtype)), axis=-1)
        cols.append(jnp.where(jnp.any(hit, axis=-1), col, jnp.asarray(fill, vals.dtype)))
    dense = jnp.stack(cols, axis=-1)
    return dense.reshape(*dense.shape[:-2], groups * m)[..., :kv_len]


def spmm_nm(probs: jax.Array, indices: jax.Array, v: jax.Array, n: int, m: int) -> jax.Array:
    """AV with an N:M compressed probability matrix (the paper's SpMM).

    Emulated: the probabilities are decompressed through the metadata (:func:`decompress_nm`)
    and multiplied with V in one dense matmul (no JAX sparse tensor-core path exists).

    Args:
      probs: [batch, heads, q_len, Lp·N/M] compressed probabilities (e.g. :func:`softmax_nm`).
      indices: uint8 [batch, heads, q_len, Lp·N/M] metadata from :func:`sddmm_nm`.
      v: [batch, kv_len, heads, head_dim]; ``Lp = ceil(kv_len / M) · M``.
      n, m: the pattern.

    Returns:
      [batch, q_len, heads, head_dim] in v's dtype.
    """
    dense = decompress_nm(probs, indices, n, m, v.shape[1])
    return base.weighted_values(dense, v)


def compressed_footprint(q_len: int, kv_len: int, n: int, m: int,
                         value_bytes: int = 4) -> dict[str, int]:
    """Bytes of one [q_len, kv_len] attention matrix, dense and compressed.

    Args:
      q_len, kv_len: matrix shape (kv_len is padded to a multiple of M).
      n, m: the pattern.
      value_bytes: bytes per value (4 float32, 2 bfloat16).

    Returns:
      {'dense': dense values, 'values': kept values (N/M of the padded row), 'metadata': the
      uint8 indices as stored here (1 byte per kept value), 'packed_metadata': the sparse
      tensor-core encoding (4 bits per group; the paper's ``n²/16 · 32 bit`` for 1:2 float32)}.
    """
    lp = padded_length(kv_len, m)
    kept = q_len * lp * n // m
    return {'dense': q_len * kv_len * value_bytes, 'values': kept * value_bytes,
            'metadata': kept, 'packed_metadata': q_len * (lp // m) * 4 // 8}


# -- cost model ---------------------------------------------------------------------------------
def selection_ops(n: int, m: int) -> int:
    """Ops per score entry of :func:`_group_keep` (1:2: 2, 2:4: 9).

    M - 1 compares, then for N = 1 the M - 2 ors and a not, otherwise M - 1 converts, M - 2 adds
    and the compare with N.
    """
    if n == 1:
        return (m - 1) + (m - 2) + 1
    return 2 * (m - 1) + (m - 2) + 1


def kernel_selection_ops(n: int, m: int) -> int:
    """Ops per score entry of the kernel's ranks, ``nm_sparse.group_keep`` (1:2: 3, 2:4: 7).

    M - 1 compares, converts and adds, and the compare with N.
    """
    del n
    return 3 * (m - 1) + 1


def pallas_tiles(length: int, m: int) -> tuple[int, int, int]:
    """(block_q, block_k, padded length) of the kernel path for ``length`` tokens."""
    bq = min(128, max(16, 1 << (length - 1).bit_length()))
    bk = max(bq, 16 * m)
    return bq, bk, -(-length // bk) * bk  # both tiles are powers of two: bk is a multiple of bq


def layer_cost(dims: base.AttentionDims, cfg, seq_len: int) -> cost.LayerCost:
    """Ops of one DFSS layer for one example (``cfg.impl`` chooses the formula).

    Every implementation computes every score of ``q·kᵀ`` before it prunes (no hardware here
    skips the pruned products), and its AV multiplies the dense-form weights (zeros where pruned),
    so ``attention_cost`` is at least 1 on every path: the selection is extra work. Components:
    'scores' and 'values' (the two matmuls), 'masking' (the pair mask and the selects around the
    softmax), 'selection' (the N:M ranks), 'softmax', 'statistics' (``kept_mass`` and
    ``kept_fraction``).

    * ``reference``: dense scores; the keep mask over keys padded to a multiple of M; the masked
      softmax of ``base.masked_attention``; the full softmax again for ``kept_mass``.
    * ``xla``: keys padded to a multiple of M before ``q·kᵀ``; one mask select, the ranks, one
      exponential per entry, sums of the kept and of all weights; output rows divided after AV.
    * ``pallas``: the forward kernel over its padded tiles (:func:`pallas_tiles`): per score entry
      the tile mask, ranks, online softmax in base 2 and the two row sums; per row and key block
      the rescaling of the running max, sums and accumulator.
    """
    n, m = parse_pattern(cfg.pattern, dims.dtype)
    h, d, length = dims.num_heads, dims.head_dim, seq_len
    if cfg.impl == 'pallas':
        return _pallas_cost(dims, n, m, seq_len)
    keys = padded_length(length, m) if cfg.impl == 'xla' else length
    pairs, grouped, rows = h * length * keys, h * length * padded_length(length, m), h * length
    attention = {'scores': cost.matmul(length, d, keys, batch=h),
                 'values': cost.matmul(length, keys, d, batch=h)}
    if cfg.impl == 'xla':
        attention.update({
            'masking': cost.elementwise(length * keys) + cost.elementwise(pairs),
            'selection': cost.elementwise(pairs, selection_ops(n, m)),
            # max, subtract, scale, exp, select kept, sum; per row the max guard, normalisation
            'softmax': cost.elementwise(pairs, 6) + cost.elementwise(rows, 6),
            # kept_mass: XLA fuses the exponentials into each consumer, so the sum of all
            # weights recomputes them (subtract, scale, exp) before it adds
            'statistics': cost.elementwise(pairs, 4) + cost.elementwise(rows, 4),
        })
        attention['values'] += cost.elementwise(rows * d)
    else:
        attention.update({
            'masking': cost.elementwise(length * length) + cost.elementwise(pairs, 3),
            'selection': cost.elementwise(pairs) + cost.elementwise(grouped,
                                                                    selection_ops(n, m) + 1),
            'softmax': cost.softmax(rows, length),
            # kept_mass: the full masked softmax, the kept select and sum; kept_fraction: and, sums
            'statistics': (cost.softmax(rows, length) + cost.elementwise(pairs, 4 + 3)
                           + cost.elementwise(length * length)),
        })
    return _layer(dims, attention, seq_len)


def _pallas_cost(dims: base.AttentionDims, n: int, m: int, seq_len: int) -> cost.LayerCost:
    """:func:`layer_cost` of the kernel path (see there)."""
    from pallas_kernels import _common  # jax-only, imported when used

    h, d = dims.num_heads, _common.padded_head_dim(dims.head_dim)
    _, bk, lp = pallas_tiles(seq_len, m)
    pairs, steps = h * lp * lp, h * lp * (lp // bk)  # row × key-block steps
    attention = {
        'scores': cost.matmul(lp, d, lp, batch=h),
        # tile pair mask, candidate select, ranks, kept & valid
        'selection': cost.elementwise(pairs, kernel_selection_ops(n, m) + 3),
        # scale, select kept, max, subtract, exp2, select kept, sum; per step the running max,
        # its correction exp2 and the rescaled sums
        'softmax': cost.elementwise(pairs, 7) + cost.elementwise(steps, 6),
        'values': cost.matmul(lp, lp, d, batch=h) + cost.elementwise(steps * d, 2),
        'statistics': cost.elementwise(pairs, 2) + cost.elementwise(steps, 2),
    }
    return _layer(dims, attention, seq_len)


def _layer(dims: base.AttentionDims, attention: dict[str, float], seq_len: int) -> cost.LayerCost:
    """A LayerCost with dense projections and feed-forward (DFSS prunes no token or head)."""
    return cost.LayerCost(attention=attention, tokens=seq_len, qkv_width=dims.qkv_dim,
                          query_rows=seq_len, kv_rows=seq_len, out_rows=seq_len,
                          ffn_tokens=seq_len, tokens_out=seq_len)


# -- the layer ----------------------------------------------------------------------------------
def kept_fraction(mask: jax.Array, n: int, m: int) -> jax.Array:
    """Fraction of valid query-key pairs N:M selection keeps, from the token mask alone.

    Every valid query row keeps ``min(N, valid keys)`` keys of each group of M consecutive keys;
    the fraction is the same for every head.

    Args:
      mask: bool [batch, length], True for real tokens.
      n, m: the pattern.

    Returns:
      float32 scalar in [0, 1]; 1 when there is no valid pair (nothing was dropped).
    """
    padded = base.pad_sequence(mask, padded_length(mask.shape[1], m))
    groups = jnp.sum(padded.reshape(mask.shape[0], -1, m), axis=-1)
    kept = jnp.sum(jnp.minimum(groups, n), axis=-1)  # per valid query row
    n_valid = jnp.sum(mask, axis=-1)  # valid rows = valid keys per example
    total = jnp.sum(n_valid * n_valid)
    return jnp.where(total > 0, jnp.sum(n_valid * kept) / jnp.maximum(total, 1),
                     1.0).astype(jnp.float32)


def _mean_over_rows(per_row: jax.Array, rows: jax.Array) -> jax.Array:
    total = jnp.sum(rows)
    return jnp.where(total > 0, jnp.sum(jnp.where(rows, per_row, 0.0)) / jnp.maximum(total, 1),
                     0.0).astype(jnp.float32)


class DFSSAttention(base.Attention):
    """N:M structured sparse attention; see the module docstring.

    Every implementation is called as ``run(layer, q, k, v, mask, deterministic, rng)`` with q, k,
    v [batch, L, heads, head_dim] and mask bool [batch, L], and returns (o [batch, L, heads,
    head_dim], stats {'kept_fraction', 'kept_mass'}); :meth:`attend` adds 'group_size':
    ``reference``: dense scores + :func:`nm_keep` + :func:`base.masked_attention`;
    ``xla``: one fused pass in dense form (:meth:`_fused_attention`; attention dropout on the
    kept weights);
    ``pallas``: the fused N:M kernel of ``pallas_kernels.nm_sparse`` (no attention dropout).
    """

    def __init__(self, dims: base.AttentionDims, cfg: ml_collections.ConfigDict, *, rngs):
        super().__init__(dims, cfg, rngs=rngs)
        self.n, self.m = parse_pattern(cfg.pattern, dims.dtype)

    def check_config(self, cfg, dims):
        """Raises ConfigError for a bad ``pattern``."""
        parse_pattern(cfg.pattern, dims.dtype)

    def _pattern_stats(self) -> dict[str, jax.Array]:
        """{'group_size': M} of the pattern that ran (2 for 1:2, 4 for 2:4), float32."""
        return {'group_size': jnp.asarray(self.m, jnp.float32)}

    def attend(self, x, mask, carry, *, deterministic, rng):
        """DFSS layer; see ``base.Attention.__call__``."""
        q, k, v = self.project_qkv(x)
        o, stats = self.implementation.run(self, q, k, v, mask, deterministic, rng)
        return base.AttentionOutput(self.project_out(o), carry,
                                    {**stats, **self._pattern_stats()}, {})

    def _reference(self, q, k, v, mask, deterministic, rng):
        """Dense scores, the N:M keep mask, masked softmax attention."""
        valid = base.pair_mask(mask, mask)  # [B, 1, L, L]
        scale = 1.0 / math.sqrt(self.dims.head_dim)
        scores = base.attention_scores(q, k)
        keep = nm_keep(scores, valid, self.n, self.m)  # padding masked before selection
        o, probs = base.masked_attention(q, k, v, keep)  # scale after selection
        if not deterministic and self.dims.attention_dropout_rate > 0.0:
            o = base.weighted_values(self.drop_probs(probs, deterministic, rng), v)
        full = jax.lax.stop_gradient(base.masked_softmax(scores * scale, valid))
        rows = jnp.broadcast_to(jnp.any(valid, axis=-1), full.shape[:-1])
        stats = {'kept_fraction': base.kept_fraction(keep, valid),
                 'kept_mass': _mean_over_rows(jnp.sum(jnp.where(keep, full, 0.0), -1), rows)}
        return o, stats

    def _pallas_attention(self, q, k, v, mask, deterministic, rng):
        """The fused N:M kernel (no dropout); statistics without the dense score matrix."""
        del deterministic, rng
        from pallas_kernels import nm_sparse  # jax-only, imported when used

        n, m, length = self.n, self.m, q.shape[1]
        bq, bk, lp = pallas_tiles(length, m)
        q_p, k_p, v_p, mask_p = (base.pad_sequence(t, lp) for t in (q, k, v, mask))  # invalid
        o, st = nm_sparse.nm_sparse_attention(
            q_p, k_p, v_p, mask_p, mask_p, n=n, m=m,
            block_sizes=nm_sparse.BlockSizes(bq, bk), return_stats=True)
        rows = jnp.broadcast_to(mask_p[:, None, :], st.lse_all.shape)
        kept_mass = _mean_over_rows(jnp.exp(st.lse_kept - st.lse_all), rows)
        return o[:, :length], {'kept_fraction': kept_fraction(mask, n, m),
                               'kept_mass': kept_mass}

    def _fused_attention(self, q, k, v, mask, deterministic, rng):
        """One pass: scores, N:M selection, softmax over the kept entries, AV (dense form).

        The key axis is padded to a multiple of M (masked keys) before ``q·kᵀ``, so the groups
        are a reshape of the score rows. Invalid pairs score -inf once; their weights are
        ``exp(-inf) = 0`` whether or not a short group "keeps" them, so no second mask is
        needed. The row maximum of the valid scores is the maximum of the kept ones (a row's
        largest score is the largest of its group), so the softmax needs no second selection
        pass; the weights stay unnormalised through AV and the output rows are divided by their
        sums (attention dropout on the unnormalised weights is the same as on the
        probabilities). ``kept_mass`` sums the same exponentials.
        """
        n, m, length = self.n, self.m, q.shape[1]
        lp = padded_length(length, m)
        k_p, v_p, kv_mask = (base.pad_sequence(t, lp) for t in (k, v, mask))
        scale = 1.0 / math.sqrt(self.dims.head_dim)
        scores = jnp.where(base.pair_mask(mask, kv_mask), base.attention_scores(q, k_p),
                           -jnp.inf)  # [B, H, L, Lp] float32
        grouped = jax.lax.stop_gradient(scores).reshape(*scores.shape[:-1], lp // m, m)
        keep = _group_keep(grouped, n).reshape(scores.shape)
        row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # padded queries
        weights = jnp.exp((scores - row_max) * scale)  # [B, H, L, Lp] in [0, 1]
        kept = jnp.where(keep, weights, 0.0)
        total = jnp.sum(kept, axis=-1)  # [B, H, L], 0 on padded queries only
        unnormalised = base.weighted_values(self.drop_probs(kept, deterministic, rng), v_p)
        norm = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
        o = (unnormalised * jnp.swapaxes(norm, 1, 2)[..., None]).astype(v.dtype)
        full = jax.lax.stop_gradient(jnp.sum(weights, axis=-1))
        rows = jnp.broadcast_to(mask[:, None, :], total.shape)
        kept_mass = _mean_over_rows(jax.lax.stop_gradient(total) / jnp.maximum(full, 1e-30), rows)
        return o, {'kept_fraction': kept_fraction(mask, n, m), 'kept_mass': kept_mass}

    implementations = base.implementations(
        base.Implementation('reference', _reference),
        base.Implementation('xla', _fused_attention),
        base.Implementation('pallas', _pallas_attention, attention_dropout=False, kernel=True),
    )

    def inspect_maps(self, x, mask, carry):
        """{'kept': bool [batch, heads, L, L]} the attended pairs."""
        del carry
        q, k, _ = self.project_qkv(x)
        return {'kept': nm_keep(base.attention_scores(q, k), base.pair_mask(mask, mask),
                                self.n, self.m)}


METHOD = base.AttentionMethod(
    name='dfss',
    module=DFSSAttention,
    default_config=default_config,
    check=validate,
    cost=layer_cost,
    description='on-the-fly N:M (1:2, 2:4) structured pruning of every score row (DFSS)',
    dense_equivalent=None,
    sweeps={'pattern': tuple({'pattern': p} for p in PATTERNS)},
)
