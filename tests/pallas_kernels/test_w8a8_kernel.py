"""`w8a8_matmul` (int8 x int8 -> int32) against the fake-quantized float product and its reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.quant import QuantSpec, seam
from bitlaws.quant.qarray import fake_quant, quantize
from pallas_kernels import w8a8_kernel

DYNAMIC = QuantSpec(format="int8", granularity="token", scale_dtype="float32")
STATIC = QuantSpec(format="int8", granularity="tensor", static=True)


def _operands(shape, seed=0):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = quantize(jnp.asarray(rng.normal(size=(k, n)) * 0.05, jnp.float32), QuantSpec(format="int8"))
    return x, w


@pytest.mark.parametrize("shape", [(1, 64, 32), (70, 200, 48), (16, 128, 64), (130, 96, 80)])
def test_matches_fake_quantized_product(shape):
    x, w = _operands(shape)
    got = w8a8_kernel.w8a8_matmul(x, w, DYNAMIC, interpret=True)
    want = jnp.dot(fake_quant(x, DYNAMIC, reduce_axes=(-1,)), w.dequantize(jnp.float32), precision="highest")
    assert got.shape == (shape[0], shape[2])
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-6 * float(jnp.max(jnp.abs(want)))
    codes, scale = w8a8_kernel.quantize_rows(x, DYNAMIC)
    np.testing.assert_allclose(got, w8a8_kernel.w8a8_matmul_reference(codes, scale, w), rtol=1e-6, atol=1e-6)


def test_codes_times_scale_is_the_seam_fake_quantization():
    x, _ = _operands((9, 64, 8))
    codes, scale = w8a8_kernel.quantize_rows(x, DYNAMIC)
    assert codes.dtype == jnp.int8 and scale.shape == (9, 1)
    np.testing.assert_array_equal(codes.astype(jnp.float32) * scale, fake_quant(x, DYNAMIC, reduce_axes=(-1,)))


def test_static_per_tensor_activation():
    x, w = _operands((20, 64, 32))
    params = seam.ActQParams(scale=jnp.float32(0.03), zero_point=None)
    got = w8a8_kernel.w8a8_matmul(x, w, STATIC, params, interpret=True)
    fq = seam.quantize_activation(x, seam.LayerQuant(mode="fake", act=STATIC), params)
    want = jnp.dot(fq, w.dequantize(jnp.float32), precision="highest")
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-6 * float(jnp.max(jnp.abs(want)))


def test_lowers_to_triton_for_cuda():
    x, w = _operands((16, 128, 64))
    text = jax.jit(lambda x: w8a8_kernel.w8a8_matmul(x, w, DYNAMIC)).trace(x).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


def test_refuses_other_operands():
    x, w = _operands((4, 64, 16))
    int4 = quantize(jnp.ones((64, 16)), QuantSpec(format="int4"))
    assert not w8a8_kernel.supports(int4, DYNAMIC)
    assert not w8a8_kernel.supports(w, QuantSpec(format="int4", granularity="token"))
    assert not w8a8_kernel.supports(w, None)
    with pytest.raises(ValueError, match="w8a8_matmul: needs a per-channel int8 QArray"):
        w8a8_kernel.w8a8_matmul(x, int4, DYNAMIC)
