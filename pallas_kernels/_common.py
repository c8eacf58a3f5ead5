"""Pieces shared by the kernels: backend choice, input checks, padding, tile matmuls.

Nothing here is specific to one sparsity pattern. The kernels use three lowerings:

* ``'triton'``: Pallas-Triton on GPU (index tables as whole refs, ``lax.fori_loop`` over them);
* ``'tpu'``: Mosaic TPU (block lists through scalar prefetch), block-sparse kernel only;
* interpret mode of either, which runs the same kernel body with XLA on any backend (CPU tests).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# A large negative finite score for masked entries: finite so max-subtraction never gives NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_BLOCK = 16  # smallest tile side: Triton's tl.dot needs every matmul dimension >= 16
SQ = getattr(pl, 'squeezed', None)  # a squeezed block dimension (None on older jax)
MAX_HEAD_DIM = 256  # widest head the kernels keep in registers (after padding to a power of 2)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and GPU launch parameters (both kernels).

    Attributes:
      block_q: query rows per tile (a power of two >= 16 dividing q_len); for the block-sparse
        kernel also the granularity of the index lists.
      block_k: keys per tile (a power of two >= 16 dividing kv_len; >= 16·M for N:M).
      num_warps: Triton warps per program (None: 4 for head_dim <= 64, else 8).
      num_stages: Triton software-pipelining stages.
    """

    block_q: int = 128
    block_k: int = 128
    num_warps: int | None = None
    num_stages: int = 2

    @classmethod
    def get_default(cls) -> BlockSizes:
        """The default tiles (128 × 128)."""
        return cls()


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static parameters of one kernel call (hashable: a jit static argument)."""

    block_q: int
    block_k: int
    scale: float
    interpret: bool
    num_warps: int
    num_stages: int


def launch_params(block_sizes: BlockSizes, head_dim: int, interpret: bool | None) -> dict:
    """The KernelConfig fields that come from the tiles, the head width and ``interpret``."""
    return dict(block_q=block_sizes.block_q, block_k=block_sizes.block_k,
                interpret=default_interpret() if interpret is None else bool(interpret),
                num_warps=block_sizes.num_warps or (4 if head_dim <= 64 else 8),
                num_stages=block_sizes.num_stages)


def default_interpret() -> bool:
    """True when JAX runs on CPU: Pallas kernels then run in interpret mode."""
    return jax.default_backend() == 'cpu'


def resolve_backend(backend: str | None) -> str:
    """'triton' | 'tpu' for ``backend`` (None: 'tpu' on a TPU backend, else 'triton').

    Raises:
      ValueError: for any other name.
    """
    if backend is None:
        return 'tpu' if jax.default_backend() == 'tpu' else 'triton'
    if backend not in ('triton', 'tpu'):
        raise ValueError(f"backend={backend!r} is not supported: use 'triton', 'tpu' or None.")
    return backend


def triton_params(num_warps: int | None, num_stages: int | None):
    """Pallas-Triton compiler params (selects the Triton lowering on GPU)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def is_power_of_two(x: int) -> bool:
    """True for 1, 2, 4, ..."""
    return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


def next_power_of_two(x: int) -> int:
    """Smallest power of two >= x (x >= 1)."""
    return 1 << max(0, math.ceil(math.log2(x)))


def padded_head_dim(head_dim: int) -> int:
    """Head width the kernels run at: the next power of two, at least 16 (zero padded)."""
    return max(MIN_BLOCK, next_power_of_two(head_dim))


def check_block(name: str, block: int, length: int, length_name: str) -> None:
    """Raises ValueError unless ``block`` is a power of two >= 16 that divides ``length``.

    Args:
      name: the block-size field (for the message).
      block: the block size.
      length: the sequence length it tiles.
      length_name: what ``length`` is (for the message).
    """
    if not (is_power_of_two(block) and block >= MIN_BLOCK):
        raise ValueError(f'{name}={block!r} must be a power of two >= {MIN_BLOCK}.')
    if length % block:
        raise ValueError(f'{length_name}={length} must be a multiple of {name}={block} '
                         '(pad the sequence and mark the padding invalid).')


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, int, int, int, int]:
    """Checks the attention operands.

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, kv_len, heads, head_dim], same dtype as q.

    Returns:
      (batch, q_len, kv_len, heads, head_dim).

    Raises:
      ValueError: naming the offending shape or dtype.
    """
    for name, x in (('q', q), ('k', k), ('v', v)):
        if getattr(x, 'ndim', None) != 4:
            raise ValueError(f'{name} must be [batch, length, heads, head_dim], got shape '
                             f'{getattr(x, "shape", None)}.')
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            raise ValueError(f'{name}.dtype={x.dtype} is not supported: float32, bfloat16 or '
                             'float16.')
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f'q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.')
    b, lq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
        raise ValueError(f'k and v must be [batch={b}, kv_len, heads={h}, head_dim={d}], got '
                         f'k.shape={k.shape}, v.shape={v.shape} (q.shape={q.shape}).')
    if d > MAX_HEAD_DIM:
        raise ValueError(f'head_dim={d} (q.shape={q.shape}) is too wide: at most {MAX_HEAD_DIM}.')
    return b, lq, k.shape[1], h, d


