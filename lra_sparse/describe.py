"""Describe a config without touching data: parameter count and per-layer attention cost (MACs).

MACs are multiply-accumulates for ONE example (one document for retrieval, where the dual encoder
runs twice). Each attention method supplies its own per-layer count through its registry entry; a
method that removes tokens (SpAtten) returns the number of tokens leaving the layer, so the
reduction of the whole model follows from chaining the layers.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx

from lra_sparse import attention as attention_lib
from lra_sparse import config_lib, data
from lra_sparse.attention import base
from lra_sparse.models import transformer


def num_params(config: ml_collections.ConfigDict, info) -> int:
    """Trainable parameter count, from abstract shapes (no allocation)."""
    abstract = nnx.eval_shape(lambda: transformer.build_model(config, info))
    params = nnx.state(abstract, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def layer_costs(config: ml_collections.ConfigDict, method: base.AttentionMethod,
                seq_len: int) -> list[dict]:
    """Per-layer MACs of ``method`` for one example entering with ``seq_len`` tokens."""
    m = config.model
    rows = []
    for i in range(m.num_layers):
        dims = base.AttentionDims(emb_dim=m.emb_dim, qkv_dim=m.qkv_dim, num_heads=m.num_heads,
                                  max_len=seq_len, layer_index=i, num_layers=m.num_layers,
                                  attention_dropout_rate=m.attention_dropout_rate, dtype=m.dtype)
        macs, next_len = method.macs(dims, config.attention, seq_len, m.mlp_dim)
        rows.append({'layer': i, 'tokens_in': seq_len, 'macs': macs,
                     'total_macs': float(sum(v for k, v in macs.items() if _is_mac(k)))})
        seq_len = next_len
    return rows


def _is_mac(key: str) -> bool:
    """Cost dicts may carry non-MAC annotations (e.g. bit widths); those are not summed."""
    return not key.endswith('_bits')


def describe(config: ml_collections.ConfigDict) -> dict:
    """JSON-ready description: params, per-layer MACs of the method and of dense, the reduction."""
    config_lib.validate(config)
    info = data.task_info(config)
    seq_len = info.seq_len + int(not info.pair_inputs and config.model.pooling == 'CLS')
    method = attention_lib.get_method(config.attention.name)
    layers = layer_costs(config, method, seq_len)
    dense_layers = layer_costs(config, attention_lib.get_method('dense'), seq_len)
    total = sum(r['total_macs'] for r in layers)
    dense_total = sum(r['total_macs'] for r in dense_layers)
    return {
        'task': config.task, 'attention': config.attention.name,
        'attention_config': config.attention.to_dict(),
        'num_params': num_params(config, info),
        'task_info': {'num_classes': info.num_classes, 'seq_len': info.seq_len,
                      'vocab_size': info.vocab_size, 'pair_inputs': info.pair_inputs},
        'tokens_per_sequence': seq_len,
        'layers': layers,
        'encoder_macs_per_sequence': total,
        'dense_encoder_macs_per_sequence': dense_total,
        'mac_reduction': dense_total / total if total else None,
    }
