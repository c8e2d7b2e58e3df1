"""Numerics: grids, maxima, rounding (checked against ml_dtypes' independent implementations)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from bitlaws.quant import formats, parse_format

FP_NAMES = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]
ML_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def _all_finite_values(dtype) -> np.ndarray:
    bits = np.dtype(dtype).itemsize * 8
    codes = np.arange(2 ** min(bits, 8), dtype=np.uint8)
    values = codes.view(dtype).astype(np.float64)
    return np.unique(values[np.isfinite(values)])


def test_fp4_e2m1_positive_grid():
    assert parse_format("fp4_e2m1").positive_grid().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("name,expected", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0), ("fp6_e3m2", 28.0),
                                          ("fp6_e2m3", 7.5), ("fp4_e2m1", 6.0)])
def test_fp_max_normal(name, expected):
    fmt = parse_format(name)
    assert fmt.max_normal == expected
    assert fmt.grid().max() == expected


@pytest.mark.parametrize("name", FP_NAMES)
def test_fp_grid_matches_ml_dtypes(name):
    # Independent implementation of the OCP encodings: every finite value, subnormals included.
    np.testing.assert_array_equal(parse_format(name).grid(), _all_finite_values(ML_DTYPES[name]))


@pytest.mark.parametrize("name", FP_NAMES)
def test_every_fp_grid_value_round_trips(name):
    fmt = parse_format(name)
    grid = jnp.asarray(fmt.grid(), jnp.float32)
    np.testing.assert_array_equal(np.asarray(fmt.round(grid)), fmt.grid())


@pytest.mark.parametrize("name", FP_NAMES)
def test_fp_rounding_is_nearest_even_like_ml_dtypes(name):
    fmt = parse_format(name)
    grid = fmt.grid()
    rng = np.random.default_rng(0)
    x = rng.uniform(-fmt.max_normal, fmt.max_normal, 20000)
    midpoints = (grid[1:] + grid[:-1]) / 2  # exact ties
    x = np.concatenate([x, midpoints, -midpoints]).astype(np.float32)
    ours = np.asarray(fmt.round(jnp.asarray(x)))
    reference = x.astype(ML_DTYPES[name]).astype(np.float32)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_round_through_the_native_dtype_has_the_arithmetic_bits(name):
    fmt = parse_format(name)
    assert fmt.native_dtype == jnp.dtype(ML_DTYPES[name])
    grid = fmt.grid()
    midpoints = (grid[1:] + grid[:-1]) / 2
    rng = np.random.default_rng(1)
    x = np.concatenate([
        grid, midpoints, np.nextafter(midpoints, np.inf), np.nextafter(midpoints, -np.inf),  # ties and their sides
        fmt.max_normal * np.array([0.999, 1.01, 1.5, 2.0, -1.01]), [fmt.min_subnormal / 2, -fmt.min_subnormal / 2],
        [0.0, -0.0, 1e-45, -1e-38, 3e38, -3e38, np.inf, -np.inf, np.nan],
        rng.standard_normal(20000) * fmt.max_normal / 4, rng.standard_normal(20000) * fmt.min_subnormal * 8,
    ]).astype(np.float32)
    native = np.asarray(fmt.round(jnp.asarray(x)))
    arithmetic = np.asarray(fmt.round_arithmetic(jnp.asarray(x)))
    assert native.tobytes() == arithmetic.tobytes()  # every bit: signed zeros, saturation, NaN
    assert parse_format("fp6_e3m2").native_dtype is None  # XLA:CPU cannot compile float6/float4 conversions
    bf16 = jnp.asarray(x[:2000], jnp.bfloat16)  # other input dtypes keep the arithmetic path
    assert np.asarray(fmt.round(bf16)).tobytes() == np.asarray(fmt.round_arithmetic(bf16)).tobytes()


def test_fp_round_saturates():
    fmt = parse_format("fp8_e4m3")
    out = np.asarray(fmt.round(jnp.asarray([1e6, -1e6, 460.0], jnp.float32)))
    assert out.tolist() == [448.0, -448.0, 448.0]


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_grids(bits):
    signed, unsigned = parse_format(f"int{bits}"), parse_format(f"uint{bits}")
    assert signed.grid().tolist() == list(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))
    assert unsigned.grid().tolist() == list(range(2**bits))
    x = jnp.asarray([-1000.0, -2.5, -1.5, 0.5, 1.5, 2.5, 1000.0])
    expected = np.clip(np.round(np.asarray(x)), signed.qmin, signed.qmax)  # numpy rounds half to even
    np.testing.assert_array_equal(np.asarray(signed.round(x)), expected)


def test_mx_formats():
    mx4 = parse_format("mxfp4")
    assert mx4.element is formats.FP4_E2M1 and mx4.block_size == 32
    assert mx4.bits == 4 and mx4.bits_per_value == 4.25
    assert parse_format("mxfp8").element is formats.FP8_E4M3
    assert parse_format("mxfp6").element.name in ("fp6_e2m3", "fp6_e3m2")


@pytest.mark.parametrize("bad", ["int17", "int1", "uint9", "fp5", "float8", "", "int4 "[:-1] + "x"])
def test_parse_format_rejects_and_lists_valid_names(bad):
    with pytest.raises(ValueError) as e:
        parse_format(bad)
    message = str(e.value)
    for name in ("int4", "uint3", "fp4_e2m1", "fp8_e4m3", "mxfp4"):
        assert name in message


def test_parse_format_accepts_every_listed_name():
    for name in formats.format_names():
        assert parse_format(name).name == name
    assert parse_format("INT4") == formats.IntFormat(4, True)


def test_int_format_validates_bits():
    with pytest.raises(ValueError, match="bits"):
        formats.IntFormat(9)