def check_valid(name: str, mask: jax.Array | None, batch: int, length: int) -> None:
    """Raises ValueError unless ``mask`` is None or a bool/int [batch, length] array."""
    if mask is None:
        return
    if getattr(mask, 'shape', None) != (batch, length):
        raise ValueError(f'{name} must be [batch={batch}, length={length}], got shape '
                         f'{getattr(mask, "shape", None)}.')
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise ValueError(f'{name}.dtype={mask.dtype} must be bool or integer.')


def check_call(q: jax.Array, k: jax.Array, v: jax.Array, q_valid: jax.Array | None,
               k_valid: jax.Array | None, block_sizes: BlockSizes
               ) -> tuple[int, int, int, int, int]:
    """The checks every kernel makes before launch: q/k/v, tiles, padding masks.

    Returns:
      (batch, q_len, kv_len, heads, head_dim).

    Raises:
      ValueError: naming the argument, its value and what is allowed.
    """
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f'block_sizes must be a pallas_kernels BlockSizes, got {block_sizes!r}.')
    b, lq, lk, h, d = check_qkv(q, k, v)
    check_block('block_sizes.block_q', block_sizes.block_q, lq, f'q_len (q.shape={q.shape})')
    check_block('block_sizes.block_k', block_sizes.block_k, lk, f'kv_len (k.shape={k.shape})')
    check_valid('q_valid', q_valid, b, lq)
    check_valid('k_valid', k_valid, b, lk)
    return b, lq, lk, h, d


def softmax_scale(head_dim: int, sm_scale: float | None) -> float:
    """1/sqrt(head_dim) unless ``sm_scale`` is given."""
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


# -- Triton-lowering BlockSpecs over the grid (batch, head, block i) ---------------------------
def row_block(rows: int, d: int) -> pl.BlockSpec:
    """[B, L, H, D] array: block ``rows`` of one head at program (b, h, i)."""
    return pl.BlockSpec((SQ, rows, SQ, d), lambda b, h, i: (b, i, h, 0))


def row_full(length: int, d: int) -> pl.BlockSpec:
    """[B, L, H, D] array: the whole sequence of one head."""
    return pl.BlockSpec((SQ, length, SQ, d), lambda b, h, i: (b, 0, h, 0))


def stat_block(rows: int) -> pl.BlockSpec:
    """[B, H, L] per-row statistic: block ``rows`` at program (b, h, i)."""
    return pl.BlockSpec((SQ, SQ, rows), lambda b, h, i: (b, h, i))


def stat_full(length: int) -> pl.BlockSpec:
    """[B, H, L] per-row statistic: the whole row of one head."""
    return pl.BlockSpec((SQ, SQ, length), lambda b, h, i: (b, h, 0))


def mask_specs(qv, kv, q_rows: int | None, k_rows: int | None, q_len: int,
               k_len: int) -> tuple[list, list]:
    """BlockSpecs and arguments of the optional [B, L] padding masks (None masks are left out).

    ``*_rows``: the block each program sees at index i, or None for the whole row.
    """
    specs, args = [], []
    for mask, rows, length in ((qv, q_rows, q_len), (kv, k_rows, k_len)):
        if mask is None:
            continue
        if rows is None:
            specs.append(pl.BlockSpec((SQ, length), lambda b, h, i: (b, 0)))
        else:
            specs.append(pl.BlockSpec((SQ, rows), lambda b, h, i: (b, i)))
        args.append(mask)
    return specs, args


