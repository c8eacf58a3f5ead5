"""Pieces shared by the kernels: backend choice, input checks, padding, tile matmuls.

Nothing here is specific to one sparsity pattern. The kernels use three lowerings:

* ``'triton'``: Pallas-Triton on GPU (index tables as whole refs, ``lax.fori_loop`` over them);
* ``'tpu'``: Mosaic TPU (block lists through scalar prefetch), block-sparse kernel only;
* interpret mode of either, which runs the same kernel body with XLA on any backend (CPU tests).

Unset ``interpret`` and ``backend`` follow the platform the call is traced for: JAX's default
backend, or the one named by :func:`lowering_platform` (to export for another platform).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator

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


# Backward tiles: at most 64 × 64 by default. Offline Triton compiles for sm_90 show the 128 × 128
# dQ and dK/dV programs spilling registers (four float32 tiles live at once); 64 × 64 tiles with
# the default warps do not (docs/BENCHMARKS.md).
DEFAULT_BWD_BLOCK = 64
WARPS = (1, 2, 4, 8, 16)
LOG2E = math.log2(math.e)  # exp(x) = exp2(x · log2(e)): scores are kept in base-2 units
LN2 = math.log(2.0)
# Dot precision of the kernels: 'default' is the backend's fast float32 matmul (TF32 tensor cores
# on GPU, one bfloat16 pass on TPU, exact on CPU), 'highest' keeps float32 (IEEE on GPU) for
# checks. 16-bit inputs are unaffected.
PRECISIONS = {'default': lax.Precision.DEFAULT, 'highest': lax.Precision.HIGHEST}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and GPU launch parameters (both kernels).

    Attributes:
      block_q: query rows per tile (a power of two >= 16 dividing q_len); for the block-sparse
        kernel also the granularity of the index lists.
      block_k: keys per tile (a power of two >= 16 dividing kv_len; >= 16·M for N:M).
      num_warps: Triton warps per forward program (None: the kernel's default; block-sparse: 8
        when a row of q (head_dim padded to a power of two) is over 128 bytes and block_q >= 64,
        else 4; N:M: 8).
      num_stages: Triton software-pipelining stages of the forward kernel.
      block_q_bwd: query rows per tile of the backward kernels (dQ and dK/dV), a power of two
        in [16, block_q] (None: min(block_q, 64)).
      block_k_bwd: keys per backward tile, a power of two in [16, block_k] (None: min(block_k,
        64); N:M: at least 16·M).
      num_warps_bwd: Triton warps per backward program (None: 8 when a row of q is over 128 bytes
        and the backward tiles have >= 64 rows, else 4).
      num_stages_bwd: Triton pipelining stages of the backward kernels (None: num_stages).
    """

    block_q: int = 128
    block_k: int = 128
    num_warps: int | None = None
    num_stages: int = 2
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None

    @classmethod
    def get_default(cls) -> BlockSizes:
        """The default tiles (128 × 128 forward, 64 × 64 backward)."""
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
    block_q_bwd: int
    block_k_bwd: int
    num_warps_bwd: int
    num_stages_bwd: int
    precision: str  # a key of PRECISIONS

    @property
    def dot_precision(self) -> lax.Precision:
        """The lax precision of the kernels' tile matmuls."""
        return PRECISIONS[self.precision]


def default_warps(head_dim: int, dtype, rows: int) -> int:
    """Triton warps for a tile program of ``rows`` query (or key) rows.

    4 when a row of q is at most 128 bytes or the tile has fewer than 64 rows, else 8. Offline
    sm_90 compiles (docs/BENCHMARKS.md): with head_dim 64, bfloat16 programs fit 4 warps without
    spilling; float32 ones (twice the bytes per row) spill with 4 and not with 8.
    """
    wide = padded_head_dim(head_dim) * jnp.dtype(dtype).itemsize > 128
    return 8 if wide and rows >= 64 else 4


