"""Conformance suite run for every registered attention method and each implementation it has.

Checked for each (method, impl): output shape and finiteness on random padded inputs, a fully padded
example gives zeros (no NaN), valid outputs ignore padded tokens, gradients are finite, the
'sparsity' statistic is a fraction, jit gives the same result, the dense-equivalent setting equals
dense attention with the same weights, and eval_only is dense while training.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lra_sparse import attention, config_lib
from lra_sparse.attention import base

B, L, E, H = 2, 32, 32, 2
CASES = [(name, impl) for name, m in attention.REGISTRY.items() for impl in m.impls]
# Settings a method needs for an impl (DSA's kernel path exists for block granularity only).
IMPL_SETTINGS = {('dsa', 'pallas'): {'granularity': 'block', 'block_q': 16, 'block_k': 16}}


def build(name, impl='reference', seed=0, **overrides):
    cfg = config_lib.attention_config(name, impl, overrides.pop('apply', 'train_and_eval'))
    overrides = {**overrides, **IMPL_SETTINGS.get((name, impl), {})}  # the impl's needs win
    for key, value in overrides.items():
        cfg[key] = value
    dims = base.AttentionDims(emb_dim=E, qkv_dim=E, num_heads=H, max_len=L, layer_index=0,
                              num_layers=2, attention_dropout_rate=0.0)
    return attention.get_method(name).module(dims, ml_collections.FrozenConfigDict(cfg),
                                             rngs=nnx.Rngs(params=seed))


def inputs(seed=0, fully_padded=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, L, E)).astype(np.float32)
    lengths = np.array([L - 5, 0 if fully_padded else L // 2])
    mask = np.arange(L)[None] < lengths[:, None]
    mask[:, 0] = lengths > 0
    return jnp.asarray(x), jnp.asarray(mask)


def call(layer, x, mask, deterministic=True, rng=None):
    carry = base.LayerCarry(positions=jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)))
    return layer(x, mask, carry, deterministic=deterministic, rng=rng)


def valid_rows(y, mask):
    """Outputs of the valid tokens: y [B, L, E] is in the layer's input frame (a method that drops
    tokens does so after the block, through carry.select)."""
    return np.asarray(y)[np.asarray(mask)]


def check_carry_frame(carry, positions):
    """The carry follows the contract: positions in the frame of the next layer's tokens."""
    if carry.select is None:
        np.testing.assert_array_equal(carry.positions, positions)
        return
    select = np.asarray(carry.select)
    assert select.dtype == np.int32 and select.shape[0] == B and select.shape[1] <= L
    assert (select >= 0).all() and (select < L).all() and (np.diff(select, axis=1) > 0).all()
    np.testing.assert_array_equal(carry.positions, np.take_along_axis(positions, select, axis=1))


@pytest.mark.parametrize('name,impl', CASES)
def test_shapes_finite_and_padding(name, impl):
    layer = build(name, impl)
    x, mask = inputs()
    out = call(layer, x, mask)
    assert out.y.shape == (B, L, E)
    y = np.asarray(out.y)
    assert np.isfinite(y).all()
    assert np.abs(y[1]).max() == 0.0, 'a fully padded example must give zeros'
    sparsity = float(out.stats['sparsity'])
    assert 0.0 <= sparsity <= 1.0
    # Changing padded tokens must not change valid outputs.
    noise = jax.random.normal(jax.random.key(7), x.shape) * 5
    x2 = jnp.where(mask[..., None], x, noise)
    out2 = call(layer, x2, mask)
    np.testing.assert_allclose(valid_rows(out.y, mask), valid_rows(out2.y, mask),
                               rtol=2e-5, atol=2e-5)
    check_carry_frame(out.carry, np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)))


