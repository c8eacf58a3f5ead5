"""Cross-platform lowering of the Pallas kernels, checked on CPU.

``jax.export`` runs the Pallas-Triton (``cuda``) and Mosaic (``tpu``) lowerings in Python, so a
CPU-only CI catches a kernel that no longer lowers for the GPU or the TPU: every kernel, forward
and forward+backward, at the benchmark's shape (B=4, H=8, L=4096, D=64), the tiles the DSA and
DFSS wiring use, bfloat16 and float32, with and without padding masks; and whole train steps with
``impl=pallas`` (DSA block granularity, DFSS). Nothing here compiles for or runs on a device.
The jaxpr checks pin the kernels' numerics: TF32-class dots for float32 by default (IEEE with
``precision='highest'``) and ``exp2`` in place of ``exp``.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import pallas_kernels
from pallas_kernels import block_sparse as bs
from pallas_kernels import nm_sparse as nm

B, H, L, D = 4, 8, 4096, 64
TRITON = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
BACKEND = {'cuda': 'triton', 'tpu': 'tpu'}
KERNEL_CALL = {'cuda': '__gpu$xla.gpu.triton', 'tpu': 'tpu_custom_call'}


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def lower(fn, args, platform):
    """StableHLO text of ``fn`` exported for ``platform`` (kernels traced for it)."""
    with pallas_kernels.lowering_platform(platform):
        exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                     disabled_checks=TRITON)(*args)
    return exported.mlir_module()


def with_grads(fn):
    """fn(q, k, v, *rest) -> fn returning (out, dq, dk, dv) for a fixed cotangent."""
    def run(q, k, v, *rest):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *rest), q, k, v)
        return (out, *vjp(jnp.ones_like(out)))
    return run


def kernel_calls(text, platform):
    return text.count(f'stablehlo.custom_call @{KERNEL_CALL[platform]}')


def block_sparse_args(dtype, tile, density=0.1, length=L, masks=False):
    nqb = length // tile
    kept = max(1, round(density * nqb))
    args = [sds((B, length, H, D), dtype)] * 3 + [sds((B, H, nqb, kept), jnp.int32),
                                                  sds((B, H, nqb), jnp.int32)]
    if masks:
        args += [sds((B, length), jnp.bool_)] * 2
    return args


# -- every kernel, forward and forward+backward ----------------------------------------------
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('tile,masks', [(128, False), (128, True), (64, True), (16, True)])
@pytest.mark.parametrize('grads', [False, True], ids=['fwd', 'fwdbwd'])
def test_block_sparse_lowers_for_cuda(dtype, tile, masks, grads):
    def fn(q, k, v, idx, cnt, *valid):
        return bs.block_sparse_attention(q, k, v, idx, cnt, *valid,
                                         block_sizes=bs.BlockSizes(tile, tile))
    text = lower(with_grads(fn) if grads else fn,
                 block_sparse_args(dtype, tile, masks=masks), 'cuda')
    assert kernel_calls(text, 'cuda') == (3 if grads else 1)  # forward, dQ, dK/dV


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('length,masks', [(L, False), (L, True), (16384, True)])
@pytest.mark.parametrize('grads', [False, True], ids=['fwd', 'fwdbwd'])
def test_block_sparse_lowers_for_tpu(dtype, length, masks, grads):
    """128-tiles (full lanes); at L = 16384 the compacted tables fit SMEM at 10% density."""
    def fn(q, k, v, idx, cnt, *valid):
        return bs.block_sparse_attention(q, k, v, idx, cnt, *valid,
                                         block_sizes=bs.BlockSizes(128, 128))
    text = lower(with_grads(fn) if grads else fn,
                 block_sparse_args(dtype, 128, length=length, masks=masks), 'tpu')
    assert kernel_calls(text, 'tpu') == (3 if grads else 1)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('pattern,masks', [((2, 4), False), ((2, 4), True), ((1, 2), True)])
@pytest.mark.parametrize('grads', [False, True], ids=['fwd', 'fwdbwd'])
def test_nm_sparse_lowers_for_cuda(dtype, pattern, masks, grads):
    """The tiles DFSS uses for long sequences: 128 × 128."""
    n, m = pattern

    def fn(q, k, v, *valid):
        return nm.nm_sparse_attention(q, k, v, *valid, n=n, m=m,
                                      block_sizes=nm.BlockSizes(128, 128))
    args = [sds((B, L, H, D), dtype)] * 3 + ([sds((B, L), jnp.bool_)] * 2 if masks else [])
    text = lower(with_grads(fn) if grads else fn, args, 'cuda')
    assert kernel_calls(text, 'cuda') == (3 if grads else 1)


def test_nm_sparse_refuses_tpu_before_lowering():
    def fn(q, k, v):
        return nm.nm_sparse_attention(q, k, v, block_sizes=nm.BlockSizes(128, 128))
    with pytest.raises(ValueError, match=r"backend='tpu' is not supported by nm_sparse_attention"):
        lower(fn, [sds((B, L, H, D), 'bfloat16')] * 3, 'tpu')


def test_block_sparse_tpu_tables_too_large_for_smem_raise_before_lowering():
    """Dense lists at L = 16384 need 2.1 MB of tables: a clear error, not a Mosaic failure."""
    def fn(q, k, v, idx, cnt):
        return bs.block_sparse_attention(q, k, v, idx, cnt, block_sizes=bs.BlockSizes(128, 128))
    with pytest.raises(ValueError, match=r"backend='tpu': the index tables need 2113536 bytes "
                                         r'of SMEM \(block_indices.shape=\(4, 8, 128, 128\)'):
        lower(fn, block_sparse_args('bfloat16', 128, density=1.0, length=16384), 'tpu')


# -- the kernels' numerics, read from the jaxpr ---------------------------------------------
def sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, 'jaxpr', item)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, 'eqns'):
                yield inner


def equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for inner in sub_jaxprs(eqn.params):
            yield from equations(inner)


def kernel_bodies(fn, args, platform='cuda'):
    """The kernel jaxpr of every pallas_call in fn's forward+backward, traced for platform."""
    with pallas_kernels.lowering_platform(platform):
        closed = jax.make_jaxpr(with_grads(fn))(*args)
    return [eqn.params['jaxpr'] for eqn in equations(closed.jaxpr)
            if eqn.primitive.name == 'pallas_call']


