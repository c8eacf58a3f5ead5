"""The one LRA Transformer encoder (every attention method plugs into it), its classifier heads.

Faithful to the reference LRA vanilla Transformer (``lra_benchmarks/models/transformer``): token
embedding N(0, 1) (not scaled), optional learned CLS token prepended (zeros init; its mask copies
position 0's), sinusoidal (interleaved sin/cos) or learned N(0, 0.02) positions, dropout, pre-LN
blocks ``x + Drop(Attn(LN(x)))`` then ``x + MLP(LN(x))`` with GELU, xavier-uniform kernels and
N(0, 1e-6) MLP biases, LayerNorm eps 1e-6, a final LayerNorm, and the classifier head
Dense(mlp) -> ReLU -> Dense(classes). The retrieval model is a shared-weight dual encoder
(no CLS token, first-position pooling) with the head concat[e1, e2] -> Dense(mlp) -> ReLU ->
Dense(mlp/2) -> ReLU -> Dense(2).

Fully masked rows: a query row with no valid key (a padding token, or the CLS token of an image
whose first pixel is 0 when pixel 0 counts as padding) gets, in the reference, weight exactly 1 on
every position (its -1e10 bias absorbs the logits in float32), so its attention output is the
*sum* of V over all positions. ``model.fully_masked_rows`` chooses: 'zeros' (the default for new
work) or 'reference' (that sum; the image task's reference-exact default). Valid rows are the same
either way; the choice reaches the logits through a padded pooled position (the image CLS token)
and through MEAN pooling, which, as in the reference, averages over padded positions too
(``MASKED_MEAN`` averages over real tokens only).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lra_sparse import attention as attention_lib
from lra_sparse.attention import base, cost

_xavier = nnx.initializers.xavier_uniform()
_bias_init = nnx.initializers.normal(stddev=1e-6)


def sinusoidal_table(max_len: int, dim: int) -> np.ndarray:
    """Fixed positional table of the reference: pe[:, 0::2] = sin, pe[:, 1::2] = cos, base 10000.

    Returns:
      float32 [max_len, dim].
    """
    position = np.arange(max_len, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * -(np.log(10000.0) / dim))
    table = np.zeros((max_len, dim), dtype=np.float32)
    table[:, 0::2] = np.sin(position * div_term)
    table[:, 1::2] = np.cos(position * div_term)[:, : dim // 2]
    return table


class Mlp(nnx.Module):
    """Dense(mlp) -> GELU -> Dropout -> Dense(emb) -> Dropout."""

    def __init__(self, emb_dim: int, mlp_dim: int, dropout_rate: float, dtype, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(emb_dim, mlp_dim, kernel_init=_xavier, bias_init=_bias_init,
                              dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, emb_dim, kernel_init=_xavier, bias_init=_bias_init,
                              dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)

    def __call__(self, x: jax.Array, deterministic: bool, rngs: tuple) -> jax.Array:
        """x: [batch, length, emb_dim] -> same shape."""
        h = jax.nn.gelu(self.fc1(x), approximate=True)  # flax.nn.gelu default, as the reference
        h = self.dropout(h, deterministic=deterministic, rngs=rngs[0])
        return self.dropout(self.fc2(h), deterministic=deterministic, rngs=rngs[1])


class Block(nnx.Module):
    """Pre-LN Transformer block whose attention comes from the registry."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, attn_cfg: Any,
                 dims: base.AttentionDims, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(model_cfg.dtype)
        self.ln1 = nnx.LayerNorm(model_cfg.emb_dim, epsilon=1e-6, rngs=rngs)
        self.attention = attention_lib.get_method(attn_cfg.name).module(dims, attn_cfg, rngs=rngs)
        self.dropout = nnx.Dropout(model_cfg.dropout_rate)
        self.ln2 = nnx.LayerNorm(model_cfg.emb_dim, epsilon=1e-6, rngs=rngs)
        self.mlp = Mlp(model_cfg.emb_dim, model_cfg.mlp_dim, model_cfg.dropout_rate, dtype,
                       rngs=rngs)

    def __call__(self, x, mask, carry, *, deterministic, rng):
        """x: [batch, length, emb_dim]; mask: bool [batch, length]. Returns (x, AttentionOutput)."""
        keys = (None,) * 4 if rng is None else tuple(jax.random.split(rng, 4))
        attn = self.attention(self.ln1(x), mask, carry, deterministic=deterministic, rng=keys[0])
        x = x + self.dropout(attn.y.astype(x.dtype), deterministic=deterministic, rngs=keys[1])
        x = x + self.mlp(self.ln2(x), deterministic, keys[2:])
        return x, attn


