"""The one encoder: shapes for every task, padding invariance, reference details."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from lra_sparse import data
from lra_sparse.models import transformer

# Every registered task's metadata at 48 tokens.
INFOS = {task: data.task_info(tiny_config(task, max_length=48)) for task in data.REGISTRY}


def random_tokens(rng, batch, length, vocab, min_len=4):
    lengths = rng.integers(min_len, length + 1, batch)
    tokens = rng.integers(1, vocab, (batch, length))
    tokens[np.arange(length)[None] >= lengths[:, None]] = 0
    return tokens.astype(np.int32), lengths


def make_batch(info, rng, batch=3):
    if info.pair_inputs:
        return {'inputs1': random_tokens(rng, batch, info.seq_len, info.vocab_size)[0],
                'inputs2': random_tokens(rng, batch, info.seq_len, info.vocab_size)[0]}
    return {'inputs': random_tokens(rng, batch, info.seq_len, info.vocab_size)[0]}


@pytest.mark.parametrize('task', list(INFOS))
def test_output_shapes(task):
    info = INFOS[task]
    config = tiny_config(task, **{'max_length': info.seq_len, 'model.num_layers': 1})
    model = transformer.build_model(config, info)
    logits, aux = model(make_batch(info, np.random.default_rng(0)))
    assert logits.shape == (3, info.num_classes)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert 'sparsity' in aux['stats'] and 'layer0/sparsity' in aux['stats']


@pytest.mark.parametrize('task', ['listops', 'retrieval'])
def test_padding_invariance(task):
    """Changing what sits in padded positions never changes the logits."""
    info = INFOS[task]
    config = tiny_config(task, **{'max_length': info.seq_len})
    model = transformer.build_model(config, info)
    rng = np.random.default_rng(1)
    batch = make_batch(info, rng)
    logits, _ = model(batch)
    # Same real tokens, but the model must not look past the padding: perturb the embedding of
    # the padding id and make sure nothing moves.
    emb = model.encoder.embed.embedding
    emb[...] = emb[...].at[0].add(3.0)
    logits2, _ = model(batch)
    np.testing.assert_allclose(logits, logits2, rtol=1e-5, atol=1e-5)


def test_sinusoidal_table_is_interleaved():
    table = transformer.sinusoidal_table(5, 4)
    np.testing.assert_allclose(table[:, 0], np.sin(np.arange(5)), rtol=1e-6)
    np.testing.assert_allclose(table[:, 1], np.cos(np.arange(5)), rtol=1e-6)
    np.testing.assert_allclose(table[:, 2], np.sin(np.arange(5) / 100.0), rtol=1e-5)


def test_cls_mask_copies_position_zero_and_dropout_is_keyed():
    info = INFOS['listops']
    config = tiny_config('listops', **{'max_length': info.seq_len})
    model = transformer.build_model(config, info)
    batch = make_batch(info, np.random.default_rng(2))
    tokens = batch['inputs'].copy()
    tokens[1, 0] = 0  # position 0 is padding here (e.g. a first pixel of value 0)
    _, mask, _ = model.encoder(jnp.asarray(tokens))
    mask = np.asarray(mask)
    assert mask.shape == (3, info.seq_len + 1)
    np.testing.assert_array_equal(mask[:, 0], tokens[:, 0] > 0)  # the CLS token copies it
    np.testing.assert_array_equal(mask[:, 1:], tokens > 0)
    assert mask[0, 0] and not mask[1, 0]
    a, _ = model(batch, deterministic=False, rng=jax.random.key(0))
    b, _ = model(batch, deterministic=False, rng=jax.random.key(0))
    c, _ = model(batch, deterministic=False, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
