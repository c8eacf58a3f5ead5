"""Describe a config without touching data: parameters, per-layer cost, train-step memory.

Costs are the cost model's (:mod:`lra_sparse.attention.cost`): operations in XLA's units (a
multiply-accumulate is 2) that the configured method and implementation execute for ONE example
(one document for retrieval, where the dual encoder runs twice), per layer and in total, beside
dense attention on the same input: ``attention_cost`` (attention ops / dense attention ops) and
``model_cost`` (encoder ops / dense encoder ops) are the ratios every run logs.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx

from lra_sparse import attention as attention_lib
from lra_sparse import config_lib, data
from lra_sparse.attention import base, cost
from lra_sparse.models import transformer


def num_params(config: ml_collections.ConfigDict, info) -> int:
    """Trainable parameter count, from abstract shapes (no allocation)."""
    abstract = nnx.eval_shape(lambda: transformer.build_model(config, info))
    params = nnx.state(abstract, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def layer_dims(config: ml_collections.ConfigDict, seq_len: int) -> list[base.AttentionDims]:
    """The AttentionDims of every layer, as the encoder builds them."""
    m = config.model
    return [base.AttentionDims(emb_dim=m.emb_dim, qkv_dim=m.qkv_dim, num_heads=m.num_heads,
                               max_len=seq_len, layer_index=i, num_layers=m.num_layers,
                               attention_dropout_rate=m.attention_dropout_rate, dtype=m.dtype,
                               fully_masked_rows=m.fully_masked_rows)
            for i in range(m.num_layers)]


def layer_rows(config: ml_collections.ConfigDict, seq_len: int) -> tuple[list[dict], dict]:
    """Per-layer costs of the configured method and the logged ratios.

    Args:
      config: a validated config.
      seq_len: tokens entering the encoder (CLS included).

    Returns:
      (rows, ratios): one row per layer {'layer', 'tokens_in', 'tokens_out', 'attention'
      ({component: ops}), 'ops' ({part: ops}, :func:`cost.layer_ops`), 'total_ops',
      'dense_total_ops', 'attention_cost'}, and :func:`cost.cost_ratios`.
    """
    m = config.model
    dims = layer_dims(config, seq_len)
    method = attention_lib.get_method(config.attention.name).chain_costs(
        dims, config.attention, seq_len)
    dense = attention_lib.get_method('dense').chain_costs(
        dims, ml_collections.ConfigDict({'impl': 'reference'}), seq_len)
    ratios = cost.cost_ratios(method, dense, m.emb_dim, m.mlp_dim)
    rows = []
    for i, (layer, dense_layer) in enumerate(zip(method, dense)):
        ops = cost.layer_ops(layer, m.emb_dim, m.mlp_dim)
        rows.append({
            'layer': i, 'tokens_in': layer.tokens, 'tokens_out': layer.tokens_out,
            'attention': dict(layer.attention), 'ops': ops, 'total_ops': sum(ops.values()),
            'dense_total_ops': sum(cost.layer_ops(dense_layer, m.emb_dim, m.mlp_dim).values()),
            'attention_cost': ratios[f'layer{i}/attention_cost']})
    ratios['encoder_ops'] = cost.encoder_ops(method, m.emb_dim, m.mlp_dim)
    ratios['dense_encoder_ops'] = cost.encoder_ops(dense, m.emb_dim, m.mlp_dim)
    return rows, ratios


def describe(config: ml_collections.ConfigDict) -> dict:
    """JSON-ready description: params, per-layer ops of the method, its costs against dense."""
    config_lib.validate(config)
    info = data.task_info(config)
    seq_len = info.seq_len + int(not info.pair_inputs and config.model.pooling == 'CLS')
    rows, ratios = layer_rows(config, seq_len)
    return {
        'task': config.task, 'attention': config.attention.name,
        'attention_config': config.attention.to_dict(),
        'implementation': attention_lib.implementation_used(config.attention),
        'num_params': num_params(config, info),
        'task_info': {'num_classes': info.num_classes, 'seq_len': info.seq_len,
                      'vocab_size': info.vocab_size, 'pair_inputs': info.pair_inputs},
        'tokens_per_sequence': seq_len,
        'layers': rows,
        'encoder_ops_per_sequence': ratios['encoder_ops'],
        'dense_encoder_ops_per_sequence': ratios['dense_encoder_ops'],
        'attention_cost': ratios['attention_cost'],
        'model_cost': ratios['model_cost'],
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
    """The description as a compact text table: one row per layer, ops per column, the ratios."""
    layers = description['layers']
    components = list(dict.fromkeys(k for row in layers for k in row['attention']))
    parts = ['qkv_proj', 'out_proj', 'ffn', 'norms_residuals']
    head = (f"{description['task']} / {description['attention']} "
            f"(impl {description['implementation']}), {len(layers)} layers, "
            f"{description['num_params']:,} parameters, {description['tokens_per_sequence']} "
            'tokens per sequence; ops per example (a multiply-accumulate is 2)')
    columns = ['layer', 'tokens', *components, 'attention', *parts, 'total', 'attention_cost']
    rows = [[str(r['layer']), str(r['tokens_in']),
             *[_si(r['attention'].get(k, 0.0)) for k in components], _si(r['ops']['attention']),
             *[_si(r['ops'][k]) for k in parts], _si(r['total_ops']), f"{r['attention_cost']:.3f}"]
            for r in layers]
    rows.append(['all', '', *[''] * (len(components) + 1 + len(parts)),
                 _si(description['encoder_ops_per_sequence']),
                 f"{description['attention_cost']:.3f}"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = [head, '  '.join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ['  '.join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    lines.append(f"dense: {_si(description['dense_encoder_ops_per_sequence'])} ops; "
                 f"attention_cost {description['attention_cost']:.3f}, "
                 f"model_cost {description['model_cost']:.3f} (this method / dense)")
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
