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

Kernels (one program per (batch, head, query block) for the forward pass, per (batch, head,
``block_q_bwd`` rows) for dQ and per (batch, head, ``block_k_bwd`` keys) for dK/dV):

* forward: online softmax (FlashAttention-2, in base 2: ``exp2`` with log2(e)·scale folded into
  the scores) over the listed key blocks only; no ``L × L`` buffer; saves the row log-sum-exp;
* dQ: the same loop, recomputing the probabilities from the saved log-sum-exp, over the
  ``block_k_bwd`` sub-tiles of the listed key blocks (backward tiles default to 64 × 64, which
  keep the programs out of register spills);
* dK/dV: loops over the query blocks that list the key block (:func:`transposed_lists`: one
  sort of the ``q_blocks · max_blocks`` list entries on device, no dense block mask).

float32 inputs use TF32-class dots by default (``precision='default'``; ``'highest'`` keeps IEEE
float32, for checks); bfloat16/float16 inputs always use their tensor-core dots.

Lowerings (``backend``):

* ``'triton'`` (default off TPU): Pallas-Triton on GPU. The tables are whole refs read in a
  ``lax.fori_loop`` whose trip count is the list's count (scalar prefetch is TPU-only), K/V tiles
  are loaded with ``ref[pl.ds(block * block_k, block_k)]``.
* ``'tpu'`` (default on TPU): Mosaic TPU. The tables go through scalar prefetch
  (``pltpu.PrefetchScalarGridSpec``) as flat int32 vectors in SMEM; forward and dQ walk the
  ``max_blocks`` slots of every list in the grid's last axis (the K/V ``index_map`` reads the
  block from the table; slots past the count repeat the last block, so nothing new is fetched,
  and compute is skipped); dK/dV walk one slot per listed (query block, key block) pair plus one
  per key block, sorted by key block, so the work and the tables grow with the kept blocks, not
  with ``(L / tile)²``. The tables are checked against SMEM (:data:`TPU_TABLE_SHARE` of it) before
  launch: e.g. at L = 16384 with 128-tiles, B = 4, H = 8, lists of up to 13 blocks (10%) need
  229 KB. Lowering for ``tpu`` is checked on CPU (``jax.export``); the kernels have run in TPU
  interpret mode only, never on a TPU.

