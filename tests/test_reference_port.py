"""A pure-jnp port of the reference LRA Transformer forward pass, checked against the project.

The port follows the reference code (google-research/long-range-arena, inference only):
  - ``lra_benchmarks/models/transformer/transformer.py``, ``TransformerEncoder.apply``: padding
    mask ``src_padding_mask = (inputs > 0)[..., None]``; embedding; for ``classifier_pool='CLS'``
    a zero-initialised CLS row is prepended and ``src_padding_mask`` gets a copy of position 0's
    mask; ``AddPositionEmbs``; ``TransformerBlock`` × num_layers; ``nn.LayerNorm`` named
    ``encoder_norm``; ``common_layers.classifier_head``.
  - ``TransformerBlock.apply``: ``x = LayerNorm(inputs); x = SelfAttention(x, padding_mask=...)``,
    residual, then ``LayerNorm`` and ``common_layers.MlpBlock``, residual.
  - ``flax.nn.attention.dot_product_attention`` (the linen-era ``flax.nn`` the reference pins):
    ``query / sqrt(depth)``, ``attn_weights + bias`` with the bias
    ``lax.select(mask > 0, 0, -1e10)`` of ``make_padding_mask(query_mask, key_mask)``, then
    ``lax.exp(attn_weights - logsumexp(attn_weights, axis=norm_dims, keepdims=True))``.
  - ``common_layers.classifier_head``: ``MEAN`` is ``jnp.mean(encoded, axis=1)`` over every
    position (padding included), ``CLS`` is ``encoded[:, 0]``; then Dense -> relu -> Dense.
  - ``flax.nn.LayerNorm``: ``var = mean(x**2) - mean(x)**2``, epsilon 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from lra_sparse import config_lib, data
from lra_sparse.attention import base
from lra_sparse.models import transformer

jax.config.update('jax_default_matmul_precision', 'highest')


def ref_layer_norm(x, ln):
    """flax.nn.LayerNorm (epsilon 1e-6, variance as E[x^2] - E[x]^2)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True) - jnp.square(mean)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * ln.scale[...] + ln.bias[...]


def ref_self_attention(x, padding_mask, attn, num_heads):
    """flax.nn.SelfAttention with a padding mask, bias=False, deterministic."""
    def heads(w):
        y = x @ w.kernel[...]
        return y.reshape(*y.shape[:-1], num_heads, -1)
    q, k, v = heads(attn.query), heads(attn.key), heads(attn.value)
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    weights = jnp.einsum('bqhd,bkhd->bhqk', q, k)
    mask = padding_mask[:, None, :, None] & padding_mask[:, None, None, :]  # make_padding_mask
    mask = jnp.broadcast_to(mask, weights.shape)
    weights = weights + jax.lax.select(mask, jnp.zeros_like(weights),
                                       jnp.full_like(weights, -1e10))
    weights = jnp.exp(weights - jax.scipy.special.logsumexp(weights, axis=-1, keepdims=True))
    y = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    return y.reshape(*y.shape[:-2], -1) @ attn.out.kernel[...]


def ref_mlp(x, mlp):
    """common_layers.MlpBlock, deterministic: Dense -> gelu -> Dense."""
    h = jax.nn.gelu(x @ mlp.fc1.kernel[...] + mlp.fc1.bias[...], approximate=True)
    return h @ mlp.fc2.kernel[...] + mlp.fc2.bias[...]


