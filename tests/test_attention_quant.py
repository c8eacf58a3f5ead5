"""The shared fake quantizer: hand-checked levels, a numpy reference on random inputs, per-axis
scales, invalid entries, rounding modes, straight-through gradients, bit and axis edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lra_sparse.attention import quant

X_HAND = np.array([-1.0, -0.4, 0.0, 0.2, 0.5, 1.0], np.float32)
CODES_HAND = {  # round-half-to-even of x * (2^(b-1) - 1), max|x| = 1
    2: [-1, 0, 0, 0, 0, 1],
    4: [-7, -3, 0, 1, 4, 7],  # -2.8, 1.4, 3.5
    8: [-127, -51, 0, 25, 64, 127],  # -50.8, 25.4, 63.5
}


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_quantizer_exact_levels(bits):
    codes, scale = quant.quant_codes(jnp.asarray(X_HAND), bits, (0,))
    qmax = 2 ** (bits - 1) - 1
    np.testing.assert_array_equal(np.asarray(codes), CODES_HAND[bits])
    np.testing.assert_allclose(float(scale[0]), 1.0 / qmax, rtol=1e-7)
    fq = np.asarray(quant.fake_quant(jnp.asarray(X_HAND * 3.0), bits, (0,)))
    np.testing.assert_allclose(fq, np.asarray(CODES_HAND[bits]) * 3.0 / qmax, rtol=1e-6)
    assert len(np.unique(fq)) <= 2 * qmax + 1


def test_quantizer_scales_ignore_invalid_entries_and_are_per_group():
    x = jnp.asarray([[0.5, -0.25, 100.0], [2.0, 1.0, -4.0]], jnp.float32)
    valid = jnp.asarray([[True, True, False], [True, True, True]])
    codes, scale = quant.quant_codes(x, 4, (1,), valid=valid)
    np.testing.assert_allclose(np.asarray(scale)[:, 0], [0.5 / 7, 4.0 / 7], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(codes)[0, :2], [7, -4])  # -3.5 -> -4 (half even)
    np.testing.assert_array_equal(np.asarray(codes)[1], [4, 2, -7])  # 3.5 -> 4, 1.75 -> 2
    assert float(codes[0, 2]) == 7  # an invalid entry is quantized with the group's scale


# -- numpy reference ------------------------------------------------------------------------------
def np_quant(x, bits, axes, valid=None, rounding='nearest'):
    """float64 reference: (codes, scale, unrounded x * qmax / max|x|)."""
    x = np.asarray(x, np.float64)
    qmax = 2.0 ** (bits - 1) - 1
    mag = np.abs(x) if valid is None else np.where(valid, np.abs(x), 0.0)
    amax = np.max(mag, axis=axes, keepdims=True)
    safe = np.where(amax > 0, amax, qmax)
    exact = x * qmax / safe
    rounded = np.round(exact) if rounding == 'nearest' else np.floor(exact)
    return np.clip(rounded, -qmax, qmax), safe / qmax, exact


def random_case(seed, shape=(3, 5, 2, 7)):
    rng = np.random.default_rng(seed)
    x = (rng.standard_cauchy(size=shape) * rng.uniform(0.01, 100)).astype(np.float32)
    valid = rng.random(shape[:2]) < 0.8
    return x, valid[:, :, None, None]


AXES = [(1, 3), (3,), (0, 1, 2, 3), (), (-1,), (0, 2)]


@pytest.mark.parametrize('rounding', quant.ROUNDINGS)
@pytest.mark.parametrize('bits', [2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize('axes', AXES, ids=str)
def test_codes_and_scales_match_numpy_on_random_inputs(axes, bits, rounding):
    for seed in range(3):
        x, valid = random_case(1000 * bits + seed)
        codes, scale = quant.quant_codes(jnp.asarray(x), bits, axes, valid=jnp.asarray(valid),
                                         rounding=rounding)
        want, want_scale, exact = np_quant(x, bits, axes, valid, rounding)
        assert codes.shape == x.shape and codes.dtype == jnp.float32
        assert scale.shape == want_scale.shape
        np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=1e-6)
        # Equal codes away from rounding boundaries (float32 vs float64 may differ by an ulp or
        # two of x * qmax / max|x|): halves for nearest, integers for floor.
        frac = exact - np.floor(exact)
        gap = np.abs(frac - 0.5) if rounding == 'nearest' else np.minimum(frac, 1 - frac)
        clear = gap > 1e-6 + 4e-7 * np.abs(exact)
        assert clear.mean() > 0.8 or axes == ()  # (): every entry is its own max, +-qmax
        got = np.asarray(codes)
        np.testing.assert_array_equal(got[clear], want[clear])
        assert np.abs(got - want).max() <= 1
        qmax = 2 ** (bits - 1) - 1
        assert np.abs(got).max() <= qmax and np.array_equal(got, np.round(got))
        fq = np.asarray(quant.fake_quant(jnp.asarray(x), bits, axes, valid=jnp.asarray(valid),
                                         rounding=rounding))
        np.testing.assert_array_equal(fq, got * np.asarray(scale))


def test_scale_reaches_the_largest_valid_magnitude():
    x, valid = random_case(7)
    codes, _ = quant.quant_codes(jnp.asarray(x), 8, (1, 3), valid=jnp.asarray(valid))
    codes = np.asarray(codes)
    for b in range(x.shape[0]):
        for h in range(x.shape[2]):
            rows = valid[b, :, 0, 0]
            if rows.any() and np.abs(x[b, rows, h]).max() > 0:
                assert np.abs(codes[b, rows, h]).max() == 127


def test_all_zero_or_all_invalid_group_has_scale_one():
    x = jnp.asarray([[0.0, 0.0, 0.0], [0.3, -2.6, 0.0]], jnp.float32)
    codes, scale = quant.quant_codes(x, 4, (1,))
    assert float(scale[0, 0]) == 1.0 and not np.asarray(codes[0]).any()
    codes, scale = quant.quant_codes(x, 4, (1,), valid=jnp.asarray([[True] * 3, [False] * 3]))
    assert float(scale[1, 0]) == 1.0
    np.testing.assert_array_equal(np.asarray(codes[1]), [0, -3, 0])  # round(x), clipped to 7


def test_one_scale_per_entry_with_empty_axes():
    x = jnp.asarray([0.3, -2.0, 0.0, 5.0], jnp.float32)
    codes, scale = quant.quant_codes(x, 4, ())
    np.testing.assert_array_equal(np.asarray(codes), [7, -7, 0, 7])
    np.testing.assert_allclose(np.asarray(scale), [0.3 / 7, 2.0 / 7, 1.0, 5.0 / 7], rtol=1e-6)


@pytest.mark.parametrize('bits', [1, 0, 2.0, True])
def test_bits_below_two_or_not_an_integer_are_refused(bits):
    with pytest.raises(ValueError, match='bits='):
        quant.quant_codes(jnp.ones(3), bits, (0,))


def test_unknown_rounding_is_refused():
    with pytest.raises(ValueError, match="rounding='up'"):
        quant.quant_codes(jnp.ones(3), 4, (0,), rounding='up')


# -- rounding modes and low bits ------------------------------------------------------------------
def test_floor_rounds_towards_minus_infinity():
    x = jnp.asarray([-1.0, -0.2, 0.2, 0.99, 1.0], jnp.float32)  # x * 7: -7, -1.4, 1.4, 6.93, 7
    codes, _ = quant.quant_codes(x, 4, (0,), rounding='floor')
    np.testing.assert_array_equal(np.asarray(codes), [-7, -2, 1, 6, 7])


@pytest.mark.parametrize('low_bits', [0, 1, 4])
def test_drop_low_bits_floor_is_an_arithmetic_shift(low_bits):
    codes = np.random.default_rng(low_bits).integers(-2047, 2048, 500)
    got = np.asarray(quant.drop_low_bits(jnp.asarray(codes, jnp.float32), low_bits))
    np.testing.assert_array_equal(got, (codes >> low_bits) << low_bits)
    nearest = np.asarray(quant.drop_low_bits(jnp.asarray(codes, jnp.float32), low_bits,
                                             rounding='nearest'))
    np.testing.assert_array_equal(nearest, np.round(codes / 2 ** low_bits) * 2 ** low_bits)


# -- straight-through gradients -------------------------------------------------------------------
@pytest.mark.parametrize('rounding', quant.ROUNDINGS)
def test_gradient_is_identity(rounding):
    x, valid = random_case(11)
    w = np.random.default_rng(12).normal(size=x.shape).astype(np.float32)

    def loss(x):
        return jnp.sum(w * quant.fake_quant(x, 4, (1, 3), valid=jnp.asarray(valid),
                                            rounding=rounding))

    g = jax.grad(loss)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g), w)  # invalid entries included


def test_straight_through_forward_is_exactly_q_in_x_dtype():
    x = jnp.asarray(np.random.default_rng(13).normal(size=(4, 9)), jnp.bfloat16)
    q = jnp.round(x.astype(jnp.float32) * 3) / 3
    out = quant.straight_through(x, q)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(q.astype(jnp.bfloat16), np.float32))
    g = jax.grad(lambda x: jnp.sum(quant.straight_through(x, q).astype(jnp.float32) * 2))(x)
    np.testing.assert_array_equal(np.asarray(g, np.float32), 2.0)
