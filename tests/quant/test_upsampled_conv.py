"""Nearest x2 upsampling + 3x3 conv at the input resolution, and ``QConv(x, upsample=2)`` in every mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.quant import QConv, QuantRule, QuantSpec, calibration_stats, quantize_model, run_calibration
from bitlaws.quant import upsampled_conv
from bitlaws.quant.seam import qconv


@jax.jit
def _literal(x, kernel):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return jax.lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_nearest_upsample_repeats_pixels():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
    np.testing.assert_array_equal(upsampled_conv.nearest_upsample(x, 2),
                                  jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    np.testing.assert_array_equal(upsampled_conv.nearest_upsample(x, 3),
                                  jnp.repeat(jnp.repeat(x, 3, axis=1), 3, axis=2))
    assert upsampled_conv.nearest_upsample(x, 1) is x


@pytest.mark.parametrize("shape,out", [((2, 5, 7, 3), 4), ((1, 1, 1, 6), 2), ((1, 8, 8, 16), 24)])
def test_phase_convolution_equals_upsample_then_conv(shape, out):
    x = jax.random.normal(jax.random.key(1), shape)
    kernel = jax.random.normal(jax.random.key(2), (3, 3, shape[-1], out))
    got = jax.jit(upsampled_conv.nearest2x_conv3x3)(x, kernel)
    assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], out)
    assert _rel(got, _literal(x, kernel)) < 1e-5


def test_phase_kernels_are_sums_of_taps():
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 2, 5))
    phases = jax.jit(upsampled_conv.phase_kernels)(kernel).reshape(2, 2, 2, 2, 2, 5)  # [u, v, C, a, b, O]
    k = np.asarray(kernel)
    # phase (0, 1): rows (k0, k1 + k2), columns (k0 + k1, k2).
    want = np.stack([np.stack([k[0, 0] + k[0, 1], k[0, 2]]),
                     np.stack([k[1, 0] + k[1, 1] + k[2, 0] + k[2, 1], k[1, 2] + k[2, 2]])])
    np.testing.assert_allclose(phases[:, :, :, 0, 1], want, rtol=1e-6)
    assert float(jnp.sum(phases)) == pytest.approx(4 * float(jnp.sum(kernel)), rel=1e-5)


@pytest.mark.parametrize("geometry,expected", [
    (dict(kernel_shape=(3, 3, 4, 4), strides=(1, 1), padding=((1, 1), (1, 1))), True),
    (dict(kernel_shape=(3, 3, 4, 4), strides=(1, 1), padding="SAME"), True),
    (dict(kernel_shape=(3, 3, 4, 4), strides=(2, 2), padding=((1, 1), (1, 1))), False),
    (dict(kernel_shape=(3, 3, 4, 4), strides=(1, 1), padding="VALID"), False),
    (dict(kernel_shape=(1, 1, 4, 4), strides=(1, 1), padding=((0, 0), (0, 0))), False),
    (dict(kernel_shape=(5, 5, 4, 4), strides=(1, 1), padding=((2, 2), (2, 2))), False),
])
def test_folds_only_the_geometry_it_computes(geometry, expected):
    assert upsampled_conv.folds(factor=2, dilation=(1, 1), feature_group_count=1, **geometry) is expected
    assert not upsampled_conv.folds(factor=3, dilation=(1, 1), feature_group_count=1, **geometry)


@pytest.mark.parametrize("kernel_size,padding", [(3, 1), (1, 0), (3, 0)])
def test_seam_upsample_matches_the_literal_form_for_any_geometry(kernel_size, padding):
    x = jax.random.normal(jax.random.key(4), (2, 4, 6, 8))
    kernel = jax.random.normal(jax.random.key(5), (kernel_size, kernel_size, 8, 8))
    pads = ((padding, padding), (padding, padding))
    got = jax.jit(lambda x, k: qconv(x, k, padding=pads, upsample=2))(x, kernel)
    want = jax.jit(lambda x, k: qconv(upsampled_conv.nearest_upsample(x, 2), k, padding=pads))(x, kernel)
    assert got.shape == want.shape and _rel(got, want) < 1e-5
    with pytest.raises(ValueError, match="upsample"):
        qconv(x, kernel, padding=pads, upsample=0)


class _Up(nnx.Module):
    def __init__(self, rngs):
        self.conv = QConv(8, 12, 3, padding=1, rngs=rngs)

    def __call__(self, x, literal=False):  # [B, H, W, 8] -> [B, 2H, 2W, 12]
        if literal:
            return self.conv(upsampled_conv.nearest_upsample(x, 2))
        return self.conv(x, upsample=2)


W4A8_TOKEN = [QuantRule(module_path=".*", weight=QuantSpec(format="int4"),
                        act=QuantSpec(format="int8", granularity="token"))]
W8A8_STATIC = [QuantRule(module_path=".*", weight=QuantSpec(format="int8"),
                         act=QuantSpec(format="int8", granularity="tensor", static=True))]


@pytest.mark.parametrize("mode", ["fake", "packed"])
def test_quantized_layer_upsample_equals_upsampled_input(mode):
    model = _Up(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(6), (2, 5, 5, 8))
    both = nnx.jit(lambda m, x: (m(x), m(x, literal=True)))
    folded, literal = both(model, x)
    assert _rel(folded, literal) < 1e-5
    q_folded, q_literal = both(quantize_model(model, W4A8_TOKEN, mode=mode), x)
    assert _rel(q_folded, q_literal) < 1e-5
    assert _rel(q_folded, folded) > 1e-3  # the quantization did something


def test_static_activation_quantization_and_calibration_see_the_upsampled_input():
    model = _Up(nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(7), (2, 4, 4, 8))
    forward = nnx.jit(lambda m, x: m(x))
    stats = run_calibration(model, W8A8_STATIC, forward, [x, 2.0 * x])
    literal_stats = run_calibration(model, W8A8_STATIC, nnx.jit(lambda m, x: m(x, literal=True)), [x, 2.0 * x])
    for name in ("lo", "hi", "count", "absmax"):
        np.testing.assert_allclose(getattr(stats["conv"], name), getattr(literal_stats["conv"], name), rtol=1e-6)
    folded, literal = nnx.jit(lambda m, x: (m(x), m(x, literal=True)))(quantize_model(model, W8A8_STATIC, stats), x)
    assert _rel(folded, literal) < 1e-5

    hessian_model = quantize_model(model, W8A8_STATIC, mode="calibrate", record_hessian=True)
    literal_model = quantize_model(model, W8A8_STATIC, mode="calibrate", record_hessian=True)
    nnx.jit(lambda a, b, x: (a(x), b(x, literal=True)))(hessian_model, literal_model, x)
    np.testing.assert_allclose(calibration_stats(hessian_model)["conv"].hessian,
                               calibration_stats(literal_model)["conv"].hessian, rtol=1e-5)


def _conv_kernel_shapes(fn, *args):
    """Kernel shapes of every convolution in ``fn``'s jaxpr."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [tuple(eqn.invars[1].aval.shape) for eqn in jaxpr.eqns if eqn.primitive.name == "conv_general_dilated"]


def test_the_decoders_upsample_at_the_input_resolution():
    """VQVAE's `Upsample2x` and the KL-VAE's `UpBlock` run the 2x2 phase convolution, not a 3x3 on a 4x larger map."""
    from bitlaws.models.kl_vae import UpBlock
    from bitlaws.models.vqvae import Upsample2x

    x = jnp.zeros((1, 4, 4, 8))
    vq = Upsample2x(8, rngs=nnx.Rngs(0))
    assert _conv_kernel_shapes(lambda x: vq(x), x) == [(2, 2, 8, 32)]
    kl = UpBlock(8, 8, num_layers=0, groups=4, add_upsample=True, rngs=nnx.Rngs(0))
    assert _conv_kernel_shapes(lambda x: kl(x), x) == [(2, 2, 8, 32)]
    assert kl(x).shape == vq(x).shape == (1, 8, 8, 8)
