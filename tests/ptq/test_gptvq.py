"""The ``gptvq`` method end to end: the spec -> bit-budget mapping, VQArray kernels through the seam (packed,
baked, jit, activation quantization), the bit accounting, and lower error than GPTQ / RTN at equal bits.

Every GPTVQ run below quantizes ``fc1`` (64 x 128) of the shared MLP under ``int3`` g32, so the whole file
compiles the algorithm once (its XLA compilation dominates the run time).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws import ptq  # noqa: F401  (registers gptvq)
from bitlaws.ptq import gptvq, gptvq_core
from bitlaws.quant import (ActStats, MethodProblem, QConv, QuantRule, QuantSpec, Target, apply_method, bit_accounting,
                           run_calibration)

INT3_G32 = QuantSpec(format="int3", granularity="group", group_size=32)
FC1 = [QuantRule(module_path="fc1", weight=INT3_G32)]


def _stats(model, rules, inputs):
    return run_calibration(model, rules, lambda m, b: m(b), [inputs(jax.random.key(0), 512)], record_hessian=True)


def test_layout_spends_the_specs_bit_budget():
    g128 = lambda fmt: QuantSpec(format=fmt, granularity="group", group_size=128)  # noqa: E731
    # 4096 x 4096: int3 g128 stores 3 + 16/128 bits (+ one int16 scale exponent) per weight.
    w3 = gptvq.choose_layout((4096, 4096), g128("int3"))
    assert (w3.bits_per_dim, w3.dim, w3.group_size, w3.group_cols) == (3, 2, 4, 4096)
    assert w3.target_bits == 3.125 + 16 / 4096**2
    assert w3.nbytes == 2048 * 4096 * 6 // 8 + 1024 * (64 * 2 * 2 + 2)  # 6-bit indices + 1024 codebooks
    assert w3.bits_per_weight == 3.1259765625
    w4 = gptvq.choose_layout((4096, 4096), g128("int4"))
    assert (w4.group_size, w4.group_cols, w4.bits_per_weight) == (16, 4096, 4.125244140625)
    # Nearest to the budget: the next layouts on either side are farther away.
    for layout in (w3, w4):
        for rows in (layout.group_size // 2, layout.group_size * 2):
            other = gptvq_core.vq_nbytes((4096, 4096), bits_per_dim=layout.bits_per_dim, dim=2, group_size=rows)
            assert abs(other * 8 / 4096**2 - layout.target_bits) > abs(layout.bits_per_weight - layout.target_bits)
    # Overrides narrow the search; bits_per_dim replaces the spec's bits.
    fixed = gptvq.choose_layout((4096, 4096), g128("int3"), group_size=128)
    assert (fixed.group_size, fixed.group_cols) == (128, 128)
    assert gptvq.choose_layout((4096, 4096), g128("int4"), bits_per_dim=2, dim=4).bits_per_dim == 2


def test_packed_equals_baked_and_the_accounting_counts_the_vqarray(mlp, inputs):
    model = mlp
    stats = _stats(model, FC1, inputs)
    packed = apply_method(model, FC1, "gptvq", materialize="packed", calib_stats=stats)
    baked = apply_method(model, FC1, "gptvq", materialize="baked", calib_stats=stats)
    vqa = packed.fc1.qkernel.get_value()
    assert isinstance(vqa, gptvq_core.VQArray) and (vqa.group_size, vqa.group_cols, vqa.index_bits) == (32, 128, 6)
    x = inputs(jax.random.key(2), 16)
    # Eager: both run the same dot on the same dequantized kernel, so the outputs agree bit for bit.
    np.testing.assert_array_equal(np.asarray(packed(x)), np.asarray(baked(x)))
    np.testing.assert_array_equal(np.asarray(baked.fc1.kernel[...]), np.asarray(vqa.dequantize()))
    # Accounting: the layer counts everything the VQArray stores, in MT and in storage.
    n = 64 * 128
    report = bit_accounting(packed)
    fc1 = report.layers[0]
    assert fc1.path == "fc1" and fc1.storage_bytes == vqa.nbytes and fc1.model_bits == vqa.nbytes * 8
    assert fc1.bits_w == vqa.nbytes * 8 / n == vqa.bits_per_weight
    other = report.total_params - n
    assert report.mt_bits == vqa.nbytes * 8 + 16 * other and report.storage_bytes == vqa.nbytes + 2 * other
    assert report.ct_bits == vqa.nbytes * 8 * 16 + 256 * other
    assert bit_accounting(packed, FC1) == report  # with rules, VQ layers are measured from the live array
    assert report.total_params == bit_accounting(model).total_params
    # The layout the method chose, its analytic size and the recorded diagnostics agree.
    layout = gptvq.choose_layout((64, 128), INT3_G32)
    assert layout.nbytes == vqa.nbytes == gptvq_core.vq_nbytes((64, 128), bits_per_dim=3, dim=2, group_size=32)
    assert layout.target_bits == 3.5 + 16 / n and abs(layout.bits_per_weight - layout.target_bits) < 0.01
    problem = MethodProblem(model, (Target("fc1", model.fc1.kernel[...], FC1[0], stats["fc1"]),), gptvq.DEFAULTS)
    result = gptvq.gptvq_method(problem)
    np.testing.assert_array_equal(np.asarray(result.weights["fc1"].indices), np.asarray(vqa.indices))
    assert result.info["fc1"] == {"bits_per_weight": vqa.bits_per_weight, "target_bits": layout.target_bits,
                                  "dim": 2, "index_bits": 6, "group_size": 32, "group_cols": 128, "codebooks": 2}


def test_packed_vq_model_runs_under_jit(mlp, inputs):
    model = mlp
    packed = apply_method(model, FC1, "gptvq", calib_stats=_stats(model, FC1, inputs))
    x = inputs(jax.random.key(3), 16)
    eager = np.asarray(packed(x))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, b: m(b))(packed, x)), eager, rtol=1e-5, atol=1e-6)
    graphdef, state = nnx.split(packed)
    pure = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))
    np.testing.assert_allclose(np.asarray(pure(state, x)), eager, rtol=1e-5, atol=1e-6)
    vqa = packed.fc1.qkernel.get_value()
    leaves, treedef = jax.tree_util.tree_flatten(vqa)  # layout is static: only arrays are leaves
    assert all(isinstance(leaf, jax.Array) for leaf in leaves) and len(leaves) == 3
    assert jax.tree_util.tree_unflatten(treedef, leaves).shape == (64, 128)


def test_activation_quantization_still_applies(mlp, inputs):
    model = mlp
    rules = [QuantRule(module_path="fc1", weight=INT3_G32, act=QuantSpec(format="int8", granularity="token"))]
    stats = _stats(model, rules, inputs)
    packed = apply_method(model, rules, "gptvq", calib_stats=stats)
    baked = apply_method(model, rules, "gptvq", materialize="baked", calib_stats=stats)
    weight_only = apply_method(model, FC1, "gptvq", calib_stats=stats)
    x = inputs(jax.random.key(4), 16)
    np.testing.assert_array_equal(np.asarray(packed(x)), np.asarray(baked(x)))
    assert not np.array_equal(np.asarray(packed(x)), np.asarray(weight_only(x)))  # the A8 quantizer ran
    report = bit_accounting(packed)
    assert report.layers[0].bits_a == 8
    assert report.layers[0].model_bits == packed.fc1.qkernel.get_value().nbytes * 8


def test_gptvq_beats_gptq_and_rtn_at_equal_bits(mlp, inputs):
    model = mlp
    stats = _stats(model, FC1, inputs)
    x = inputs(jax.random.key(1), 256)
    reference = model(x)
    error, bits = {}, {}
    for method in ("gptvq", "gptq", "rtn"):
        quantized = apply_method(model, FC1, method, calib_stats=stats)
        error[method] = float(jnp.mean((quantized(x) - reference) ** 2))
        layer = bit_accounting(quantized).layers[0]
        bits[method] = layer.storage_bytes * 8 / layer.params  # effective bits, scales / codebooks included
    assert abs(bits["gptvq"] - bits["gptq"]) < 0.01 and bits["gptq"] == bits["rtn"], bits  # 3.504 vs 3.502
    assert error["gptvq"] < 0.8 * error["gptq"] < 0.8 * error["rtn"], error


@pytest.mark.parametrize("params, match", [
    ({"codebooks": 4}, r"no hyper-parameter\(s\) \['codebooks'\].*dim=2"),
    ({"dim": 0}, r"gptvq: dim must be a positive integer, got 0"),
    ({"dim": 3}, r"fc1: gptvq: bits_per_dim=3 \(the weight spec's bits\) x dim=3 = 9 index bits"),
    ({"bits_per_dim": 2.5}, r"gptvq: bits_per_dim must be a positive integer or None, got 2.5"),
    ({"group_size": 48}, r"fc1: gptvq: group_size=48 must be a multiple of dim=2 dividing the kernel's input dim 64"),
    ({"group_cols": 3}, r"fc1: gptvq: group_cols=3 must divide the kernel's output dim 128"),
    ({"group_size": 2, "group_cols": 1}, r"no codebook of the kernel \(64, 128\).*64 vectors"),
    ({"em_iters": -1}, r"gptvq: em_iters must be a non-negative integer, got -1"),
    ({"damp": -0.1}, r"gptvq: damp must be a number >= 0"),
    ({"init": "kmeans++"}, r"gptvq: init must be one of"),
    ({"metric": "l1"}, r"gptvq: metric must be one of"),
    ({"codebook_dtype": "int8"}, r"gptvq: codebook_dtype must be one of"),
    ({"codebook_update": "yes"}, r"gptvq: codebook_update must be True or False"),
    ({"block_size": 0}, r"gptvq: block_size must be a positive integer, got 0"),
])
def test_hyper_parameter_errors_name_the_parameter(params, match, mlp):
    with pytest.raises(ValueError, match=match):  # raised before any layer is quantized
        apply_method(mlp, FC1, "gptvq", params=params, calib_stats=_identity_stats(fc1=64))


def _identity_stats(**layers):
    """``{layer: ActStats}`` with identity Hessians of the given sizes (for errors raised before quantizing)."""
    return {name: dataclasses.replace(ActStats.empty(k, k), hessian=jnp.eye(k), count=jnp.ones(()))
            for name, k in layers.items()}


def test_spec_bits_too_wide_for_the_index_name_every_layer(mlp):
    rules = [QuantRule(module_path="fc.", weight=QuantSpec(format="int8"))]
    with pytest.raises(ValueError, match=r"fc1: .*bits_per_dim=8 \(the weight spec's bits\) x dim=2 = 16 .*; "
                                         r"fc2: .*lower dim or bits_per_dim"):
        apply_method(mlp, rules, "gptvq", calib_stats=_identity_stats(fc1=64, fc2=128))


class _ConvNet(nnx.Module):
    def __init__(self):
        self.conv = QConv(8, 16, 3, rngs=nnx.Rngs(0))

    def __call__(self, x):  # [B, 8, 8, 8] -> [B, 8, 8, 16]
        return self.conv(x)


@pytest.mark.slow
def test_conv_kernels_run_through_qconv():
    model = _ConvNet()
    rules = [QuantRule(module_path="conv", weight=QuantSpec(format="int2", granularity="group", group_size=24))]
    data = jax.random.normal(jax.random.key(0), (16, 8, 8, 8))
    stats = run_calibration(model, rules, lambda m, b: m(b), [data], record_hessian=True)
    packed = apply_method(model, rules, "gptvq", calib_stats=stats)
    baked = apply_method(model, rules, "gptvq", materialize="baked", calib_stats=stats)
    vqa = packed.conv.qkernel.get_value()
    assert isinstance(vqa, gptvq_core.VQArray) and vqa.shape == (3, 3, 8, 16)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 8))
    np.testing.assert_array_equal(np.asarray(packed(x)), np.asarray(baked(x)))
    assert bit_accounting(packed).layers[0].storage_bytes == vqa.nbytes


def test_small_layers_fall_back_to_a_lower_dim(mlp):
    # fc1's 64x128 kernel has 4096 2-vectors: int8 x dim 1 = 256 centroids fit, so d drops 2 -> 1 only when allowed.
    rules = [QuantRule(module_path="fc1", weight=QuantSpec(format="int4"))]
    params = {"group_size": 2, "group_cols": 8}  # one codebook per 2 rows x 8 columns: 8 2-vectors < 256 centroids
    with pytest.raises(ValueError, match=r"fc1: gptvq: no codebook .*256 vectors"):
        apply_method(mlp, rules, "gptvq", params={**params, "lower_dim_if_small": False},
                     calib_stats=_identity_stats(fc1=64))
    with pytest.raises(ValueError, match="lower_dim_if_small must be True or False"):
        apply_method(mlp, rules, "gptvq", params={"lower_dim_if_small": 1}, calib_stats=_identity_stats(fc1=64))
    layout = gptvq.choose_layout((64, 128), rules[0].weight, dim=1, group_size=2, group_cols=8)
    assert layout.dim == 1 and layout.group_size == 2