On CPU the kernels run in interpret mode automatically (when the platform they are traced for,
JAX's default backend or the one set by ``pallas_kernels.lowering_platform``, is the CPU): the HLO
interpreter for ``'triton'``, TPU interpret mode (``pltpu.InterpretParams``) for ``'tpu'``.

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


def transposed_lists(block_indices: jax.Array, block_counts: jax.Array,
                     num_k_blocks: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Forward lists -> for every key block, the query blocks that list it (one sorted run each).

    O(q_blocks · max_blocks) memory and a sort of that size: no dense block mask.

    Args:
      block_indices: int [B', H', q_blocks, max_blocks] (out-of-range values clamped).
      block_counts: int [B', H', q_blocks] (clamped to [0, max_blocks]).
      num_k_blocks: number of key blocks.

    Returns:
      (q_blocks int32 [B', H', q_blocks · max_blocks]: the listing query blocks, sorted by key
      block then query block, unused slots last; start int32 [B', H', num_k_blocks]: where each
      key block's run begins; count int32 [B', H', num_k_blocks]: its length).
    """
    bp, hp, nqb, mb = block_indices.shape
    kb, live = _live_blocks(block_indices, block_counts, num_k_blocks)
    qb = jnp.broadcast_to(jnp.arange(nqb, dtype=jnp.int32)[:, None], kb.shape)
    keys = jnp.where(live, kb, num_k_blocks) * nqb + qb  # unused slots sort last
    q_blocks = (jnp.sort(keys.reshape(bp, hp, nqb * mb), axis=-1) % nqb).astype(jnp.int32)
    rows = jnp.arange(bp * hp, dtype=jnp.int32)[:, None]
    count = jnp.zeros((bp * hp, num_k_blocks + 1), jnp.int32).at[
        rows, jnp.where(live, kb, num_k_blocks).reshape(bp * hp, -1)].add(1)
    count = count[:, :num_k_blocks].reshape(bp, hp, num_k_blocks)
    return q_blocks, jnp.cumsum(count, axis=-1, dtype=jnp.int32) - count, count


def _live_blocks(idx, cnt, num_k_blocks):
    """(clamped key blocks int32 [..., q_blocks, max_blocks], the slot is within its count)."""
    mb = idx.shape[-1]
    live = jnp.arange(mb, dtype=jnp.int32) < c.clamp(cnt.astype(jnp.int32), 0, mb)[..., None]
    return c.clamp(idx.astype(jnp.int32), 0, num_k_blocks - 1), live


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


# The TPU kernels keep their index tables in SMEM (scalar prefetch). They may use this share of
# it: Mosaic keeps scalars of its own there too (the exact headroom is unverified).
TPU_TABLE_SHARE = 0.75
_TPU_DEFAULT_SMEM = 1 << 20  # TPU v4 and later: 1 MiB per core
_TPU_MAX_BLOCKS = 1 << 14  # block numbers packed in 14 bits (see _tpu_dkv_slots)


def tpu_smem_bytes() -> int:
    """SMEM per TPU core: the device's when running on a TPU, else 1 MiB (TPU v4 and later)."""
    if jax.default_backend() == 'tpu':
        try:
            return int(pltpu.get_tpu_info().smem_capacity_bytes)
        except Exception:  # noqa: BLE001 - an unknown chip: keep the default
            pass
    return _TPU_DEFAULT_SMEM


def tpu_table_bytes(table_shape: tuple[int, ...], num_k_blocks: int) -> int:
    """SMEM bytes of the largest index table of the TPU kernels.

    Forward and dQ: the lists and counts, B'·H'·q_blocks·(max_blocks + 1) int32; dK/dV: one
    packed word per (query block, key block) pair that may exist plus one per key block,
    B'·H'·(q_blocks·max_blocks + k_blocks) int32.
    """
    bp, hp, nqb, mb = table_shape
    return 4 * bp * hp * max(nqb * (mb + 1), nqb * mb + num_k_blocks)


def _check_tpu_tables(table_shape: tuple[int, ...], num_k_blocks: int) -> None:
    """Raises ValueError when the TPU kernels' tables cannot fit SMEM (before launch)."""
    nqb = table_shape[2]
    if max(nqb, num_k_blocks) > _TPU_MAX_BLOCKS:
        raise ValueError(f"backend='tpu' supports at most {_TPU_MAX_BLOCKS} blocks per sequence, "
                         f'got {nqb} query and {num_k_blocks} key blocks: use larger tiles.')
    need, budget = tpu_table_bytes(table_shape, num_k_blocks), int(
        TPU_TABLE_SHARE * tpu_smem_bytes())
    if need > budget:
        raise ValueError(
            f"backend='tpu': the index tables need {need} bytes of SMEM (block_indices.shape="
            f'{tuple(table_shape)}, {num_k_blocks} key blocks), more than the {budget} allowed '
            f'({TPU_TABLE_SHARE:.0%} of {tpu_smem_bytes()}): use larger tiles, fewer '
            'max_blocks, or fewer batch elements or heads per call.')


def _prepare(q, k, v, block_indices, block_counts, q_valid, k_valid, sm_scale, block_sizes,
             precision):
    """Validates a call; returns (head_dim, scale)."""
    b, lq, lk, h, d = c.check_call(q, k, v, q_valid, k_valid, block_sizes, precision)
    _check_tables(block_indices, block_counts, b, h, lq // block_sizes.block_q,
                  lk // block_sizes.block_k)
    return d, c.softmax_scale(d, sm_scale)


# -- public API -------------------------------------------------------------------------------
def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array,
                           block_counts: jax.Array, q_valid: jax.Array | None = None,
                           k_valid: jax.Array | None = None, *, sm_scale: float | None = None,
                           block_sizes: BlockSizes = BlockSizes(),
                           interpret: bool | None = None, backend: str | None = None,
                           precision: str = 'default') -> jax.Array:
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
      precision: 'default' (float32 inputs use TF32 tensor cores on GPU) or 'highest' (IEEE
        float32 dots, for checks).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype. Rows with nothing attended are zeros.

    Raises:
      ValueError: naming the offending shape, dtype, block size, index value or (TPU) table
        size, before launch.
    """
    d, scale = _prepare(q, k, v, block_indices, block_counts, q_valid, k_valid, sm_scale,
                        block_sizes, precision)
    backend = c.resolve_backend(backend)
    if backend == 'tpu':
        _check_tpu_tables(block_indices.shape, k.shape[1] // block_sizes.block_k)
    cfg = _Config(scale=scale, backend=backend,
                  **c.launch_params(block_sizes, d, q.dtype, interpret, precision))
    return _run(q, k, v, block_indices.astype(jnp.int32), block_counts.astype(jnp.int32),
                c.as_int_mask(q_valid), c.as_int_mask(k_valid), cfg=cfg)


def block_sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                     block_indices: jax.Array, block_counts: jax.Array,
                                     q_valid: jax.Array | None = None,
                                     k_valid: jax.Array | None = None, *,
                                     sm_scale: float | None = None,
                                     block_sizes: BlockSizes = BlockSizes(),
                                     interpret: bool | None = None,
                                     backend: str | None = None,
                                     precision: str = 'default') -> jax.Array:
    """Dense masked-softmax twin of :func:`block_sparse_attention` (plain jnp, XLA autodiff).

    Same arguments and result (``interpret``, ``backend`` and ``precision`` are ignored: the
    reference always uses float32 'highest' matmuls). Builds the ``L × L`` keep mask from the
    lists (clamped like the kernel): the obviously-correct oracle, not a fast path.
    """
    del interpret, backend
    _, scale = _prepare(q, k, v, block_indices, block_counts, q_valid, k_valid, sm_scale,
                        block_sizes, precision)
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
    nkb = k.shape[1] // cfg.block_k
    if cfg.backend == 'tpu':
        slots = _tpu_dkv_slots(idx, cnt, nkb)
        dq, dk, dv = _tpu_backward(q, k, v, idx, cnt, slots, qv, kv, do, lse, delta, cfg)
    else:
        dq = _backward_dq(q, k, v, idx, cnt, qv, kv, do, lse, delta, cfg)
        dk, dv = _backward_dkv(q, k, v, transposed_lists(idx, cnt, nkb), qv, kv, do, lse,
                               delta, cfg)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# -- pallas calls (Triton) ----------------------------------------------------------------------
def _table_map(shape):
    """Index map for a [B' , H', rows, ...] table: broadcast axes (size 1) always read block 0."""
    def pick(b, h):
        return (b if shape[0] > 1 else 0), (h if shape[1] > 1 else 0)
    return pick


def _row_of_table(table, per_row: int = 1):
    """BlockSpec of entry (or list) i // per_row of a [B', H', rows(, n)] table.

    Program (b, h, i) reads row ``i // per_row``: ``per_row`` programs share a row.
    """
    pick = _table_map(table.shape)
    if table.ndim == 4:
        return pl.BlockSpec((_SQ, _SQ, _SQ, table.shape[3]),
                            lambda b, h, i: (*pick(b, h), i // per_row, 0))
    return pl.BlockSpec((_SQ, _SQ, 1), lambda b, h, i: (*pick(b, h), i // per_row))


def _whole_table(table):
    """BlockSpec of the whole [B', H', n] table row of program (b, h, i)."""
    pick = _table_map(table.shape)
    return pl.BlockSpec((_SQ, _SQ, table.shape[2]), lambda b, h, i: (*pick(b, h), 0))


def _flags(cfg, qv, kv):
    """Kernel keyword arguments shared by the Triton kernels."""
    return dict(scale_log2=cfg.scale * c.LOG2E, prec=cfg.dot_precision, has_qv=qv is not None,
                has_kv=kv is not None)


def _forward(q, k, v, idx, cnt, qv, kv, cfg):
    """Forward kernel. Returns (o [B, Lq, H, D], lse float32 [B, H, Lq])."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    mspecs, margs = c.mask_specs(qv, kv, bq, None, lq, lk)
    in_specs = [_row_of_table(idx), _row_of_table(cnt), c.row_block(bq, d), c.row_full(lk, d),
                c.row_full(lk, d)] + mspecs
    args = [idx, cnt, q, k, v, *margs]
    kernel = functools.partial(_fwd_kernel, block_k=bk, num_k_blocks=lk // bk,
                               **_flags(cfg, qv, kv))
    out_specs = [c.row_block(bq, d), c.stat_block(bq)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq), jnp.float32)]
    return c.triton_call(kernel, (b, h, lq // bq), in_specs, out_specs, out_shape, cfg,
                         'block_sparse_fwd')(*args)


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *rest, scale_log2, prec, block_k,
                num_k_blocks, has_qv, has_kv):
    """One (batch, head, query block): online softmax over the listed key blocks."""
    qv_ref, kv_ref, (o_ref, lse_ref) = c.split_masks(rest, has_qv, has_kv)
    bq, d = q_ref.shape
    q = q_ref[...]
    q_ok = (qv_ref[...] != 0) if has_qv else None
    count = c.clamp(cnt_ref[0], 0, idx_ref.shape[0])

    def body(j, carry):
        start = pl.multiple_of(c.clamp(idx_ref[j], 0, num_k_blocks - 1) * block_k, block_k)
        rows = pl.ds(start, block_k)
        s = c.dot_nt(q, k_ref[rows, :], prec) * scale_log2
        valid = c.pair_valid(q_ok, (kv_ref[rows] != 0) if has_kv else None)
        return c.online_update(*carry, s, valid, v_ref[rows, :], prec)

    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), c.MASK_VALUE, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m_i, l_i = lax.fori_loop(0, count, body, init)
    out, lse = c.finish_rows(acc, m_i, l_i)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _probs(q, k, lse2, scale_log2, valid, prec):
    """Recomputed probabilities of a tile: float32 [rows, cols] (0 where not valid).

    ``lse2``: float32 [rows] log-sum-exp in base 2 (natural lse · log2(e)).
    """
    p = jnp.exp2(c.dot_nt(q, k, prec) * scale_log2 - lse2[:, None])
    return p if valid is None else jnp.where(valid, p, 0.0)


