"""Quantizer numerics that never fail silently: zero blocks, scale storage at any magnitude, non-finite
values, argument validation, and one up-front error for rules a model cannot take (issue [5/12])."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from bitlaws.quant import (LutFormat, QLinear, QuantRule, QuantSpec, dequantize, fake_quant, parse_format, quantize,
                           quantize_model, register_format)
from bitlaws.quant import formats
from bitlaws.quant.accounting import qarray_nbytes
from bitlaws.quant.transform import quant_layers


def _rel_rms(y, x):
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    return float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2)))


def _agree(x, spec, reduce_axes=None):
    """fake_quant and dequantize(quantize(.)) give the same array (NaN where the other has NaN)."""
    fake = np.asarray(fake_quant(x, spec, reduce_axes))
    packed = np.asarray(dequantize(quantize(x, spec, reduce_axes)))
    np.testing.assert_array_equal(fake, packed)  # NaN == NaN for assert_array_equal
    return fake


# ------------------------------------------------------------------------ 1. MX zero blocks
@pytest.mark.parametrize("name", ["mxfp4", "mxfp6", "mxfp8", "mxfp6_e3m2", "mxfp8_e5m2"])
def test_mx_all_zero_block_gives_exact_zeros(name):
    x = jax.random.normal(jax.random.key(0), (128, 4)).at[32:64, 1].set(0.0)  # one all-zero block of 32
    y = _agree(x, QuantSpec(format=name))
    assert np.isfinite(y).all()
    assert (y[32:64, 1] == 0).all()
    assert _rel_rms(y, x) < 0.2


def test_mx_tiny_block_is_finite():
    x = jnp.full((32, 2), 1e-40, jnp.float32).at[:, 1].set(1.0)  # subnormal block beside a normal one
    y = _agree(x, QuantSpec(format="mxfp4"))
    assert np.isfinite(y).all() and (y[:, 1] == 1.0).all()


# ------------------------------------------------------------------------ 2. scales at any magnitude
@pytest.mark.parametrize("name,granularity", [("int8", "channel"), ("int4", "channel"), ("int4", "group"),
                                              ("uint4", "channel"), ("fp4_e2m1", "group"), ("nf4", "group")])
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_error_does_not_depend_on_magnitude(name, granularity, scale_dtype):
    base = jax.random.normal(jax.random.key(1), (256, 32))
    group = 64 if granularity == "group" else None
    spec = QuantSpec(format=name, granularity=granularity, group_size=group, scale_dtype=scale_dtype)
    reference = _rel_rms(fake_quant(base, spec), base)
    for std in (1e-8, 1e-6, 1e-4, 1e-3, 1e3, 1e6):
        x = base * std
        error = _rel_rms(_agree(x, spec), x)
        # float16/bfloat16 scales are power-of-two shifted or wide-ranged: only the mantissa rounding remains
        assert abs(error - reference) <= 0.01 * reference, (std, error, reference)


def test_float16_scales_store_a_per_tensor_exponent():
    x = jax.random.normal(jax.random.key(2), (128, 8)) * 1e6  # int4 scales ~ 6e5: beyond float16's 65504
    spec = QuantSpec(format="int4")
    qa = quantize(x, spec)
    assert qa.scale.dtype == jnp.float16 and qa.scale_exp.dtype == jnp.int16 and qa.scale_exp.shape == ()
    assert np.isfinite(np.asarray(qa.scale, np.float32)).all()
    assert qa.nbytes == qarray_nbytes(x.shape, spec)
    exact = np.abs(np.asarray(x)).max(axis=0) / 7
    effective = np.asarray(qa.scale_f32)[0]
    assert np.all(effective >= exact) and np.all(effective <= exact * (1 + 2.0**-10))  # rounded up, 11 bits


def test_bfloat16_and_float32_scales_have_no_exponent():
    x = jax.random.normal(jax.random.key(2), (64, 8))
    for dtype in ("bfloat16", "float32"):
        qa = quantize(x, QuantSpec(format="int4", scale_dtype=dtype))
        assert qa.scale_exp is None and qa.scale.dtype == jnp.dtype(dtype)
        assert qa.nbytes == qarray_nbytes(x.shape, QuantSpec(format="int4", scale_dtype=dtype))


# ------------------------------------------------------------------------ 3. non-finite values
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("name", ["int4", "uint4", "fp4_e2m1", "fp8_e4m3", "mxfp4", "nf4"])
def test_non_finite_value_poisons_only_its_group(bad, name):
    x = jax.random.normal(jax.random.key(3), (128, 128))
    spec = QuantSpec(format=name, granularity="group", group_size=32)
    y = _agree(x.at[5, 7].set(bad), spec)
    assert np.isnan(y[0:32, 7]).all()  # the group holding the bad value
    clean = np.asarray(fake_quant(x, spec))
    mask = np.ones_like(clean, bool)
    mask[0:32, 7] = False
    np.testing.assert_array_equal(y[mask], clean[mask])  # every other group as if nothing happened


def test_one_inf_in_a_per_tensor_tensor_gives_nan_not_zeros():
    x = jax.random.normal(jax.random.key(4), (128, 128)).at[3, 4].set(jnp.inf)
    y = _agree(x, QuantSpec(format="int4", granularity="tensor"))
    assert np.isnan(y).all()  # loud: the tensor's scale is undefined (it used to zero 16383 of 16384 values)


def test_non_finite_activations_give_nan_out():
    x = jax.random.normal(jax.random.key(5), (4, 16, 64)).at[1, 3, 0].set(jnp.nan)
    y = _agree(x, QuantSpec(format="int8", granularity="token"), reduce_axes=(-1,))
    assert np.isnan(y[1, 3]).all() and np.isfinite(np.delete(y.reshape(-1, 64), 16 + 3, axis=0)).all()


def test_quantize_model_refuses_non_finite_kernels_and_names_the_layers():
    class Two(nnx.Module):
        def __init__(self):
            self.a = QLinear(32, 32, rngs=nnx.Rngs(0))
            self.b = QLinear(32, 32, rngs=nnx.Rngs(1))

    model = Two()
    model.a.kernel[...] = model.a.kernel[...].at[0, 0].set(jnp.nan)
    model.b.kernel[...] = model.b.kernel[...].at[1, 2].set(jnp.inf).at[3, 3].set(-jnp.inf)
    rules = [QuantRule(module_path=".*", weight=QuantSpec(format="int4"))]
    for mode in ("fake", "packed"):
        with pytest.raises(ValueError, match=r"non-finite.*a \(1 of 1024 values\).*b \(2 of 1024 values\)"):
            quantize_model(model, rules, mode=mode)
    quantize_model(model, rules, mode="calibrate")  # calibration does not quantize weights


def test_huge_finite_ranges_do_not_overflow():
    x = jnp.asarray([[-3e38], [3e38], [1.0], [0.0]], jnp.float32)
    for name in ("uint8", "int8", "fp8_e4m3"):
        y = _agree(x, QuantSpec(format=name, granularity="tensor", scale_dtype="float32"))
        assert np.isfinite(y).all() and abs(float(y[1, 0]) - 3e38) < 0.02 * 3e38


# ------------------------------------------------------------------------ 4. argument validation
def test_reduce_axes_out_of_range_is_an_error():
    x = jnp.ones((4, 8))
    for fn in (quantize, fake_quant):
        with pytest.raises(ValueError, match=r"reduce_axes=\(5,\).*out of range for a 2-d tensor"):
            fn(x, QuantSpec(format="int8"), (5,))
        with pytest.raises(ValueError, match="reduce_axes.*twice"):
            fn(x, QuantSpec(format="int8"), (0, -2))


def test_zero_d_and_empty_tensors_are_errors():
    for fn in (quantize, fake_quant):
        with pytest.raises(ValueError, match="0-d"):
            fn(jnp.float32(1.0), QuantSpec(format="int8"))
        with pytest.raises(ValueError, match=r"empty \(shape \(0, 4\)\)"):
            fn(jnp.zeros((0, 4)), QuantSpec(format="int8"))


# ------------------------------------------------------------------------ 5. rules checked up front
class _Mixed(nnx.Module):
    def __init__(self):
        self.ok = QLinear(128, 64, rngs=nnx.Rngs(0))
        self.narrow = QLinear(48, 64, rngs=nnx.Rngs(1))
        self.odd = QLinear(100, 64, rngs=nnx.Rngs(2))


def test_quantize_model_names_every_layer_the_group_size_does_not_fit():
    model = _Mixed()
    before = nnx.state(model)
    rules = [QuantRule(module_path=".*", weight=QuantSpec(format="int4", granularity="group", group_size=64))]
    with pytest.raises(ValueError, match=r"2 layer\(s\).*narrow \(kernel \(48, 64\): K=48.*odd \(kernel \(100, 64\)"):
        quantize_model(model, rules, mode="packed")
    after = nnx.state(model)
    assert all(layer.qkernel is None for _, layer in quant_layers(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)


# ------------------------------------------------------------------------ lookup-table formats
def test_nf4_rounds_to_the_nearest_table_value_and_packs_4_bits():
    nf4 = parse_format("nf4")
    assert isinstance(nf4, LutFormat) and nf4.bits == 4 and nf4.max_normal == 1.0 and 0.0 in nf4.values
    x = jnp.linspace(-1.2, 1.2, 97)
    rounded = np.asarray(nf4.round(x))
    table = np.asarray(nf4.values)
    expected = table[np.argmin(np.abs(np.asarray(x)[:, None] - table[None]), axis=1)]
    np.testing.assert_array_equal(rounded, expected.astype(np.float32))
    w = jax.random.normal(jax.random.key(6), (256, 16))
    spec = QuantSpec(format="nf4", granularity="group", group_size=64)
    qa = quantize(w, spec)
    assert qa.values.dtype == jnp.uint8 and qa.values.shape == (128, 16)  # two codes per byte
    assert qa.nbytes == 128 * 16 + 4 * 16 * 2 + 2 + 16 * 4  # codes + fp16 scales + exponent + table
    assert qa.nbytes == qarray_nbytes(w.shape, spec)
    _agree(w, spec)


def test_user_lut_format_registers_by_name():
    fmt = LutFormat("test-pot2", [-1.0, 0.0, 0.5, 1.0])
    register_format(fmt)
    register_format(LutFormat("test-pot2", [1.0, 0.5, 0.0, -1.0]))  # equal (sorted) table: re-run is fine
    assert parse_format("TEST-POT2") == fmt and "test-pot2" in formats.format_names()
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        register_format(LutFormat("test-pot2", [-1.0, -0.5, 0.0, 1.0]))
    with pytest.raises(ValueError, match="built in"):
        register_format(LutFormat("nf4", [-1.0, 0.0, 0.5, 1.0]))
    y = _agree(jnp.linspace(-2, 2, 64).reshape(64, 1), QuantSpec(format="test-pot2", granularity="tensor"))
    assert set(np.unique(y)) <= {-2.0, 0.0, 1.0, 2.0}


@pytest.mark.parametrize("values", [[0.0, 1.0, 2.0], [0.0, 0.0, 1.0, 2.0], [0.0, 1.0, np.inf, 2.0], [0.0] * 4])
def test_bad_lut_tables_are_rejected(values):
    with pytest.raises(ValueError, match="LutFormat 'bad'"):
        LutFormat("bad", values)


# ------------------------------------------------------------------------ property test
PROPERTY_FORMATS = ["int8", "int4", "int3", "uint4", "uint8", "fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp4_e2m1", "nf4",
                    "mxfp8", "mxfp6", "mxfp4"]


def _error_bound_in_scales(fmt) -> float:
    """Largest |x - x_hat| / scale the format allows for a value inside its calibrated range."""
    grid = fmt.grid()
    half_step = float(np.max(np.diff(grid))) / 2
    if isinstance(fmt, formats.IntFormat):
        return 0.5 if fmt.signed else 1.0  # uint: the rounded zero point moves the range by up to half a step
    if isinstance(fmt, formats.MxFormat):  # the E8M0 scale maps max|x| into [2^emax, 2^(emax+1)): may clip
        return max(half_step, 2.0 ** (fmt.element.emax + 1) - fmt.max_normal)
    return half_step


def _scale_bound(fmt, amax: np.ndarray) -> np.ndarray:
    """Largest effective scale a group of absolute maximum `amax` may get (storage rounds up)."""
    if isinstance(fmt, formats.MxFormat):
        return amax / 2.0**fmt.element.emax
    if isinstance(fmt, formats.IntFormat) and not fmt.signed:
        return 2 * amax / fmt.qmax * (1 + 2.0**-10)
    return amax / fmt.max_normal * (1 + 2.0**-10)


@st.composite
def _tensors(draw):
    magnitude = 10.0 ** draw(st.integers(-8, 6))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    if draw(st.booleans()):
        x[rng.integers(0, 2) * 32:][:32, rng.integers(0, 8)] = 0.0  # a zero block
    if draw(st.booleans()):
        x[rng.integers(0, 64), rng.integers(0, 8)] *= 1000.0  # a single outlier
    return x * np.float32(magnitude)


@settings(max_examples=40, deadline=None)
@given(x=_tensors(), name=st.sampled_from(PROPERTY_FORMATS), granularity=st.sampled_from(["tensor", "channel", "group"]))
def test_property_fake_equals_packed_finite_and_within_the_grid_bound(x, name, granularity):
    fmt = parse_format(name)
    if fmt.is_mx:
        granularity = "group"
    spec = QuantSpec(format=fmt, granularity=granularity, group_size=32 if granularity == "group" else None)
    qa = quantize(x, spec)
    y = np.asarray(dequantize(qa))
    np.testing.assert_array_equal(np.asarray(fake_quant(x, spec)), y)
    assert np.isfinite(y).all()
    rows = 32 if granularity == "group" else 64
    grouped = np.abs(x).reshape(64 // rows, rows, 8)  # [G, L, C]
    amax = grouped.max(axis=1) if granularity != "tensor" else np.full((1, 8), np.abs(x).max())
    scale = np.asarray(qa.scale_f32)  # [G, C] or [1, 1]
    scale = np.broadcast_to(scale, amax.shape)
    floor = max(2.0**-126, float(scale.max()) * 2.0**-28)  # float16 storage floor: <= 2^-28 of the largest scale
    assert np.all(scale <= np.maximum(_scale_bound(fmt, amax), floor) * (1 + 1e-6))
    per_element = np.repeat(scale, rows, axis=0)  # [64, 8]
    bound = _error_bound_in_scales(fmt) * per_element * (1 + 1e-6)
    assert np.all(np.abs(y - x) <= bound)
    # Relative to the group's own magnitude the error is set by the grid alone, whatever the tensor's magnitude.
    group_amax = np.repeat(amax, rows, axis=0)
    relative = np.abs(y - x)[group_amax > 0] / group_amax[group_amax > 0]
    assert np.all(relative <= _error_bound_in_scales(fmt) * _scale_bound(fmt, np.float64(1.0)) * (1 + 1e-5))
