"""`int_matmul` (W2/W4/W8 x A16) against its plain-jnp reference, in the Pallas interpreter, and lowered for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.quant import QuantSpec
from bitlaws.quant.qarray import quantize
from pallas_kernels import common, int_kernel

# (format, granularity, group size, (M, K, N)): block multiples, M = 1, K and N that need padding.
CASES = [
    ("int4", "group", 128, (1, 256, 64)),
    ("int4", "group", 32, (16, 256, 128)),
    ("int4", "channel", None, (5, 200, 48)),  # K = 200: no power-of-two block divides it -> padded
    ("uint4", "group", 64, (17, 128, 96)),  # zero points
    ("int8", "channel", None, (3, 64, 32)),
    ("uint8", "group", 32, (4, 96, 40)),  # N = 40 padded to 64
    ("int2", "group", 64, (2, 128, 16)),
    ("int4", "tensor", None, (33, 64, 16)),
    ("int3", "group", 128, (3, 256, 32)),  # 8 codes in 3 bytes: the project's 3-bit packing as stored
    ("uint3", "channel", None, (1, 200, 24)),  # K = 200 is not a whole number of 8-code units
]
TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}  # relative to max |reference|


def _operands(fmt, granularity, group_size, shape, dtype=jnp.float32, seed=0):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(k, n)) * 0.05, jnp.float32)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    return x, quantize(w, QuantSpec(format=fmt, granularity=granularity, group_size=group_size))


@pytest.mark.parametrize("fmt,granularity,group_size,shape", CASES)
def test_kernel_matches_reference_in_interpreter(fmt, granularity, group_size, shape):
    x, w = _operands(fmt, granularity, group_size, shape)
    got = int_kernel.int_matmul(x, w, interpret=True)
    ref = int_kernel.int_matmul_reference(x, w)
    assert got.shape == (shape[0], shape[2]) and got.dtype == x.dtype
    np.testing.assert_array_less(float(jnp.max(jnp.abs(got - ref))), TOLERANCE[jnp.float32] * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_activations_accumulate_in_float32(dtype):
    x, w = _operands("int4", "group", 64, (8, 512, 64), dtype=dtype)
    got = int_kernel.int_matmul(x, w, interpret=True)
    ref = int_kernel.int_matmul_reference(x, w)  # f32 math on the same half-precision inputs
    assert got.dtype == dtype
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
    assert err <= TOLERANCE[dtype] * float(jnp.max(jnp.abs(ref.astype(jnp.float32))))


def test_non_finite_group_stays_nan():
    x, _ = _operands("int4", "group", 32, (4, 64, 16))
    w = jnp.ones((64, 16)).at[3, 5].set(jnp.nan)
    qa = quantize(w, QuantSpec(format="int4", granularity="group", group_size=32))
    got = np.asarray(int_kernel.int_matmul(x, qa, interpret=True))
    assert np.isnan(got[:, 5]).all() and np.isfinite(np.delete(got, 5, axis=1)).all()


def test_lowers_to_triton_for_cuda_and_to_xla_for_cpu():
    x, w = _operands("int4", "group", 128, (1, 256, 64))
    f = jax.jit(lambda x: int_kernel.int_matmul(x, w))
    cuda = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    cpu = f.trace(x).lower(lowering_platforms=("cpu",)).as_text()
    assert "triton" in cuda.lower()
    assert "triton" not in cpu.lower()
    np.testing.assert_allclose(f(x), int_kernel.int_matmul_reference(x, w), rtol=1e-6, atol=1e-6)


def test_rejects_unsupported_weights_by_name():
    x, _ = _operands("int4", "channel", None, (2, 64, 16))
    fp8 = quantize(jnp.ones((64, 16)), QuantSpec(format="fp8_e4m3"))
    with pytest.raises(ValueError, match="int_matmul: unsupported weight QArray\\(fp8_e4m3"):
        int_kernel.int_matmul(x, fp8)
    int4 = quantize(jnp.ones((64, 16)), QuantSpec(format="int4"))
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        int_kernel.int_matmul(x[:, :32], int4)


def test_group_smaller_than_a_dot_is_refused():
    x, w = _operands("int2", "group", 32, (2, 128, 16))  # 2-bit: 4 codes per unit, 16-row dots need groups >= 64
    with pytest.raises(ValueError, match="group size 32 of .* is not a multiple of 64"):
        int_kernel.int_matmul(x, w, interpret=True)


def test_block_config_validates():
    with pytest.raises(ValueError, match="BlockConfig.block_n must be a power of two >= 16"):
        common.BlockConfig(block_n=48)
    assert common.BlockConfig(block_m=64).for_m(1).block_m == 16