def _sub_tile(t, parts: int):
    """Loop step t >= 0 over (list slot, sub-tile) pairs -> (slot, sub-tile)."""
    if parts == 1:
        return t, 0
    parts = jnp.int32(parts)
    return lax.div(t, parts), lax.rem(t, parts)  # lax ops: jnp's floor division trips Triton


def _backward_dq(q, k, v, idx, cnt, qv, kv, do, lse, delta, cfg):
    """The dQ kernel: one program per (batch, head, block_q_bwd rows).

    Each program loops over the block_k_bwd sub-tiles of its rows' listed key blocks.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    rq, rk = cfg.block_q_bwd, cfg.block_k_bwd
    per_list = cfg.block_q // rq
    rows_vec = c.stat_block(rq)
    mspecs, margs = c.mask_specs(qv, kv, rq, None, lq, lk)
    in_specs = [_row_of_table(idx, per_list), _row_of_table(cnt, per_list), c.row_block(rq, d),
                c.row_full(lk, d), c.row_full(lk, d), c.row_block(rq, d), rows_vec,
                rows_vec] + mspecs
    args = [idx, cnt, q, k, v, do, lse, delta, *margs]
    kernel = functools.partial(_dq_kernel, scale=cfg.scale, block_k=cfg.block_k, sub_k=rk,
                               num_k_blocks=lk // cfg.block_k, **_flags(cfg, qv, kv))
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return c.triton_call(kernel, (b, h, lq // rq), in_specs, c.row_block(rq, d), out_shape, cfg,
                         'block_sparse_dq', backward=True)(*args)


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, scale,
               scale_log2, prec, block_k, sub_k, num_k_blocks, has_qv, has_kv):
    qv_ref, kv_ref, (dq_ref,) = c.split_masks(rest, has_qv, has_kv)
    q, do, delta = q_ref[...], do_ref[...], delta_ref[...]
    lse2 = lse_ref[...] * c.LOG2E
    q_ok = (qv_ref[...] != 0) if has_qv else None
    parts = block_k // sub_k
    count = c.clamp(cnt_ref[0], 0, idx_ref.shape[0])

    def body(t, dq):
        slot, part = _sub_tile(t, parts)
        block = c.clamp(idx_ref[slot], 0, num_k_blocks - 1)
        rows = pl.ds(pl.multiple_of(block * block_k + part * sub_k, sub_k), sub_k)
        k, v = k_ref[rows, :], v_ref[rows, :]
        valid = c.pair_valid(q_ok, (kv_ref[rows] != 0) if has_kv else None)
        p = _probs(q, k, lse2, scale_log2, valid, prec)
        ds = p * (c.dot_nt(do, v, prec) - delta[:, None])
        return dq + c.dot_nn(ds.astype(k.dtype), k, prec)

    dq = lax.fori_loop(0, count * parts, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _backward_dkv(q, k, v, tables, qv, kv, do, lse, delta, cfg):
    """The dK/dV kernel: one program per (batch, head, block_k_bwd keys).

    Each program loops over the block_q_bwd sub-tiles of the query blocks that list its key
    block (``tables``: :func:`transposed_lists`).
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    rq, rk = cfg.block_q_bwd, cfg.block_k_bwd
    per_list = cfg.block_k // rk
    q_blocks, start, count = tables
    rows_full = c.stat_full(lq)
    mspecs, margs = c.mask_specs(qv, kv, None, rk, lq, lk)
    in_specs = [_whole_table(q_blocks), _row_of_table(start, per_list),
                _row_of_table(count, per_list), c.row_full(lq, d), c.row_block(rk, d),
                c.row_block(rk, d), c.row_full(lq, d), rows_full, rows_full] + mspecs
    args = [q_blocks, start, count, q, k, v, do, lse, delta, *margs]
    kernel = functools.partial(_dkv_kernel, scale=cfg.scale, block_q=cfg.block_q, sub_q=rq,
                               num_q_blocks=lq // cfg.block_q, **_flags(cfg, qv, kv))
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs = [c.row_block(rk, d), c.row_block(rk, d)]
    return c.triton_call(kernel, (b, h, lk // rk), in_specs, out_specs, out_shape, cfg,
                         'block_sparse_dkv', backward=True)(*args)


def _dkv_kernel(qb_ref, start_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *rest, scale, scale_log2, prec, block_q, sub_q, num_q_blocks, has_qv, has_kv):
    qv_ref, kv_ref, (dk_ref, dv_ref) = c.split_masks(rest, has_qv, has_kv)
    k, v = k_ref[...], v_ref[...]
    k_ok = (kv_ref[...] != 0) if has_kv else None
    parts = block_q // sub_q
    first = c.clamp(start_ref[0], 0, qb_ref.shape[0])
    count = c.clamp(count_ref[0], 0, qb_ref.shape[0] - first)

    def body(t, carry):
        dk, dv = carry
        slot, part = _sub_tile(t, parts)
        block = c.clamp(qb_ref[first + slot], 0, num_q_blocks - 1)
        rows = pl.ds(pl.multiple_of(block * block_q + part * sub_q, sub_q), sub_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        lse2, delta = lse_ref[rows] * c.LOG2E, delta_ref[rows]
        valid = c.pair_valid((qv_ref[rows] != 0) if has_qv else None, k_ok)
        p = _probs(q, k, lse2, scale_log2, valid, prec)
        dv = dv + c.dot_tn(p.astype(do.dtype), do, prec)
        ds = p * (c.dot_nt(do, v, prec) - delta[:, None])
        dk = dk + c.dot_tn(ds.astype(q.dtype), q, prec)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, count * parts, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# -- TPU (Mosaic) lowering ----------------------------------------------------------------------
# Head-major layout [B, H, L, D]; row statistics as [B, H, L, 1] columns; masks as [B, L, 1]
# (query side, a column) and [B, 1, L] (key side, a row). Index tables are flat int32 vectors in
# SMEM (scalar prefetch; flat, so SMEM holds no padding). Forward and dQ: grid (B, H, q_blocks,
# max_blocks), the last axis walks a list. dK/dV: grid (B, H, slots) over the packed pairs of
# _tpu_dkv_slots, sorted by key block. Accumulators live in VMEM scratch; an output block is
# written at the last step that visits it.
_Q_SHIFT, _K_SHIFT, _BLOCK_BITS = 3, 17, (1 << 14) - 1


def _tpu_call(kernel, grid, num_prefetch, in_specs, out_specs, out_shape, scratch, cfg, name):
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_prefetch, grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch)
    semantics = ('parallel', 'parallel') + ('parallel', 'arbitrary')[-(len(grid) - 2):]
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape,
        interpret=pltpu.InterpretParams() if cfg.interpret else False,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics), name=name)


