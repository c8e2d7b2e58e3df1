"""`fp8_matmul` (E4M3) and `mxfp4_matmul` (E2M1 + E8M0 per 32) against their references, interpreted and lowered."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.quant import QuantSpec, formats
from bitlaws.quant.qarray import quantize
from pallas_kernels import fp8_kernel, mxfp4_kernel

CASES = [
    (fp8_kernel.fp8_matmul, fp8_kernel.fp8_matmul_reference, QuantSpec(format="fp8_e4m3"), (1, 128, 64)),
    (fp8_kernel.fp8_matmul, fp8_kernel.fp8_matmul_reference,
     QuantSpec(format="fp8_e4m3", granularity="group", group_size=64), (9, 192, 40)),
    (fp8_kernel.fp8_matmul, fp8_kernel.fp8_matmul_reference, QuantSpec(format="fp8_e4m3"), (33, 100, 16)),  # K pad
    (mxfp4_kernel.mxfp4_matmul, mxfp4_kernel.mxfp4_matmul_reference, QuantSpec(format="mxfp4"), (1, 128, 64)),
    (mxfp4_kernel.mxfp4_matmul, mxfp4_kernel.mxfp4_matmul_reference, QuantSpec(format="mxfp4"), (20, 96, 24)),
]


@pytest.mark.parametrize("matmul,reference,spec,shape", CASES)
def test_kernel_matches_reference_in_interpreter(matmul, reference, spec, shape):
    m, k, n = shape
    rng = np.random.default_rng(0)
    w = quantize(jnp.asarray(rng.normal(size=(k, n)), jnp.float32), spec)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    got, want = matmul(x, w, interpret=True), reference(x, w)
    assert got.shape == (m, n)
    assert float(jnp.max(jnp.abs(got - want))) <= 2e-6 * float(jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("matmul,spec", [(fp8_kernel.fp8_matmul, QuantSpec(format="fp8_e4m3")),
                                         (mxfp4_kernel.mxfp4_matmul, QuantSpec(format="mxfp4"))])
def test_lowers_to_triton_for_cuda(matmul, spec):
    w = quantize(jnp.ones((128, 64)), spec)
    x = jnp.ones((4, 128))
    assert "triton" in jax.jit(lambda x: matmul(x, w)).trace(x).lower(lowering_platforms=("cuda",)).as_text().lower()


def test_e2m1_decode_is_the_format_grid():
    codes = jnp.arange(16, dtype=jnp.int32)
    positive = formats.parse_format("mxfp4").element.positive_grid()
    want = np.concatenate([positive, -positive])
    np.testing.assert_array_equal(mxfp4_kernel.decode_e2m1(codes), want)


def test_bf16_activations():
    rng = np.random.default_rng(1)
    w = quantize(jnp.asarray(rng.normal(size=(256, 64)), jnp.float32), QuantSpec(format="mxfp4"))
    x = jnp.asarray(rng.normal(size=(8, 256)), jnp.bfloat16)
    got = mxfp4_kernel.mxfp4_matmul(x, w, interpret=True).astype(jnp.float32)
    want = mxfp4_kernel.mxfp4_matmul_reference(x, w).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-2 * float(jnp.max(jnp.abs(want)))


def test_refusals_name_the_weight():
    x = jnp.ones((2, 64))
    int4 = quantize(jnp.ones((64, 16)), QuantSpec(format="int4"))
    with pytest.raises(ValueError, match="fp8_matmul: unsupported weight QArray\\(int4"):
        fp8_kernel.fp8_matmul(x, int4)
    with pytest.raises(ValueError, match="mxfp4_matmul: unsupported weight QArray\\(int4"):
        mxfp4_kernel.mxfp4_matmul(x, int4)
