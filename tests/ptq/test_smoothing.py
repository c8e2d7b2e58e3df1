"""``smoothquant`` and ``awq`` end to end: rewrites that keep the float function, lower error than RTN."""

import jax
import jax.numpy as jnp
import pytest

from bitlaws import ptq  # noqa: F401  (registers the methods)
from bitlaws.quant import QuantRule, QuantSpec, quantize_model, run_calibration, with_mode


def _error(model, quantized, x):
    reference = model(x)
    return float(jnp.mean((quantized(x) - reference) ** 2) / jnp.mean(reference**2))


def _stats(model, rules, inputs, hessian=False):
    return run_calibration(model, rules, lambda m, b: m(b), [inputs(jax.random.key(0), 512, outliers=True)],
                           record_hessian=hessian)


def test_smoothquant_keeps_the_float_function_and_beats_rtn_at_w8a8(mlp, inputs):
    model = mlp
    rules = [QuantRule(module_path="fc.", weight=QuantSpec(format="int8"),
                       act=QuantSpec(format="int8", granularity="token"))]
    stats = _stats(model, rules, inputs)
    smooth = quantize_model(model, rules, stats, mode="fake", method="smoothquant")
    x = inputs(jax.random.key(1), 256, outliers=True)
    off = with_mode(smooth, "fp")  # quantization off: the smoothed model is the float one
    assert float(jnp.max(jnp.abs(off(x) - model(x))) / jnp.max(jnp.abs(model(x)))) < 1e-5
    packed = quantize_model(model, rules, stats, mode="packed", method="smoothquant")
    rtn = quantize_model(model, rules, mode="packed")
    assert _error(model, packed, x) < 0.7 * _error(model, rtn, x)


@pytest.mark.parametrize("clip", [False, True])
def test_awq_beats_rtn_at_w3(clip, mlp, inputs):
    model = mlp
    rules = [QuantRule(module_path="fc.", weight=QuantSpec(format="int3", granularity="group", group_size=16))]
    stats = _stats(model, rules, inputs, hessian=True)
    awq = quantize_model(model, rules, stats, mode="packed", method="awq", params={"clip": clip, "n_grid": 10})
    rtn = quantize_model(model, rules, mode="packed")
    x = inputs(jax.random.key(1), 256, outliers=True)
    assert _error(model, awq, x) < 0.9 * _error(model, rtn, x)
