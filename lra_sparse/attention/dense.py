"""Dense softmax attention: the baseline and the oracle every sparse method is tested against.

Implementations: ``reference`` is the explicit einsum/softmax of :func:`base.masked_attention`
(with attention dropout); ``xla`` calls ``jax.nn.dot_product_attention`` (cuDNN where XLA picks
it), which has no attention dropout, so a rate above 0 is refused with it unless
``apply='eval_only'``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from lra_sparse.attention import base, cost


def default_config() -> ml_collections.ConfigDict:
    """Dense attention has no knobs of its own."""
    return ml_collections.ConfigDict()


class DenseAttention(base.Attention):
    """Full multi-head softmax attention with a padding mask on queries and keys."""

    def _reference(self, x: jax.Array, mask: jax.Array, deterministic: bool,
                   rng: jax.Array | None) -> jax.Array:
        """Explicit scores, softmax, dropout and AV.

        Args:
          x: [batch, length, emb_dim]; mask: bool [batch, length].

        Returns:
          y [batch, length, emb_dim].
        """
        return self.dense(x, mask, deterministic, rng)[0]

    def _fused(self, x: jax.Array, mask: jax.Array, deterministic: bool,
               rng: jax.Array | None) -> jax.Array:
        """``jax.nn.dot_product_attention`` (no dropout); same arguments and result."""
        del deterministic, rng
        q, k, v = self.project_qkv(x)
        o = jax.nn.dot_product_attention(q, k, v, mask=base.pair_mask(mask, mask))
        o = jnp.where(mask[:, :, None, None], o, 0).astype(v.dtype)
        return self.project_out(o)

    implementations = base.implementations(
        base.Implementation('reference', _reference),
        base.Implementation('xla', _fused, attention_dropout=False),
    )

    def attend(self, x, mask, carry, *, deterministic, rng):
        """Full attention; see ``base.Attention.__call__``."""
        y = self.implementation.run(self, x, mask, deterministic, rng)
        return base.AttentionOutput(y, carry, {'kept_fraction': jnp.ones((), jnp.float32)}, {})


METHOD = base.AttentionMethod(
    name='dense',
    module=DenseAttention,
    default_config=default_config,
    cost=lambda dims, cfg, seq_len: cost.dense_layer_cost(dims, seq_len, cfg.impl),
    description='full softmax attention (baseline and test oracle)',
    dense_equivalent={},
)
