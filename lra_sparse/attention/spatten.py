"""SpAtten: cascade token and head pruning, local value pruning, quantization.

SpAtten (Wang, Zhang, Han, "SpAtten: Efficient Sparse Attention Architecture with Cascade Token
and Head Pruning", HPCA 2021; Algorithm 2, Sections III and IV-A) as a method of the one encoder.
For x [batch, n, emb] and its mask [batch, n], one layer:

1. projects Q/K/V [batch, n, heads, head_dim] of the heads kept so far only (``head_keep``);
2. quantizes them (``quant``: ``static``, the paper's mode for BERT-type encoders, Q, K and V at
   ``static_bits``; ``progressive``: MSBs first, rows whose largest probability is below the
   threshold recomputed with MSB+LSB; ``none``) and computes the probabilities [batch, heads, n,
   n];
3. adds them to the cumulative token importance ``s_t`` [batch, n] (sum over heads and rows);
4. local value pruning (``value_pruning``): each query row keeps its own
   ``ceil(value_keep_ratio * valid)`` largest probabilities (``per_query``, Sec. IV-A), or each
   head one set of V vectors by column mass (``per_head``);
5. adds ``sum |E|`` per head to the cumulative head importance ``s_h`` [batch, H];
6. keeps, for the next layers, the best heads by ``s_h`` and the best tokens by ``s_t`` (index 0
   always with ``force_cls``; counts from the token schedule, a budget that prunes longer inputs
   more with ``length_adaptive``, or each example's own fraction): ``carry.select``
   [batch, n_next] lists the surviving tokens; the block gathers them before its feed-forward.

Carry state (:class:`SpAttenAttention`): ``token_scores``, ``head_scores``, ``head_keep``,
``valid0`` (and ``alive`` for the reference).

Implementations: ``xla`` gathers (later layers run on shorter sequences, pruned heads' weight
slices are skipped, per-head value pruning gathers the kept V vectors); ``reference`` is the
dense-masked twin (full lengths, every head, pruned tokens masked through ``alive``, pruned heads
and values zeroed). Both give the same logits.

Statistics: ``kept_fraction`` (valid pairs of the encoder input whose probability reaches AV:
pruned tokens, heads and values count as not kept), ``tokens_kept``, ``heads_kept``,
``values_kept``, and with quantization ``average_bits`` and ``lsb_refetch_fraction``. Costs:
:func:`layer_cost`. Inspection: :meth:`SpAttenAttention.inspect_maps`.

The rules in full, the defaults and where they come from, the options that restore the former
defaults, and the paper-to-code table: ``docs/methods/spatten.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from lra_sparse.attention import base, cost, quant

# The fastest setting on CPU/XLA (docs/methods/spatten.md, "Speed preset"): per-query value
# pruning's top-k over every probability row costs more than the AV product it spares.
SPEED_PRESET = {'value_pruning': 'per_head'}
# The former defaults, for reproducing earlier runs (docs/methods/spatten.md).
FORMER_DEFAULTS = {'value_pruning': 'per_head', 'quant': 'progressive', 'msb_rounding': 'floor',
                   'quant_values': False, 'requant_reference_length': 0,
                   'length_adaptive': False}
QUANT_MODES = ('none', 'static', 'progressive')
VALUE_PRUNING = ('per_query', 'per_head')
MSB_BITS = (4, 6, 8, 10, 12)
STATIC_BITS = (4, 6, 8, 10, 12, 16)
LSB_BITS = (4,)
_EPS = 1e-6


def default_config() -> ml_collections.ConfigDict:
    """SpAtten's fields (see the module docstring for the rules they feed)."""
    c = ml_collections.ConfigDict()
    c.token_keep_ratios = ()  # fraction of tokens each layer processes, one per layer, first 1.0,
    # non-increasing, each in (0, 1]; () = the rule of token_keep_final/token_prune_start_layer
    c.token_keep_final = 0.5  # rule: fraction of tokens the last layer processes, in (0, 1]
    c.token_prune_start_layer = 1  # rule: first layer that sees pruned tokens, 1..num_layers
    # (num_layers = no token pruning); linear decrease from 1.0 to token_keep_final after it
    c.length_adaptive = True  # True: the schedule is a token budget (fraction of the padded
    # length), so longer inputs prune more (the paper); False: each example keeps the fraction
    # of its own length
    c.force_cls = True  # index 0 (the CLS token, the pooled position) is never pruned
    c.head_keep_counts = ()  # heads each layer computes, one per layer, first = num_heads,
    # non-increasing, >= 1; () = the rule: the last round(num_layers/3) layers keep head_keep_final
    c.head_keep_final = 0.75  # rule: fraction of heads kept in the last third, in (0, 1]
    c.value_keep_ratio = 0.3  # local value pruning: fraction of V vectors used, (0, 1]
    c.value_pruning = 'per_query'  # per_query (each query its own top V) | per_head (one set
    # per head by column mass, shared by all queries)
    c.quant = 'static'  # none | static (static_bits) | progressive (msb_bits + lsb_bits)
    c.static_bits = 12  # static: bit width of Q, K (and V): 4 | 6 | 8 | 10 | 12 | 16
    c.quant_values = True  # quantize V too (static: static_bits; progressive: msb + lsb bits)
    c.msb_bits = 8  # progressive: MSB bits, 4 | 6 | 8 | 10 | 12
    c.lsb_bits = 4  # progressive: LSB bits fetched on a refetch, 4
    c.msb_rounding = 'nearest'  # progressive: MSB value of a code, nearest | floor (bit drop)
    c.requant_threshold = 0.05  # progressive: refetch rows whose max probability is below, [0, 1]
    c.requant_reference_length = 1024  # progressive: > 0: the threshold is relative to the row,
    # requant_threshold * requant_reference_length / (keys of the row); 0: absolute
    return c


