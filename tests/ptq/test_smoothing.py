"""``smoothquant`` and ``awq`` end to end: rewrites that keep the float function, lower error than RTN."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bitlaws import ptq  # noqa: F401  (registers the methods)
from bitlaws.quant import QLinear, QuantRule, QuantSpec, quantize_model, run_calibration, with_mode


class _Mlp(nnx.Module):
    def __init__(self):
        self.fc1 = QLinear(64, 128, rngs=nnx.Rngs(0))
        self.fc2 = QLinear(128, 32, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


def _outlier_inputs(key, n):
    """Correlated inputs with three outlier channels (x40), as transformers' activations have."""
    mixing = jax.random.normal(jax.random.key(42), (64, 64)) / 8.0
    x = jax.random.normal(key, (n, 64)) @ mixing
    return x.at[:, jnp.asarray([3, 17, 40])].multiply(40.0)


def _error(model, quantized, x):
    reference = model(x)
    return float(jnp.mean((quantized(x) - reference) ** 2) / jnp.mean(reference**2))


def _stats(model, rules, hessian=False):
    return run_calibration(model, rules, lambda m, b: m(b), [_outlier_inputs(jax.random.key(0), 512)],
                           record_hessian=hessian)


def test_smoothquant_keeps_the_float_function_and_beats_rtn_at_w8a8():
    model = _Mlp()
    rules = [QuantRule(module_path="fc.", weight=QuantSpec(format="int8"),
                       act=QuantSpec(format="int8", granularity="token"))]
    stats = _stats(model, rules)
    smooth = quantize_model(model, rules, stats, mode="fake", method="smoothquant")
    x = _outlier_inputs(jax.random.key(1), 256)
    off = with_mode(smooth, "fp")  # quantization off: the smoothed model is the float one
    assert float(jnp.max(jnp.abs(off(x) - model(x))) / jnp.max(jnp.abs(model(x)))) < 1e-5
    packed = quantize_model(model, rules, stats, mode="packed", method="smoothquant")
    rtn = quantize_model(model, rules, mode="packed")
    assert _error(model, packed, x) < 0.7 * _error(model, rtn, x)


@pytest.mark.parametrize("clip", [False, True])
def test_awq_beats_rtn_at_w3(clip):
    model = _Mlp()
    rules = [QuantRule(module_path="fc.", weight=QuantSpec(format="int3", granularity="group", group_size=16))]
    stats = _stats(model, rules, hessian=True)
    awq = quantize_model(model, rules, stats, mode="packed", method="awq", params={"clip": clip, "n_grid": 10})
    rtn = quantize_model(model, rules, mode="packed")
    x = _outlier_inputs(jax.random.key(1), 256)
    assert _error(model, awq, x) < 0.9 * _error(model, rtn, x)