class Encoder(nnx.Module):
    """Embedding, optional CLS token, positions, N blocks, final LayerNorm."""

    def __init__(self, config: ml_collections.ConfigDict, vocab_size: int, seq_len: int,
                 use_cls: bool, *, rngs: nnx.Rngs):
        m = config.model
        self.use_cls = use_cls
        self.max_len = seq_len + int(use_cls)
        self.embed = nnx.Embed(vocab_size, m.emb_dim,
                               embedding_init=nnx.initializers.normal(stddev=1.0), rngs=rngs)
        if use_cls:
            self.cls = nnx.Param(jnp.zeros((1, 1, m.emb_dim)))
        if m.learn_pos_emb:
            init = nnx.initializers.normal(stddev=0.02)
            self.pos_emb = nnx.Param(init(rngs.params(), (1, self.max_len, m.emb_dim)))
        else:
            self.pos_emb = base.Buffer(jnp.asarray(sinusoidal_table(self.max_len, m.emb_dim))[None])
        self.dropout = nnx.Dropout(m.dropout_rate)
        attn_cfg = ml_collections.FrozenConfigDict(config.attention)
        self.blocks = nnx.List([
            Block(m, attn_cfg, base.AttentionDims(
                emb_dim=m.emb_dim, qkv_dim=m.qkv_dim, num_heads=m.num_heads,
                max_len=self.max_len, layer_index=i, num_layers=m.num_layers,
                attention_dropout_rate=m.attention_dropout_rate, dtype=m.dtype,
                fully_masked_rows=m.fully_masked_rows), rngs=rngs)
            for i in range(m.num_layers)
        ])
        self.final_ln = nnx.LayerNorm(m.emb_dim, epsilon=1e-6, rngs=rngs)
        self.emb_dim, self.mlp_dim = m.emb_dim, m.mlp_dim

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True,
                 rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
        """Encode a batch of token ids.

        Args:
          tokens: int [batch, seq_len], 0 = padding.
          deterministic: False while training.
          rng: dropout key (needed when not deterministic).

        Returns:
          (encoded [batch, length', emb_dim], mask bool [batch, length'], aux) where length' is
          the final sequence length (shorter when a method prunes tokens) and aux holds
          'stats' ({name: scalar}, per layer as 'layer{i}/{name}' and averaged as '{name}'),
          'aux_loss' (scalar) and 'positions' (int32 [batch, length'] original positions).
        """
        mask = tokens > 0
        x = self.embed(tokens)
        if self.use_cls:
            cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
            mask = jnp.concatenate([mask[:, :1], mask], axis=1)
        if x.shape[1] > self.max_len:
            raise ValueError(f'input length {x.shape[1]} exceeds the positional table '
                             f'({self.max_len}); raise config.max_length')
        x = x + self.pos_emb[...][:, : x.shape[1]].astype(x.dtype)
        keys = [None] * (len(self.blocks) + 1) if rng is None else list(
            jax.random.split(rng, len(self.blocks) + 1))
        x = self.dropout(x, deterministic=deterministic, rngs=keys[-1])
        batch, length = tokens.shape[0], x.shape[1]
        carry = base.LayerCarry(
            positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)))
        x, mask, carry, trace = run_blocks(self.blocks, x, mask, carry,
                                           deterministic=deterministic, keys=keys[:-1])
        aux_loss = jnp.zeros((), jnp.float32)
        for attn, _ in trace:
            for value in attn.aux_losses.values():
                aux_loss = aux_loss + value
        stats = merge_layer_stats([attn.stats for attn, _ in trace])
        stats.update({name: jnp.asarray(value, jnp.float32) for name, value in
                      self.cost_ratios(length, deterministic).items()})
        return self.final_ln(x), mask, {'stats': stats, 'aux_loss': aux_loss,
                                        'positions': carry.positions}

    def cost_ratios(self, length: int, deterministic: bool) -> dict[str, float]:
        """The counted ``attention_cost`` (per layer and total) and ``model_cost`` of one forward.

        Args:
          length: tokens entering the blocks (CLS included).
          deterministic: False while training (an ``apply='eval_only'`` method then runs dense).

        Returns:
          :func:`cost.cost_ratios` of this encoder's method against dense attention.
        """
        dims = [block.attention.dims for block in self.blocks]
        attn_cfg = self.blocks[0].attention.cfg
        dense = attention_lib.get_method('dense')
        dense_cfg = ml_collections.ConfigDict({'impl': 'reference'})
        method = attention_lib.get_method(attn_cfg.name)
        if attn_cfg.get('apply', 'train_and_eval') == 'eval_only' and not deterministic:
            method, attn_cfg = dense, dense_cfg
        return cost.cost_ratios(method.chain_costs(dims, attn_cfg, length),
                                dense.chain_costs(dims, dense_cfg, length),
                                self.emb_dim, self.mlp_dim)


def run_blocks(blocks, x: jax.Array, mask: jax.Array, carry: base.LayerCarry, *,
               deterministic: bool, keys) -> tuple[jax.Array, jax.Array, base.LayerCarry, list]:
    """The encoder's layer loop: each block, then its ``carry.select`` on the states and the mask.

    Args:
      blocks: callables ``(x, mask, carry, *, deterministic, rng) -> (x, AttentionOutput)``.
      x: [batch, length, emb_dim] hidden states; mask: bool [batch, length].
      carry: the LayerCarry entering the first block.
      deterministic: False while training.
      keys: one PRNG key (or None) per block.

    Returns:
      (x [batch, length', emb_dim], mask [batch, length'], the last carry (select applied), and
      per block (its AttentionOutput, the mask it saw)).
    """
    trace = []
    for block, key in zip(blocks, keys):
        x, attn = block(x, mask, carry, deterministic=deterministic, rng=key)
        trace.append((attn, mask))
        carry = attn.carry
        if carry.select is not None:
            x = jnp.take_along_axis(x, carry.select[:, :, None], axis=1)
            mask = jnp.take_along_axis(mask, carry.select, axis=1)
            carry = carry.replace(select=None)
    return x, mask, carry, trace