# -- schedules (static, Python) -------------------------------------------------------------------
def token_keep_schedule(cfg, num_layers: int) -> tuple[float, ...]:
    """Fraction of the input tokens processed by each layer.

    Args:
      cfg: the attention config.
      num_layers: encoder depth N.

    Returns:
      N floats r_l, r_0 = 1, non-increasing. The rule: r_l = 1 for l < s (s =
      token_prune_start_layer), then r_l = 1 - (1 - final) * (l - s + 1) / (N - s).
    """
    if cfg.token_keep_ratios:
        return tuple(float(r) for r in cfg.token_keep_ratios)
    start, final = max(1, int(cfg.token_prune_start_layer)), float(cfg.token_keep_final)
    return tuple(1.0 if i < start else 1.0 - (1.0 - final) * (i - start + 1) / (num_layers - start)
                 for i in range(num_layers))


def head_keep_schedule(cfg, num_heads: int, num_layers: int) -> tuple[int, ...]:
    """Number of heads each layer computes (head_keep_counts, or the last-third rule)."""
    if cfg.head_keep_counts:
        return tuple(int(h) for h in cfg.head_keep_counts)
    start = max(1, num_layers - int(math.floor(num_layers / 3 + 0.5)))
    kept = max(1, min(num_heads, int(math.floor(num_heads * float(cfg.head_keep_final) + 0.5))))
    return tuple(num_heads if i < start else kept for i in range(num_layers))


def next_capacity(n: int, ratio: float) -> int:
    """Static token count after pruning n tokens by a per-layer keep ratio: ceil(n * ratio)."""
    return max(1, min(n, math.ceil(n * ratio - 1e-9))) if n > 0 else 0


def capacity_chain(length: int, ratios: Sequence[float], layer: int) -> int:
    """Static token count entering ``layer`` for an input of ``length`` tokens."""
    n = length
    for i in range(layer):
        n = next_capacity(n, ratios[i + 1] / ratios[i])
    return n


# -- validation ---------------------------------------------------------------------------------
_check = base.check_field


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_schedule(field: str, values, num_layers: int, *, entry_ok, entries: str,
                    first, first_rule: str, order_rule: str) -> None:
    """A per-layer schedule: () or one valid entry per layer, the given first, non-increasing.

    Args:
      field: the config field; values: its value; num_layers: encoder depth.
      entry_ok: value -> True for a valid entry; entries: the valid entries in words.
      first: the required first entry; first_rule, order_rule: those rules in words.
    """
    _check(isinstance(values, (tuple, list)), field, values,
           f'a tuple of per-layer {entries} or ()')
    if not values:
        return
    _check(len(values) == num_layers, field, values,
           f'one entry per layer (model.num_layers={num_layers})')
    _check(all(entry_ok(v) for v in values), field, values, entries)
    _check(values[0] == first, field, values, first_rule)
    _check(all(b <= a for a, b in zip(values, values[1:])), field, values, order_rule)


def check_fields(cfg, num_layers: int, num_heads: int) -> None:
    """Raises ConfigError for any bad SpAtten field (needs only the depth and head count)."""
    _check_schedule(
        'token_keep_ratios', cfg.token_keep_ratios, num_layers,
        entry_ok=lambda r: _is_number(r) and 0.0 < r <= 1.0, entries='fractions in (0, 1]',
        first=1.0,
        first_rule='first entry 1.0 (layer 0 sees every token: no importance score exists yet)',
        order_rule='non-increasing fractions (a pruned token never comes back)')
    final = cfg.token_keep_final
    _check(_is_number(final) and 0.0 < final <= 1.0, 'token_keep_final', final,
           'a fraction in (0, 1]')
    start = cfg.token_prune_start_layer
    _check(isinstance(start, int) and not isinstance(start, bool) and 1 <= start <= num_layers,
           'token_prune_start_layer', start,
           f'an integer in [1, {num_layers}] (layer 0 sees every token; {num_layers} = never)')
    for flag in ('length_adaptive', 'force_cls', 'quant_values'):
        _check(isinstance(cfg[flag], bool), flag, cfg[flag], 'True or False')
    _check_schedule(
        'head_keep_counts', cfg.head_keep_counts, num_layers,
        entry_ok=lambda h: isinstance(h, int) and not isinstance(h, bool) and h >= 1,
        entries='head counts >= 1', first=num_heads,
        first_rule=f'first entry = model.num_heads={num_heads} (layer 0 computes every head)',
        order_rule='counts no larger than the heads left by the previous layer (non-increasing)')
    hf = cfg.head_keep_final
    _check(_is_number(hf) and 0.0 < hf <= 1.0, 'head_keep_final', hf, 'a fraction in (0, 1]')
    vr = cfg.value_keep_ratio
    _check(_is_number(vr) and 0.0 < vr <= 1.0, 'value_keep_ratio', vr, 'a fraction in (0, 1]')
    _check(cfg.value_pruning in VALUE_PRUNING, 'value_pruning', cfg.value_pruning,
           f'one of {", ".join(VALUE_PRUNING)}')
    _check(cfg.quant in QUANT_MODES, 'quant', cfg.quant, f'one of {", ".join(QUANT_MODES)}')
    _check(cfg.static_bits in STATIC_BITS and not isinstance(cfg.static_bits, bool),
           'static_bits', cfg.static_bits, f'one of {", ".join(map(str, STATIC_BITS))}')
    _check(cfg.msb_rounding in quant.ROUNDINGS, 'msb_rounding', cfg.msb_rounding,
           f'one of {", ".join(quant.ROUNDINGS)}')
    _check(cfg.msb_bits in MSB_BITS and not isinstance(cfg.msb_bits, bool), 'msb_bits',
           cfg.msb_bits, f'one of {", ".join(map(str, MSB_BITS))} (settings 4+4 ... 12+4)')
    _check(cfg.lsb_bits in LSB_BITS and not isinstance(cfg.lsb_bits, bool), 'lsb_bits',
           cfg.lsb_bits, f'one of {", ".join(map(str, LSB_BITS))}')
    thr = cfg.requant_threshold
    _check(_is_number(thr) and 0.0 <= thr <= 1.0, 'requant_threshold', thr,
           'a probability in [0, 1]')
    ref = cfg.requant_reference_length
    _check(isinstance(ref, int) and not isinstance(ref, bool) and ref >= 0,
           'requant_reference_length', ref,
           'an integer >= 0 (0: absolute threshold; > 0: relative to the row length)')


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks SpAtten's fields against the full config (depth, heads) before any compute."""
    check_fields(config.attention, config.model.num_layers, config.model.num_heads)