@pytest.mark.parametrize('name,impl', CASES)
def test_gradients_finite_and_jit_matches(name, impl):
    layer = build(name, impl)
    x, mask = inputs(1, fully_padded=False)
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        out = call(nnx.merge(graphdef, state), x, mask)
        return jnp.sum(out.y ** 2) + sum(out.aux_losses.values())

    g_state, g_x = jax.grad(loss, argnums=(0, 1))(state, x)
    for leaf in jax.tree.leaves(g_state) + [g_x]:
        assert np.isfinite(np.asarray(leaf)).all()
    eager = call(layer, x, mask).y
    jitted = jax.jit(lambda s, x: call(nnx.merge(graphdef, s), x, mask).y)(state, x)
    np.testing.assert_allclose(eager, jitted, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(jitted, jax.jit(
        lambda s, x: call(nnx.merge(graphdef, s), x, mask).y)(state, x))


@pytest.mark.parametrize('name,impl', [c for c in CASES
                                       if attention.REGISTRY[c[0]].dense_equivalent is not None])
def test_dense_equivalent_setting_equals_dense(name, impl):
    method = attention.REGISTRY[name]
    layer = build(name, impl, **dict(method.dense_equivalent))
    dense = build('dense')
    for proj in ('query', 'key', 'value', 'out'):
        getattr(dense, proj).kernel[...] = getattr(layer, proj).kernel[...]
    x, mask = inputs(2)
    np.testing.assert_allclose(call(layer, x, mask).y, call(dense, x, mask).y,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', list(attention.REGISTRY))
def test_eval_only_is_dense_while_training(name):
    layer = build(name, apply='eval_only')
    dense = build('dense')
    for proj in ('query', 'key', 'value', 'out'):
        getattr(dense, proj).kernel[...] = getattr(layer, proj).kernel[...]
    x, mask = inputs(3)
    train_out = call(layer, x, mask, deterministic=False, rng=jax.random.key(0))
    np.testing.assert_allclose(train_out.y, call(dense, x, mask).y, rtol=1e-5, atol=1e-5)
    assert train_out.carry.select is None


@pytest.mark.parametrize('name', list(attention.REGISTRY))
def test_registry_entry_is_complete(name):
    method = attention.REGISTRY[name]
    assert method.name == name and method.description
    assert issubclass(method.module, base.Attention)
    assert isinstance(method.default_config(), ml_collections.ConfigDict)
    assert set(method.impls) <= {'reference', 'xla', 'pallas'}
    for sweep in method.sweeps.values():
        fields = config_lib.attention_config(name, 'reference', 'train_and_eval')
        for point in sweep:
            assert set(point) <= set(fields), point


@pytest.mark.parametrize('name,impl', CASES)
def test_implementation_table_entry_is_consistent(name, impl):
    method = attention.REGISTRY[name]
    entry = method.impls[impl]
    assert entry.name == impl and callable(entry.run)
    assert 'reference' in method.impls  # the oracle exists for every method
    fields = config_lib.attention_config(name, impl, 'train_and_eval')
    assert set(entry.settings) <= set(fields), 'a restriction names a field the method lacks'
    config = config_lib.attention_config(name, impl, 'train_and_eval')
    config.update(IMPL_SETTINGS.get((name, impl), {}))
    used = attention.implementation_used(config)
    on_cpu = jax.default_backend() == 'cpu'
    assert used == (f'{impl} (interpret)' if entry.kernel and on_cpu else impl)
    config.apply = 'eval_only'
    assert attention.implementation_used(config) == used + ', training: dense reference'


@pytest.mark.parametrize('name,impl', [(n, i) for n, i in CASES
                                       if not attention.REGISTRY[n].impls[i].attention_dropout])
def test_impl_without_attention_dropout_is_refused_with_a_rate(name, impl):
    def settings(rate, apply='train_and_eval'):
        cfg = config_lib.attention_config(name, impl, apply)
        cfg.update(IMPL_SETTINGS.get((name, impl), {}))
        dims = base.AttentionDims(emb_dim=E, qkv_dim=E, num_heads=H, max_len=L,
                                  attention_dropout_rate=rate)
        return dims, ml_collections.FrozenConfigDict(cfg)

    module = attention.get_method(name).module
    with pytest.raises(base.ConfigError, match=(
            rf"config\.model\.attention_dropout_rate=0\.1 is not allowed with "
            rf"attention\.impl='{impl}': {name} {impl} has no attention dropout")):
        module(*settings(0.1), rngs=nnx.Rngs(params=0))
    module(*settings(0.1, 'eval_only'), rngs=nnx.Rngs(params=0))  # trains dense attention
    module(*settings(0.0), rngs=nnx.Rngs(params=0))
