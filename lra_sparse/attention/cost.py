"""Operation counts of attention layers and the encoder: the one cost model of every method.

Unit: one *op* is one flop or one transcendental as XLA counts them (``HloCostAnalysis``:
``compiled.cost_analysis()['flops'] + ['transcendentals']``): a multiply-accumulate is 2 ops, an
elementwise add, compare or select 1, an ``exp`` 1 flop-free transcendental. Every count is for
ONE example at the configured (padded) length with every token valid, and covers what the
deterministic forward pass runs (what evaluation runs): the layer's output and its statistics.
Training-only work (auxiliary losses, dropout) and the backward pass are not counted.

Two conventions differ from XLA's own bookkeeping, because XLA's would not measure the work:

* a sort of ``rows`` rows of ``cols`` entries along the last axis counts
  ``rows * cols * ceil(log2 cols)`` comparisons (XLA counts ``N * ceil(log2 N)`` over all ``N``
  entries of the array, whatever the axis and the batch);
* a top-k of ``rows`` rows of ``cols`` entries counts ``rows * cols * ceil(log2 k)`` (a partial
  selection; XLA's CPU top-k is a custom call it counts as -1).

``tests/test_cost.py`` checks every method × implementation against XLA's count of the layer and
of the encoder with exactly these two corrections applied to XLA's side.

A method's registry entry states what its chosen implementation executes as a :class:`LayerCost`:
attention components by name ('predictor', 'selection', 'scores', 'softmax', 'values', ...) plus
the rows and widths of its projections and the tokens its feed-forward sees when they differ from
dense (head pruning, token pruning). The encoder turns layer costs into totals
(:func:`layer_ops`, :func:`encoder_ops`), and the two ratios every run logs:

* ``attention_cost`` = attention ops / the ops of dense attention (:func:`dense_attention`) over
  the tokens that entered the encoder, per layer and summed over layers;
* ``model_cost`` = the encoder's forward ops (embedding, every layer's projections, attention,
  feed-forward, norms and residuals, final norm) / the dense encoder's. The classifier head, the
  same for every method and under 0.1% of a text model, is left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

# Ops per element XLA counts (jax 0.10, checked in tests/test_cost.py).
SOFTMAX_OPS = 5  # max, subtract, exp (a transcendental), sum, divide
LAYER_NORM_OPS = 7  # mean, centre, square, mean, rsqrt (per row), scale, bias
GELU_OPS = 9  # tanh approximation: 8 flops and one tanh (a transcendental)


def matmul(m: int, k: int, n: int, batch: int = 1) -> float:
    """Ops of ``batch`` products of an [m, k] and a [k, n] matrix (2 per multiply-accumulate)."""
    return 2.0 * batch * m * k * n


def elementwise(count: int, ops_per_element: float = 1.0) -> float:
    """Ops of an elementwise pass over ``count`` entries (a scale, a select, a compare, ...)."""
    return float(count) * ops_per_element


def softmax(rows: int, cols: int) -> float:
    """Ops of a softmax over ``rows`` rows of ``cols`` entries."""
    return float(SOFTMAX_OPS * rows * cols)


def sort(rows: int, cols: int) -> float:
    """Comparisons of sorting ``rows`` rows of ``cols`` entries along the row."""
    return float(rows * cols * max(1, math.ceil(math.log2(max(cols, 2)))))


def top_k(rows: int, cols: int, k: int) -> float:
    """Comparisons of selecting the ``k`` largest of each of ``rows`` rows of ``cols`` entries."""
    return float(rows * cols * max(1, math.ceil(math.log2(max(k, 2)))))


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """What one attention layer executes for one example (see the module docstring).

    Attributes:
      attention: {component: ops} of the attention proper (projections excluded).
      tokens: tokens entering the layer.
      qkv_width: Q/K/V width projected (num_heads * head_dim; less when heads are pruned).
      query_rows: rows projected to queries.
      kv_rows: rows projected to keys and to values.
      out_rows: rows through the output projection.
      ffn_tokens: tokens through the layer's feed-forward (fewer when tokens are pruned first).
      tokens_out: tokens leaving the layer (the next layer's ``tokens``).
    """

    attention: Mapping[str, float]
    tokens: int
    qkv_width: int
    query_rows: int
    kv_rows: int
    out_rows: int
    ffn_tokens: int
    tokens_out: int

    @property
    def attention_ops(self) -> float:
        """Sum of the attention components."""
        return float(sum(self.attention.values()))


def dense_attention(num_heads: int, head_dim: int, seq_len: int,
                    impl: str = 'reference') -> dict[str, float]:
    """{component: ops} of dense softmax attention over ``seq_len`` tokens.

    'reference' is the explicit path of ``base.masked_attention``: scores, the 1/sqrt(d) scale,
    the padding select before and after the softmax (and the [L, L] pair mask shared by the
    heads), the softmax, AV. 'xla' (``jax.nn.dot_product_attention``) selects once.
    """
    rows = num_heads * seq_len
    pairs = rows * seq_len
    selects = 2 if impl == 'reference' else 1
    return {
        'scores': matmul(seq_len, head_dim, seq_len, batch=num_heads),
        'masking': elementwise(pairs, selects) + elementwise(seq_len * seq_len),
        'softmax': elementwise(pairs) + softmax(rows, seq_len),
        'values': matmul(seq_len, seq_len, head_dim, batch=num_heads),
    }


def dense_layer_cost(dims, seq_len: int, impl: str = 'reference') -> LayerCost:
    """The :class:`LayerCost` of dense attention (``dims``: ``base.AttentionDims``)."""
    return LayerCost(
        attention=dense_attention(dims.num_heads, dims.head_dim, seq_len, impl),
        tokens=seq_len, qkv_width=dims.qkv_dim, query_rows=seq_len, kv_rows=seq_len,
        out_rows=seq_len, ffn_tokens=seq_len, tokens_out=seq_len)


def layer_ops(layer: LayerCost, emb_dim: int, mlp_dim: int) -> dict[str, float]:
    """{part: ops} of one encoder block for one example.

    Parts: 'attention' (the layer's components summed), 'qkv_proj', 'out_proj', 'ffn' (two
    matmuls, their bias adds and the GELU), 'norms_residuals' (the two pre-norms and the two
    residual adds; the second norm and residual over the feed-forward's tokens).
    """
    e, d, f = emb_dim, layer.qkv_width, layer.ffn_tokens
    return {
        'attention': layer.attention_ops,
        'qkv_proj': matmul(layer.query_rows + 2 * layer.kv_rows, e, d),
        'out_proj': matmul(layer.out_rows, d, e),
        'ffn': (matmul(f, e, mlp_dim) + matmul(f, mlp_dim, e)
                + elementwise(f * mlp_dim, GELU_OPS + 1) + elementwise(f * e)),
        'norms_residuals': elementwise((layer.tokens + f) * e, LAYER_NORM_OPS + 1),
    }


def encoder_ops(layers: list[LayerCost], emb_dim: int, mlp_dim: int) -> float:
    """Ops of the encoder's forward pass for one example.

    The positional add over the tokens entering, every block (:func:`layer_ops`) and the final
    norm over the tokens leaving the last block.
    """
    total = elementwise(layers[0].tokens * emb_dim)
    total += sum(sum(layer_ops(layer, emb_dim, mlp_dim).values()) for layer in layers)
    return total + elementwise(layers[-1].tokens_out * emb_dim, LAYER_NORM_OPS)


def cost_ratios(layers: list[LayerCost], dense_layers: list[LayerCost], emb_dim: int,
                mlp_dim: int) -> dict[str, float]:
    """The logged cost statistics of an encoder against the dense one on the same input.

    Args:
      layers: the method's layer costs, in order.
      dense_layers: dense attention's (reference implementation) for the same input length.
      emb_dim, mlp_dim: model widths.

    Returns:
      {'layer{i}/attention_cost', 'attention_cost' (summed over layers, then divided),
      'model_cost'} as floats.
    """
    ratios = {f'layer{i}/attention_cost': layer.attention_ops / dense.attention_ops
              for i, (layer, dense) in enumerate(zip(layers, dense_layers))}
    ratios['attention_cost'] = (sum(layer.attention_ops for layer in layers)
                                / sum(dense.attention_ops for dense in dense_layers))
    ratios['model_cost'] = (encoder_ops(layers, emb_dim, mlp_dim)
                            / encoder_ops(dense_layers, emb_dim, mlp_dim))
    return ratios
