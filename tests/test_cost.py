"""The cost formulas against XLA's own count of what runs.

For every registered method × implementation, at three shapes: the formula's attention ops
(``cost.LayerCost.attention``) against XLA's count of the layer's deterministic forward (its
output and its statistics, what evaluation runs) minus the projections, within
``ATTENTION_TOLERANCE``; and the encoder's total (:func:`cost.encoder_ops`) against XLA's count of
the encoder's forward, within ``MODEL_TOLERANCE``. XLA's count is corrected for the two conventions
``lra_sparse.attention.cost`` documents (sorts along their axis, top-k as a selection).

Kernel implementations run the Pallas interpreter, a loop whose body XLA counts once; their
methods check the kernel's count in their own tests and are left out here (``KERNEL_NOTE``).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lra_sparse import attention, config_lib
from lra_sparse.attention import base, cost
from lra_sparse.models import transformer

ATTENTION_TOLERANCE = 0.15
MODEL_TOLERANCE = 0.05
E, H, MLP = 64, 4, 128
SHAPES = (64, 128, 256)  # sequence lengths, one example
# Settings an (method, impl) needs at these shapes.
IMPL_SETTINGS = {('dsa', 'pallas'): {'granularity': 'block', 'block_q': 64, 'block_k': 64}}
KERNEL_NOTE = 'kernels run as an interpreter loop XLA counts once; checked in the method tests'

CASES = [(name, impl) for name, method in attention.REGISTRY.items() for impl in method.impls]


# -- XLA's count, with cost.py's conventions for sorts and top-k -------------------------------
_SHAPE = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = \(?\w+\[([\d,]*)\]')
_SORT = re.compile(r'\) sort\(|\]\{[\d,]*\} sort\(|\] sort\(')
_DIMENSIONS = re.compile(r'dimensions=\{(\d+)\}')
_OPERAND = re.compile(r'custom-call\(%?([\w.\-]+)\)')


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(',') if d]


def hlo_corrections(hlo: str) -> float:
    """Ops to add to XLA's count so sorts and top-k follow ``cost.sort`` / ``cost.top_k``.

    XLA counts a sort as ``N * ceil(log2 N)`` over all N entries and a CPU top-k custom call as
    -1; both are replaced by the cost model's counts along the sorted axis.
    """
    shapes = {}
    for line in hlo.splitlines():
        match = _SHAPE.match(line)
        if match:
            shapes[match.group(1)] = _dims(match.group(2))
    correction = 0.0
    for line in hlo.splitlines():
        match = _SHAPE.match(line)
        if not match:
            continue
        dims = _dims(match.group(2))
        if _SORT.search(line) and 'to_apply' in line:
            n = int(np.prod(dims))
            axis = int(_DIMENSIONS.search(line).group(1))
            correction -= n * math.ceil(math.log2(n)) if n > 1 else 0
            correction += cost.sort(n // dims[axis], dims[axis])
        elif 'custom_call_target="TopK"' in line:
            operand = shapes[_OPERAND.search(line).group(1)]
            rows, k = dims
            correction += 1 + cost.top_k(rows, operand[-1], k)
    return correction


def xla_ops(fn, *args) -> float:
    """flops + transcendentals of the compiled ``fn(*args)``, with :func:`hlo_corrections`."""
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    total = analysis.get('flops', 0.0) + analysis.get('transcendentals', 0.0)
    return total + hlo_corrections(compiled.as_text())


def test_corrections_count_sorts_and_top_k_along_their_axis():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 96)), jnp.float32)
    plain = xla_ops(lambda a: a * 2.0, x)
    assert xla_ops(lambda a: jnp.sort(a, axis=-1) * 2.0, x) == pytest.approx(
        plain + cost.sort(15, 96))
    assert xla_ops(lambda a: jnp.sort(a, axis=1) * 2.0, x) == pytest.approx(
        plain + cost.sort(3 * 96, 5))
    top = xla_ops(lambda a: jax.lax.top_k(a, 7)[0], x)
    assert top == pytest.approx(cost.top_k(15, 96, 7), abs=64)  # plus reshapes, if any


def test_unit_counts_match_xla():
    """The per-element constants of cost.py are what XLA counts."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 256)), jnp.float32)
    assert xla_ops(lambda a: jax.nn.softmax(a, axis=-1), x) == pytest.approx(
        cost.softmax(64, 256), rel=0.02)
    assert xla_ops(lambda a, b: a @ b, x, x.T) == cost.matmul(64, 256, 64)
    norm = nnx.LayerNorm(256, epsilon=1e-6, rngs=nnx.Rngs(0))
    graph, state = nnx.split(norm)
    counted = xla_ops(lambda s, a: nnx.merge(graph, s)(a), state, x)
    assert counted == pytest.approx(cost.elementwise(x.size, cost.LAYER_NORM_OPS), rel=0.02)
    gelu = xla_ops(lambda a: jax.nn.gelu(a + 1.0, approximate=True), x)
    assert gelu == cost.elementwise(x.size, cost.GELU_OPS + 1)  # the add, then the GELU


# -- layers ----------------------------------------------------------------------------------
def build_layer(name: str, impl: str, seq_len: int):
    cfg = config_lib.attention_config(name, impl, 'train_and_eval')
    cfg.update(IMPL_SETTINGS.get((name, impl), {}))
    dims = base.AttentionDims(emb_dim=E, qkv_dim=E, num_heads=H, max_len=seq_len, layer_index=0,
                              num_layers=2)
    frozen = ml_collections.FrozenConfigDict(cfg)
    layer = attention.get_method(name).module(dims, frozen, rngs=nnx.Rngs(params=0))
    return layer, dims, frozen