def launch_params(block_sizes: BlockSizes, head_dim: int, dtype, interpret: bool | None,
                  precision: str, *, forward_warps: int | None = None,
                  min_block_k_bwd: int = MIN_BLOCK) -> dict:
    """The KernelConfig fields from the tiles, head width, dtype, ``interpret`` and precision.

    Unset fields of ``block_sizes`` get their defaults: backward tiles min(tile, 64) (keys: at
    least ``min_block_k_bwd``), :func:`default_warps` of the tiles (forward: ``forward_warps``
    when the kernel gives one), backward stages = forward stages.
    """
    bs = block_sizes
    block_q_bwd = bs.block_q_bwd or min(bs.block_q, DEFAULT_BWD_BLOCK)
    block_k_bwd = bs.block_k_bwd or min(bs.block_k, max(DEFAULT_BWD_BLOCK, min_block_k_bwd))
    return dict(
        block_q=bs.block_q, block_k=bs.block_k,
        interpret=default_interpret() if interpret is None else bool(interpret),
        num_warps=bs.num_warps or forward_warps or default_warps(head_dim, dtype, bs.block_q),
        num_stages=bs.num_stages, block_q_bwd=block_q_bwd, block_k_bwd=block_k_bwd,
        num_warps_bwd=bs.num_warps_bwd or default_warps(head_dim, dtype,
                                                        max(block_q_bwd, block_k_bwd)),
        num_stages_bwd=bs.num_stages if bs.num_stages_bwd is None else bs.num_stages_bwd,
        precision=precision)


_PLATFORM_NAMES = {'cpu': 'cpu', 'gpu': 'gpu', 'cuda': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu'}
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    'pallas_kernels_target_platform', default=None)


@contextlib.contextmanager
def lowering_platform(platform: str) -> Iterator[None]:
    """Traces kernel calls for ``platform`` instead of the default backend.

    Inside the block, calls that leave ``interpret`` and ``backend`` unset pick the compiled
    kernels of ``platform``: e.g. to export a model for GPU from a CPU machine::

        with pallas_kernels.lowering_platform('cuda'):
            jax.export.export(jax.jit(step), platforms=['cuda'], disabled_checks=...)(*args)

    Args:
      platform: 'cuda' (or 'gpu', 'rocm'), 'tpu' or 'cpu'.

    Raises:
      ValueError: for any other name.
    """
    if platform not in _PLATFORM_NAMES:
        raise ValueError(f'platform={platform!r} is not supported: one of '
                         f'{", ".join(_PLATFORM_NAMES)}.')
    token = _TARGET_PLATFORM.set(_PLATFORM_NAMES[platform])
    try:
        with _abstract_gpu(_PLATFORM_NAMES[platform]):
            yield
    finally:
        _TARGET_PLATFORM.reset(token)


# The GPU that lowering for 'cuda' without one assumes (jax >= 0.12 asks for a device kind).
ABSTRACT_GPU_KIND = 'NVIDIA H100 80GB HBM3'


def _abstract_gpu(platform: str) -> contextlib.AbstractContextManager:
    """On jax >= 0.12 without a local GPU, an abstract H100 for the Triton lowering to target.

    jax 0.12's Triton lowering reads the GPU's compute capability from the device; on a machine
    without one it needs an abstract device (``jax.sharding.AbstractDevice``). Older jax reads
    nothing and needs none.
    """
    abstract_device = getattr(jax.sharding, 'AbstractDevice', None)
    if platform != 'gpu' or abstract_device is None or jax.default_backend() == 'gpu':
        return contextlib.nullcontext()
    mesh = jax.sharding.AbstractMesh(
        (1,), ('kernel',), axis_types=(jax.sharding.AxisType.Explicit,),
        abstract_device=abstract_device(device_kind=ABSTRACT_GPU_KIND, num_cores=None,
                                        platform='gpu'))
    return jax.sharding.use_abstract_mesh(mesh)


def target_platform() -> str:
    """'cpu' | 'gpu' | 'tpu': the platform set by :func:`lowering_platform`, else JAX's default."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


def default_interpret() -> bool:
    """True when the target platform is the CPU: Pallas kernels then run in interpret mode."""
    return target_platform() == 'cpu'


def resolve_backend(backend: str | None) -> str:
    """'triton' | 'tpu' for ``backend`` (None: 'tpu' when targeting a TPU, else 'triton').

    Raises:
      ValueError: for any other name.
    """
    if backend is None:
        return 'tpu' if target_platform() == 'tpu' else 'triton'
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


def check_launch(block_sizes: BlockSizes) -> None:
    """Raises ValueError for backward tiles, warps or stages a kernel cannot use."""
    bs = block_sizes
    for name, block, outer in (('block_q_bwd', bs.block_q_bwd, 'block_q'),
                               ('block_k_bwd', bs.block_k_bwd, 'block_k')):
        limit = getattr(bs, outer)
        if block is not None and not (is_power_of_two(block) and MIN_BLOCK <= block <= limit):
            raise ValueError(f'block_sizes.{name}={block!r} must be a power of two in '
                             f'[{MIN_BLOCK}, block_sizes.{outer}={limit}].')
    for name in ('num_warps', 'num_warps_bwd'):
        warps = getattr(bs, name)
        if warps is not None and warps not in WARPS:
            raise ValueError(f'block_sizes.{name}={warps!r} must be one of {WARPS} or None.')
    for name in ('num_stages', 'num_stages_bwd'):
        stages = getattr(bs, name)
        if stages is not None and not (isinstance(stages, int) and stages >= 1):
            raise ValueError(f'block_sizes.{name}={stages!r} must be an integer >= 1'
                             f'{" or None" if name.endswith("bwd") else ""}.')


def check_precision(precision: str) -> None:
    """Raises ValueError unless ``precision`` is a key of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported: 'default' (TF32 on GPU for "
                         "float32 inputs) or 'highest' (IEEE float32).")