@pytest.mark.parametrize('precision,want', [('default', lax.Precision.DEFAULT),
                                            ('highest', lax.Precision.HIGHEST)])
@pytest.mark.parametrize('kernel', ['block_sparse', 'nm_sparse'])
def test_float32_dots_use_the_requested_precision_and_exp2(kernel, precision, want):
    """'default' (TF32 tensor cores on GPU) unless 'highest' is asked for; exp2, never exp."""
    args = block_sparse_args('float32', 128)
    if kernel == 'block_sparse':
        fn = functools.partial(bs.block_sparse_attention, precision=precision)
    else:
        args, fn = args[:3], functools.partial(nm.nm_sparse_attention, precision=precision)
    bodies = kernel_bodies(fn, args)
    assert len(bodies) == 3  # forward, dQ, dK/dV
    for body in bodies:
        eqns = list(equations(body))
        dots = [e.params['precision'] for e in eqns if e.primitive.name == 'dot_general']
        assert dots and all(p == (want, want) for p in dots), dots
        names = {e.primitive.name for e in eqns}
        assert 'exp2' in names and 'exp' not in names


# -- whole train steps ----------------------------------------------------------------------
@pytest.mark.parametrize('attention,overrides', [
    ('dsa', {'attention.granularity': 'block', 'attention.block_q': 64,
             'attention.block_k': 64}),
    ('dfss', {}),
], ids=['dsa-block', 'dfss'])
def test_train_step_with_pallas_attention_lowers_for_cuda(attention, overrides):
    from lra_sparse import config_lib, data, train

    config = config_lib.load(f'configs/listops.py:attention={attention},impl=pallas,tiny,'
                             'synthetic')
    config.model.attention_dropout_rate = 0.0
    for dotted, value in overrides.items():
        section, field = dotted.split('.')
        config[section][field] = value
    config_lib.validate(config)
    info = data.task_info(config)
    graphdef, state, tx = train.init_state(config, info)
    step = functools.partial(train.train_step, graphdef=graphdef, tx=tx,
                             lr_fn=train.learning_rate_fn(config),
                             num_microbatches=config.num_microbatches)
    batch = {'inputs': sds((config.batch_size, info.seq_len), jnp.int32),
             'targets': sds((config.batch_size,), jnp.int32),
             'weights': sds((config.batch_size,), jnp.float32)}
    abstract_state = jax.tree.map(lambda x: sds(x.shape, x.dtype), state)
    text = lower(step, (abstract_state, batch), 'cuda')
    # The compiled kernels, not their interpret-mode versions (the layers share one function).
    kernel = 'block_sparse' if attention == 'dsa' else 'nm_sparse'
    names = re.findall(r'stablehlo.custom_call @__gpu\$xla.gpu.triton.*?name = "(\w+)"', text)
    assert sorted(names) == sorted(f'{kernel}_{part}' for part in ('fwd', 'dq', 'dkv'))
