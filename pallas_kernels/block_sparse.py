"""Block-sparse flash attention over per-(batch, head, query-block) lists of key blocks.

The attention matrix is tiled into ``block_q × block_k`` tiles. For every batch element, head and
query block, an index list says which key blocks are attended (computed on device at run time,
e.g. DSA's block predictor): ``block_indices`` int32 ``[batch, heads, q_blocks, max_blocks]``
(the first ``block_counts[b, h, i]`` slots are used, the rest is padding) and ``block_counts``
int32 ``[batch, heads, q_blocks]``. The leading two axes of both tables may also be 1 (one list
shared over the batch or the heads). :func:`block_mask_to_indices` builds them from a dense
boolean block mask.

Inside the kept tiles an optional padding mask applies: ``k_valid`` marks real keys and
``q_valid`` real queries (padded query rows output zeros). A query row with nothing attended
(no kept block, or only padding in its kept blocks) outputs zeros, never NaN.

Kernels (one program per (batch, head, query block) for the forward pass and dQ, one per
(batch, head, key block) for dK/dV):

* forward: online softmax (FlashAttention-2) over the listed key blocks only; no ``L × L``
  buffer; saves the row log-sum-exp for the backward pass;
* dQ: the same loop, recomputing the probabilities from the saved log-sum-exp;
* dK/dV: loops over the query blocks that list the key block (the transposed lists, built on
  device from the forward lists in O(q_blocks · k_blocks) work, small next to ``L²``).

Lowerings (``backend``):

* ``'triton'`` (default off TPU): Pallas-Triton on GPU. The tables are whole refs read in a
  ``lax.fori_loop`` whose trip count is the list's count (scalar prefetch is TPU-only), K/V tiles
  are loaded with ``ref[pl.ds(block * block_k, block_k)]``.
* ``'tpu'`` (default on TPU): Mosaic TPU. The tables go through scalar prefetch
  (``pltpu.PrefetchScalarGridSpec``); the grid's last axis walks the list slots and the K/V
  ``index_map`` reads the block index from the prefetched table (slots past the count repeat the
  last block, so the pipeline fetches nothing new, and compute is skipped). Checked in TPU
  interpret mode only (no TPU was available): Mosaic's layout rules (e.g. tiles of 128 keys for
  full lanes) and the SMEM size of large tables are not verified.

On CPU the kernels run in interpret mode automatically (``jax.default_backend() == 'cpu'``):
the HLO interpreter for ``'triton'``, TPU interpret mode (``pltpu.InterpretParams``) for
``'tpu'``.

Preconditions the kernel does not check on device: the indices of one list (within its count)
are distinct (a repeated block would be counted twice in the forward pass). Indices outside
``[0, k_blocks)`` and counts outside ``[0, max_blocks]`` are clamped into range by the kernels
and by :func:`block_sparse_attention_reference` alike; when the tables are concrete (not traced)
the wrapper raises ``ValueError`` for them instead.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common as c
from pallas_kernels._common import BlockSizes  # re-exported: this kernel's tile sizes

_HIGHEST = lax.Precision.HIGHEST
_SQ = c.SQ  # a squeezed block dimension (None on older jax)


@dataclasses.dataclass(frozen=True)
class _Config(c.KernelConfig):
    backend: str = 'triton'  # 'triton' | 'tpu'


# -- index lists ------------------------------------------------------------------------------
def block_mask_to_indices(block_mask: jax.Array,
                          max_blocks: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Dense block mask -> index lists (ascending block order).

    Args:
      block_mask: bool [batch, heads, num_q_blocks, num_k_blocks] (any leading axes work).
      max_blocks: slots per list (default num_k_blocks, which never truncates). A row with more
        kept blocks than ``max_blocks`` keeps its first ``max_blocks`` (count = max_blocks).

    Returns:
      (indices int32 [..., num_q_blocks, max_blocks], counts int32 [..., num_q_blocks]). Slots
      past the count repeat the last kept block (0 when none is kept), so a pipelined kernel that
      reads them fetches nothing new.
    """
    block_mask = jnp.asarray(block_mask, bool)
    mb = block_mask.shape[-1] if max_blocks is None else int(max_blocks)
    if mb < 1:
        raise ValueError(f'max_blocks={max_blocks} must be >= 1.')
    return _mask_to_indices(block_mask, mb)


