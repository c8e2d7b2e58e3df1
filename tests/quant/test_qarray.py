"""QArray: quantize / dequantize error bounds, real packing, storage size, fake_quant and its STE gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from bitlaws.quant import QArray, QuantSpec, dequantize, fake_quant, parse_format, quantize
from bitlaws.quant import packing, qarray
from bitlaws.quant.accounting import qarray_nbytes

INT_NAMES = [f"{s}int{b}" for s in ("", "u") for b in range(2, 9)]
GRANULARITIES = ["tensor", "channel", "group"]
HYPOTHESIS = settings(max_examples=15, deadline=None)


def _spec(name, granularity, group_size=4, **kw):
    return QuantSpec(format=name, granularity=granularity,
                     group_size=group_size if granularity == "group" else None, **kw)


def _per_element_scale(qa: QArray) -> np.ndarray:
    """The float scale each element of the original tensor was quantized with."""
    k, _ = qa.view_shape
    scale = np.asarray(qa.scale_f32)  # [G, C]
    per_row = np.repeat(scale, k // scale.shape[0], axis=0)  # [K, C]
    per_row = np.broadcast_to(per_row, (k, qa.view_shape[1]))
    return np.asarray(qarray.from_view(jnp.asarray(per_row), qa.shape, qa.reduce_axes))


@st.composite
def matrices(draw):
    rows = draw(st.sampled_from([4, 8]))  # a few shapes keep XLA's per-shape compilations cached
    cols = draw(st.sampled_from([1, 3, 5]))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    values = draw(hnp.arrays(np.float32, (rows, cols),
                             elements=st.floats(-1, 1, width=32, allow_nan=False, allow_infinity=False)))
    return values * np.float32(scale)


@HYPOTHESIS
@given(x=matrices(), name=st.sampled_from(INT_NAMES), granularity=st.sampled_from(GRANULARITIES))
def test_int_error_at_most_half_step(x, name, granularity):
    qa = quantize(x, _spec(name, granularity))
    err = np.abs(np.asarray(dequantize(qa)) - x)
    bound = 0.5 * _per_element_scale(qa)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7), float((err - bound).max())


@HYPOTHESIS
@given(x=matrices(), name=st.sampled_from(["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]),
       granularity=st.sampled_from(GRANULARITIES))
def test_fp_error_at_most_half_local_step(x, name, granularity):
    fmt = parse_format(name)
    qa = quantize(x, _spec(name, granularity))
    scale = _per_element_scale(qa)
    deq = np.asarray(dequantize(qa))
    grid = fmt.grid()
    units = x / scale
    idx = np.clip(np.searchsorted(grid, units), 1, grid.size - 1)
    local_step = grid[idx] - grid[idx - 1]
    assert np.all(np.abs(deq - x) <= 0.5 * local_step * scale * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("name", INT_NAMES + ["fp8_e4m3", "fp6_e2m3", "fp4_e2m1", "mxfp4", "mxfp6", "mxfp8"])
def test_fake_quant_equals_dequantize_of_quantize(name):
    x = jax.random.normal(jax.random.key(0), (64, 24)) * 3
    spec = QuantSpec(format=name) if name.startswith("mx") else _spec(name, "group", 16)
    np.testing.assert_array_equal(np.asarray(fake_quant(x, spec)), np.asarray(dequantize(quantize(x, spec))))


@pytest.mark.parametrize("name", ["int4", "uint3", "int8", "fp8_e5m2", "fp4_e2m1"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zero_range_groups_are_finite(name, granularity):
    for fill in (0.0, 3.0, -1e-30):
        x = jnp.full((8, 4), fill, jnp.float32)
        deq = np.asarray(dequantize(quantize(x, _spec(name, granularity))))
        assert np.all(np.isfinite(deq))
        np.testing.assert_allclose(deq, np.asarray(x), atol=1e-3 * max(abs(fill), 1e-3))


@HYPOTHESIS
@given(bits=st.sampled_from([2, 3, 4, 8]), length=st.sampled_from([1, 2, 3, 5, 7, 9, 13, 31, 33]), rows=st.just(2),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_identity_on_any_last_dim(bits, length, rows, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, (rows, length), dtype=np.uint8)
    packed = packing.pack_bits(codes, bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (rows, packing.packed_length(length, bits))
    np.testing.assert_array_equal(np.asarray(packing.unpack_bits(packed, bits, length)), codes)


def test_packing_layouts_are_dense():
    assert packing.packed_length(8, 4) == 4 and packing.packed_length(8, 2) == 2
    assert packing.packed_length(8, 3) == 3 and packing.packed_length(7, 8) == 7
    two = packing.pack_bits(np.array([[0x3, 0xA]], np.uint8), 4)
    assert np.asarray(two).tolist() == [[0xA3]]  # little-endian nibbles: v0 | v1 << 4


def test_qarray_storage_dtypes():
    x = jax.random.normal(jax.random.key(1), (64, 8))
    assert quantize(x, _spec("int8", "channel")).values.dtype == jnp.int8
    assert quantize(x, _spec("uint8", "channel")).values.dtype == jnp.uint8
    assert quantize(x, _spec("fp8_e4m3", "channel")).values.dtype == jnp.float8_e4m3fn
    assert quantize(x, _spec("fp8_e5m2", "channel")).values.dtype == jnp.float8_e5m2
    int4 = quantize(x, _spec("int4", "channel"))
    assert int4.values.dtype == jnp.uint8 and int4.values.shape == (32, 8)
    assert quantize(x, _spec("int3", "channel")).values.shape == (24, 8)
    mx = quantize(x, QuantSpec(format="mxfp4"))
    assert mx.scale.dtype == jnp.uint8 and mx.scale.shape == (2, 8) and mx.zero_point is None


def test_qarray_is_a_pytree_with_static_layout():
    qa = quantize(jnp.ones((16, 4)), _spec("int4", "group", 8))
    leaves, treedef = jax.tree.flatten(qa)
    assert len(leaves) == 3  # values, scale, scale_exp (float16 scales; zero point None)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt.spec == qa.spec and rebuilt.shape == qa.shape
    np.testing.assert_array_equal(jax.jit(dequantize)(qa), dequantize(qa))


@pytest.mark.parametrize("name,bits_per_value", [("int4", 0.5), ("int3", 0.375)])
def test_storage_of_4096_square_group_128(name, bits_per_value):
    w = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.float32)
    spec = QuantSpec(format=name, granularity="group", group_size=128)
    qa = quantize(w, spec)
    groups = 4096 * 4096 // 128
    assert qa.nbytes <= bits_per_value * 4096**2 + groups * (2 + 1) + 2  # fp16 scale + zero byte; exponent
    assert qa.nbytes == qarray_nbytes(w.shape, spec)
    rel = float(jnp.sqrt(jnp.mean((dequantize(qa) - w) ** 2)))
    assert rel < (0.15 if name == "int4" else 0.3)


@pytest.mark.parametrize("name,granularity", [(n, g) for n in ["int4", "uint4", "fp4_e2m1", "fp8_e4m3", "int3"]
                                              for g in GRANULARITIES] + [("mxfp4", "group"), ("mxfp6", "group")])
def test_analytic_nbytes_matches_real(name, granularity):
    spec = QuantSpec(format=name) if name.startswith("mx") else _spec(name, granularity, 32)
    x = jnp.ones((3, 3, 64, 10))
    assert quantize(x, spec).nbytes == qarray_nbytes(x.shape, spec)


def test_reduce_axes_for_activations_and_convs():
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    per_token = quantize(x, QuantSpec(format="int8", granularity="token"), reduce_axes=(-1,))
    assert per_token.scale.shape == (1, 10)
    np.testing.assert_allclose(dequantize(per_token), x, atol=0.02)
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 8, 4))
    conv = quantize(kernel, _spec("int4", "group", 24))
    assert conv.view_shape == (72, 4) and conv.scale.shape == (3, 4)
    assert dequantize(conv).shape == kernel.shape


@pytest.mark.parametrize("spec", [
    QuantSpec(format="int8", granularity="token", scale_dtype="float32"),
    QuantSpec(format="int8", granularity="token"),  # float16 scales: one shared storage exponent per call
    QuantSpec(format="uint4", granularity="token", scale_dtype="bfloat16"),
    QuantSpec(format="fp8_e4m3", granularity="token", scale_dtype="float32"),
    QuantSpec(format="fp4_e2m1", granularity="token"),
    QuantSpec(format="int4", granularity="token", calibrator="percentile", percentile=90.0),
    QuantSpec(format="int4", granularity="token", calibrator="mse"),
], ids=lambda spec: spec.short() + "/" + spec.scale_dtype)
def test_per_token_rows_path_equals_the_reduction_view_bit_for_bit(spec):
    """Per-token activation scales are computed on [N, K, 1] in place; the [K, N] view must give the same bits."""
    x = np.asarray(jax.random.normal(jax.random.key(5), (3, 7, 48)), np.float32) * 3.0
    x[0, 0] = 0.0  # an all-zero token
    x[0, 1, 5] = 1e4  # an outlier
    x[0, 2] *= 1e-30  # tiny (subnormal-scale) values
    x[1, 3, 7] = np.nan  # a non-finite value: its token gets NaN, the others not
    x[1, 4, 0] = -np.inf
    x[2, 5] = 2.0 ** 100  # huge, constant
    x = jnp.asarray(x)
    fast = qarray._quantize_dequantize(x, spec, (2,))
    view = qarray._quantize_dequantize_view(x, spec, (2,))
    for a, b in zip(fast, view):
        assert a.shape == b.shape == x.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x_hat = np.asarray(fast[0])
    assert np.isnan(x_hat[1, 3]).all() and np.isnan(x_hat[1, 4]).all() and np.isfinite(x_hat[2]).all()
    np.testing.assert_array_equal(x_hat[0, 0], 0.0)


def test_group_size_must_divide_axis():
    spec = QuantSpec(format="int4", granularity="group", group_size=100)
    with pytest.raises(ValueError, match="group_size"):
        quantize(jnp.ones((4096, 8)), spec)


def test_fake_quant_straight_through_gradient():
    spec = QuantSpec(format="int4", granularity="tensor", calibrator="percentile", percentile=90.0)
    x = jax.random.normal(jax.random.key(4), (32, 16))
    grad = np.asarray(jax.grad(lambda v: jnp.sum(fake_quant(v, spec) * 2.0))(x))
    _, inside = qarray.quantize_dequantize(x, spec)
    inside = np.asarray(inside)
    assert 0 < (~inside).sum() < inside.size  # the percentile clip leaves some values outside
    np.testing.assert_array_equal(grad[inside], 2.0)
    np.testing.assert_array_equal(grad[~inside], 0.0)
    # Forward mode too: the value is dequantize(quantize(x)), the tangent passes inside the range only.
    value, tangent = jax.jvp(lambda v: fake_quant(v, spec), (x,), (jnp.full_like(x, 3.0),))
    np.testing.assert_array_equal(np.asarray(value), np.asarray(qarray.quantize_dequantize(x, spec)[0]))
    np.testing.assert_array_equal(np.asarray(tangent), np.where(inside, 3.0, 0.0))
    second = jax.grad(lambda v: jnp.sum(jax.grad(lambda u: jnp.sum(fake_quant(u, spec) ** 2))(v)))(x)
    np.testing.assert_array_equal(np.asarray(second), np.where(inside, 2.0, 0.0))  # d/dx (2 x_hat * mask)


def test_minmax_unsigned_matches_paper_equations():
    # Eq. 4-6 by hand on one group: l = -1, u = 2, b = 2 -> s = 1, z = 1.
    x = jnp.asarray([[-1.0], [0.4], [0.6], [2.0]])
    qa = quantize(x, QuantSpec(format="uint2", granularity="tensor", scale_dtype="float32"))
    assert float(qa.scale[0, 0]) == 1.0 and int(qa.zero_point[0, 0]) == 1
    np.testing.assert_array_equal(np.asarray(dequantize(qa))[:, 0], [-1.0, 0.0, 1.0, 2.0])
