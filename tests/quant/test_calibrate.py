"""Calibrators: min-max, absmax, percentile, MSE search, and scale storage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.quant import QuantSpec, dequantize, quantize
from bitlaws.quant import calibrate


def _grouped(x):
    return jnp.asarray(x, jnp.float32).reshape(1, -1, 1)


def test_minmax_and_absmax_ranges():
    x = _grouped([-3.0, 1.0, 2.0])
    lo, hi = calibrate.minmax_range(x, QuantSpec(format="int8", granularity="tensor"))
    assert (lo.item(), hi.item()) == (-3.0, 2.0)
    lo, hi = calibrate.absmax_range(x, QuantSpec(format="int8", granularity="tensor"))
    assert (lo.item(), hi.item()) == (-3.0, 3.0)


def test_percentile_clips_outliers():
    x = np.concatenate([np.linspace(-1, 1, 999), [100.0]])
    spec = QuantSpec(format="int8", granularity="tensor", calibrator="percentile", percentile=99.0)
    lo, hi = calibrate.percentile_range(_grouped(x), spec)
    assert hi.item() < 1.5 and lo.item() == -hi.item()


def test_mse_is_never_worse_than_minmax_and_clips_heavy_tails():
    x = jax.random.t(jax.random.key(0), 2.0, (512, 8))  # heavy-tailed weights
    errors = {}
    for name in ("minmax", "mse"):
        spec = QuantSpec(format="int3", granularity="channel", calibrator=name)
        errors[name] = np.asarray(jnp.mean((dequantize(quantize(x, spec)) - x) ** 2, axis=0))
    assert np.all(errors["mse"] <= errors["minmax"] * (1 + 1e-6))
    assert errors["mse"].mean() < 0.9 * errors["minmax"].mean()


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_stored_scale_rounds_up_and_covers_the_range(scale_dtype):
    x = jax.random.normal(jax.random.key(1), (256, 16)) * 0.37
    spec = QuantSpec(format="int4", granularity="channel", scale_dtype=scale_dtype)
    qa = quantize(x, spec)
    assert qa.scale.dtype == jnp.dtype(scale_dtype)
    exact = np.abs(np.asarray(x)).max(axis=0) / 7
    assert np.all(np.asarray(qa.scale, np.float32)[0] >= exact)


def test_tiny_and_zero_groups_get_a_finite_scale():
    spec = QuantSpec(format="uint4", granularity="tensor")
    scale, zero = calibrate.range_to_params(jnp.zeros((1, 1, 1)), jnp.zeros((1, 1, 1)), spec)
    assert np.isfinite(np.asarray(scale, np.float32)).all() and float(scale[0, 0, 0]) > 0
    assert int(zero[0, 0, 0]) == 0


def test_mx_scale_is_ocp_shared_exponent():
    spec = QuantSpec(format="mxfp4")
    x = jnp.zeros((32, 1)).at[0, 0].set(5.0)  # floor(log2 5) = 2, emax(E2M1) = 2 -> X = 2^0
    qa = quantize(x, spec)
    assert int(qa.scale[0, 0]) == 127
    assert float(dequantize(qa)[0, 0]) == 4.0  # 5 rounds to the E2M1 grid value 4 (ties to even at 5)


def test_bit_level_scale_helpers_equal_frexp_and_nextafter():
    """`_ceil_log2` / `_floor_log2` / `_round_up_to` read float bits; they must equal the frexp / nextafter
    definitions on every positive normal float32 they may see (a random sample of 2^20 bit patterns)."""
    from bitlaws.quant import calibrate as c  # pylint: disable=g-import-not-at-top

    bits = np.random.default_rng(0).integers(0x00800000, 0x7F800000, size=1 << 20, dtype=np.int64).astype(np.int32)
    x = jnp.asarray(np.concatenate([bits.view(np.float32),
                                    np.float32([2.0**-126, 0.5, 1.0, 3.0, np.finfo(np.float32).max])]))
    mantissa, exponent = jnp.frexp(x)
    np.testing.assert_array_equal(c._ceil_log2(x), jnp.where(mantissa == 0.5, exponent - 1, exponent))
    np.testing.assert_array_equal(c._floor_log2(x), exponent - 1)
    for dtype, lo, hi in ((jnp.float16, 2.0**-14, 2.0**15), (jnp.bfloat16, 2.0**-126, 3.0e38)):
        y = x[(x >= lo) & (x <= hi)]
        stored = y.astype(dtype)
        want = jnp.where(stored.astype(jnp.float32) < y, jnp.nextafter(stored, jnp.asarray(jnp.inf, dtype)), stored)
        np.testing.assert_array_equal(c._round_up_to(y, dtype), want.astype(jnp.float32))
    e = jnp.arange(-300, 301, dtype=jnp.int32)
    np.testing.assert_array_equal(e >> 1, e // 2)  # `_shift` splits exponents with an arithmetic shift