@functools.partial(jax.jit, static_argnums=1)
def _mask_to_indices(block_mask: jax.Array, mb: int) -> tuple[jax.Array, jax.Array]:
    nkb = block_mask.shape[-1]
    order = jnp.argsort(jnp.logical_not(block_mask), axis=-1, stable=True).astype(jnp.int32)
    if mb > nkb:
        order = jnp.concatenate(
            [order, jnp.zeros((*order.shape[:-1], mb - nkb), jnp.int32)], axis=-1)
    order = order[..., :mb]
    counts = jnp.minimum(jnp.sum(block_mask, axis=-1), mb).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    last = jnp.where(counts[..., None] > 0, last, 0)
    slot = jnp.arange(mb, dtype=jnp.int32)
    return jnp.where(slot < counts[..., None], order, last).astype(jnp.int32), counts


@functools.partial(jax.jit, static_argnums=2)
def indices_to_block_mask(block_indices: jax.Array, block_counts: jax.Array,
                          num_k_blocks: int) -> jax.Array:
    """Index lists -> dense block mask (out-of-range indices and counts clamped).

    Args:
      block_indices: int [..., num_q_blocks, max_blocks].
      block_counts: int [..., num_q_blocks].
      num_k_blocks: number of key blocks.

    Returns:
      bool [..., num_q_blocks, num_k_blocks].
    """
    mb = block_indices.shape[-1]
    lead = block_indices.shape[:-1]
    counts = c.clamp(block_counts.astype(jnp.int32), 0, mb)
    idx = c.clamp(block_indices.astype(jnp.int32), 0, num_k_blocks - 1).reshape(-1, mb)
    ok = (jnp.arange(mb, dtype=jnp.int32) < counts[..., None]).reshape(-1, mb)
    rows = jnp.arange(idx.shape[0], dtype=jnp.int32)[:, None]
    hits = jnp.zeros((idx.shape[0], num_k_blocks), jnp.int32).at[rows, idx].max(
        ok.astype(jnp.int32))
    return (hits > 0).reshape(*lead, num_k_blocks)


# -- checks -----------------------------------------------------------------------------------
def _check_tables(block_indices, block_counts, batch: int, heads: int, nqb: int,
                  nkb: int) -> None:
    """Shapes and dtypes of the index lists; their values too when they are concrete."""
    idx, cnt = block_indices, block_counts
    for name, x in (('block_indices', idx), ('block_counts', cnt)):
        if not jnp.issubdtype(getattr(x, 'dtype', np.float32), jnp.integer):
            raise ValueError(f'{name}.dtype={getattr(x, "dtype", None)} must be an integer type.')
    if (idx.ndim != 4 or idx.shape[0] not in (1, batch) or idx.shape[1] not in (1, heads)
            or idx.shape[2] != nqb or idx.shape[3] < 1):
        raise ValueError(f'block_indices must be [batch={batch} or 1, heads={heads} or 1, '
                         f'q_blocks={nqb}, max_blocks >= 1], got shape {idx.shape}.')
    if cnt.shape != idx.shape[:3]:
        raise ValueError(f'block_counts must be {idx.shape[:3]} (block_indices.shape[:3]), got '
                         f'shape {cnt.shape}.')
    try:
        idx_np, cnt_np = np.asarray(idx), np.asarray(cnt)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: the kernels clamp instead
    mb = idx.shape[3]
    if cnt_np.size and (cnt_np.min() < 0 or cnt_np.max() > mb):
        raise ValueError(f'block_counts must lie in [0, max_blocks={mb}], got values in '
                         f'[{cnt_np.min()}, {cnt_np.max()}].')
    used = np.arange(mb) < cnt_np[..., None]
    bad = used & ((idx_np < 0) | (idx_np >= nkb))
    if bad.any():
        raise ValueError(f'block_indices must lie in [0, k_blocks={nkb}) within each count, got '
                         f'{idx_np[bad][0]} at {tuple(int(i) for i in np.argwhere(bad)[0])}.')


