"""The ``gptq`` method end to end: calibration Hessians from the seam, packed QArrays, lower error than RTN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws import ptq  # noqa: F401  (registers gptq)
from bitlaws.quant import QArray, QuantRule, QuantSpec, quantize_model, run_calibration


@pytest.mark.parametrize("fmt", ["int3", "int4"])
def test_gptq_beats_rtn_through_quantize_model(fmt, mlp, inputs):
    model = mlp
    calibration = inputs(jax.random.key(0), 512)
    rules = [QuantRule(module_path="fc.", weight=QuantSpec(format=fmt, granularity="group", group_size=32))]
    stats = run_calibration(model, rules, lambda m, b: m(b), [calibration], record_hessian=True)
    gptq = quantize_model(model, rules, stats, mode="packed", method="gptq", params={"block_size": 16})
    rtn = quantize_model(model, rules, mode="packed")
    assert isinstance(gptq.fc1.qkernel.get_value(), QArray)
    held_out = inputs(jax.random.key(1), 256)
    reference = model(held_out)
    error = {name: float(jnp.mean((m(held_out) - reference) ** 2)) for name, m in (("gptq", gptq), ("rtn", rtn))}
    assert error["gptq"] < 0.8 * error["rtn"], error


def test_gptq_needs_hessians_and_names_its_parameters(mlp, inputs):
    model = mlp
    rules = [QuantRule(module_path="fc1", weight=QuantSpec(format="int4"))]
    with pytest.raises(ValueError, match="method 'gptq' needs calibration Hessians"):
        quantize_model(model, rules, mode="packed", method="gptq")
    stats = run_calibration(model, rules, lambda m, b: m(b), [inputs(jax.random.key(0), 64)], record_hessian=True)
    with pytest.raises(ValueError, match=r"no hyper-parameter\(s\) \['blocksize'\].*block_size=128"):
        quantize_model(model, rules, stats, mode="packed", method="gptq", params={"blocksize": 64})
    baked = quantize_model(model, rules, stats, mode="baked", method="gptq")
    packed = quantize_model(model, rules, stats, mode="packed", method="gptq")
    x = inputs(jax.random.key(2), 8)
    np.testing.assert_array_equal(np.asarray(baked(x)), np.asarray(packed(x)))