def _flat_row(shape):
    """(b, h) -> the row of a flattened [B', H', rows] table (broadcast axes read row 0)."""
    pick = _table_map(shape)

    def row(b, h):
        tb, th = pick(b, h)
        return tb * shape[1] + th
    return row


def _tpu_maps(table_shape, num_blocks):
    """Index maps of a grid (b, h, i, j) with prefetched flat (idx, cnt) tables.

    Returns:
      (own, listed): ``own`` picks block i of the program's own rows; ``listed`` picks the block
      in slot j of list (b, h, i) (slots past the count repeat the last listed block).
    """
    row = _flat_row(table_shape)
    nqb, mb = table_shape[2], table_shape[3]

    def own(b, h, i, j, idx_ref, cnt_ref):
        return b, h, i, 0

    def listed(b, h, i, j, idx_ref, cnt_ref):
        base = row(b, h) * nqb + i
        slot = jnp.minimum(j, jnp.maximum(cnt_ref[base] - 1, 0))
        return b, h, c.clamp(idx_ref[base * mb + slot], 0, num_blocks - 1), 0

    return own, listed


def _unpack_slot(word):
    """Packed dK/dV slot -> (key block, query block to fetch, first, last, live)."""
    k_block = lax.shift_right_logical(word, _K_SHIFT)
    q_block = lax.shift_right_logical(word, _Q_SHIFT) & _BLOCK_BITS
    return k_block, q_block, (word & 4) != 0, (word & 2) != 0, (word & 1) != 0


