"""Attention registry: ``config.attention.name`` -> :class:`base.AttentionMethod`.

A new method is one file in this package exporting ``METHOD`` plus one line in ``_MODULES``; the
conformance and smoke tests walk :data:`REGISTRY` and pick it up.
"""

from __future__ import annotations

import importlib
import types

from lra_sparse.attention.base import (
    Attention,
    AttentionDims,
    AttentionMethod,
    AttentionOutput,
    ConfigError,
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


__all__ = ['REGISTRY', 'get_method', 'Attention', 'AttentionDims', 'AttentionMethod',
           'AttentionOutput', 'ConfigError', 'LayerCarry']