def split_masks(rest, has_qv: bool, has_kv: bool):
    """Kernel refs after the fixed inputs -> (q mask ref | None, k mask ref | None, the rest)."""
    rest = list(rest)
    qv_ref = rest.pop(0) if has_qv else None
    kv_ref = rest.pop(0) if has_kv else None
    return qv_ref, kv_ref, rest


def triton_call(kernel, grid, in_specs, out_specs, out_shape, cfg: KernelConfig, name: str):
    """``pl.pallas_call`` with the launch parameters of ``cfg``."""
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=cfg.interpret, compiler_params=triton_params(cfg.num_warps, cfg.num_stages),
        name=name)


def as_int_mask(mask: jax.Array | None) -> jax.Array | None:
    """bool/int [batch, length] -> int32 (1 valid, 0 padding); None stays None."""
    return None if mask is None else (mask != 0).astype(jnp.int32)


def pad_last(x: jax.Array, size: int) -> jax.Array:
    """Zero-pads the last axis of x to ``size``."""
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def pair_valid(q_valid: jax.Array | None, k_valid: jax.Array | None) -> jax.Array | None:
    """Tile validity from row and column validity.

    Args:
      q_valid: bool [rows] or None; k_valid: bool [cols] or None.

    Returns:
      bool [rows, cols] (or broadcastable to it), or None when both are None.
    """
    if q_valid is None and k_valid is None:
        return None
    if q_valid is None:
        return k_valid[None, :]
    if k_valid is None:
        return q_valid[:, None]
    return q_valid[:, None] & k_valid[None, :]


# -- tile matmuls ----------------------------------------------------------------------------
# float32 accumulation. HIGHEST keeps float32 operands in full precision (IEEE, not TF32, on
# GPU), so a float32 N:M selection matches the float32 reference; 16-bit operands are unaffected.
_DOT = dict(preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """Tile matmul a [m, d] · b [n, d]ᵀ -> float32 [m, n]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), **_DOT)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """Tile matmul a [m, k] · b [k, n] -> float32 [m, n]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), **_DOT)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """Tile matmul a [k, m]ᵀ · b [k, n] -> float32 [m, n]."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), **_DOT)


def finish_rows(acc: jax.Array, m_i: jax.Array, l_i: jax.Array) -> tuple[jax.Array, jax.Array]:
    """End of an online softmax.

    Args:
      acc: float32 [rows, d] unnormalised output; m_i, l_i: float32 [rows] running max and sum.

    Returns:
      (out float32 [rows, d], zero for rows with nothing attended; lse float32 [rows], natural-log
      sum-exp of the attended scaled scores, -inf for such rows).
    """
    live = l_i > 0.0
    safe = jnp.where(live, l_i, 1.0)
    out = jnp.where(live[:, None], acc / safe[:, None], 0.0)
    lse = jnp.where(live, m_i + jnp.log(safe), -jnp.inf)
    return out, lse


def row_delta(o: jax.Array, do: jax.Array) -> jax.Array:
    """Backward preprocessing: rowsum(o · do).

    Args:
      o, do: [batch, length, heads, head_dim].

    Returns:
      float32 [batch, heads, length].
    """
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    return jnp.swapaxes(delta, 1, 2)


def online_update(acc: jax.Array, m_i: jax.Array, l_i: jax.Array, s: jax.Array,
                  valid: jax.Array | None, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step of the online softmax (FlashAttention-2) over a score tile.

    Args:
      acc: float32 [rows, d] unnormalised output so far.
      m_i: float32 [rows] running max (starts at MASK_VALUE).
      l_i: float32 [rows] running sum of exp(s - m_i) over attended entries.
      s: float32 [rows, cols] scaled scores of this tile.
      valid: bool broadcastable to [rows, cols], the entries attended; None = all.
      v: [cols, d] values of this tile.

    Returns:
      Updated (acc, m_i, l_i).
    """
    if valid is not None:
        s = jnp.where(valid, s, MASK_VALUE)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
    alpha = jnp.exp(m_i - m_new)
    p = jnp.exp(s - m_new[:, None])
    if valid is not None:
        p = jnp.where(valid, p, 0.0)
    l_new = alpha * l_i + jnp.sum(p, axis=-1)
    acc = alpha[:, None] * acc + dot_nn(p.astype(v.dtype), v)
    return acc, m_new, l_new


def clamp(x: jax.Array, lo: int, hi: int) -> jax.Array:
    """min(max(x, lo), hi) with ops every lowering has."""
    return jnp.minimum(jnp.maximum(x, lo), hi)