def _prepare(q, k, v, block_indices, block_counts, q_valid, k_valid, sm_scale, block_sizes):
    """Validates a call; returns (head_dim, scale)."""
    b, lq, lk, h, d = c.check_call(q, k, v, q_valid, k_valid, block_sizes)
    _check_tables(block_indices, block_counts, b, h, lq // block_sizes.block_q,
                  lk // block_sizes.block_k)
    return d, c.softmax_scale(d, sm_scale)


# -- public API -------------------------------------------------------------------------------
def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array,
                           block_counts: jax.Array, q_valid: jax.Array | None = None,
                           k_valid: jax.Array | None = None, *, sm_scale: float | None = None,
                           block_sizes: BlockSizes = BlockSizes(),
                           interpret: bool | None = None,
                           backend: str | None = None) -> jax.Array:
    """Softmax attention restricted to the listed tiles (Pallas kernels, differentiable).

    Args:
      q: [batch, q_len, heads, head_dim] (float32, bfloat16 or float16).
      k, v: [batch, kv_len, heads, head_dim], q's dtype.
      block_indices: int [batch or 1, heads or 1, q_len / block_q, max_blocks] kept key blocks of
        every query block (distinct within the count; order free).
      block_counts: int [batch or 1, heads or 1, q_len / block_q] used slots of every list.
      q_valid: optional bool/int [batch, q_len], False for padded queries (their rows are 0).
      k_valid: optional bool/int [batch, kv_len], False for padded keys (never attended).
      sm_scale: score scale (default 1/sqrt(head_dim)).
      block_sizes: the tiles (powers of two >= 16 dividing the lengths) and GPU parameters.
      interpret: run the kernels in interpret mode (default: on CPU only).
      backend: 'triton' (GPU) or 'tpu' (Mosaic); default 'tpu' on a TPU backend, else 'triton'.

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype. Rows with nothing attended are zeros.

    Raises:
      ValueError: naming the offending shape, dtype, block size or index value, before launch.
    """
    d, scale = _prepare(q, k, v, block_indices, block_counts, q_valid, k_valid, sm_scale,
                        block_sizes)
    cfg = _Config(scale=scale, backend=c.resolve_backend(backend),
                  **c.launch_params(block_sizes, d, interpret))
    return _run(q, k, v, block_indices.astype(jnp.int32), block_counts.astype(jnp.int32),
                c.as_int_mask(q_valid), c.as_int_mask(k_valid), cfg=cfg)