def ref_encoder(tokens, enc, num_heads, use_cls):
    """TransformerEncoder.apply without the head: [batch, length] ids -> [batch, length', emb]."""
    padding_mask = tokens > 0
    x = enc.embed.embedding[...][tokens]
    if use_cls:
        cls = jnp.broadcast_to(enc.cls[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        padding_mask = jnp.concatenate([padding_mask[:, :1], padding_mask], axis=1)
    x = x + enc.pos_emb[...][:, :x.shape[1]]
    for block in enc.blocks:
        x = x + ref_self_attention(ref_layer_norm(x, block.ln1), padding_mask, block.attention,
                                   num_heads)
        x = x + ref_mlp(ref_layer_norm(x, block.ln2), block.mlp)
    return ref_layer_norm(x, enc.final_ln)


def ref_classifier_logits(batch, model, config):
    """classifier_head: pooling (MEAN over all positions, or CLS) -> Dense -> relu -> Dense."""
    pooling = config.model.pooling
    encoded = ref_encoder(jnp.asarray(batch['inputs']), model.encoder, config.model.num_heads,
                          use_cls=pooling == 'CLS')
    pooled = jnp.mean(encoded, axis=1) if pooling == 'MEAN' else encoded[:, 0]
    h = jax.nn.relu(pooled @ model.mlp.kernel[...] + model.mlp.bias[...])
    return h @ model.logits.kernel[...] + model.logits.bias[...]


def image_batch(rng, batch=4, length=64, zero_first=True):
    """Pixel ids 0..255 with some zeros; the first pixel of the first examples is 0."""
    pixels = rng.integers(0, 256, (batch, length))
    pixels[rng.random((batch, length)) < 0.2] = 0
    pixels[:, 0] = rng.integers(1, 256, batch)
    if zero_first:
        pixels[: batch // 2, 0] = 0
    return {'inputs': pixels.astype(np.int32)}


def build(task, **overrides):
    config = tiny_config(task, **{'max_length': 64, 'model.num_layers': 2, **overrides})
    info = data.task_info(config)
    return config, transformer.build_model(config, info)


def padded_tokens(rng, vocab, batch=4, length=64):
    """Real tokens 1..vocab-1 then padding; position 0 is always real."""
    lengths = rng.integers(length // 4, length, batch)
    tokens = rng.integers(1, vocab, (batch, length))
    tokens[np.arange(length)[None] >= lengths[:, None]] = 0
    return {'inputs': tokens.astype(np.int32)}


@pytest.mark.parametrize('task,overrides', [
    ('listops', {}),
    ('text', {'model.learn_pos_emb': True}),
    ('image', {'data.image_pixel0_is_padding': False}),
])
def test_port_equals_project_when_no_row_reaches_the_output(task, overrides):
    config, model = build(task, **overrides)
    info = data.task_info(config)
    batch = padded_tokens(np.random.default_rng(0), info.vocab_size)
    logits, _ = model(batch)
    np.testing.assert_allclose(logits, ref_classifier_logits(batch, model, config), atol=1e-5)


def test_image_default_is_reference_exact_when_the_first_pixel_is_padding():
    config, model = build('image')
    assert config.model.fully_masked_rows == 'reference' and config.data.image_pixel0_is_padding
    batch = image_batch(np.random.default_rng(1))
    assert (batch['inputs'][:2, 0] == 0).all() and (batch['inputs'][2:, 0] > 0).all()
    logits, _ = model(batch)
    np.testing.assert_allclose(logits, ref_classifier_logits(batch, model, config), atol=1e-5)


def test_zeros_mode_differs_from_the_reference_only_where_the_cls_row_is_masked():
    config, model = build('image', **{'model.fully_masked_rows': 'zeros'})
    batch = image_batch(np.random.default_rng(1))
    logits = np.asarray(model(batch)[0])
    expected = np.asarray(ref_classifier_logits(batch, model, config))
    np.testing.assert_allclose(logits[2:], expected[2:], atol=1e-5)
    assert np.abs(logits[:2] - expected[:2]).max() > 1e-3


@pytest.mark.parametrize('mode', ['reference', 'zeros'])
def test_mean_pooling_over_padded_positions(mode):
    config, model = build('listops', **{'model.pooling': 'MEAN', 'model.fully_masked_rows': mode})
    batch = padded_tokens(np.random.default_rng(2), 17)
    logits = np.asarray(model(batch)[0])
    expected = np.asarray(ref_classifier_logits(batch, model, config))
    if mode == 'reference':
        np.testing.assert_allclose(logits, expected, atol=1e-5)
    else:  # padded rows enter the mean as zeros instead of the reference's sums of V
        assert np.abs(logits - expected).max() > 1e-3


def test_masked_mean_ignores_padded_positions():
    config, model = build('listops', **{'model.pooling': 'MASKED_MEAN'})
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 17, (3, 40)).astype(np.int32)
    tokens[1, 30:] = 0
    padded = np.pad(tokens, [(0, 0), (0, 24)])
    short = np.asarray(model({'inputs': tokens})[0])
    np.testing.assert_allclose(short, model({'inputs': padded})[0], atol=1e-5)
    _, mean_model = build('listops', **{'model.pooling': 'MEAN'})
    assert not np.allclose(mean_model({'inputs': tokens})[0], mean_model({'inputs': padded})[0],
                           atol=1e-4)


@pytest.mark.parametrize('name', ['dsa', 'spatten', 'dfss', 'cta'])
def test_sparse_methods_give_padding_rows_the_sum_of_values(name):
    """Every method inherits the row rule from the base layer: reference rows are out(sum V)."""
    config, _ = build('listops', **{'model.fully_masked_rows': 'reference'})
    config.attention = config_lib.attention_config(name, 'reference', 'train_and_eval')
    info = data.task_info(config)
    model = transformer.build_model(config, info)
    layer = model.encoder.blocks[0].attention
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 16, config.model.emb_dim)), jnp.float32)
    mask = jnp.asarray(np.arange(16)[None] < np.array([[12], [7]]))
    carry = base.LayerCarry(
        positions=jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16)))
    y = np.asarray(layer(x, mask, carry).y)
    summed = np.asarray(layer.out(jnp.sum(layer.value(x), axis=1)))
    for b, n in enumerate((12, 7)):
        np.testing.assert_allclose(y[b, n:], np.broadcast_to(summed[b], y[b, n:].shape),
                                   rtol=1e-5, atol=1e-5)
