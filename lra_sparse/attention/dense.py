"""Dense softmax attention: the baseline and the oracle every sparse method is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from lra_sparse.attention import base


def default_config() -> ml_collections.ConfigDict:
    """Dense attention has no knobs of its own."""
    return ml_collections.ConfigDict()


class DenseAttention(base.Attention):
    """Full multi-head softmax attention with a padding mask on queries and keys.

    ``impl='reference'`` is the explicit einsum/softmax of :func:`base.masked_attention`;
    ``impl='xla'`` calls ``jax.nn.dot_product_attention`` (cuDNN where XLA picks it) and is used
    only without attention dropout (the fused call has no dropout), falling back to the reference
    otherwise.
    """

    def attend(self, x, mask, carry, *, deterministic, rng):
        """Full attention; see ``base.Attention.__call__``."""
        use_fused = self.cfg.impl == 'xla' and (
            deterministic or self.dims.attention_dropout_rate == 0.0)
        if use_fused:
            q, k, v = self.project_qkv(x)
            valid = base.pair_mask(mask, mask)
            o = jax.nn.dot_product_attention(q, k, v, mask=valid)
            o = jnp.where(mask[:, :, None, None], o, 0).astype(v.dtype)
            y = self.project_out(o)
        else:
            y, _, _ = self.dense(x, mask, deterministic, rng)
        return base.AttentionOutput(y, carry, {'sparsity': jnp.zeros((), jnp.float32)}, {})


METHOD = base.AttentionMethod(
    name='dense',
    module=DenseAttention,
    default_config=default_config,
    impls=('reference', 'xla'),
    description='full softmax attention (baseline and test oracle)',
    dense_equivalent={},
)