def block_sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                     block_indices: jax.Array, block_counts: jax.Array,
                                     q_valid: jax.Array | None = None,
                                     k_valid: jax.Array | None = None, *,
                                     sm_scale: float | None = None,
                                     block_sizes: BlockSizes = BlockSizes(),
                                     interpret: bool | None = None,
                                     backend: str | None = None) -> jax.Array:
    """Dense masked-softmax twin of :func:`block_sparse_attention` (plain jnp, XLA autodiff).

    Same arguments and result (``interpret`` and ``backend`` are ignored). Builds the ``L × L``
    keep mask from the lists (clamped like the kernel): the obviously-correct oracle, not a fast
    path.
    """
    del interpret, backend
    _, scale = _prepare(q, k, v, block_indices, block_counts, q_valid, k_valid, sm_scale,
                        block_sizes)
    bq, bk = block_sizes.block_q, block_sizes.block_k
    lk = k.shape[1]
    tiles = indices_to_block_mask(block_indices, block_counts, lk // bk)  # [B', H', nqb, nkb]
    keep = jnp.repeat(jnp.repeat(tiles, bq, axis=2), bk, axis=3)  # [B', H', Lq, Lk]
    if q_valid is not None:
        keep = keep & (q_valid != 0)[:, None, :, None]
    if k_valid is not None:
        keep = keep & (k_valid != 0)[:, None, None, :]
    return masked_attention_reference(q, k, v, keep, scale)


def masked_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array,
                               scale: float) -> jax.Array:
    """Softmax attention over the ``keep`` entries; rows with nothing kept are zeros.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim].
      keep: bool broadcastable to [batch, heads, q_len, kv_len].
      scale: score scale.

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype (float32 softmax).
    """
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32,
                   precision=_HIGHEST) * scale
    keep = jnp.broadcast_to(keep, s.shape)
    p = jax.nn.softmax(jnp.where(keep, s, c.MASK_VALUE), axis=-1)
    p = jnp.where(keep, p, 0.0)
    out = jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), v, precision=_HIGHEST)
    return out.astype(q.dtype)


# -- custom VJP -------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('cfg',))
def _run(q, k, v, idx, cnt, qv, kv, *, cfg: _Config):
    """Pads the head dim to the kernel width, runs the custom-VJP kernels, slices back."""
    d = q.shape[-1]
    dp = c.padded_head_dim(d)
    o = _attention(c.pad_last(q, dp), c.pad_last(k, dp), c.pad_last(v, dp), idx, cnt, qv, kv,
                   cfg)
    return o[..., :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, idx, cnt, qv, kv, cfg):
    return _attention_fwd(q, k, v, idx, cnt, qv, kv, cfg)[0]


def _attention_fwd(q, k, v, idx, cnt, qv, kv, cfg):
    forward = _tpu_forward if cfg.backend == 'tpu' else _forward
    o, lse = forward(q, k, v, idx, cnt, qv, kv, cfg)
    return o, (q, k, v, idx, cnt, qv, kv, o, lse)


def _attention_bwd(cfg, res, do):
    q, k, v, idx, cnt, qv, kv, o, lse = res
    delta = c.row_delta(o, do)  # [B, H, Lq]
    nkb, nqb = k.shape[1] // cfg.block_k, q.shape[1] // cfg.block_q
    tiles_t = jnp.swapaxes(indices_to_block_mask(idx, cnt, nkb), -1, -2)  # [B', H', nkb, nqb]
    idx_t, cnt_t = block_mask_to_indices(tiles_t, nqb)
    if cfg.backend == 'tpu':
        dq, dk, dv = _tpu_backward(q, k, v, idx, cnt, idx_t, cnt_t, qv, kv, do, lse, delta, cfg)
    else:
        dq = _backward_dq(q, k, v, idx, cnt, qv, kv, do, lse, delta, cfg)
        dk, dv = _backward_dkv(q, k, v, idx_t, cnt_t, qv, kv, do, lse, delta, cfg)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# -- pallas calls -----------------------------------------------------------------------------
def _table_map(shape):
    """Index map for a [B' , H', rows, ...] table: broadcast axes (size 1) always read block 0."""
    def pick(b, h):
        return (b if shape[0] > 1 else 0), (h if shape[1] > 1 else 0)
    return pick


def _specs_for_tables(idx, cnt):
    """BlockSpecs of a list table (one list per program) and its counts."""
    pick = _table_map(idx.shape)
    return [pl.BlockSpec((_SQ, _SQ, _SQ, idx.shape[3]), lambda b, h, i: (*pick(b, h), i, 0)),
            pl.BlockSpec((_SQ, _SQ, 1), lambda b, h, i: (*pick(b, h), i))]