def check_call(q: jax.Array, k: jax.Array, v: jax.Array, q_valid: jax.Array | None,
               k_valid: jax.Array | None, block_sizes: BlockSizes, precision: str = 'default'
               ) -> tuple[int, int, int, int, int]:
    """The checks every kernel makes before launch: q/k/v, tiles, launch, masks, precision.

    Returns:
      (batch, q_len, kv_len, heads, head_dim).

    Raises:
      ValueError: naming the argument, its value and what is allowed.
    """
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f'block_sizes must be a pallas_kernels BlockSizes, got {block_sizes!r}.')
    check_precision(precision)
    b, lq, lk, h, d = check_qkv(q, k, v)
    check_block('block_sizes.block_q', block_sizes.block_q, lq, f'q_len (q.shape={q.shape})')
    check_block('block_sizes.block_k', block_sizes.block_k, lk, f'kv_len (k.shape={k.shape})')
    check_launch(block_sizes)
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


def triton_call(kernel, grid, in_specs, out_specs, out_shape, cfg: KernelConfig, name: str,
                backward: bool = False):
    """``pl.pallas_call`` with the forward (or ``backward``) launch parameters of ``cfg``."""
    warps, stages = ((cfg.num_warps_bwd, cfg.num_stages_bwd) if backward
                     else (cfg.num_warps, cfg.num_stages))
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=cfg.interpret, compiler_params=triton_params(warps, stages), name=name)


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
# float32 accumulation at the given precision (see PRECISIONS).
def dot_nt(a: jax.Array, b: jax.Array, precision: lax.Precision) -> jax.Array:
    """Tile matmul a [m, d] · b [n, d]ᵀ -> float32 [m, n]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array, precision: lax.Precision) -> jax.Array:
    """Tile matmul a [m, k] · b [k, n] -> float32 [m, n]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array, precision: lax.Precision) -> jax.Array:
    """Tile matmul a [k, m]ᵀ · b [k, n] -> float32 [m, n]."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def finish_rows(acc: jax.Array, m_i: jax.Array, l_i: jax.Array) -> tuple[jax.Array, jax.Array]:
    """End of an online softmax kept in base-2 units.

    Args:
      acc: float32 [rows, d] unnormalised output; m_i float32 [rows] running max of the base-2
        scores (scaled scores · log2(e)); l_i float32 [rows] running sum of exp2(score - m_i).

    Returns:
      (out float32 [rows, d], zero for rows with nothing attended; lse float32 [rows], natural-log
      sum-exp of the attended scaled scores, -inf for such rows).
    """
    live = l_i > 0.0
    safe = jnp.where(live, l_i, 1.0)
    out = jnp.where(live[:, None], acc / safe[:, None], 0.0)
    lse = jnp.where(live, (m_i + jnp.log2(safe)) * LN2, -jnp.inf)
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
                  valid: jax.Array | None, v: jax.Array, precision: lax.Precision
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step of the online softmax (FlashAttention-2) over a score tile, in base 2.

    Args:
      acc: float32 [rows, d] unnormalised output so far.
      m_i: float32 [rows] running max (starts at MASK_VALUE).
      l_i: float32 [rows] running sum of exp2(s - m_i) over attended entries.
      s: float32 [rows, cols] base-2 scores of this tile (raw scores · scale · log2(e)).
      valid: bool broadcastable to [rows, cols], the entries attended; None = all.
      v: [cols, d] values of this tile.
      precision: of the PV matmul.

    Returns:
      Updated (acc, m_i, l_i).
    """
    if valid is not None:
        s = jnp.where(valid, s, MASK_VALUE)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if valid is not None:
        p = jnp.where(valid, p, 0.0)
    l_new = alpha * l_i + jnp.sum(p, axis=-1)
    acc = alpha[:, None] * acc + dot_nn(p.astype(v.dtype), v, precision)
    return acc, m_new, l_new


def clamp(x: jax.Array, lo: int, hi: int) -> jax.Array:
    """min(max(x, lo), hi) with ops every lowering has."""
    return jnp.minimum(jnp.maximum(x, lo), hi)
