"""Fake quantization shared by the methods: symmetric linear codes, straight-through gradients.

Values are rounded to ``b``-bit signed integer codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` times a
scale ``max|x| / (2^(b-1) - 1)``; one scale is shared over the ``axes`` given (the other axes get
their own: per token, per head, per output column ...), entries marked invalid never set a scale,
and an all-zero group gets scale 1. The computation stays in float (a simulation of the integer
arithmetic, exact for these code ranges); the gradient passes straight through the rounding
(identity), as in quantization-aware training.

Rounding modes (``rounding``): ``'nearest'`` (half to even, ``jnp.round``) or ``'floor'``
(towards -inf, what dropping the low bits of a two's-complement code does).

Used by DSA (the low-precision prediction path) and SpAtten (quantized Q and K, progressive
MSB + LSB codes).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

ROUNDINGS = ('nearest', 'floor')


def _round(x: jax.Array, rounding: str) -> jax.Array:
    if rounding == 'nearest':
        return jnp.round(x)
    if rounding == 'floor':
        return jnp.floor(x)
    raise ValueError(f'rounding={rounding!r} is not supported: use one of {", ".join(ROUNDINGS)}.')


def max_code(bits: int) -> float:
    """Largest code of a symmetric ``bits``-bit quantizer: 2^(bits-1) - 1 (bits >= 2)."""
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f'bits={bits!r} is not supported: use an integer >= 2.')
    return 2.0 ** (bits - 1) - 1.0


def straight_through(x: jax.Array, q: jax.Array) -> jax.Array:
    """Forward value exactly ``q`` (in x's dtype), gradient identity with respect to ``x``."""
    return (x - jax.lax.stop_gradient(x)) + jax.lax.stop_gradient(q).astype(x.dtype)


def quant_codes(x: jax.Array, bits: int, axes: Sequence[int], *, valid: jax.Array | None = None,
                rounding: str = 'nearest') -> tuple[jax.Array, jax.Array]:
    """Symmetric linear quantization codes and scales (no gradient).

    Args:
      x: float array of any shape.
      bits: bit width b >= 2.
      axes: the axes one scale is shared over (``()``: one scale per entry).
      valid: optional bool, broadcastable to ``x``; invalid entries do not set the scale (they
        are still quantized with it).
      rounding: 'nearest' or 'floor'.

    Returns:
      (codes float32 integers shaped like x, in [-(2^(b-1) - 1), 2^(b-1) - 1]; scale float32
      shaped like x with ``axes`` of size 1): ``scale = max|x| / (2^(b-1) - 1)`` over the group
      (1 for an all-zero group) and ``codes = clip(rounding(x * (2^(b-1) - 1) / max|x|))``.
      ``x * qmax / max|x|`` rather than ``x / scale`` keeps hand-checkable ratios exact (0.5 at
      4 bits is exactly 3.5).
    """
    qmax = max_code(bits)
    xf = jax.lax.stop_gradient(x).astype(jnp.float32)
    magnitude = jnp.abs(xf) if valid is None else jnp.where(valid, jnp.abs(xf), 0.0)
    amax = jnp.max(magnitude, axis=tuple(axes), keepdims=True)
    safe = jnp.where(amax > 0, amax, qmax)
    codes = jnp.clip(_round(xf * qmax / safe, rounding), -qmax, qmax)
    return codes, safe / qmax


def fake_quant(x: jax.Array, bits: int, axes: Sequence[int], *, valid: jax.Array | None = None,
               rounding: str = 'nearest') -> jax.Array:
    """``codes * scale`` of :func:`quant_codes` in x's dtype, straight-through gradient."""
    codes, scale = quant_codes(x, bits, axes, valid=valid, rounding=rounding)
    return straight_through(x, codes * scale)


def drop_low_bits(codes: jax.Array, low_bits: int, rounding: str = 'floor') -> jax.Array:
    """The high part of integer codes: ``rounding(codes / 2^low_bits) * 2^low_bits``.

    With ``'floor'`` this is the value seen when only the most significant bits of a
    two's-complement code are read (an arithmetic shift right, then back left).

    Args:
      codes: float integer codes (e.g. from :func:`quant_codes`).
      low_bits: bits dropped, >= 0.
      rounding: 'floor' or 'nearest'.

    Returns:
      float codes shaped like ``codes``, multiples of 2^low_bits.
    """
    step = 2.0 ** low_bits
    return _round(codes / step, rounding) * step
