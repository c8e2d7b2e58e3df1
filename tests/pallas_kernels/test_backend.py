"""The ``pallas`` seam backends: dispatch, fallbacks, and agreement with the ``xla`` backend through `qdot`/`qconv`."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from bitlaws.ptq import gptvq_core
from bitlaws.quant import QuantSpec, backends, seam
from bitlaws.quant.qarray import quantize

INT8_TOKEN = QuantSpec(format="int8", granularity="token", scale_dtype="float32")
INT4_TOKEN = QuantSpec(format="int4", granularity="token", scale_dtype="float32")


def _layer(fmt, k=128, n=64, seed=0, **spec):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(k, n)) * 0.05, jnp.float32)
    return quantize(w, QuantSpec(format=fmt, **spec))


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("fmt,act,spec", [
    ("int4", None, dict(granularity="group", group_size=64)),  # W4A16: weight-only kernel
    ("int8", INT8_TOKEN, {}),  # W8A8: int8 x int8 kernel on the unquantized activation
    ("int4", INT4_TOKEN, dict(granularity="group", group_size=32)),  # W4A4: fake-quantized x, W4 kernel
])
def test_qdot_pallas_interpret_agrees_with_xla(fmt, act, spec):
    w = _layer(fmt, **spec)
    x = _x((2, 7, 128))  # leading axes are flattened to M = 14
    bias = jnp.arange(64, dtype=jnp.float32) / 64
    packed = seam.LayerQuant(mode="packed", weight=w.spec, act=act)
    want = seam.qdot(x, w, packed, bias=bias)  # backend "xla"
    got = seam.qdot(x, w, packed, bias=bias, backend="pallas-interpret")
    assert got.shape == want.shape == (2, 7, 64)
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * float(jnp.max(jnp.abs(want)))


def test_pallas_backend_off_gpu_is_the_xla_computation_with_one_notice():
    w = _layer("int4", granularity="group", group_size=64)
    x = _x((5, 128))
    packed = seam.LayerQuant(mode="packed", weight=w.spec, backend="pallas")
    pallas_kernels.backend._NOTICED.discard("no-gpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = jax.jit(lambda x: seam.qdot(x, w, packed))(x)
        seam.qdot(x, w, packed)
    notices = [c for c in caught if "no GPU on this host" in str(c.message)]
    assert len(notices) == 1
    np.testing.assert_array_equal(got, jax.jit(lambda x: seam.qdot(x, w, packed, backend="xla"))(x))


def test_format_without_kernel_falls_back_to_xla_with_a_notice():
    w = _layer("fp6_e3m2")
    x = _x((3, 128))
    with pytest.warns(UserWarning, match="no kernel for fp6_e3m2"):
        got = pallas_kernels.matmul(x, w, interpret=True)
    np.testing.assert_array_equal(got, backends.xla_matmul(x, w))


def test_other_storage_types_are_refused_by_name():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 16)), jnp.float32)
    vq = gptvq_core.quantize_weight(w, jnp.eye(64), bits_per_dim=2, dim=2, group_size=64, em_iters=2,
                                    codebook_update=False)
    with pytest.raises(ValueError, match="kernels for QArray weights only, got VQArray"):
        pallas_kernels.matmul(_x((2, 64)), vq, interpret=True)


def test_qconv_through_pallas_uses_patches_and_agrees_with_xla():
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 32)) * 0.1, jnp.float32)
    w = quantize(kernel, QuantSpec(format="int8"), reduce_axes=(0, 1, 2))
    x = _x((2, 6, 6, 16))
    packed = seam.LayerQuant(mode="packed", weight=w.spec, act=INT8_TOKEN)
    for geometry in (dict(strides=(1, 1), padding="SAME"), dict(strides=(2, 2), padding="VALID"),
                     dict(strides=(1, 1), padding=((1, 2), (0, 1)), dilation=(2, 1))):
        want = seam.qconv(x, w, packed, **geometry)
        got = seam.qconv(x, w, packed, backend="pallas-interpret", **geometry)
        assert got.shape == want.shape
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * float(jnp.max(jnp.abs(want)))


def test_matmul_entry_dispatches_and_accepts_other_backends():
    w = _layer("int8")
    x = _x((4, 128))
    act = backends.ActOperand(spec=INT8_TOKEN)
    via_xla = pallas_kernels.matmul(x, w, backend="xla", act=act)
    via_kernel = pallas_kernels.matmul(x, w, interpret=True, act=act)
    assert float(jnp.max(jnp.abs(via_kernel - via_xla))) <= 1e-5 * float(jnp.max(jnp.abs(via_xla)))
    with pytest.raises(ValueError, match="unknown matmul backend 'cuda'"):
        pallas_kernels.matmul(x, w, backend="cuda")
