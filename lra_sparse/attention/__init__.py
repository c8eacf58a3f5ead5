"""Attention registry: ``config.attention.name`` -> :class:`base.AttentionMethod`.

A new method is one file in this package exporting ``METHOD`` plus one line in ``_MODULES``; the
conformance and smoke tests walk :data:`REGISTRY` and pick it up. How a method runs
(``config.attention.impl``) is an entry of the table its layer class declares
(:class:`base.Implementation`); :func:`implementation_used` says what actually runs.
"""

from __future__ import annotations

import importlib
import types

import ml_collections

from lra_sparse.attention.base import (
    Attention,
    AttentionDims,
    AttentionMethod,
    AttentionOutput,
    ConfigError,
    Implementation,
    LayerCarry,
)

# Order = the order methods appear in tables and plots.
_MODULES = ('dense', 'dsa', 'spatten', 'dfss', 'cta')

REGISTRY: types.MappingProxyType[str, AttentionMethod] = types.MappingProxyType({
    name: importlib.import_module(f'lra_sparse.attention.{name}').METHOD for name in _MODULES
})


def get_method(name: str) -> AttentionMethod:
    """Registry lookup with an error that lists the registered names."""
    if name not in REGISTRY:
        raise ConfigError(
            f'config.attention.name={name!r} is not allowed: registered methods are '
            f'{", ".join(REGISTRY)}.')
    return REGISTRY[name]


def implementation_used(attention: ml_collections.ConfigDict) -> str:
    """The implementation that runs ``config.attention`` on this backend, for a run's results.

    Args:
      attention: ``config.attention`` (validated).

    Returns:
      'reference', 'xla', 'pallas' (compiled kernel) or 'pallas (interpret)' (a kernel in
      interpret mode, on CPU); with ``apply='eval_only'`` followed by ', training: dense
      reference' (training runs dense attention through the reference path).
    """
    used = get_method(attention.name).impls[attention.impl].used()
    if attention.get('apply', 'train_and_eval') == 'eval_only':
        used += ', training: dense reference'
    return used


__all__ = ['REGISTRY', 'get_method', 'implementation_used', 'Attention', 'AttentionDims',
           'AttentionMethod', 'AttentionOutput', 'ConfigError', 'Implementation', 'LayerCarry']
