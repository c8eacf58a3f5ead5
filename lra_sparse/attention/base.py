"""The one attention interface every method implements.

Every attention method is an ``nnx.Module`` subclass of :class:`Attention`. The shared encoder block
calls it on the (layer-normalised) block input and gets back an :class:`AttentionOutput`:

    out = attention(x, mask, carry, deterministic=..., rng=...)
    out.y          # [batch, length, emb_dim] attention output (after the output projection)
    out.carry      # LayerCarry for the next layer (token positions, method state, token selection)
    out.stats      # {name: scalar} statistics ('kept_fraction', 'sparsity' and the method's own)
    out.aux_losses # {name: scalar} weighted auxiliary losses, summed into the training loss

Methods own their Q/K/V/O projections (no bias, xavier-uniform, as in the reference LRA code), so a
method that works on the block input before projection (DSA's predictor, CTA's hashing) or that
projects only some heads (SpAtten head pruning) needs no special case in the encoder. All methods
name those projections identically, so a dense checkpoint loads into any method
(``eval_only`` and DSA fine-tuning rely on this).

The carry is how a method acts across layers (SpAtten's cascade pruning): ``carry.select`` (if not
None) lists, per example, the indices of the current tokens that survive this block; the encoder
gathers the hidden states and the padding mask with it after the block. Methods that ignore the
carry return it unchanged.

How a method runs (``config.attention.impl``: reference | xla | pallas) is an entry of the table
its layer class declares (:class:`Implementation`: the function that runs it, the attention
settings it supports, whether it has attention dropout); :func:`check_implementation` refuses any
other (implementation, setting) pair before compute, so nothing silently runs another path.

Standard statistics: every method reports ``kept_fraction`` (the fraction of valid query-key pairs
whose exact probability contributes to the output; the denominator is the valid pairs of the
sequence as it entered the encoder, so pairs of tokens a method pruned count as not kept); the
base class adds ``sparsity = 1 - kept_fraction``. What a layer costs is not measured at run time
but counted by the method's formula (:mod:`lra_sparse.attention.cost`, registry field ``cost``);
the encoder logs the ``attention_cost`` and ``model_cost`` ratios it gives.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, struct

from lra_sparse.attention import cost as cost_lib
from lra_sparse.errors import ConfigError, check, config_error  # noqa: F401  (re-exported)

# A large negative finite score for masked entries: finite so that max-subtraction never gives NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class Buffer(nnx.Variable):
    """A non-trainable variable that is part of the checkpoint (random projections, hash params)."""


class LayerCarry(struct.PyTreeNode):
    """State passed from one encoder layer to the next.

    Attributes:
      positions: int32 [batch, length] original input position of every current token (the encoder
        starts with ``arange(length)``; methods that drop tokens keep it up to date).
      select: int32 [batch, new_length] or None. Indices (into the current sequence) of the tokens
        that survive this block; the encoder applies it to the hidden states and the mask after the
        block and resets it to None. ``positions`` and ``state`` must already be in the new frame.
      state: method-specific pytree carried across layers (e.g. cumulative importance scores).
    """

    positions: jax.Array
    select: jax.Array | None = None
    state: Mapping[str, Any] = struct.field(default_factory=dict)


class AttentionOutput(NamedTuple):
    """What every attention method returns (see the module docstring)."""

    y: jax.Array
    carry: LayerCarry
    stats: dict[str, jax.Array]
    aux_losses: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class AttentionDims:
    """Static shape facts an attention layer is built with.

    Attributes:
      emb_dim: model width E (input and output of the layer).
      qkv_dim: total width of the Q/K/V projections (num_heads * head_dim).
      num_heads: number of heads H.
      max_len: longest sequence the layer sees, CLS token included.
      layer_index: 0-based index of this layer in the encoder.
      num_layers: number of layers in the encoder.
      attention_dropout_rate: dropout on attention probabilities (training only).
      dtype: computation dtype name ('float32' or 'bfloat16').
      fully_masked_rows: what a query with no valid key (a padding token) outputs: 'zeros', or
        'reference': the sum of V over every position the layer sees, which is what the reference
        LRA code computes (its -1e10 bias makes every weight of such a row exactly 1 in float32).
    """

    emb_dim: int
    qkv_dim: int
    num_heads: int
    max_len: int
    layer_index: int = 0
    num_layers: int = 1
    attention_dropout_rate: float = 0.0
    dtype: str = 'float32'
    fully_masked_rows: str = 'zeros'

    @property
    def head_dim(self) -> int:
        """Width of one head."""
        return self.qkv_dim // self.num_heads


def pair_mask(q_mask: jax.Array, kv_mask: jax.Array) -> jax.Array:
    """Query-key validity mask.

    Args:
      q_mask: bool [batch, q_len], True for real tokens.
      kv_mask: bool [batch, kv_len].

    Returns:
      bool [batch, 1, q_len, kv_len], True where both the query and the key are real tokens.
    """
    return (q_mask[:, :, None] & kv_mask[:, None, :])[:, None]


def attention_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """Unscaled scores.

    Args:
      q: [batch, q_len, heads, head_dim].
      k: [batch, kv_len, heads, head_dim].

    Returns:
      float32 [batch, heads, q_len, kv_len] = q·kᵀ (no 1/sqrt(d) scale).
    """
    return jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)


def masked_softmax(scores: jax.Array, keep: jax.Array) -> jax.Array:
    """Softmax over the kept entries of each row; rows with nothing kept are all zeros.

    Args:
      scores: float [..., q_len, kv_len] (already scaled).
      keep: bool, broadcastable to ``scores``.

    Returns:
      float32 probabilities of the same shape; exactly 0 where ``keep`` is False.
    """
    keep = jnp.broadcast_to(keep, scores.shape)
    probs = jax.nn.softmax(jnp.where(keep, scores.astype(jnp.float32), MASK_VALUE), axis=-1)
    return jnp.where(keep, probs, 0.0)


def weighted_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    """AV product.

    Args:
      probs: [batch, heads, q_len, kv_len].
      v: [batch, kv_len, heads, head_dim].

    Returns:
      [batch, q_len, heads, head_dim] in v's dtype.
    """
    return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Obviously-correct softmax attention restricted to ``keep`` (the reference of every method).

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, kv_len, heads, head_dim].
      keep: bool broadcastable to [batch, heads, q_len, kv_len]; padding must already be False.

    Returns:
      (out [batch, q_len, heads, head_dim], probs float32 [batch, heads, q_len, kv_len]).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    probs = masked_softmax(attention_scores(q, k) * scale, keep)
    return weighted_values(probs, v), probs


def standard_stats(stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """A layer's statistics with ``sparsity = 1 - kept_fraction`` added.

    Args:
      stats: {name: float32 scalar} as the method returned them, with 'kept_fraction'.

    Returns:
      the same plus 'sparsity'.
    """
    stats = dict(stats)
    stats['sparsity'] = (1.0 - stats['kept_fraction']).astype(jnp.float32)
    return stats


def kept_fraction(keep: jax.Array, valid: jax.Array) -> jax.Array:
    """Fraction of valid query-key pairs that are attended (the standard ``kept_fraction``).

    Args:
      keep: bool broadcastable to [batch, heads, q_len, kv_len].
      valid: bool broadcastable to the same shape (both tokens real).

    Returns:
      float32 scalar in [0, 1]; 1 when there are no valid pairs.
    """
    shape = jnp.broadcast_shapes(keep.shape, valid.shape)
    valid = jnp.broadcast_to(valid, shape)
    kept = jnp.sum(jnp.broadcast_to(keep, shape) & valid)
    total = jnp.sum(valid)
    return jnp.where(total > 0, kept / jnp.maximum(total, 1), 1.0).astype(jnp.float32)


# -- implementations (``config.attention.impl``) -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Restriction:
    """The values of one ``config.attention`` field that an implementation supports.

    Attributes:
      accepts: value -> True when this implementation runs it.
      description: the supported values in words, for error messages (e.g. ``'element, vector'``).
    """

    accepts: Callable[[Any], bool]
    description: str


def one_of(*values: Any) -> Restriction:
    """A :class:`Restriction` to the listed values."""
    return Restriction(lambda value: value in values, ', '.join(map(str, values)))


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run a method: an entry of its table of implementations.

    Attributes:
      name: the ``config.attention.impl`` value: 'reference' | 'xla' | 'pallas'.
      run: the layer function that computes it, called as ``run(layer, ...)`` with the method's
        own arguments (each method documents them on its functions).
      settings: {attention field: :class:`Restriction`} for the fields whose values this
        implementation restricts; every other field takes every value its method allows.
      attention_dropout: whether it applies attention dropout while training. Without it a rate
        above 0 is refused unless ``apply='eval_only'`` (training then runs dense attention).
      kernel: whether it runs a Pallas kernel (interpret mode on CPU).
      defaults: attention fields a config that selects this implementation starts from, over the
        method's own defaults (``config_lib.attention_config``; e.g. DSA's kernel path starts
        at block granularity with 64 × 64 tiles).
    """

    name: str
    run: Callable[..., Any]
    settings: Mapping[str, Restriction] = dataclasses.field(default_factory=dict)
    attention_dropout: bool = True
    kernel: bool = False
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def used(self) -> str:
        """What runs on this backend: the name, plus ' (interpret)' for a kernel on CPU."""
        if not self.kernel:
            return self.name
        from pallas_kernels import _common  # jax-only, imported when used

        return f'{self.name} (interpret)' if _common.default_interpret() else self.name


