"""N:M structured sparse flash attention (DFSS's selection, fused in the score tile).

What it computes (the order of operations of DFSS, Chen et al., PPoPP'23):

1. raw scores ``s = q·kᵀ`` (float32 accumulation);
2. padding masked **before** selection: a key is a candidate only if both the query and the key
   are valid, so a group never keeps padding over a valid key;
3. selection: in every group of M consecutive keys of a score row keep the N largest
   candidates, ties to the lowest index (the rank of an entry is the number of group members that
   beat it: a larger score, or an equal score at a lower index; it is kept iff rank < N);
4. scaling by ``sm_scale`` (default ``1/sqrt(head_dim)``) **after** selection;
5. softmax over the kept entries only, then PV over the kept entries.

Pallas has no sort or top-k, so the selection is comparison based: a ``block_k``-key tile is read
as M strided sub-tiles (sub-tile j holds keys ``j, j + M, j + 2M, ...`` of the tile), so the M
members of every group sit at the same position of the M score sub-tiles and their ranks are
M·(M-1) elementwise comparisons in registers. The dense score matrix is never written. Each
sub-tile feeds its own matmuls (``block_k / M`` wide, hence ``block_k >= 16·M`` for Triton).

The forward pass also returns, at no extra exponentials (the max of every group is always kept,
so the running max over kept entries equals the max over all candidates), the log-sum-exp of the
kept and of all candidate scaled scores per row (``return_stats=True``): ``exp(lse_kept -
lse_all)`` is the softmax mass the kept entries carry. Selection carries no gradient.

Kernels: forward and dQ (one program per (batch, head, query block), a loop over all key blocks)
and dK/dV (one program per (batch, head, key block), a loop over all query blocks); each
recomputes the selection; the backward kernels use their own tiles (``block_q_bwd`` ×
``block_k_bwd``, 64 × 64 by default) and launch parameters. The online softmax runs in base 2
(``exp2`` with log2(e)·scale folded into the scores); float32 inputs use TF32 dots on GPU unless
``precision='highest'``.

Lowering: Pallas-Triton on GPU, interpret mode on CPU (automatic when the platform the call is
traced for is the CPU). There is no TPU (Mosaic) lowering: ``backend='tpu'`` (the default on a
TPU) raises ``ValueError`` before anything is traced.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as c
from pallas_kernels._common import BlockSizes  # re-exported: this kernel's tile sizes

_HIGHEST = lax.Precision.HIGHEST
SUPPORTED_M = (2, 4)
# The forward program holds M score sub-tiles and their masks: with 4 warps the 128 × 128 tiles
# spill registers in offline sm_90 compiles, with 8 they do not (docs/BENCHMARKS.md).
FORWARD_WARPS = 8


class NMStats(NamedTuple):
    """Per-row statistics of the forward pass (no gradient).

    Attributes:
      lse_kept: float32 [batch, heads, q_len] log-sum-exp of the kept scaled scores (-inf for rows
        with nothing kept).
      lse_all: float32 [batch, heads, q_len] log-sum-exp of all candidate scaled scores (valid
        query-key pairs; -inf for rows without any).
    """

    lse_kept: jax.Array
    lse_all: jax.Array


@dataclasses.dataclass(frozen=True)
class _Config(c.KernelConfig):
    n: int
    m: int


# -- selection (shared by the kernels and the reference) --------------------------------------
def group_keep(keys: list[jax.Array], n: int) -> list[jax.Array]:
    """Top-N of every group by comparison ranks (ties to the lowest index).

    Args:
      keys: M float arrays of one shape; ``keys[j]`` holds the selection key of in-group
        position j of every group (-inf for non-candidates).
      n: entries kept per group.

    Returns:
      M bool arrays: position j is kept iff fewer than N members beat it (a member i beats j when
      ``keys[i] > keys[j]``, or ``keys[i] == keys[j]`` and ``i < j``).
    """
    out = []
    for j, key_j in enumerate(keys):
        rank = jnp.zeros(key_j.shape, jnp.int32)
        for i, key_i in enumerate(keys):
            if i != j:
                beats = key_i >= key_j if i < j else key_i > key_j
                rank = rank + beats.astype(jnp.int32)
        out.append(rank < n)
    return out


def nm_keep_mask(scores: jax.Array, valid: jax.Array | None, n: int, m: int) -> jax.Array:
    """Dense N:M keep mask (the reference selection).

    Args:
      scores: float [..., q_len, kv_len] raw scores, kv_len a multiple of M.
      valid: bool broadcastable to ``scores`` (candidate pairs) or None (all).
      n, m: keep N of every M consecutive keys.

    Returns:
      bool [..., q_len, kv_len]; invalid pairs are never kept.
    """
    key = scores.astype(jnp.float32)
    if valid is not None:
        valid = jnp.broadcast_to(valid, scores.shape)
        key = jnp.where(valid, key, -jnp.inf)
    grouped = key.reshape(*key.shape[:-1], key.shape[-1] // m, m)
    keep = jnp.stack(group_keep([grouped[..., j] for j in range(m)], n), axis=-1)
    keep = keep.reshape(scores.shape)
    return keep if valid is None else keep & valid


# -- checks -----------------------------------------------------------------------------------
def _prepare(q, k, v, q_valid, k_valid, n, m, sm_scale, block_sizes, precision):
    """Validates a call; returns the scale."""
    if m not in SUPPORTED_M or not isinstance(n, int) or not 1 <= n < m:
        raise ValueError(f'n:m={n}:{m} is not supported: M in {SUPPORTED_M}, 1 <= N < M '
                         '(e.g. 1:2, 2:4).')
    d = c.check_call(q, k, v, q_valid, k_valid, block_sizes, precision)[4]
    for name in ('block_k', 'block_k_bwd'):
        block = getattr(block_sizes, name)
        if block is not None and block < c.MIN_BLOCK * m:
            raise ValueError(f'block_sizes.{name}={block} must be >= {c.MIN_BLOCK}·M='
                             f'{c.MIN_BLOCK * m} (each of the M strided sub-tiles feeds a '
                             'matmul).')
    return c.softmax_scale(d, sm_scale)


def _check_backend(backend: str | None) -> None:
    """Raises ValueError for the TPU: this kernel has a Triton lowering only."""
    if c.resolve_backend(backend) == 'tpu':
        raise ValueError("backend='tpu' is not supported by nm_sparse_attention: the N:M kernel "
                         "has no TPU (Mosaic) lowering; use backend='triton' (GPU, or interpret "
                         'mode anywhere) or the reference.')


# -- public API -------------------------------------------------------------------------------
def nm_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        q_valid: jax.Array | None = None, k_valid: jax.Array | None = None, *,
                        n: int = 2, m: int = 4, sm_scale: float | None = None,
                        block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None,
                        return_stats: bool = False, backend: str | None = None,
                        precision: str = 'default') -> jax.Array | tuple[jax.Array, NMStats]:
    """N:M-pruned softmax attention (Pallas kernels, differentiable); see the module docstring.

    Args:
      q: [batch, q_len, heads, head_dim] (float32, bfloat16 or float16).
      k, v: [batch, kv_len, heads, head_dim], q's dtype; kv_len a multiple of block_k.
      q_valid: optional bool/int [batch, q_len], False for padded queries (their rows are 0).
      k_valid: optional bool/int [batch, kv_len], False for padded keys (never selected).
      n, m: keep N of every M consecutive keys (M in 2, 4; 1 <= N < M).
      sm_scale: score scale applied after selection (default 1/sqrt(head_dim)).
      block_sizes: the tiles and GPU parameters.
      interpret: run the kernels in interpret mode (default: on CPU only).
      return_stats: also return :class:`NMStats`.
      backend: 'triton' or None (the default backend); 'tpu', and None on a TPU, raise.
      precision: 'default' (float32 inputs use TF32 tensor cores on GPU, so near-tied scores may
        select differently from the float32 reference) or 'highest' (IEEE float32 dots).

    Returns:
      out [batch, q_len, heads, head_dim] in q's dtype (rows with nothing kept are zeros), and
      NMStats when ``return_stats``.

    Raises:
      ValueError: naming the offending shape, dtype, pattern, block size or backend, before
        launch.
    """
    _check_backend(backend)
    scale = _prepare(q, k, v, q_valid, k_valid, n, m, sm_scale, block_sizes, precision)
    d = q.shape[-1]
    cfg = _Config(n=n, m=m, scale=scale,
                  **c.launch_params(block_sizes, d, q.dtype, interpret, precision,
                                    forward_warps=FORWARD_WARPS, min_block_k_bwd=c.MIN_BLOCK * m))
    o, lse_kept, lse_all = _run(q, k, v, c.as_int_mask(q_valid), c.as_int_mask(k_valid),
                                cfg=cfg)
    if return_stats:
        return o, NMStats(lse_kept, lse_all)
    return o


def nm_sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                  q_valid: jax.Array | None = None,
                                  k_valid: jax.Array | None = None, *, n: int = 2, m: int = 4,
                                  sm_scale: float | None = None,
                                  block_sizes: BlockSizes = BlockSizes(),
                                  interpret: bool | None = None,
                                  return_stats: bool = False, backend: str | None = None,
                                  precision: str = 'default'
                                  ) -> jax.Array | tuple[jax.Array, NMStats]:
    """Dense jnp twin of :func:`nm_sparse_attention` (same arguments and result).

    Forms the ``L × L`` scores, :func:`nm_keep_mask` and a masked softmax (XLA autodiff; the
    selection is under ``stop_gradient``). ``interpret``, ``backend`` and ``precision`` are
    ignored: the reference always uses float32 'highest' matmuls.
    """
    del interpret, backend
    scale = _prepare(q, k, v, q_valid, k_valid, n, m, sm_scale, block_sizes, precision)
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32,
                   precision=_HIGHEST)
    valid = None
    if q_valid is not None or k_valid is not None:
        qv = jnp.ones(q.shape[:2], bool) if q_valid is None else q_valid != 0
        kv = jnp.ones(k.shape[:2], bool) if k_valid is None else k_valid != 0
        valid = (qv[:, :, None] & kv[:, None, :])[:, None]
    keep = nm_keep_mask(lax.stop_gradient(s), valid, n, m)
    scaled = s * scale
    p = jax.nn.softmax(jnp.where(keep, scaled, c.MASK_VALUE), axis=-1)
    p = jnp.where(keep, p, 0.0)
    o = jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), v, precision=_HIGHEST).astype(q.dtype)
    if not return_stats:
        return o
    scaled = lax.stop_gradient(scaled)
    all_ok = jnp.ones(scaled.shape, bool) if valid is None else jnp.broadcast_to(valid,
                                                                                 scaled.shape)
    return o, NMStats(_logsumexp(scaled, keep), _logsumexp(scaled, all_ok))


def _logsumexp(x: jax.Array, where: jax.Array) -> jax.Array:
    """Row log-sum-exp over ``where`` entries of x [..., L]; -inf for empty rows."""
    mx = jnp.max(jnp.where(where, x, -jnp.inf), axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    total = jnp.sum(jnp.where(where, jnp.exp(x - mx), 0.0), axis=-1)
    return jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + mx[..., 0], -jnp.inf)


# -- custom VJP -------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('cfg',))
def _run(q, k, v, qv, kv, *, cfg: _Config):
    """Pads the head dim, runs the custom-VJP kernels, slices back; stats without gradient."""
    d = q.shape[-1]
    dp = c.padded_head_dim(d)
    o, lse_kept, lse_all = _attention(c.pad_last(q, dp), c.pad_last(k, dp), c.pad_last(v, dp),
                                      qv, kv, cfg)
    return o[..., :d], lax.stop_gradient(lse_kept), lax.stop_gradient(lse_all)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, qv, kv, cfg):
    return _forward(q, k, v, qv, kv, cfg)


def _attention_fwd(q, k, v, qv, kv, cfg):
    o, lse_kept, lse_all = _forward(q, k, v, qv, kv, cfg)
    return (o, lse_kept, lse_all), (q, k, v, qv, kv, o, lse_kept)


def _attention_bwd(cfg, res, cotangents):
    q, k, v, qv, kv, o, lse = res
    do = cotangents[0]  # the statistics are stop_gradient-ed by the caller
    delta = c.row_delta(o, do)
    dq = _backward_dq(q, k, v, qv, kv, do, lse, delta, cfg)
    dk, dv = _backward_dkv(q, k, v, qv, kv, do, lse, delta, cfg)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# -- pallas calls -----------------------------------------------------------------------------
def _kernel_args(cfg, qv, kv):
    return dict(n=cfg.n, m=cfg.m, scale=cfg.scale, scale_log2=cfg.scale * c.LOG2E,
                prec=cfg.dot_precision, has_qv=qv is not None, has_kv=kv is not None)


def _tile(q, k_parts, q_ok, k_ok_parts, n, prec):
    """Raw scores, candidates and kept entries of one tile, as M strided sub-tiles.

    Args:
      q: [rows, d]; k_parts: M arrays [cols / M, d] (sub-tile j = keys j, j + M, ...).
      q_ok: bool [rows] or None; k_ok_parts: M bool arrays [cols / M] or None.
      n: kept per group.
      prec: the score matmuls' precision.

    Returns:
      (s, valid, keep): M float32 [rows, cols / M] raw scores, M validity masks (broadcastable;
      None when no mask is given), M bool kept masks.
    """
    s = [c.dot_nt(q, kj, prec) for kj in k_parts]
    valid = [c.pair_valid(q_ok, None if k_ok_parts is None else k_ok_parts[j])
             for j in range(len(s))]
    keys = s if valid[0] is None else [jnp.where(vj, sj, -jnp.inf) for sj, vj in zip(s, valid)]
    keep = group_keep(keys, n)
    if valid[0] is not None:
        keep = [kj & vj for kj, vj in zip(keep, valid)]
    return s, valid, keep


def _forward(q, k, v, qv, kv, cfg):
    """Forward kernel: (o [B, Lq, H, D], lse_kept, lse_all float32 [B, H, Lq])."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq = cfg.block_q
    mspecs, margs = c.mask_specs(qv, kv, bq, None, lq, lk)
    rows_vec = c.stat_block(bq)
    kernel = functools.partial(_fwd_kernel, block_k=cfg.block_k, num_k_blocks=lk // cfg.block_k,
                               **_kernel_args(cfg, qv, kv))
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)] + [
        jax.ShapeDtypeStruct((b, h, lq), jnp.float32)] * 2
    in_specs = [c.row_block(bq, d), c.row_full(lk, d), c.row_full(lk, d)] + mspecs
    out_specs = [c.row_block(bq, d), rows_vec, rows_vec]
    return c.triton_call(kernel, (b, h, lq // bq), in_specs, out_specs, out_shape, cfg,
                         'nm_sparse_fwd')(q, k, v, *margs)


def _fwd_kernel(q_ref, k_ref, v_ref, *rest, n, m, scale, scale_log2, prec, block_k, num_k_blocks,
                has_qv, has_kv):
    """One (batch, head, query block): select, online softmax (base 2) over kept entries, PV."""
    del scale
    qv_ref, kv_ref, (o_ref, lse_ref, lse_all_ref) = c.split_masks(rest, has_qv, has_kv)
    bq, d = q_ref.shape
    g = block_k // m
    q = q_ref[...]
    q_ok = (qv_ref[...] != 0) if has_qv else None

    def body(kb, carry):
        acc, m_i, l_i, l_all = carry
        parts = [pl.ds(kb * block_k + j, g, stride=m) for j in range(m)]
        k_ok = [kv_ref[p] != 0 for p in parts] if has_kv else None
        s, valid, keep = _tile(q, [k_ref[p, :] for p in parts], q_ok, k_ok, n, prec)
        s = [x * scale_log2 for x in s]
        m_tile = functools.reduce(jnp.maximum, [
            jnp.max(jnp.where(kp, x, c.MASK_VALUE), axis=-1) for x, kp in zip(s, keep)])
        m_new = jnp.maximum(m_i, m_tile)
        alpha = jnp.exp2(m_i - m_new)
        e = [jnp.exp2(x - m_new[:, None]) for x in s]
        e_all = e if valid[0] is None else [jnp.where(vj, ej, 0.0) for ej, vj in zip(e, valid)]
        p = [jnp.where(kp, ej, 0.0) for ej, kp in zip(e, keep)]
        l_i = alpha * l_i + sum(jnp.sum(pj, axis=-1) for pj in p)
        l_all = alpha * l_all + sum(jnp.sum(ej, axis=-1) for ej in e_all)
        acc = alpha[:, None] * acc
        for pj, part in zip(p, parts):
            vj = v_ref[part, :]
            acc = acc + c.dot_nn(pj.astype(vj.dtype), vj, prec)
        return acc, m_new, l_i, l_all

    zeros = jnp.zeros((bq,), jnp.float32)
    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), c.MASK_VALUE, jnp.float32), zeros,
            zeros)
    acc, m_i, l_i, l_all = lax.fori_loop(0, num_k_blocks, body, init)
    out, lse = c.finish_rows(acc, m_i, l_i)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse
    lse_all_ref[...] = c.finish_rows(acc, m_i, l_all)[1]


