"""The ``gptq`` method end to end: calibration Hessians from the seam, packed QArrays, lower error than RTN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.ptq import gptq
from bitlaws.quant import CalibrationData, QArray, QuantRule, QuantSpec, quantize_model, run_calibration


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


def test_sequential_gptq_calibrates_later_layers_on_quantized_earlier_ones(mlp, inputs):
    model = mlp
    rules = [QuantRule(module_path="fc.", weight=QuantSpec(format="int3", granularity="group", group_size=32))]
    data = CalibrationData(lambda m, b: m(b), [inputs(jax.random.key(0), 256), inputs(jax.random.key(3), 256)])
    plain = quantize_model(model, rules, mode="packed", method="gptq", params={"block_size": 16}, data=data)
    sequential = quantize_model(model, rules, mode="packed", method="gptq", data=data,
                                params={"block_size": 16, "sequential": True})
    # The first stage sees the float model either way; fc2's Hessian comes from quantized fc1's outputs.
    np.testing.assert_array_equal(np.asarray(plain.fc1.qkernel.get_value().values),
                                  np.asarray(sequential.fc1.qkernel.get_value().values))
    assert not np.array_equal(np.asarray(plain.fc2.qkernel.get_value().values),
                              np.asarray(sequential.fc2.qkernel.get_value().values))
    held_out = inputs(jax.random.key(1), 512)
    reference = model(held_out)
    error = {name: float(jnp.mean((m(held_out) - reference) ** 2)) for name, m in
             (("plain", plain), ("sequential", sequential))}
    assert error["sequential"] < error["plain"], error
    with pytest.raises(ValueError, match="sequential=True needs the calibration data"):
        stats = run_calibration(model, rules, lambda m, b: m(b), data.batches, record_hessian=True)
        quantize_model(model, rules, stats, mode="packed", method="gptq", params={"sequential": True})


def test_stages_group_layers_by_block():
    paths = ["word_embed", "blocks.0.attn.qkv", "blocks.0.ffn.fc1", "blocks.1.attn.qkv", "blocks.10.fc", "head"]
    assert gptq.stages(paths) == [["word_embed"], ["blocks.0.attn.qkv", "blocks.0.ffn.fc1"], ["blocks.1.attn.qkv"],
                                  ["blocks.10.fc"], ["head"]]