def layer_forward_ops(layer, seq_len: int) -> float:
    """XLA's count of one example's deterministic forward: the output and the statistics."""
    graph, state = nnx.split(layer)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, seq_len, E)), jnp.float32)
    mask = jnp.ones((1, seq_len), bool)
    carry = base.LayerCarry(positions=jnp.arange(seq_len, dtype=jnp.int32)[None])

    def forward(state, x, mask):
        out = nnx.merge(graph, state)(x, mask, carry, deterministic=True)
        return out.y, out.stats

    return xla_ops(forward, state, x, mask)


def projection_ops(layer_cost: cost.LayerCost) -> float:
    ops = cost.layer_ops(layer_cost, E, MLP)
    return ops['qkv_proj'] + ops['out_proj']


@pytest.mark.parametrize('seq_len', SHAPES)
@pytest.mark.parametrize('name,impl', CASES)
def test_attention_formula_matches_xla(name, impl, seq_len):
    method = attention.get_method(name)
    if method.impls[impl].kernel:
        pytest.skip(KERNEL_NOTE)
    layer, dims, cfg = build_layer(name, impl, seq_len)
    layer_cost = method.layer_cost(dims, cfg, seq_len)
    counted = layer_forward_ops(layer, seq_len) - projection_ops(layer_cost)
    assert layer_cost.attention_ops == pytest.approx(counted, rel=ATTENTION_TOLERANCE), (
        f'{name}/{impl} at L={seq_len}: formula {dict(layer_cost.attention)}, XLA {counted:.0f}')


# -- the encoder ----------------------------------------------------------------------------
def model_config(name: str, impl: str) -> ml_collections.ConfigDict:
    config = config_lib.load(f'configs/listops.py:attention={name},impl={impl},tiny')
    config.model.update(emb_dim=E, qkv_dim=E, num_heads=H, mlp_dim=MLP, num_layers=2,
                        attention_dropout_rate=0.0)
    config.attention.update(IMPL_SETTINGS.get((name, impl), {}))
    return config


@pytest.mark.parametrize('seq_len', SHAPES[1:])
@pytest.mark.parametrize('name,impl', CASES)
def test_encoder_formula_matches_xla(name, impl, seq_len):
    method = attention.get_method(name)
    if method.impls[impl].kernel:
        pytest.skip(KERNEL_NOTE)
    config = model_config(name, impl)
    encoder = transformer.Encoder(config, vocab_size=20, seq_len=seq_len, use_cls=False,
                                  rngs=nnx.Rngs(params=0))
    graph, state = nnx.split(encoder)
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, 20, size=(1, seq_len)), jnp.int32)

    def forward(state, tokens):
        encoded, _, aux = nnx.merge(graph, state)(tokens, deterministic=True)
        return encoded, aux['stats']

    dims = [block.attention.dims for block in encoder.blocks]
    formula = cost.encoder_ops(method.chain_costs(dims, config.attention, seq_len), E, MLP)
    assert formula == pytest.approx(xla_ops(forward, state, tokens), rel=MODEL_TOLERANCE)


# -- the logged ratios -----------------------------------------------------------------------
def test_dense_costs_one_and_keeps_everything():
    config = model_config('dense', 'reference')
    encoder = transformer.Encoder(config, vocab_size=20, seq_len=64, use_cls=True,
                                  rngs=nnx.Rngs(params=0))
    tokens = jnp.asarray(np.random.default_rng(4).integers(1, 20, size=(2, 64)), jnp.int32)
    tokens = tokens.at[1, 40:].set(0)  # padding does not change the counted costs
    _, _, aux = encoder(tokens)
    stats = {k: float(v) for k, v in aux['stats'].items()}
    assert stats['kept_fraction'] == 1.0 and stats['sparsity'] == 0.0
    assert stats['attention_cost'] == pytest.approx(1.0)
    assert stats['model_cost'] == pytest.approx(1.0)
    assert stats['layer1/attention_cost'] == pytest.approx(1.0)


def test_eval_only_training_costs_dense():
    config = model_config('dsa', 'reference')
    config.attention.apply = 'eval_only'
    encoder = transformer.Encoder(config, vocab_size=20, seq_len=64, use_cls=False,
                                  rngs=nnx.Rngs(params=0))
    assert encoder.cost_ratios(64, deterministic=False)['model_cost'] == pytest.approx(1.0)
    assert encoder.cost_ratios(64, deterministic=True)['attention_cost'] != pytest.approx(1.0)


def test_ratios_are_totals_over_layers():
    layers = [cost.dense_layer_cost(base.AttentionDims(E, E, H, 64), 64)] * 2
    half = cost.LayerCost(attention={'scores': layers[0].attention_ops / 2}, tokens=64,
                          qkv_width=E, query_rows=64, kv_rows=64, out_rows=64, ffn_tokens=64,
                          tokens_out=64)
    ratios = cost.cost_ratios([layers[0], half], layers, E, MLP)
    assert ratios['layer0/attention_cost'] == 1.0 and ratios['layer1/attention_cost'] == 0.5
    assert ratios['attention_cost'] == pytest.approx(0.75)
    saved = layers[0].attention_ops / 2
    dense_total = cost.encoder_ops(layers, E, MLP)
    assert ratios['model_cost'] == pytest.approx((dense_total - saved) / dense_total)
