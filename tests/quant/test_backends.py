"""The backend registry of the packed mode: registration, per-call / per-rule choice, convolution patches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.quant import QuantRule, QuantSpec, backends, seam, transform
from bitlaws.quant.layers import QLinear
from bitlaws.quant.qarray import quantize
from bitlaws.quant.spec import rules_from_json, rules_to_json


@pytest.mark.parametrize("geometry", [
    dict(strides=(1, 1), padding="SAME", dilation=(1, 1)),
    dict(strides=(2, 1), padding="VALID", dilation=(1, 1)),
    dict(strides=(1, 2), padding=((2, 0), (1, 1)), dilation=(1, 2)),
])
def test_patches_times_kernel_view_is_the_convolution(geometry):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 2, 3, 5)), jnp.float32)  # HWIO
    patches = backends.conv_patches(x, kernel.shape, **geometry)  # [B, H', W', kh * kw * C]
    got = patches @ kernel.reshape(-1, 5)
    want = jax.lax.conv_general_dilated(x, kernel, geometry["strides"], geometry["padding"],
                                        rhs_dilation=geometry["dilation"], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_backend_without_conv_runs_convolutions_as_patches():
    calls = []

    def counting(x, w, act):
        calls.append(x.shape)
        return backends.xla_matmul(x, w, act)

    backends.register_backend("counting-test", counting, replace=True)
    rng = np.random.default_rng(1)
    w = quantize(jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32), QuantSpec(format="int8"),
                 reduce_axes=(0, 1, 2))
    x = jnp.asarray(rng.normal(size=(1, 5, 5, 4)), jnp.float32)
    quant = seam.LayerQuant(mode="packed", weight=w.spec)
    got = seam.qconv(x, w, quant, backend="counting-test")
    np.testing.assert_allclose(got, seam.qconv(x, w, quant), rtol=1e-5, atol=1e-5)
    assert calls == [(25, 36)]
    with pytest.raises(ValueError, match="'counting-test' has no grouped convolution"):
        seam.qconv(jnp.ones((1, 5, 5, 8)), w, quant, backend="counting-test", feature_group_count=2)


def test_quantizing_backend_receives_the_raw_activation_and_its_spec():
    seen = {}

    def spy(x, w, act):
        seen["x"], seen["act"] = x, act
        return backends.xla_matmul(x, w, act)

    backends.register_backend("spy-test", spy, quantizes_activations=True, replace=True)
    act = QuantSpec(format="int8", granularity="token")
    w = quantize(jnp.ones((16, 4)), QuantSpec(format="int8"))
    x = jnp.linspace(-1.0, 1.0, 32).reshape(2, 16)
    seam.qdot(x, w, seam.LayerQuant(mode="packed", weight=w.spec, act=act), backend="spy-test")
    np.testing.assert_array_equal(seen["x"], x)
    assert seen["act"].spec == act and not seen["act"].quantized


def test_registry_errors_name_the_backend():
    with pytest.raises(ValueError, match="unknown matmul backend 'nope'; registered: .*'pallas'.*'xla'"):
        backends.get_backend("nope")
    with pytest.raises(ValueError, match="'xla' is already registered"):
        backends.register_backend("xla", backends.xla_matmul)
    with pytest.raises(ValueError, match="QuantRule.backend must be None or a backend name"):
        QuantRule(module_path=".*", backend="")


class _Two(nnx.Module):
    def __init__(self):
        self.first = QLinear(16, 8, rngs=nnx.Rngs(0))
        self.second = QLinear(8, 4, rngs=nnx.Rngs(1))


def test_rule_backend_is_used_and_saved():
    model = _Two()
    int8 = QuantSpec(format="int8")
    rules = [QuantRule(module_path="first", weight=int8, backend="pallas"), QuantRule(module_path=".*", weight=int8)]
    packed = transform.apply_method(model, rules, "rtn", materialize="packed")
    layers = dict(transform.quant_layers(packed))
    assert layers["first"].quant.backend == "pallas" and layers["second"].quant.backend == "xla"
    assert rules_from_json(rules_to_json(rules)) == rules
    with pytest.raises(ValueError, match="unknown matmul backend 'gpu'"):
        transform.apply_method(model, [QuantRule(module_path=".*", weight=int8, backend="gpu")], "rtn",
                               materialize="packed")
