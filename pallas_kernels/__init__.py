"""Pallas attention kernels for dynamic sparse attention (depends on jax only).

One module per kernel; each holds a frozen ``BlockSizes`` dataclass, the Pallas kernels (forward,
dQ, dK/dV) under a ``jax.custom_vjp``, and a plain-jnp reference with the same signature:

* :mod:`pallas_kernels.block_sparse`: flash attention over per-(batch, head, query-block) lists
  of key blocks computed on device (DSA's block granularity), plus the mask <-> list helpers;
* :mod:`pallas_kernels.nm_sparse`: flash attention with DFSS's N:M (1:2, 2:4) selection applied
  to every score tile in registers.

All take ``[batch, length, heads, head_dim]`` arrays and optional padding masks, lower to
Pallas-Triton on GPU, and run in interpret mode on CPU (automatically; :func:`lowering_platform`
traces them for another platform, e.g. to export for GPU from a CPU machine). ``python -m
pallas_kernels.bench`` measures them; ``python -m pallas_kernels.validate`` checks and measures
them on a GPU in one command (see ``docs/BENCHMARKS.md``).
"""

from pallas_kernels import block_sparse, nm_sparse
from pallas_kernels._common import BlockSizes, lowering_platform, target_platform
from pallas_kernels.block_sparse import (
    block_mask_to_indices,
    block_sparse_attention,
    block_sparse_attention_reference,
    indices_to_block_mask,
)
from pallas_kernels.nm_sparse import NMStats, nm_sparse_attention, nm_sparse_attention_reference

__all__ = [
    'BlockSizes',
    'NMStats',
    'block_mask_to_indices',
    'block_sparse',
    'block_sparse_attention',
    'block_sparse_attention_reference',
    'indices_to_block_mask',
    'lowering_platform',
    'nm_sparse',
    'nm_sparse_attention',
    'nm_sparse_attention_reference',
    'target_platform',
]