# -- selection and quantization helpers (pure functions, tested directly) -------------------------
def select_tokens(scores: jax.Array, valid: jax.Array, keep: jax.Array, capacity: int,
                  force_first: bool = True) -> tuple[jax.Array, jax.Array]:
    """Cascade token selection: top-``keep`` valid tokens by score, padding first to fill.

    Args:
      scores: float [batch, n] cumulative importance.
      valid: bool [batch, n] tokens currently valid.
      keep: int32 [batch] valid tokens to keep (index 0 included when forced and valid); the
        caller ensures ``keep <= capacity - (index 0 forced and invalid)`` and enough invalid
        positions to fill the rest.
      capacity: static number of tokens leaving the layer.
      force_first: index 0 is always selected (kept when valid), whatever its score.

    Returns:
      (select int32 [batch, capacity] ascending indices: the kept tokens (index 0 when forced)
      and padding positions; kept bool [batch, n] the valid tokens that survive). Ties: lowest
      index first.
    """
    n = scores.shape[1]
    key = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    idx = jnp.arange(n, dtype=jnp.int32)[None]
    if force_first:
        key = key.at[:, 0].set(jnp.inf)
        offset = (~valid[:, 0]).astype(jnp.int32)  # an invalid index 0 takes rank 0
        first = idx == 0
    else:
        offset, first = 0, jnp.zeros_like(idx, bool)
    order = jnp.argsort(-key, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1, stable=True)
    kept = valid & (rank < (keep + offset)[:, None])
    tier = jnp.where(kept | first, 0, jnp.where(valid, 2, 1))
    chosen = jnp.argsort(tier * n + idx, axis=1, stable=True)[:, :capacity]
    return jnp.sort(chosen, axis=1).astype(jnp.int32), kept


def top_heads(head_scores: jax.Array, head_keep: jax.Array, count: int) -> jax.Array:
    """Heads kept for the next layer: the ``count`` best of ``head_keep`` by cumulative score.

    Args:
      head_scores: float [batch, H] cumulative head importance (original head ids).
      head_keep: int32 [batch, H_l] heads computed by this layer.
      count: static number of heads for the next layer.

    Returns:
      int32 [batch, count] ascending head ids; ties go to the lowest id.
    """
    s = jnp.take_along_axis(head_scores, head_keep, axis=1)
    order = jnp.argsort(-s, axis=1, stable=True)[:, :count]
    return jnp.sort(jnp.take_along_axis(head_keep, order, axis=1), axis=1)


def _per_example_head(mask: jax.Array) -> dict:
    """Scale grouping of Q/K [batch, n, heads, head_dim]: per example and head, valid tokens.

    Args:
      mask: bool [batch, n].

    Returns:
      {'axes', 'valid'} keyword arguments of the ``quant`` functions.
    """
    return {'axes': (1, 3), 'valid': mask[:, :, None, None]}


def fake_quant(x: jax.Array, mask: jax.Array, bits: int) -> jax.Array:
    """Rounds x [batch, n, heads, head_dim] to ``bits`` (nearest), straight-through gradient.

    One scale per example and head over the valid tokens (mask bool [batch, n]).
    """
    return quant.fake_quant(x, bits, **_per_example_head(mask))


def msb_lsb_quant(x: jax.Array, mask: jax.Array, msb: int, lsb: int,
                  rounding: str = 'nearest') -> tuple[jax.Array, jax.Array]:
    """(MSB-only value, full MSB+LSB value) of x's (msb+lsb)-bit code, straight-through.

    Args:
      x: [batch, n, heads, head_dim]; one scale per example and head over the valid tokens.
      mask: bool [batch, n].
      msb, lsb: bit widths of the two parts.
      rounding: how the MSB value drops the low ``lsb`` bits of the code: 'nearest' (round the
        code to the nearest multiple of 2^lsb, unbiased) or 'floor' (an arithmetic shift, what
        reading only the MSB half of a two's-complement code gives; biased by -2^(lsb-1) codes
        on average).

    Returns:
      Two arrays shaped like x; the MSB code, a multiple of 2^lsb, lies in
      [-2^(msb-1), 2^(msb-1) - 1] * 2^lsb.
    """
    codes, scale = quant.quant_codes(x, msb + lsb, **_per_example_head(mask))
    step, top = 2.0 ** lsb, 2.0 ** (msb - 1)
    # The MSB half is a signed msb-bit integer: nearest rounding of the largest codes is clipped.
    msb_codes = jnp.clip(quant.drop_low_bits(codes, lsb, rounding=rounding) / step,
                         -top, top - 1) * step
    return (quant.straight_through(x, msb_codes * scale),
            quant.straight_through(x, codes * scale))