def _tpu_dkv_slots(idx, cnt, num_k_blocks):
    """The dK/dV walk of the TPU kernels: int32 [B'·H'·S] packed slots, sorted by key block.

    S = q_blocks · max_blocks + num_k_blocks slots per (b, h).

    Every (query block, key block) pair of the lists is one slot; every key block also gets one
    empty slot (so its dK/dV block is written, zero when no query lists it); unused list slots
    sort last, empty, under the last key block. A slot packs (key block << 17) | (query block to
    fetch << 3) | first << 2 | last << 1 | live, where first/last mark the key block's run and an
    empty slot fetches the previous live query block (no new DMA).
    """
    bp, hp, nqb, mb = idx.shape
    kb, live = _live_blocks(idx, cnt, num_k_blocks)
    width = nqb + 1  # key = key block · width + query block + 1 (0: the empty slot)
    qb = jnp.arange(1, nqb + 1, dtype=jnp.int32)[:, None]
    pairs = jnp.where(live, kb * width + qb, num_k_blocks * width).reshape(bp, hp, nqb * mb)
    empties = jnp.broadcast_to(jnp.arange(num_k_blocks, dtype=jnp.int32) * width,
                               (bp, hp, num_k_blocks))
    keys = jnp.sort(jnp.concatenate([pairs, empties], axis=-1), axis=-1)
    k_block, q_plus = keys // width, keys % width
    live = (q_plus > 0) & (k_block < num_k_blocks)
    k_block = jnp.minimum(k_block, num_k_blocks - 1)
    edge = k_block[..., 1:] != k_block[..., :-1]
    true = jnp.ones((bp, hp, 1), bool)
    first, last = (jnp.concatenate([true, edge], -1), jnp.concatenate([edge, true], -1))
    pos = jnp.arange(keys.shape[-1], dtype=jnp.int32)
    source = lax.cummax(jnp.where(live, pos, -1), axis=2)  # the last live slot so far
    q_fetch = jnp.where(source >= 0, jnp.take_along_axis(q_plus - 1, jnp.maximum(source, 0),
                                                         axis=-1), 0)
    word = ((k_block << _K_SHIFT) | (q_fetch << _Q_SHIFT) | (first.astype(jnp.int32) << 2)
            | (last.astype(jnp.int32) << 1) | live.astype(jnp.int32))
    return word.reshape(-1)


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


