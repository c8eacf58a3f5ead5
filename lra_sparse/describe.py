"""Describe a config without touching data: parameters, per-layer cost (MACs), train-step memory.

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


def train_step_memory(config: ml_collections.ConfigDict) -> dict[str, int] | None:
    """XLA's memory analysis of the compiled train step, in bytes per device.

    Compiles the real train step (the batch abstract: nothing is loaded), so it takes as long as
    the first step of a run does (about a minute for a full-size config on a CPU).

    Returns:
      {'argument_bytes', 'output_bytes', 'temp_bytes', 'generated_code_bytes'}, or None when the
      backend reports no analysis.
    """
    import jax.numpy as jnp  # noqa: PLC0415

    from lra_sparse import train  # noqa: PLC0415  (heavy import, only for this)

    info = data.task_info(config)
    run, state = train.setup_run(config, info)
    shape = (config.batch_size, info.seq_len)
    batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32) for key in info.input_keys}
    batch['targets'] = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    batch['weights'] = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    analysis = run.train_step.lower(run.place(state), batch).compile().memory_analysis()
    if analysis is None:
        return None
    return {'argument_bytes': int(analysis.argument_size_in_bytes),
            'output_bytes': int(analysis.output_size_in_bytes),
            'temp_bytes': int(analysis.temp_size_in_bytes),
            'generated_code_bytes': int(analysis.generated_code_size_in_bytes)}


def table(description: dict) -> str:
    """The description as a compact text table: one row per layer, MACs per column, totals."""
    layers = description['layers']
    keys = list(dict.fromkeys(k for row in layers for k in row['macs'] if _is_mac(k)))
    head = (f"{description['task']} / {description['attention']} "
            f"(impl {description['attention_config'].get('impl')}), {len(layers)} layers, "
            f"{description['num_params']:,} parameters, {description['tokens_per_sequence']} "
            'tokens per sequence; MACs per example')
    columns = ['layer', 'tokens', *keys, 'total']
    rows = [[str(r['layer']), str(r['tokens_in']),
             *[_si(r['macs'].get(k, 0.0)) for k in keys], _si(r['total_macs'])] for r in layers]
    rows.append(['all', '', *[''] * len(keys), _si(description['encoder_macs_per_sequence'])])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = [head, '  '.join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ['  '.join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    reduction = description['mac_reduction']
    lines.append(f"dense: {_si(description['dense_encoder_macs_per_sequence'])} MACs"
                 + (f' ({reduction:.2f}x this method)' if reduction else ''))
    memory = description.get('train_step_memory')
    if memory:
        lines.append('train step, compiled, per device: '
                     + ', '.join(f'{name.removesuffix("_bytes").replace("_", " ")} '
                                 f'{_si(value, "B")}' for name, value in memory.items()))
    return '\n'.join(lines)


def _si(value: float, unit: str = '') -> str:
    """1234567 -> '1.23M' (k, M, G, T)."""
    for scale, prefix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(value) >= scale:
            return f'{value / scale:.2f}{prefix}{unit}'
    return f'{value:.0f}{unit}'