def _ceil_count(count: jax.Array, ratio: float) -> jax.Array:
    return jnp.ceil(count.astype(jnp.float32) * ratio - 1e-4).astype(jnp.int32)


def per_query_value_mask(probs: jax.Array, live: jax.Array, kv_keep: jax.Array,
                         kv_cap: int) -> jax.Array:
    """Per-query local value pruning: each row keeps its own ``kv_keep`` largest probabilities.

    Args:
      probs: float32 [batch, heads, n, n] (rows of padded queries all zero).
      live: bool [batch, n] keys processed.
      kv_keep: int32 [batch] V vectors each query row keeps, 1 <= kv_keep <= kv_cap.
      kv_cap: static upper bound of kv_keep.

    Returns:
      probs with every entry below the row's ``kv_keep``-th largest live probability set to 0
      (not renormalised). Entries equal to that value are all kept (ties: a row may keep more
      than ``kv_keep``; equal probabilities need equal scores).
    """
    return jnp.where(per_query_value_keep(probs, live, kv_keep, kv_cap), probs, 0.0)


def per_query_value_keep(probs: jax.Array, live: jax.Array, kv_keep: jax.Array,
                         kv_cap: int) -> jax.Array:
    """The entries :func:`per_query_value_mask` keeps: bool [batch, heads, n, n] (same args)."""
    ranked = jnp.where(live[:, None, None, :], jax.lax.stop_gradient(probs), -1.0)
    top = jax.lax.top_k(ranked, kv_cap)[0]  # [B, heads, n, kv_cap] descending
    kth = jnp.take_along_axis(top, jnp.broadcast_to((kv_keep - 1)[:, None, None, None],
                                                    top.shape[:3] + (1,)), axis=-1)
    return ranked >= kth


# -- cost model -----------------------------------------------------------------------------------
QUANT_OPS = 9  # ops per element of one static fake quantization (abs, max, scale, round, clip ...)
MSB_LSB_OPS = 18  # per element of progressive Q or K: the code, its MSB value, both passed through


def _quantization_ops(cfg, elements: int) -> float:
    """Ops of quantizing Q, K (and V) of ``elements`` = n * h * head_dim entries each."""
    values = int(cfg.quant_values)
    if cfg.quant == 'static':
        return cost.elementwise(elements, QUANT_OPS * (2 + values))
    return cost.elementwise(elements, 2 * MSB_LSB_OPS + QUANT_OPS * values)


def layer_cost(dims: base.AttentionDims, cfg, seq_len: int) -> cost.LayerCost:
    """Ops one SpAtten layer executes for one example entering with ``seq_len`` tokens.

    ``impl=xla`` runs the layer's static capacity: its scheduled heads ``h`` over ``n = seq_len``
    tokens, and the feed-forward over the ``n_next`` tokens it keeps (the block gathers them
    first). ``impl=reference`` computes every head over the full length (masks instead of
    gathers). Components: 'scores', 'masking', 'softmax' as dense attention over (h, n);
    'quantization' (Q, K, V fake quantization); 'refetch' (progressive: the second score and
    softmax pass over every row, and the per-row decision; the emulation always computes it);
    'importance' (token scores: a sum over the probabilities; head scores: |E| summed);
    'value_selection' (per query: a top-k over each row and the masking; per head: column mass,
    a sort per head, the gathered slots); 'values' (AV: dense width, or the gathered per-head V
    vectors under xla); 'selection' (the three sorts of the next layer's token choice).
    """
    physical = cfg.impl == 'xla'
    layer, n, d = dims.layer_index, seq_len, dims.head_dim
    heads_scheduled = head_keep_schedule(cfg, dims.num_heads, dims.num_layers)[layer]
    h = heads_scheduled if physical else dims.num_heads
    pairs = h * n * n
    comps = dict(cost.dense_attention(h, d, n, 'reference'))
    if not physical and heads_scheduled < dims.num_heads:
        comps['masking'] += cost.elementwise(pairs)  # pruned heads' probabilities zeroed
    if cfg.quant != 'none':
        comps['quantization'] = _quantization_ops(cfg, n * h * d)
    if cfg.quant == 'progressive':
        again = cost.dense_attention(h, d, n, 'reference')
        comps['refetch'] = (again['scores'] + again['masking'] + again['softmax']
                            + cost.elementwise(pairs, 2))  # row max, select
    comps['importance'] = cost.elementwise(pairs) + cost.elementwise(n * h * d, 2)
    ratio = float(cfg.value_keep_ratio)
    if ratio < 1.0:
        kv = next_capacity(n if physical else capacity_chain(n, token_keep_schedule(
            cfg, dims.num_layers), layer), ratio)
        if cfg.value_pruning == 'per_query':
            comps['value_selection'] = cost.top_k(h * n, n, kv) + cost.elementwise(pairs, 3)
        else:
            comps['value_selection'] = (cost.elementwise(pairs, 3) + cost.sort(h, n)
                                        + cost.elementwise(h * n * kv))
            if physical:
                comps['values'] = cost.matmul(n, kv, d, batch=h)
    ratios = token_keep_schedule(cfg, dims.num_layers)
    n_next = n
    if layer + 1 < dims.num_layers and ratios[layer + 1] < ratios[layer]:
        comps['selection'] = 3 * cost.sort(1, n) + cost.elementwise(n, 8)
        if physical:
            n_next = next_capacity(n, ratios[layer + 1] / ratios[layer])
    return cost.LayerCost(attention=comps, tokens=n, qkv_width=h * d, query_rows=n, kv_rows=n,
                          out_rows=n, ffn_tokens=n_next, tokens_out=n_next)