def _flat_tables(idx, cnt):
    return idx.reshape(-1), cnt.reshape(-1)


def _tpu_forward(q, k, v, idx, cnt, qv, kv, cfg):
    """TPU forward. Returns (o [B, Lq, H, D], lse float32 [B, H, Lq])."""
    b, lq, h, d = q.shape
    bq, bk = cfg.block_q, cfg.block_k
    own, listed = _tpu_maps(idx.shape, k.shape[1] // bk)
    tile_q = pl.BlockSpec((_SQ, _SQ, bq, d), own)
    tile_k = pl.BlockSpec((_SQ, _SQ, bk, d), listed)
    mspecs, margs = _tpu_mask_specs(qv, kv, bq, bk, own, listed)
    kernel = functools.partial(_tpu_fwd_kernel, scale_log2=cfg.scale * c.LOG2E,
                               prec=cfg.dot_precision, state=_tpu_list_state(idx.shape),
                               has_qv=qv is not None, has_kv=kv is not None)
    o, lse = _tpu_call(
        kernel, (b, h, lq // bq, idx.shape[3]), 2, [tile_q, tile_k, tile_k] + mspecs,
        [tile_q, pl.BlockSpec((_SQ, _SQ, bq, 1), own)],
        [jax.ShapeDtypeStruct((b, h, lq, d), q.dtype),
         jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32)],
        [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
         pltpu.VMEM((bq, d), jnp.float32)], cfg, 'block_sparse_fwd_tpu',
    )(*_flat_tables(idx, cnt), _heads_first(q), _heads_first(k), _heads_first(v), *margs)
    return _heads_first(o), lse[..., 0]


def _tpu_list_state(table_shape):
    """Count table ref -> (first slot, last slot, live slot) of the running program (b, h, i, j).

    ``live``: the slot holds a listed block.
    """
    row = _flat_row(table_shape)
    nqb = table_shape[2]

    def state(cnt_ref):
        b, h, i, j = (pl.program_id(a) for a in range(4))
        count = c.clamp(cnt_ref[row(b, h) * nqb + i], 0, pl.num_programs(3))
        return j == 0, j == pl.num_programs(3) - 1, j < count
    return state


def _tpu_fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *rest, scale_log2, prec, state,
                    has_qv, has_kv):
    del idx_ref  # used by the index maps
    qv_ref, kv_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = c.split_masks(rest, has_qv, has_kv)
    first, last, live = state(cnt_ref)

    @pl.when(first)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, c.MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(live)
    def _step():
        s = c.dot_nt(q_ref[...], k_ref[...], prec) * scale_log2
        valid = _tpu_valid(qv_ref, kv_ref)
        if valid is not None:
            s = jnp.where(valid, s, c.MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s - m_new)
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + c.dot_nn(p.astype(v_ref.dtype), v_ref[...], prec)
        m_sc[...] = m_new

    @pl.when(last)
    def _finish():
        l_i = l_sc[...]
        ok = l_i > 0.0
        safe = jnp.where(ok, l_i, 1.0)
        o_ref[...] = jnp.where(ok, acc_sc[...] / safe, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(ok, (m_sc[...] + jnp.log2(safe)) * c.LN2, -jnp.inf)


def _tpu_backward(q, k, v, idx, cnt, slots, qv, kv, do, lse, delta, cfg):
    """TPU dQ and dK/dV kernels. Returns (dq, dk, dv) in [B, L, H, D]."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    qh, kh, vh, doh = (_heads_first(x) for x in (q, k, v, do))
    lse2, delta = (lse * c.LOG2E)[..., None], delta[..., None]  # [B, H, Lq, 1]
    flags = dict(scale=cfg.scale, scale_log2=cfg.scale * c.LOG2E, prec=cfg.dot_precision,
                 has_qv=qv is not None, has_kv=kv is not None)

    own, listed = _tpu_maps(idx.shape, lk // bk)
    q_tile, q_col = pl.BlockSpec((_SQ, _SQ, bq, d), own), pl.BlockSpec((_SQ, _SQ, bq, 1), own)
    k_tile = pl.BlockSpec((_SQ, _SQ, bk, d), listed)
    mspecs, margs = _tpu_mask_specs(qv, kv, bq, bk, own, listed)
    dq = _tpu_call(
        functools.partial(_tpu_dq_kernel, state=_tpu_list_state(idx.shape), **flags),
        (b, h, lq // bq, idx.shape[3]), 2,
        [q_tile, k_tile, k_tile, q_tile, q_col, q_col] + mspecs, q_tile,
        jax.ShapeDtypeStruct(qh.shape, q.dtype), [pltpu.VMEM((bq, d), jnp.float32)], cfg,
        'block_sparse_dq_tpu')(*_flat_tables(idx, cnt), qh, kh, vh, doh, lse2, delta, *margs)

    per_head = slots.shape[0] // (idx.shape[0] * idx.shape[1])
    row = _flat_row(idx.shape)

    def own_k(b, h, s, slots_ref):
        return b, h, _unpack_slot(slots_ref[row(b, h) * per_head + s])[0], 0

    def listed_q(b, h, s, slots_ref):
        return b, h, _unpack_slot(slots_ref[row(b, h) * per_head + s])[1], 0

    k_own = pl.BlockSpec((_SQ, _SQ, bk, d), own_k)
    q_listed = pl.BlockSpec((_SQ, _SQ, bq, d), listed_q)
    col_listed = pl.BlockSpec((_SQ, _SQ, bq, 1), listed_q)
    mspecs, margs = _tpu_mask_specs(qv, kv, bq, bk, listed_q, own_k)
    dk, dv = _tpu_call(
        functools.partial(_tpu_dkv_kernel, row=row, per_head=per_head, **flags),
        (b, h, per_head), 1,
        [q_listed, k_own, k_own, q_listed, col_listed, col_listed] + mspecs, [k_own, k_own],
        [jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)], cfg,
        'block_sparse_dkv_tpu')(slots, qh, kh, vh, doh, lse2, delta, *margs)
    return _heads_first(dq), _heads_first(dk), _heads_first(dv)


def _tpu_probs(q_ref, k_ref, lse2_ref, scale_log2, valid, prec):
    """Recomputed probabilities of the tile: float32 [bq, bk]."""
    p = jnp.exp2(c.dot_nt(q_ref[...], k_ref[...], prec) * scale_log2 - lse2_ref[...])
    return p if valid is None else jnp.where(valid, p, 0.0)


def _tpu_dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, *rest,
                   scale, scale_log2, prec, state, has_qv, has_kv):
    del idx_ref
    qv_ref, kv_ref, (dq_ref, dq_sc) = c.split_masks(rest, has_qv, has_kv)
    first, last, live = state(cnt_ref)

    @pl.when(first)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(live)
    def _step():
        p = _tpu_probs(q_ref, k_ref, lse2_ref, scale_log2, _tpu_valid(qv_ref, kv_ref), prec)
        ds = p * (c.dot_nt(do_ref[...], v_ref[...], prec) - delta_ref[...])
        dq_sc[...] += c.dot_nn(ds.astype(k_ref.dtype), k_ref[...], prec)

    @pl.when(last)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(slots_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, *rest, scale,
                    scale_log2, prec, row, per_head, has_qv, has_kv):
    qv_ref, kv_ref, (dk_ref, dv_ref, dk_sc, dv_sc) = c.split_masks(rest, has_qv, has_kv)
    b, h, s = (pl.program_id(a) for a in range(3))
    _, _, first, last, live = _unpack_slot(slots_ref[row(b, h) * per_head + s])

    @pl.when(first)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(live)
    def _step():
        p = _tpu_probs(q_ref, k_ref, lse2_ref, scale_log2, _tpu_valid(qv_ref, kv_ref), prec)
        do = do_ref[...]
        dv_sc[...] += c.dot_tn(p.astype(do.dtype), do, prec)
        ds = p * (c.dot_nt(do, v_ref[...], prec) - delta_ref[...])
        dk_sc[...] += c.dot_tn(ds.astype(q_ref.dtype), q_ref[...], prec)

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)