def _kept_probs(s, keep, lse2, scale_log2):
    """Recomputed probabilities of kept entries: M float32 [rows, cols / M].

    ``s``: M raw score sub-tiles; ``lse2``: float32 [rows] base-2 log-sum-exp (lse · log2(e)).
    """
    return [jnp.where(kp, jnp.exp2(x * scale_log2 - lse2[:, None]), 0.0)
            for x, kp in zip(s, keep)]


def _backward_dq(q, k, v, qv, kv, do, lse, delta, cfg):
    """The dQ kernel: one program per (batch, head, query block), loop over all key blocks."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    rows_vec = c.stat_block(bq)
    mspecs, margs = c.mask_specs(qv, kv, bq, None, lq, lk)
    kernel = functools.partial(_dq_kernel, block_k=bk, num_k_blocks=lk // bk,
                               **_kernel_args(cfg, qv, kv))
    in_specs = [c.row_block(bq, d), c.row_full(lk, d), c.row_full(lk, d), c.row_block(bq, d),
                rows_vec, rows_vec] + mspecs
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return c.triton_call(kernel, (b, h, lq // bq), in_specs, c.row_block(bq, d), out_shape, cfg,
                         'nm_sparse_dq', backward=True)(q, k, v, do, lse, delta, *margs)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, n, m, scale, scale_log2,
               prec, block_k, num_k_blocks, has_qv, has_kv):
    qv_ref, kv_ref, (dq_ref,) = c.split_masks(rest, has_qv, has_kv)
    g = block_k // m
    q, do, delta = q_ref[...], do_ref[...], delta_ref[...]
    lse2 = lse_ref[...] * c.LOG2E
    q_ok = (qv_ref[...] != 0) if has_qv else None

    def body(kb, dq):
        parts = [pl.ds(kb * block_k + j, g, stride=m) for j in range(m)]
        k_parts = [k_ref[p, :] for p in parts]
        k_ok = [kv_ref[p] != 0 for p in parts] if has_kv else None
        s, _, keep = _tile(q, k_parts, q_ok, k_ok, n, prec)
        for pj, kj, part in zip(_kept_probs(s, keep, lse2, scale_log2), k_parts, parts):
            ds = pj * (c.dot_nt(do, v_ref[part, :], prec) - delta[:, None])
            dq = dq + c.dot_nn(ds.astype(kj.dtype), kj, prec)
        return dq

    dq = lax.fori_loop(0, num_k_blocks, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _backward_dkv(q, k, v, qv, kv, do, lse, delta, cfg):
    """The dK/dV kernel: one program per (batch, head, key block), loop over all query blocks."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    rows_full = c.stat_full(lq)
    mspecs, margs = c.mask_specs(qv, kv, None, bk, lq, lk)
    kernel = functools.partial(_dkv_kernel, block_q=bq, num_q_blocks=lq // bq,
                               **_kernel_args(cfg, qv, kv))
    in_specs = [c.row_full(lq, d), c.row_block(bk, d), c.row_block(bk, d), c.row_full(lq, d),
                rows_full, rows_full] + mspecs
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs = [c.row_block(bk, d), c.row_block(bk, d)]
    return c.triton_call(kernel, (b, h, lk // bk), in_specs, out_specs, out_shape, cfg,
                         'nm_sparse_dkv', backward=True)(q, k, v, do, lse, delta, *margs)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, n, m, scale, scale_log2,
                prec, block_q, num_q_blocks, has_qv, has_kv):
    qv_ref, kv_ref, (dk_ref, dv_ref) = c.split_masks(rest, has_qv, has_kv)
    bk, d = k_ref.shape
    g = bk // m
    parts = [pl.ds(j, g, stride=m) for j in range(m)]
    k_parts = [k_ref[p, :] for p in parts]
    v_parts = [v_ref[p, :] for p in parts]
    k_ok = [kv_ref[p] != 0 for p in parts] if has_kv else None

    def body(qb, carry):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(qb * block_q, block_q), block_q)
        q, do, delta = q_ref[rows, :], do_ref[rows, :], delta_ref[rows]
        lse2 = lse_ref[rows] * c.LOG2E
        q_ok = (qv_ref[rows] != 0) if has_qv else None
        s, _, keep = _tile(q, k_parts, q_ok, k_ok, n, prec)
        probs = _kept_probs(s, keep, lse2, scale_log2)
        dk, dv = list(dk), list(dv)
        for j, pj in enumerate(probs):
            dv[j] = dv[j] + c.dot_tn(pj.astype(do.dtype), do, prec)
            ds = pj * (c.dot_nt(do, v_parts[j], prec) - delta[:, None])
            dk[j] = dk[j] + c.dot_tn(ds.astype(q.dtype), q, prec)
        return tuple(dk), tuple(dv)

    zeros = tuple(jnp.zeros((g, d), jnp.float32) for _ in range(m))
    dk, dv = lax.fori_loop(0, num_q_blocks, body, (zeros, zeros))
    for j, part in enumerate(parts):
        dk_ref[part, :] = (dk[j] * scale).astype(dk_ref.dtype)
        dv_ref[part, :] = dv[j].astype(dv_ref.dtype)