# -- the layer ----------------------------------------------------------------------------------
class SpAttenAttention(base.Attention):
    """SpAtten attention layer; see the module docstring for what it computes and carries.

    Carry state (in the frame of the tokens entering the next layer):
      token_scores: float32 [batch, n] cumulative token importance s_t.
      head_scores: float32 [batch, H] cumulative head importance s_h (original head ids).
      head_keep: int32 [batch, H_next] heads the next layer computes (ascending).
      valid0: int32 [batch] valid tokens of the original input (for the statistics).
      alive: bool [batch, n] (reference impl only) tokens not pruned so far.
    """

    def __init__(self, dims: base.AttentionDims, cfg: ml_collections.ConfigDict, *, rngs):
        super().__init__(dims, cfg, rngs=rngs)
        self.token_ratios = token_keep_schedule(cfg, dims.num_layers)
        self.head_counts = head_keep_schedule(cfg, dims.num_heads, dims.num_layers)

    def check_config(self, cfg, dims):
        """Raises ConfigError for any bad SpAtten field."""
        check_fields(cfg, dims.num_layers, dims.num_heads)

    # -- the steps of one layer ---------------------------------------------------------------
    # ``physical`` (the xla implementation) gathers: kept heads' weight slices, kept V vectors,
    # the surviving tokens; otherwise (reference) the same selections are masks on full arrays.
    def _entry_state(self, carry: base.LayerCarry, mask: jax.Array, physical: bool) -> dict:
        """The carry state entering this layer; layer 0 starts it (nothing pruned yet).

        Args:
          carry: the previous layer's carry (state empty before layer 0).
          mask: bool [batch, n] valid tokens.
          physical: whether sequences shrink (reference: an 'alive' mask instead).

        Returns:
          {'token_scores' float32 [batch, n], 'head_scores' float32 [batch, H], 'head_keep' int32
          [batch, H_l], 'valid0' int32 [batch], and for the reference 'alive' bool [batch, n]}.
        """
        if carry.state:
            return dict(carry.state)
        batch, n = mask.shape
        h = self.dims.num_heads
        state = {
            'token_scores': jnp.zeros((batch, n), jnp.float32),
            'head_scores': jnp.zeros((batch, h), jnp.float32),
            'head_keep': jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32), (batch, h)),
            'valid0': jnp.sum(mask, axis=1).astype(jnp.int32),
        }
        if not physical:
            state['alive'] = jnp.ones((batch, n), bool)
        return state

    def _kernel(self, proj) -> jax.Array:
        return proj.kernel[...].astype(jnp.dtype(self.dims.dtype))

    def _project_kept_heads(self, x: jax.Array, head_keep: jax.Array, physical: bool):
        """Q, K, V of the computed heads and which of their slots are kept heads.

        Args:
          x: [batch, n, emb]; head_keep: int32 [batch, H_l] ascending kept head ids.

        Returns:
          (q, k, v [batch, n, H', head_dim], head_on bool [batch, H']): physically with pruned
          heads H' = H_l (per-example weight slices, all on); otherwise H' = H with the pruned
          heads off.
        """
        batch, num_heads = x.shape[0], self.dims.num_heads
        h_cur = head_keep.shape[1]
        if physical and h_cur < num_heads:
            e, d = self.dims.emb_dim, self.dims.head_dim
            xc = x.astype(jnp.dtype(self.dims.dtype))
            qkv = [jnp.einsum('ble,ebhd->blhd', xc, jnp.take(  # slices [E, B, H_l, D]
                self._kernel(proj).reshape(e, num_heads, d), head_keep, axis=1))
                for proj in (self.query, self.key, self.value)]
            return (*qkv, jnp.ones((batch, h_cur), bool))
        if h_cur < num_heads:
            head_on = jnp.sum(jax.nn.one_hot(head_keep, num_heads, dtype=jnp.int32), axis=1) > 0
        else:
            head_on = jnp.ones((batch, num_heads), bool)
        return (*self.project_qkv(x), head_on)

    def _output_kept_heads(self, o: jax.Array, head_keep: jax.Array, physical: bool) -> jax.Array:
        """[batch, n, H', head_dim] -> [batch, n, emb] through the kept heads' output rows."""
        e, h, d = self.dims.emb_dim, self.dims.num_heads, self.dims.head_dim
        if not (physical and head_keep.shape[1] < h):
            return self.project_out(o)
        w = jnp.take(self._kernel(self.out).reshape(h, d, e), head_keep, axis=0)  # [B, H_l, D, E]
        return jnp.einsum('blhd,bhde->ble', o.astype(w.dtype), w)

    def _quantize_values(self, v: jax.Array, mask: jax.Array) -> jax.Array:
        """V [batch, n, heads, head_dim] at the configured width (unchanged unless quant_values)."""
        cfg = self.cfg
        if cfg.quant == 'none' or not cfg.quant_values:
            return v
        bits = cfg.static_bits if cfg.quant == 'static' else cfg.msb_bits + cfg.lsb_bits
        return fake_quant(v, mask, bits)

    def _probs(self, q, k, mask, row_ok):
        """Probabilities with the configured Q/K quantization.

        Args:
          q, k: [batch, n, heads, head_dim]; mask: bool [batch, n] tokens processed.
          row_ok: bool [batch, heads, n] valid query rows of computed heads (refetch counting).

        Returns:
          (probs float32 [batch, heads, n, n], quantization stats {'average_bits',
          'lsb_refetch_fraction'} or {} without quantization).
        """
        valid = base.pair_mask(mask, mask)
        scale = 1.0 / math.sqrt(self.dims.head_dim)
        cfg = self.cfg

        def probs_of(qq, kk):
            return base.masked_softmax(base.attention_scores(qq, kk) * scale, valid)

        if cfg.quant == 'none':
            return probs_of(q, k), {}
        if cfg.quant == 'static':
            bits = cfg.static_bits
            probs = probs_of(fake_quant(q, mask, bits), fake_quant(k, mask, bits))
            return probs, {'average_bits': jnp.asarray(float(bits), jnp.float32),
                           'lsb_refetch_fraction': jnp.zeros((), jnp.float32)}
        q_msb, q_full = msb_lsb_quant(q, mask, cfg.msb_bits, cfg.lsb_bits, cfg.msb_rounding)
        k_msb, k_full = msb_lsb_quant(k, mask, cfg.msb_bits, cfg.lsb_bits, cfg.msb_rounding)
        p_msb = probs_of(q_msb, k_msb)
        need = (jnp.max(p_msb, axis=-1) < self._requant_threshold(mask)) & row_ok  # [B, h, n]
        probs = jnp.where(need[..., None], probs_of(q_full, k_full), p_msb)
        rows = jnp.sum(row_ok)
        frac = jnp.where(rows > 0, jnp.sum(need) / jnp.maximum(rows, 1), 0.0).astype(jnp.float32)
        return probs, {'lsb_refetch_fraction': frac,
                       'average_bits': (cfg.msb_bits + cfg.lsb_bits * frac).astype(jnp.float32)}

    def _requant_threshold(self, mask: jax.Array) -> jax.Array | float:
        """Refetch threshold on a row's largest probability: float, or float32 [batch, 1, 1].

        Absolute (``requant_reference_length=0``): ``requant_threshold``. Relative: scaled by
        ``requant_reference_length / keys`` (keys: the example's tokens processed), so a row is
        judged against the uniform value 1/keys as the paper's threshold was at its reference
        length (0.05 at 1024 keys: 51x uniform).
        """
        cfg = self.cfg
        if not cfg.requant_reference_length:
            return cfg.requant_threshold
        keys = jnp.maximum(jnp.sum(mask, axis=1), 1).astype(jnp.float32)
        return (cfg.requant_threshold * cfg.requant_reference_length / keys)[:, None, None]

    def _prune_values(self, probs, v, live, n_cur: int, v_cur, physical: bool):
        """Local value pruning (``value_pruning``): per query, or per head.

        Args:
          probs: float32 [batch, heads, n, n]; v: [batch, n, heads, head_dim].
          live: bool [batch, n] tokens processed; n_cur: static token count of the layer.
          v_cur: int32 [batch] tokens processed per example.

        Returns:
          (probs of the used V vectors [batch, heads, n, kv], the used V [batch, kv, heads,
          head_dim], kv_keep int32 [batch] V vectors used per query row): kv = n with the pruned
          entries zeroed, except per head under xla, which gathers the static
          ``ceil(value_keep_ratio * n_cur)`` vectors.
        """
        ratio = float(self.cfg.value_keep_ratio)
        if ratio >= 1.0:
            return probs, v, v_cur
        kv_cap = next_capacity(n_cur, ratio)  # static V vectors per row or head
        kv_keep = jnp.minimum(jnp.minimum(_ceil_count(v_cur, ratio), v_cur), kv_cap)  # [B]
        if self.cfg.value_pruning == 'per_query':
            return per_query_value_mask(probs, live, kv_keep, kv_cap), v, kv_keep
        mass = jnp.where(live[:, None, :], jnp.sum(probs, axis=2), -jnp.inf)
        order = jnp.argsort(-jax.lax.stop_gradient(mass), axis=-1, stable=True)
        if not physical:
            rank = jnp.argsort(order, axis=-1, stable=True)
            keep_v = rank < kv_keep[:, None, None]  # [B, heads, n]
            return jnp.where(keep_v[:, :, None, :], probs, 0.0), v, kv_keep
        idx = order[..., :kv_cap]  # [B, heads, kv_cap]
        slot_ok = jnp.arange(kv_cap)[None, None] < kv_keep[:, None, None]
        probs_v = jnp.take_along_axis(probs, idx[:, :, None, :], axis=-1)
        probs_v = jnp.where(slot_ok[:, :, None, :], probs_v, 0.0)
        v_used = jnp.take_along_axis(jnp.swapaxes(v, 1, 2), idx[..., None], axis=2)
        return probs_v, jnp.swapaxes(v_used, 1, 2), kv_keep  # V [B, kv_cap, heads, D]

    def _head_importance(self, o: jax.Array, head_keep: jax.Array, physical: bool) -> jax.Array:
        """Head importance of this layer: sum of |E| over query rows and head_dim.

        Args:
          o: [batch, n, H', head_dim] attention output of the computed heads (0 for rows and
            heads not processed); head_keep: int32 [batch, H_l].

        Returns:
          float32 [batch, H] indexed by original head id (no gradient).
        """
        part = jax.lax.stop_gradient(jnp.sum(jnp.abs(o.astype(jnp.float32)), axis=(1, 3)))
        if physical and head_keep.shape[1] < self.dims.num_heads:
            part = jnp.einsum('bk,bkh->bh', part,
                              jax.nn.one_hot(head_keep, self.dims.num_heads, dtype=jnp.float32))
        return part

    def _tokens_to_keep(self, live, n_cur: int, v_cur, n_next: int, rho: float) -> jax.Array:
        """Valid tokens each example keeps for the next layer (see the module docstring).

        Args:
          live: bool [batch, n] tokens processed; n_cur, n_next: static token counts of this
            and the next layer; v_cur: int32 [batch] tokens processed; rho: r_{l+1} / r_l.

        Returns:
          int32 [batch], leaving room for index 0 and for padding to fill ``n_next`` slots.
        """
        keep = jnp.minimum(v_cur, n_next) if self.cfg.length_adaptive else _ceil_count(v_cur, rho)
        first_invalid = (~live[:, 0]).astype(jnp.int32) if self.cfg.force_cls else 0
        keep = jnp.clip(keep, n_next - (n_cur - v_cur), n_next - first_invalid)
        return jnp.clip(keep, 0, v_cur)

    def _carry_to_next_layer(self, carry, state, live, mask, n_cur: int, v_cur,
                             physical: bool) -> base.LayerCarry:
        """Cascade pruning: the heads and tokens the next layer processes.

        Args:
          carry: the carry this layer received; state: its updated state (this layer's
            cumulative scores, heads computed here in 'head_keep').
          live: bool [batch, n] tokens processed; mask: bool [batch, n] valid tokens.
          n_cur: static token count; v_cur: int32 [batch] tokens processed.

        Returns:
          The next carry: physically ``select`` int32 [batch, n_next] and positions / token
          scores in the new frame; otherwise the same sequence with the pruned tokens off in
          'alive'. The last layer prunes nothing.
        """
        layer = self.dims.layer_index
        if layer + 1 >= self.dims.num_layers:
            return carry.replace(select=None, state=state)
        head_keep = state['head_keep']
        if self.head_counts[layer + 1] < head_keep.shape[1]:
            state['head_keep'] = top_heads(state['head_scores'], head_keep,
                                           self.head_counts[layer + 1])
        rho = self.token_ratios[layer + 1] / self.token_ratios[layer]
        if rho >= 1.0:
            return carry.replace(select=None, state=state)
        n_next = next_capacity(n_cur, rho)
        keep = self._tokens_to_keep(live, n_cur, v_cur, n_next, rho)
        select, kept = select_tokens(state['token_scores'], live, keep, n_next,
                                     force_first=self.cfg.force_cls)
        if not physical:
            state['alive'] = state['alive'] & (kept | ~mask)
            return carry.replace(select=None, state=state)
        state['token_scores'] = jnp.take_along_axis(state['token_scores'], select, axis=1)
        positions = jnp.take_along_axis(carry.positions, select, axis=1)
        return carry.replace(positions=positions, select=select, state=state)

    # -- the layer -----------------------------------------------------------------------------
    def attend(self, x, mask, carry, *, deterministic, rng):
        """SpAtten layer; see ``base.Attention.__call__`` and the module docstring."""
        return self.implementation.run(self, x, mask, carry, deterministic, rng)

    def _attend(self, x, mask, carry, deterministic, rng, *, physical: bool,
                maps: dict | None = None):
        """The steps of Algorithm 2 for x [batch, n, emb], mask bool [batch, n].

        ``physical``: gather (xla) rather than mask (reference); the implementations table binds
        it. ``maps``: when a dict, filled with the inspection maps (:meth:`inspect_maps`).
        """
        state = self._entry_state(carry, mask, physical)
        n = x.shape[1]
        # Static token count of this layer (reference: sequences never shrink, chain the rule).
        n_cur = n if physical else capacity_chain(n, self.token_ratios, self.dims.layer_index)
        live = mask if physical else mask & state['alive']  # [B, n] tokens processed
        head_keep = state['head_keep']
        q, k, v, head_on = self._project_kept_heads(x, head_keep, physical)
        v = self._quantize_values(v, live)
        probs, stats = self._probs(q, k, live, live[:, None, :] & head_on[:, :, None])
        probs = jnp.where(head_on[:, :, None, None], probs, 0.0)
        v_cur = jnp.sum(live, axis=1).astype(jnp.int32)  # [B] tokens processed
        # Cumulative token importance (Algorithm 2): sum over heads and query rows.
        token_scores = state['token_scores'] + jax.lax.stop_gradient(jnp.sum(probs, axis=(1, 2)))
        probs_v, v_used, kv_keep = self._prune_values(probs, v, live, n_cur, v_cur, physical)
        o = base.weighted_values(self.drop_probs(probs_v, deterministic, rng), v_used)
        o = jnp.where(head_on[:, None, :, None], o, 0).astype(v.dtype)  # [B, n, heads, D]
        y = self._output_kept_heads(o, head_keep, physical)
        head_scores = state['head_scores'] + self._head_importance(o, head_keep, physical)
        stats.update(self._stats(v_cur, kv_keep, head_keep.shape[1], state['valid0']))
        state = dict(state, token_scores=token_scores, head_scores=head_scores)
        new_carry = self._carry_to_next_layer(carry, state, live, mask, n_cur, v_cur, physical)
        if maps is not None:
            maps.update(self._maps(probs, live, n_cur, v_cur, head_keep, head_on, new_carry))
        return base.AttentionOutput(y, new_carry, stats, {})

    def inspect_maps(self, x, mask, carry):
        """Inspection maps of this layer (deterministic forward of the configured impl).

        Returns:
          {'kept_positions': int32 [batch, n_next] original input positions of the tokens that
          survive this layer (-1 where padding or pruned); 'kept_heads': bool [batch, H] heads
          computed; 'kept_values': bool [batch, H, n, n] the (query, V vector) pairs local value
          pruning keeps on valid pairs of computed heads; 'kept': the same pairs (the pairs whose
          exact probability reaches the output)}.
        """
        maps = {}
        self._attend(x, mask, carry, True, None, physical=self.cfg.impl == 'xla', maps=maps)
        return maps

    def _maps(self, probs, live, n_cur, v_cur, head_keep, head_on, new_carry) -> dict:
        """The arrays of :meth:`inspect_maps` from one layer's intermediate values.

        Args:
          probs: float32 [batch, H', n, n]; live: bool [batch, n] tokens processed; n_cur,
          v_cur: static and per-example token counts; head_keep: int32 [batch, H_l];
          head_on: bool [batch, H']; new_carry: the carry leaving the layer.
        """
        num_heads = self.dims.num_heads
        heads = jnp.sum(jax.nn.one_hot(head_keep, num_heads, dtype=jnp.int32), axis=1) > 0
        pairs = live[:, None, :, None] & live[:, None, None, :] & head_on[:, :, None, None]
        keep = pairs
        ratio = float(self.cfg.value_keep_ratio)
        if ratio < 1.0:
            kv_cap = next_capacity(n_cur, ratio)
            kv_keep = jnp.minimum(jnp.minimum(_ceil_count(v_cur, ratio), v_cur), kv_cap)
            if self.cfg.value_pruning == 'per_query':
                keep = keep & per_query_value_keep(probs, live, kv_keep, kv_cap)
            else:
                mass = jnp.where(live[:, None, :], jnp.sum(probs, axis=2), -jnp.inf)
                rank = jnp.argsort(jnp.argsort(-mass, axis=-1, stable=True), axis=-1,
                                   stable=True)
                keep = keep & (rank < kv_keep[:, None, None])[:, :, None, :]
        if keep.shape[1] < num_heads:  # physical head pruning: computed heads -> original ids
            keep = jnp.einsum('bkqv,bkh->bhqv', keep.astype(jnp.int32),
                              jax.nn.one_hot(head_keep, num_heads, dtype=jnp.int32)) > 0
        if new_carry.select is not None:  # xla: the selected frame, padding slots invalid
            survivors = jnp.take_along_axis(live, new_carry.select, axis=1)
        else:  # reference (the 'alive' mask), or nothing pruned after this layer
            survivors = live & new_carry.state.get('alive', jnp.ones_like(live))
        positions = jnp.where(survivors, new_carry.positions, -1).astype(jnp.int32)
        return {'kept_positions': positions, 'kept_heads': heads, 'kept_values': keep,
                'kept': keep}

    implementations = base.implementations(
        base.Implementation('reference', functools.partial(_attend, physical=False)),
        base.Implementation('xla', functools.partial(_attend, physical=True)),
    )

    def _stats(self, v_cur, kv_keep, h_cur, valid0) -> dict[str, jax.Array]:
        """Pooled-over-batch statistics (see the module docstring for the definitions).

        ``kept_fraction`` counts, per valid query row of a computed head, the V vectors its
        value pruning keeps (exact when no two kept probabilities of a row tie); 1 without valid
        pairs. The base class adds ``sparsity = 1 - kept_fraction``.

        Args:
          v_cur: int32 [batch] tokens processed; kv_keep: int32 [batch] V vectors used per row;
          h_cur: heads computed (static); valid0: int32 [batch] valid tokens of the input.
        """
        dims = self.dims
        f32 = jnp.float32
        v, kv, v0 = v_cur.astype(f32), kv_keep.astype(f32), valid0.astype(f32)

        def frac(num, den):
            return jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0.0).astype(f32)

        dense_pairs = jnp.sum(dims.num_heads * v0 * v0)
        kept = jnp.where(dense_pairs > 0, frac(jnp.sum(h_cur * v * kv), dense_pairs), 1.0)
        return {
            'kept_fraction': kept.astype(f32),
            'tokens_kept': frac(jnp.sum(v), jnp.sum(v0)),
            'heads_kept': jnp.asarray(h_cur / dims.num_heads, f32),
            'values_kept': frac(jnp.sum(kv), jnp.sum(v)),
        }

METHOD = base.AttentionMethod(
    name='spatten',
    module=SpAttenAttention,
    default_config=default_config,
    check=validate,
    cost=layer_cost,
    description='cascade token and head pruning, local value pruning, static or progressive '
                'quantization (SpAtten)',
    dense_equivalent={'token_keep_ratios': (), 'token_keep_final': 1.0,
                      'length_adaptive': False, 'head_keep_counts': (), 'head_keep_final': 1.0,
                      'value_keep_ratio': 1.0, 'quant': 'none'},
    sweeps={'token_keep': tuple({'token_keep_final': r} for r in (1.0, 0.5, 0.25, 0.1)),
            'token_keep_speed': tuple({**SPEED_PRESET, 'token_keep_final': r}
                                      for r in (1.0, 0.5, 0.25, 0.1))},
)