def implementations(*entries: Implementation) -> Mapping[str, Implementation]:
    """A method's table of implementations: read-only {name: entry}, iterating over the names."""
    return types.MappingProxyType({entry.name: entry for entry in entries})


def check_implementation(method: str, table: Mapping[str, Implementation], cfg,
                         attention_dropout_rate: float) -> None:
    """Refuses an (implementation, setting) pair the table does not support, in one line.

    Args:
      method: the method's registry name (for the message).
      table: the method's implementations.
      cfg: ``config.attention``.
      attention_dropout_rate: ``config.model.attention_dropout_rate``.

    Raises:
      ConfigError: naming the field, its value, the implementation, the values it supports
        and the implementations that run the whole ``cfg`` as it is.
    """
    impl = cfg.impl
    check(impl in table, 'attention.impl', impl, f'{method} supports {", ".join(table)}')
    entry = table[impl]
    for field, restriction in entry.settings.items():
        value = cfg[field]
        if not restriction.accepts(value):
            others = [name for name, other in table.items() if name != impl and all(
                r.accepts(cfg[f]) for f, r in other.settings.items())]
            alternative = (f'impl {" or ".join(others)} supports {field}={value!r}' if others
                           else f'no implementation supports {field}={value!r}')
            raise ConfigError(
                f'config.attention.{field}={value!r} is not allowed with attention.impl='
                f'{impl!r}: {method} {impl} supports {field} {restriction.description}; '
                f'{alternative}.')
    if (not entry.attention_dropout and attention_dropout_rate > 0
            and cfg.get('apply', 'train_and_eval') != 'eval_only'):
        others = [name for name, other in table.items() if other.attention_dropout]
        raise ConfigError(
            f'config.model.attention_dropout_rate={attention_dropout_rate!r} is not allowed with '
            f'attention.impl={impl!r}: {method} {impl} has no attention dropout; use '
            + (f'attention.impl={" or ".join(others)}, ' if others else '')
            + 'model.attention_dropout_rate=0 or attention.apply=eval_only (training then runs '
            'dense attention).')