def _forward(q, k, v, idx, cnt, qv, kv, cfg):
    """Forward kernel. Returns (o [B, Lq, H, D], lse float32 [B, H, Lq])."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    mspecs, margs = c.mask_specs(qv, kv, bq, None, lq, lk)
    in_specs = _specs_for_tables(idx, cnt) + [c.row_block(bq, d), c.row_full(lk, d),
                                              c.row_full(lk, d)] + mspecs
    args = [idx, cnt, q, k, v, *margs]
    kernel = functools.partial(_fwd_kernel, scale=cfg.scale, block_k=bk, num_k_blocks=lk // bk,
                               has_qv=qv is not None, has_kv=kv is not None)
    out_specs = [c.row_block(bq, d), c.stat_block(bq)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq), jnp.float32)]
    return c.triton_call(kernel, (b, h, lq // bq), in_specs, out_specs, out_shape, cfg,
                         'block_sparse_fwd')(*args)


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *rest, scale, block_k, num_k_blocks,
                has_qv, has_kv):
    """One (batch, head, query block): online softmax over the listed key blocks."""
    qv_ref, kv_ref, (o_ref, lse_ref) = c.split_masks(rest, has_qv, has_kv)
    bq, d = q_ref.shape
    q = q_ref[...]
    q_ok = (qv_ref[...] != 0) if has_qv else None
    count = c.clamp(cnt_ref[0], 0, idx_ref.shape[0])

    def body(j, carry):
        start = pl.multiple_of(c.clamp(idx_ref[j], 0, num_k_blocks - 1) * block_k, block_k)
        rows = pl.ds(start, block_k)
        s = c.dot_nt(q, k_ref[rows, :]) * scale
        valid = c.pair_valid(q_ok, (kv_ref[rows] != 0) if has_kv else None)
        return c.online_update(*carry, s, valid, v_ref[rows, :])

    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), c.MASK_VALUE, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m_i, l_i = lax.fori_loop(0, count, body, init)
    out, lse = c.finish_rows(acc, m_i, l_i)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _probs(q, k, lse, scale, valid):
    """Recomputed probabilities of a tile: float32 [rows, cols] (0 where not valid)."""
    p = jnp.exp(c.dot_nt(q, k) * scale - lse[:, None])
    return p if valid is None else jnp.where(valid, p, 0.0)


def _backward_dq(q, k, v, idx, cnt, qv, kv, do, lse, delta, cfg):
    """The dQ kernel: one program per (batch, head, query block), loop over its key blocks."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    rows_vec = c.stat_block(bq)
    mspecs, margs = c.mask_specs(qv, kv, bq, None, lq, lk)
    in_specs = _specs_for_tables(idx, cnt) + [
        c.row_block(bq, d), c.row_full(lk, d), c.row_full(lk, d), c.row_block(bq, d), rows_vec,
        rows_vec] + mspecs
    args = [idx, cnt, q, k, v, do, lse, delta, *margs]
    kernel = functools.partial(_dq_kernel, scale=cfg.scale, block_k=bk, num_k_blocks=lk // bk,
                               has_qv=qv is not None, has_kv=kv is not None)
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return c.triton_call(kernel, (b, h, lq // bq), in_specs, c.row_block(bq, d), out_shape, cfg,
                         'block_sparse_dq')(*args)


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, scale,
               block_k, num_k_blocks, has_qv, has_kv):
    qv_ref, kv_ref, (dq_ref,) = c.split_masks(rest, has_qv, has_kv)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_ok = (qv_ref[...] != 0) if has_qv else None
    count = c.clamp(cnt_ref[0], 0, idx_ref.shape[0])

    def body(j, dq):
        start = pl.multiple_of(c.clamp(idx_ref[j], 0, num_k_blocks - 1) * block_k, block_k)
        rows = pl.ds(start, block_k)
        k, v = k_ref[rows, :], v_ref[rows, :]
        p = _probs(q, k, lse, scale, c.pair_valid(q_ok, (kv_ref[rows] != 0) if has_kv else None))
        ds = p * (c.dot_nt(do, v) - delta[:, None])
        return dq + c.dot_nn(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _backward_dkv(q, k, v, idx_t, cnt_t, qv, kv, do, lse, delta, cfg):
    """The dK/dV kernel: one program per (batch, head, key block), loop over its query blocks."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    rows_full = c.stat_full(lq)
    mspecs, margs = c.mask_specs(qv, kv, None, bk, lq, lk)
    in_specs = _specs_for_tables(idx_t, cnt_t) + [
        c.row_full(lq, d), c.row_block(bk, d), c.row_block(bk, d), c.row_full(lq, d), rows_full,
        rows_full] + mspecs
    args = [idx_t, cnt_t, q, k, v, do, lse, delta, *margs]
    kernel = functools.partial(_dkv_kernel, scale=cfg.scale, block_q=bq, num_q_blocks=lq // bq,
                               has_qv=qv is not None, has_kv=kv is not None)
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs = [c.row_block(bk, d), c.row_block(bk, d)]
    return c.triton_call(kernel, (b, h, lk // bk), in_specs, out_specs, out_shape, cfg,
                         'block_sparse_dkv')(*args)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, scale,
                block_q, num_q_blocks, has_qv, has_kv):
    qv_ref, kv_ref, (dk_ref, dv_ref) = c.split_masks(rest, has_qv, has_kv)
    k, v = k_ref[...], v_ref[...]
    k_ok = (kv_ref[...] != 0) if has_kv else None
    count = c.clamp(cnt_ref[0], 0, idx_ref.shape[0])

    def body(j, carry):
        dk, dv = carry
        start = pl.multiple_of(c.clamp(idx_ref[j], 0, num_q_blocks - 1) * block_q, block_q)
        rows = pl.ds(start, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        lse, delta = lse_ref[rows], delta_ref[rows]
        p = _probs(q, k, lse, scale, c.pair_valid((qv_ref[rows] != 0) if has_qv else None, k_ok))
        dv = dv + c.dot_tn(p.astype(do.dtype), do)
        ds = p * (c.dot_nt(do, v) - delta[:, None])
        dk = dk + c.dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, count, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# -- TPU (Mosaic) lowering ----------------------------------------------------------------------
# Head-major layout [B, H, L, D]; row statistics as [B, H, L, 1] columns; masks as [B, L, 1]
# (query side, a column) and [B, 1, L] (key side, a row). Grid (B, H, rows, slots): the last axis
# walks a list, the accumulators live in VMEM scratch, the output block is written at the last
# slot.
def _tpu_call(kernel, grid, num_prefetch, in_specs, out_specs, out_shape, scratch, cfg, name):
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_prefetch, grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape,
        interpret=pltpu.InterpretParams() if cfg.interpret else False,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
        name=name)


def _tpu_maps(table_shape, num_blocks):
    """Index maps of a grid (b, h, i, j) with prefetched (idx, cnt) tables.

    Returns:
      (own, listed): ``own`` picks block i of the program's own rows; ``listed`` picks the block
      in slot j of list (b, h, i) (slots past the count repeat the last listed block).
    """
    pick = _table_map(table_shape)

    def own(b, h, i, j, idx_ref, cnt_ref):
        return b, h, i, 0

    def listed(b, h, i, j, idx_ref, cnt_ref):
        tb, th = pick(b, h)
        slot = jnp.minimum(j, jnp.maximum(cnt_ref[tb, th, i] - 1, 0))
        return b, h, c.clamp(idx_ref[tb, th, i, slot], 0, num_blocks - 1), 0

    return own, listed


def _tpu_mask_specs(qv, kv, q_rows, k_rows, q_map, k_map):
    """Specs/args of the optional masks: q side [B, L, 1] (column), k side [B, 1, L] (row)."""
    specs, args = [], []
    if qv is not None:
        specs.append(pl.BlockSpec((_SQ, q_rows, 1), lambda *a: (a[0], q_map(*a)[2], 0)))
        args.append(qv[:, :, None])
    if kv is not None:
        specs.append(pl.BlockSpec((_SQ, 1, k_rows), lambda *a: (a[0], 0, k_map(*a)[2])))
        args.append(kv[:, None, :])
    return specs, args


def _tpu_valid(qv_ref, kv_ref):
    """Tile validity from the mask refs: bool broadcastable to [rows, cols], or None."""
    valid = None if qv_ref is None else qv_ref[...] != 0  # [rows, 1]
    if kv_ref is not None:
        k_ok = kv_ref[...] != 0  # [1, cols]
        valid = k_ok if valid is None else valid & k_ok
    return valid


def _heads_first(x):
    return jnp.swapaxes(x, 1, 2)


def _tpu_forward(q, k, v, idx, cnt, qv, kv, cfg):
    """TPU forward. Returns (o [B, Lq, H, D], lse float32 [B, H, Lq])."""
    b, lq, h, d = q.shape
    bq, bk = cfg.block_q, cfg.block_k
    own, listed = _tpu_maps(idx.shape, k.shape[1] // bk)
    tile_q = pl.BlockSpec((_SQ, _SQ, bq, d), own)
    tile_k = pl.BlockSpec((_SQ, _SQ, bk, d), listed)
    mspecs, margs = _tpu_mask_specs(qv, kv, bq, bk, own, listed)
    kernel = functools.partial(_tpu_fwd_kernel, scale=cfg.scale, pick=_table_map(idx.shape),
                               has_qv=qv is not None, has_kv=kv is not None)
    o, lse = _tpu_call(
        kernel, (b, h, lq // bq, idx.shape[3]), 2, [tile_q, tile_k, tile_k] + mspecs,
        [tile_q, pl.BlockSpec((_SQ, _SQ, bq, 1), own)],
        [jax.ShapeDtypeStruct((b, h, lq, d), q.dtype),
         jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32)],
        [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
         pltpu.VMEM((bq, d), jnp.float32)], cfg, 'block_sparse_fwd_tpu',
    )(idx, cnt, _heads_first(q), _heads_first(k), _heads_first(v), *margs)
    return _heads_first(o), lse[..., 0]


def _tpu_list_state(cnt_ref, pick):
    """(first slot, last slot, the slot holds a listed block) of this program."""
    b, h, i, j = (pl.program_id(a) for a in range(4))
    tb, th = pick(b, h)
    count = c.clamp(cnt_ref[tb, th, i], 0, pl.num_programs(3))
    return j == 0, j == pl.num_programs(3) - 1, j < count


def _tpu_fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *rest, scale, pick, has_qv, has_kv):
    del idx_ref  # used by the index maps
    qv_ref, kv_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = c.split_masks(rest, has_qv, has_kv)
    first, last, live = _tpu_list_state(cnt_ref, pick)

    @pl.when(first)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, c.MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(live)
    def _step():
        s = c.dot_nt(q_ref[...], k_ref[...]) * scale
        valid = _tpu_valid(qv_ref, kv_ref)
        if valid is not None:
            s = jnp.where(valid, s, c.MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + c.dot_nn(p.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    @pl.when(last)
    def _finish():
        l_i = l_sc[...]
        ok = l_i > 0.0
        safe = jnp.where(ok, l_i, 1.0)
        o_ref[...] = jnp.where(ok, acc_sc[...] / safe, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(ok, m_sc[...] + jnp.log(safe), -jnp.inf)


def _tpu_backward(q, k, v, idx, cnt, idx_t, cnt_t, qv, kv, do, lse, delta, cfg):
    """TPU dQ and dK/dV kernels. Returns (dq, dk, dv) in [B, L, H, D]."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    qh, kh, vh, doh = (_heads_first(x) for x in (q, k, v, do))
    lse, delta = lse[..., None], delta[..., None]  # [B, H, Lq, 1]
    flags = dict(scale=cfg.scale, has_qv=qv is not None, has_kv=kv is not None)

    own, listed = _tpu_maps(idx.shape, lk // bk)
    q_tile, q_col = pl.BlockSpec((_SQ, _SQ, bq, d), own), pl.BlockSpec((_SQ, _SQ, bq, 1), own)
    k_tile = pl.BlockSpec((_SQ, _SQ, bk, d), listed)
    mspecs, margs = _tpu_mask_specs(qv, kv, bq, bk, own, listed)
    dq = _tpu_call(
        functools.partial(_tpu_dq_kernel, pick=_table_map(idx.shape), **flags),
        (b, h, lq // bq, idx.shape[3]), 2,
        [q_tile, k_tile, k_tile, q_tile, q_col, q_col] + mspecs, q_tile,
        jax.ShapeDtypeStruct(qh.shape, q.dtype), [pltpu.VMEM((bq, d), jnp.float32)], cfg,
        'block_sparse_dq_tpu')(idx, cnt, qh, kh, vh, doh, lse, delta, *margs)

    own_k, listed_q = _tpu_maps(idx_t.shape, lq // bq)
    k_own = pl.BlockSpec((_SQ, _SQ, bk, d), own_k)
    q_listed = pl.BlockSpec((_SQ, _SQ, bq, d), listed_q)
    col_listed = pl.BlockSpec((_SQ, _SQ, bq, 1), listed_q)
    mspecs, margs = _tpu_mask_specs(qv, kv, bq, bk, listed_q, own_k)
    dk, dv = _tpu_call(
        functools.partial(_tpu_dkv_kernel, pick=_table_map(idx_t.shape), **flags),
        (b, h, lk // bk, idx_t.shape[3]), 2,
        [q_listed, k_own, k_own, q_listed, col_listed, col_listed] + mspecs, [k_own, k_own],
        [jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)], cfg,
        'block_sparse_dkv_tpu')(idx_t, cnt_t, qh, kh, vh, doh, lse, delta, *margs)
    return _heads_first(dq), _heads_first(dk), _heads_first(dv)


def _tpu_probs(q_ref, k_ref, lse_ref, scale, valid):
    """Recomputed probabilities of the tile: float32 [bq, bk]."""
    p = jnp.exp(c.dot_nt(q_ref[...], k_ref[...]) * scale - lse_ref[...])
    return p if valid is None else jnp.where(valid, p, 0.0)


def _tpu_dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
                   scale, pick, has_qv, has_kv):
    del idx_ref
    qv_ref, kv_ref, (dq_ref, dq_sc) = c.split_masks(rest, has_qv, has_kv)
    first, last, live = _tpu_list_state(cnt_ref, pick)

    @pl.when(first)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(live)
    def _step():
        p = _tpu_probs(q_ref, k_ref, lse_ref, scale, _tpu_valid(qv_ref, kv_ref))
        ds = p * (c.dot_nt(do_ref[...], v_ref[...]) - delta_ref[...])
        dq_sc[...] += c.dot_nn(ds.astype(k_ref.dtype), k_ref[...])

    @pl.when(last)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
                    scale, pick, has_qv, has_kv):
    del idx_ref
    qv_ref, kv_ref, (dk_ref, dv_ref, dk_sc, dv_sc) = c.split_masks(rest, has_qv, has_kv)
    first, last, live = _tpu_list_state(cnt_ref, pick)

    @pl.when(first)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(live)
    def _step():
        p = _tpu_probs(q_ref, k_ref, lse_ref, scale, _tpu_valid(qv_ref, kv_ref))
        do = do_ref[...]
        dv_sc[...] += c.dot_tn(p.astype(do.dtype), do)
        ds = p * (c.dot_nt(do, v_ref[...]) - delta_ref[...])
        dk_sc[...] += c.dot_tn(ds.astype(q_ref.dtype), q_ref[...])

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)