def merge_layer_stats(per_layer: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """{'layer{i}/{name}': value} for every layer plus '{name}': the mean over layers.

    Every layer's ``kept_fraction`` has the same denominator (the valid pairs of the encoder's
    input), so their mean is the fraction of (layer, valid pair) combinations kept.
    """
    merged, totals = {}, {}
    for i, stats in enumerate(per_layer):
        for name, value in stats.items():
            merged[f'layer{i}/{name}'] = value
            totals.setdefault(name, []).append(value)
    for name, values in totals.items():
        merged[name] = jnp.mean(jnp.stack(values))
    return merged


class Classifier(nnx.Module):
    """Single-input classifier: Encoder + CLS pooling + Dense(mlp) -> ReLU -> Dense(classes)."""

    def __init__(self, config: ml_collections.ConfigDict, vocab_size: int, seq_len: int,
                 num_classes: int, *, rngs: nnx.Rngs):
        m = config.model
        self.pooling = m.pooling
        self.encoder = Encoder(config, vocab_size, seq_len, use_cls=m.pooling == 'CLS', rngs=rngs)
        self.mlp = nnx.Linear(m.emb_dim, m.mlp_dim, rngs=rngs)
        self.logits = nnx.Linear(m.mlp_dim, num_classes, rngs=rngs)

    def __call__(self, batch: dict, *, deterministic: bool = True,
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """batch['inputs']: int [batch, seq_len] -> (logits float32 [batch, classes], aux)."""
        encoded, mask, aux = self.encoder(batch['inputs'], deterministic=deterministic, rng=rng)
        pooled = pool(encoded, mask, self.pooling)
        h = jax.nn.relu(self.mlp(pooled))
        return self.logits(h).astype(jnp.float32), aux


def pool(encoded: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """Sequence pooling of the classifier.

    Args:
      encoded: [batch, length, emb].
      mask: bool [batch, length], True for real tokens.
      mode: 'CLS' (first position), 'MEAN' (mean over every position, padding included, as the
        reference ``classifier_head``) or 'MASKED_MEAN' (mean over real tokens; 0 for none).

    Returns:
      [batch, emb].
    """
    if mode == 'CLS':
        return encoded[:, 0]
    if mode == 'MEAN':
        return jnp.mean(encoded, axis=1)
    if mode == 'MASKED_MEAN':
        weights = mask[:, :, None].astype(encoded.dtype)
        count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return jnp.sum(encoded * weights, axis=1) / count
    raise ValueError(f'unknown pooling {mode!r}')


class DualEncoderClassifier(nnx.Module):
    """Retrieval: one shared encoder applied to both documents, no CLS, first-position pooling."""

    def __init__(self, config: ml_collections.ConfigDict, vocab_size: int, seq_len: int,
                 num_classes: int, *, rngs: nnx.Rngs):
        m = config.model
        self.encoder = Encoder(config, vocab_size, seq_len, use_cls=False, rngs=rngs)
        self.mlp = nnx.Linear(2 * m.emb_dim, m.mlp_dim, rngs=rngs)
        self.mlp2 = nnx.Linear(m.mlp_dim, m.mlp_dim // 2, rngs=rngs)
        self.logits = nnx.Linear(m.mlp_dim // 2, num_classes, rngs=rngs)

    def __call__(self, batch: dict, *, deterministic: bool = True,
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """batch['inputs1'], batch['inputs2']: int [batch, seq_len] -> (logits [batch, 2], aux)."""
        keys = (None, None) if rng is None else tuple(jax.random.split(rng))
        e1, _, aux1 = self.encoder(batch['inputs1'], deterministic=deterministic, rng=keys[0])
        e2, _, aux2 = self.encoder(batch['inputs2'], deterministic=deterministic, rng=keys[1])
        h = jnp.concatenate([e1[:, 0], e2[:, 0]], axis=-1)
        h = jax.nn.relu(self.mlp2(jax.nn.relu(self.mlp(h))))
        stats = jax.tree.map(lambda a, b: (a + b) / 2, aux1['stats'], aux2['stats'])
        return self.logits(h).astype(jnp.float32), {
            'stats': stats, 'aux_loss': aux1['aux_loss'] + aux2['aux_loss'],
            'positions': aux1['positions']}


def build_model(config: ml_collections.ConfigDict, info, *, seed: int | None = None) -> nnx.Module:
    """The model for a config and a ``TaskInfo`` (num_classes, seq_len, vocab_size, pair_inputs)."""
    rngs = nnx.Rngs(params=config.seed if seed is None else seed)
    cls = DualEncoderClassifier if info.pair_inputs else Classifier
    return cls(config, info.vocab_size, info.seq_len, info.num_classes, rngs=rngs)