def _projection(in_dim: int, out_dim: int, rngs: nnx.Rngs, dtype: str) -> nnx.Linear:
    return nnx.Linear(
        in_dim,
        out_dim,
        use_bias=False,
        kernel_init=nnx.initializers.xavier_uniform(),
        dtype=jnp.dtype(dtype),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Base class: Q/K/V/O projections, dropout, the eval-only switch, the call contract.

    Subclasses implement :meth:`attend` (the method proper), set :attr:`implementations` (their
    table, see :func:`implementations`) and dispatch through :attr:`implementation`; they check
    their own fields in :meth:`check_config`. ``cfg`` is the ``config.attention`` ConfigDict
    (``name``, ``impl``, ``apply`` plus the method's own fields). Building a layer checks the
    fields and the (implementation, setting) pairs, as ``config_lib.validate`` does.
    """

    implementations: ClassVar[Mapping[str, Implementation]] = implementations()

    def __init__(self, dims: AttentionDims, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.check_config(cfg, dims)
        check_implementation(cfg.get('name', type(self).__name__), self.implementations, cfg,
                             dims.attention_dropout_rate)
        self.dims = dims
        self.cfg = cfg
        e, d = dims.emb_dim, dims.qkv_dim
        self.query = _projection(e, d, rngs, dims.dtype)
        self.key = _projection(e, d, rngs, dims.dtype)
        self.value = _projection(e, d, rngs, dims.dtype)
        self.out = _projection(d, e, rngs, dims.dtype)
        self.dropout = nnx.Dropout(dims.attention_dropout_rate, broadcast_dims=())

    def check_config(self, cfg: ml_collections.ConfigDict, dims: AttentionDims) -> None:
        """Raises ConfigError for a bad method field (default: no fields to check)."""
        del cfg, dims

    @property
    def implementation(self) -> Implementation:
        """The table entry of ``cfg.impl``."""
        return self.implementations[self.cfg.impl]

    # -- helpers shared by methods -------------------------------------------------------------
    def split_heads(self, x: jax.Array) -> jax.Array:
        """[batch, length, qkv_dim] -> [batch, length, heads, head_dim]."""
        return x.reshape(*x.shape[:-1], self.dims.num_heads, self.dims.head_dim)

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Project the block input.

        Args:
          x: [batch, length, emb_dim].

        Returns:
          q, k, v, each [batch, length, heads, head_dim].
        """
        return (self.split_heads(self.query(x)), self.split_heads(self.key(x)),
                self.split_heads(self.value(x)))

    def project_out(self, o: jax.Array) -> jax.Array:
        """[batch, length, heads, head_dim] -> [batch, length, emb_dim]."""
        return self.out(o.reshape(*o.shape[:-2], self.dims.qkv_dim))

    def drop_probs(self, probs: jax.Array, deterministic: bool, rng: jax.Array | None) -> jax.Array:
        """Attention dropout on probabilities (no-op when deterministic or rate 0)."""
        if deterministic or self.dims.attention_dropout_rate == 0.0:
            return probs
        return self.dropout(probs, deterministic=False, rngs=rng)

    def dense(self, x: jax.Array, mask: jax.Array, deterministic: bool,
              rng: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Full softmax attention with this layer's weights.

        Args:
          x: [batch, length, emb_dim]; mask: bool [batch, length].

        Returns:
          (y [batch, length, emb_dim], probs [batch, heads, length, length], valid pair mask).
        """
        q, k, v = self.project_qkv(x)
        valid = pair_mask(mask, mask)
        scale = 1.0 / math.sqrt(self.dims.head_dim)
        probs = masked_softmax(attention_scores(q, k) * scale, valid)
        o = weighted_values(self.drop_probs(probs, deterministic, rng), v)
        return self.project_out(o), probs, valid

    # -- the contract ------------------------------------------------------------------------
    def __call__(self, x: jax.Array, mask: jax.Array, carry: LayerCarry, *,
                 deterministic: bool = True, rng: jax.Array | None = None) -> AttentionOutput:
        """Run the layer.

        Args:
          x: [batch, length, emb_dim] layer-normalised block input.
          mask: bool [batch, length], True for real tokens.
          carry: the LayerCarry from the previous layer.
          deterministic: False while training (dropout on, eval-only methods fall back to dense).
          rng: PRNG key for dropout and any training-time randomness.

        Returns:
          AttentionOutput.
        """
        if self.cfg.get('apply', 'train_and_eval') == 'eval_only' and not deterministic:
            y, _, _ = self.dense(x, mask, deterministic, rng)
            out = AttentionOutput(y, carry, {'kept_fraction': jnp.ones((), jnp.float32)}, {})
        else:
            if getattr(self, 'record_maps', False):
                maps = {'dense_probs': self.dense(x, mask, True, None)[1], 'mask': mask,
                        'positions': carry.positions, **self.inspect_maps(x, mask, carry)}
                self.sow(nnx.Intermediate, 'maps', maps)
            out = self.attend(x, mask, carry, deterministic=deterministic, rng=rng)
        if self.dims.fully_masked_rows == 'reference':
            out = out._replace(y=self.reference_masked_rows(out.y, x, mask))
        return out._replace(stats=standard_stats(out.stats))

    def reference_masked_rows(self, y: jax.Array, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Rows of padding queries set to what the reference LRA attention outputs for them.

        The reference adds a -1e10 bias to masked pairs and normalises with
        ``exp(w - logsumexp(w))`` in float32: for a row with no valid key, -1e10 absorbs every
        logit, each weight is exactly 1 and the row's output is the sum of V over all positions.
        A query row has no valid key exactly when the query is padding (a real query sees itself).
        Every method gets this from the base class; for token-pruning methods "all positions" are
        the tokens the layer still holds. Attention dropout is not applied to these rows.

        Args:
          y: [batch, length, emb_dim] the method's output (zeros on padding rows).
          x: [batch, length, emb_dim] the layer input.
          mask: bool [batch, length], True for real tokens.

        Returns:
          y with padding rows replaced by ``out(sum_k value(x)_k)``: [batch, length, emb_dim].
        """
        summed = self.out(jnp.sum(self.value(x), axis=1, keepdims=True))
        return jnp.where(mask[:, :, None], y, summed.astype(y.dtype))

    def inspect_maps(self, x: jax.Array, mask: jax.Array, carry: LayerCarry) -> dict:
        """Method-specific maps for inspection (``lra_sparse.inspect``); default: none.

        Called only when the inspector sets ``record_maps``; never inside training. Methods return
        arrays with a leading batch axis, e.g. 'kept' bool [batch, heads, q_len, kv_len] (the
        attended pairs), 'predicted' / 'oracle' masks, cluster ids, kept-token positions.
        """
        del x, mask, carry
        return {}

    def attend(self, x: jax.Array, mask: jax.Array, carry: LayerCarry, *,
               deterministic: bool, rng: jax.Array | None) -> AttentionOutput:
        """The method proper; same arguments and result as ``__call__``."""
        raise NotImplementedError(f'{type(self).__name__} must implement attend()')


@dataclasses.dataclass(frozen=True)
class AttentionMethod:
    """A registry entry.

    Attributes:
      name: registry key (``config.attention.name``).
      module: the Attention subclass.
      default_config: returns the method's own config fields (each commented where defined).
      cost: (dims, cfg, seq_len) -> :class:`cost.LayerCost`, the ops the implementation chosen by
        ``cfg.impl`` executes for one example entering with ``seq_len`` tokens (the deterministic
        forward with its statistics; see :mod:`lra_sparse.attention.cost`).
      check: raises ``ConfigError`` for a bad method field of ``config`` (the full config);
        :meth:`validate` runs it and then the implementation checks.
      description: one line for --help and docs.
      dense_equivalent: overrides of the method's fields under which it must equal dense attention
        exactly (e.g. sparsity 0); the conformance suite checks it. None if no such setting.
      sweeps: named sweeps of this method's knobs, {name: [{field: value}, ...]} (overrides of
        ``config.attention``), used by the sweep tool and the configs.
    """

    name: str
    module: type[Attention]
    default_config: Callable[[], ml_collections.ConfigDict]
    cost: Callable[..., cost_lib.LayerCost]
    check: Callable[[ml_collections.ConfigDict], None] = lambda config: None
    description: str = ''
    dense_equivalent: Mapping[str, Any] | None = None
    sweeps: Mapping[str, tuple[Mapping[str, Any], ...]] = dataclasses.field(default_factory=dict)

    @property
    def impls(self) -> Mapping[str, Implementation]:
        """The table of implementations (``config.attention.impl`` -> entry); iterates names."""
        return self.module.implementations

    def validate(self, config: ml_collections.ConfigDict) -> None:
        """Raises ``ConfigError`` for a bad method field or an unsupported (impl, setting) pair."""
        self.check(config)
        check_implementation(self.name, self.impls, config.attention,
                             config.model.attention_dropout_rate)

    def layer_cost(self, dims: AttentionDims, cfg: ml_collections.ConfigDict,
                   seq_len: int) -> cost_lib.LayerCost:
        """What one layer executes for one example entering with ``seq_len`` tokens."""
        return self.cost(dims, cfg, seq_len)

    def chain_costs(self, dims: Sequence[AttentionDims], cfg: ml_collections.ConfigDict,
                    seq_len: int) -> list[cost_lib.LayerCost]:
        """:meth:`layer_cost` of each layer in turn (each entering with what the last left).

        Args:
          dims: one AttentionDims per layer, in order.
          cfg: ``config.attention``.
          seq_len: tokens entering the encoder (CLS included).
        """
        costs = []
        for layer_dims in dims:
            costs.append(self.layer_cost(layer_dims, cfg, seq_len))
            seq_len = costs[-1].tokens_out
        return costs


def pad_sequence(x: jax.Array, length: int) -> jax.Array:
    """[batch, L, ...] -> [batch, length, ...] zero padded on the sequence axis (for kernel tiles).

    Pad the token mask the same way, so the padded positions are invalid.
    """
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def check_field(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raises ``config_error('attention.' + field, ...)`` unless ``ok`` (method validators)."""
    check(ok, f'attention.{field}', value, allowed)
