"""The seam, QLinear/QConv and quantize_model on a small transformer block."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.quant import (QArray, QuantRule, QuantSpec, UnusedRuleWarning, bake_fake_weights, calibration_stats, dequantize,
                           match_rules, quantize_model, run_calibration, with_mode)
from bitlaws.quant.layers import QLinear
from bitlaws.port.mapping import to_state_dict

INT8 = QuantSpec(format="int8")
W8A8 = [QuantRule(module_path=r".*", weight=INT8, act=QuantSpec(format="int8", granularity="token"))]


def _rel(a, b):
    """Relative L2 error ||a - b|| / ||b||."""
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_fp_mode_is_bit_identical_to_the_unwrapped_computation(block, images):
    np.testing.assert_array_equal(np.asarray(block(images)), np.asarray(block.reference(images)))
    jitted = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(jitted(block, images)),
                                  np.asarray(jax.jit(lambda x: block.reference(x))(images)))


def test_fake_w8a8_is_close_and_input_model_unchanged(block, images):
    before = to_state_dict(block)
    reference = block(images)
    w8a16 = quantize_model(block, [QuantRule(module_path=".*", weight=INT8)])
    assert float(jnp.abs(w8a16(images) - reference).max() / jnp.abs(reference).max()) < 1e-2
    fake = quantize_model(block, W8A8, mode="fake")  # per-token int8 activations on top: ~1% through 5 layers
    assert _rel(fake(images), reference) < 2e-2
    after = to_state_dict(block)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    assert block.qkv.quant.mode == "fp" and fake.qkv.quant.mode == "fake"
    np.testing.assert_array_equal(np.asarray(block(images)), np.asarray(block.reference(images)))


def test_lower_bits_give_larger_error(block, images):
    errors = []
    for fmt in ("int8", "int4", "int2"):
        rules = [QuantRule(module_path=".*", weight=QuantSpec(format=fmt))]
        errors.append(_rel(quantize_model(block, rules)(images), block(images)))
    assert errors[0] < errors[1] < errors[2]


def test_packed_matches_fake_and_holds_qarrays(block, images):
    rules = [QuantRule(module_path=r"(qkv|proj|mlp\.\d+)",
                       weight=QuantSpec(format="int4", granularity="group", group_size=16)),
             QuantRule(module_path="stem", weight=QuantSpec(format="fp8_e4m3"))]
    fake = quantize_model(block, rules, mode="fake")
    packed = quantize_model(block, rules, mode="packed")
    assert packed.qkv.kernel is None and isinstance(packed.qkv.qkernel.get_value(), QArray)
    assert packed.qkv.qkernel.get_value().values.dtype == jnp.uint8
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(packed, images)),
                               np.asarray(fake(images)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dequantize(packed.mlp[0].qkernel.get_value())),
                               np.asarray(quantize_model(block, rules, mode="fake").mlp[0].kernel[...]), atol=0.5)


def test_unused_rule_is_reported(block):
    rules = W8A8 + [QuantRule(module_path=r"blocks\.\d+\.never", weight=INT8)]
    with pytest.warns(UnusedRuleWarning, match="never"):
        quantize_model(block, [rules[1], rules[0]])  # first-position rule matches nothing
    match = match_rules(block, rules)
    assert match.unused_rules == [rules[1]] and not match.unmatched_layers


def test_first_match_wins_and_unmatched_layers_stay_fp(block, images):
    rules = [QuantRule(module_path="qkv", weight=QuantSpec(format="int2")),
             QuantRule(module_path="qkv|proj", weight=INT8)]
    model = quantize_model(block, rules)
    assert model.qkv.quant.weight.bits == 2 and model.proj.quant.weight.bits == 8
    assert model.stem.quant.mode == "fp" and model.mlp[0].quant.mode == "fp"
    assert match_rules(block, rules).unmatched_layers == ["mlp.0", "mlp.1", "stem"]


def test_calibration_statistics_and_hessian(block, images):
    rules = [QuantRule(module_path=".*", weight=INT8, act=QuantSpec(format="int8", granularity="tensor"))]
    batches = [images, images * 2.0]
    captured = []
    original = QLinear.__call__

    def spy(layer, x):
        if layer is calib_model.qkv:
            captured.append(np.asarray(x))
        return original(layer, x)

    calib_model = quantize_model(block, rules, mode="calibrate", record_hessian=True)
    QLinear.__call__ = spy
    try:
        for batch in batches:
            calib_model(batch)
    finally:
        QLinear.__call__ = original
    stats = calibration_stats(calib_model)["qkv"]
    rows = np.concatenate([c.reshape(-1, c.shape[-1]) for c in captured])
    np.testing.assert_allclose(np.asarray(stats.absmax), np.abs(rows).max(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.hessian), rows.T @ rows, rtol=1e-4, atol=1e-4)
    assert float(stats.count) == rows.shape[0] and float(stats.batches) == 2
    assert float(stats.lo) == pytest.approx(rows.min()) and float(stats.hi) == pytest.approx(rows.max())
    conv_stats = calibration_stats(calib_model)["stem"]
    assert conv_stats.hessian.shape == (27, 27)


def test_static_activation_quantization_uses_calibrated_scale(block, images):
    rules = [QuantRule(module_path=".*", weight=INT8,
                       act=QuantSpec(format="int8", granularity="tensor", static=True))]
    forward = nnx.jit(lambda m, x: m(x))
    stats = run_calibration(block, rules, forward, [images, images * 0.5])
    with pytest.raises(ValueError, match="calib_stats"):
        quantize_model(block, rules)
    model = quantize_model(block, rules, stats)
    scale = float(model.qkv.act_qparams.get_value().scale)
    assert scale == pytest.approx(max(abs(float(stats["qkv"].lo)), abs(float(stats["qkv"].hi))) / 127, rel=1e-3)
    assert _rel(forward(model, images), block(images)) < 2e-2


def test_fake_mode_trains_with_straight_through_gradients(block, images):
    model = quantize_model(block, [QuantRule(module_path=".*", weight=QuantSpec(format="int4"))])

    def loss(m):
        return jnp.mean(m(images) ** 2)

    grads = nnx.grad(loss)(model)
    g = grads.qkv.kernel[...]
    assert g.shape == block.qkv.kernel.shape and float(jnp.abs(g).sum()) > 0


def test_group_size_must_divide_layer_kernels(block):
    rules = [QuantRule(module_path="proj", weight=QuantSpec(format="int4", granularity="group", group_size=24))]
    with pytest.raises(ValueError, match="proj.*group_size=24"):
        quantize_model(block, rules)


def test_with_mode_switches_back_to_fp(block, images):
    fake = quantize_model(block, W8A8)
    np.testing.assert_array_equal(np.asarray(with_mode(fake, "fp")(images)), np.asarray(block(images)))
    packed = quantize_model(block, W8A8, mode="packed")
    with pytest.raises(ValueError, match="packed"):
        with_mode(packed, "fp")


def test_unknown_mode_method_backend(block):
    with pytest.raises(ValueError, match="mode"):
        quantize_model(block, W8A8, mode="int")
    with pytest.raises(ValueError, match="gptq"):
        quantize_model(block, W8A8, mode="packed", method="gptq")
    with pytest.raises(ValueError, match="backend"):
        quantize_model(block, W8A8, mode="packed", backend="cuda")


def test_baked_weights_compute_the_fake_model_with_shared_graphs(block, images):
    w4 = [QuantRule(module_path=".*", weight=QuantSpec(format="int4"))]
    w8a8 = W8A8
    baked4 = bake_fake_weights(quantize_model(block, w4))
    np.testing.assert_array_equal(np.asarray(baked4(images)), np.asarray(quantize_model(block, w4)(images)))
    np.testing.assert_allclose(np.asarray(bake_fake_weights(quantize_model(block, w8a8))(images)),
                               np.asarray(quantize_model(block, w8a8)(images)), rtol=1e-6, atol=1e-6)
    # Weight-only settings share the float model's graph definition: a jitted function compiles once.
    assert nnx.graphdef(baked4) == nnx.graphdef(block)
    assert baked4.qkv.quant.mode == "fp" and block.qkv.kernel[...] is not baked4.qkv.kernel[...]
