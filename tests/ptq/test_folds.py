"""Input-transform folds on tiny random VAR and DiT models: exact float function, right layers folded."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.demo.dit_family import QUANT_PATTERN as DIT_PATTERN
from bitlaws.demo.var_family import QUANT_PATTERN as VAR_PATTERN
from bitlaws.models.common import random_model
from bitlaws.models.dit import DiT
from bitlaws.models.var import VAR
from bitlaws.ptq import folds  # importing bitlaws.ptq registers the methods
from bitlaws.quant import ActStats, QuantRule, QuantSpec, apply_method, dequantize, methods, run_calibration, with_mode
from bitlaws.quant.layers import InputScale
from bitlaws.quant.transform import quant_layers

VAR_TINY = dict(vocab_size=16, Cvae=4, num_classes=5, depth=2, embed_dim=32, num_heads=2, patch_nums=(1, 2, 3),
                cond_drop_rate=0.0)
DIT_TINY = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def _var(**overrides) -> VAR:
    return random_model(lambda: VAR(**{**VAR_TINY, **overrides}, rngs=nnx.Rngs(0)), seed=0)


def _dit() -> DiT:
    return random_model(lambda: DiT(**DIT_TINY, rngs=nnx.Rngs(0)), seed=0)


def _var_batch(seed: int = 1, n: int = 3):
    rng = np.random.default_rng(seed)
    labels = jnp.asarray(rng.integers(0, VAR_TINY["num_classes"], n), jnp.int32)
    x = jnp.asarray(rng.standard_normal((n, 13, VAR_TINY["Cvae"])), jnp.float32)  # L - first_l = 14 - 1
    return labels, x


def _dit_batch(seed: int = 1, n: int = 3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, 4, 4, 4)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, n), jnp.int32)
    y = jnp.asarray(rng.integers(0, DIT_TINY["num_classes"], n), jnp.int32)
    return x, t, y


def _var_forward(model, batch):
    return model(*batch)  # teacher-forced logits [B, L, V]


def _dit_forward(model, batch):
    return model(*batch)  # denoiser output [B, H, W, 2C]


def _rel(out, ref) -> float:
    return float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))


def _random_transforms(model, shiftable, seed: int = 0):
    """``s`` log-normal over about 10x on every seam layer; a shift on every layer that can take one."""
    rng = np.random.default_rng(seed)
    transforms = {}
    for path, layer in quant_layers(model):
        n_in = layer.kernel_shape[-2]
        s = np.exp(rng.standard_normal(n_in) * np.log(10.0) / 4.0).astype(np.float32)
        delta = rng.standard_normal(n_in).astype(np.float32) * 0.5 if path in shiftable else None
        transforms[path] = folds.InputTransform(jnp.asarray(s), None if delta is None else jnp.asarray(delta))
    return transforms


def _apply(model, fold: folds.FoldResult):
    """`model` with a `FoldResult` applied (what `apply_method` materializes, quantization off)."""
    new = nnx.clone(model)
    for dotted, value in fold.params.items():
        node = new
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        getattr(node, leaf).set_value(value)
    layers = dict(quant_layers(new))
    for path, kernel in fold.kernels.items():
        layers[path].kernel.set_value(kernel)
    for path, s in fold.input_scales.items():
        layers[path].input_scale = InputScale(s)
    return new


def _expected(depth, block_paths, head):
    return {f"blocks.{i}.{p}" for i in range(depth) for p in block_paths} | {head}


CASES = {
    "var": (lambda: _var(), _var_batch, _var_forward,
            _expected(2, ("attn.mat_qkv", "ffn.fc1", "attn.proj"), "head"),
            _expected(2, ("ffn.fc1", "attn.proj"), "head")),
    "var-no-l2": (lambda: _var(attn_l2_norm=False), _var_batch, _var_forward,
                  _expected(2, ("attn.mat_qkv", "ffn.fc1", "attn.proj"), "head"),
                  _expected(2, ("attn.mat_qkv", "ffn.fc1", "attn.proj"), "head")),
    "var-shared-aln": (lambda: _var(shared_aln=True), _var_batch, _var_forward,
                       _expected(2, ("attn.proj",), "head"), _expected(2, ("attn.proj",), "head")),
    "dit": (_dit, _dit_batch, _dit_forward,
            _expected(2, ("attn.qkv", "mlp.fc1", "attn.proj"), "final_layer.linear"),
            _expected(2, ("attn.qkv", "mlp.fc1", "attn.proj"), "final_layer.linear")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_folds_keep_the_float_function(case):
    build, batch, forward, foldable, shiftable = CASES[case]
    model = build()
    assert set(folds.fold_sites(model)) == foldable
    assert folds.shiftable_layers(model) == shiftable
    transforms = _random_transforms(model, shiftable)
    fold = folds.fold_input_transforms(model, transforms)
    assert set(fold.folded) == foldable
    assert set(fold.input_scales) == set(transforms) - foldable  # the rest keep an InputScale
    folded_model = _apply(model, fold)
    for path, layer in quant_layers(folded_model):
        assert (layer.input_scale is None) == (path in foldable), path
    data = batch()
    err = _rel(forward(folded_model, data), forward(model, data))
    assert err < 1e-5, f"{case}: max relative error {err:.2e}"


def test_predecessors_outside_the_targets_come_back_as_parameters():
    model = _dit()
    s = jnp.full((32,), 2.0)
    fold = folds.fold_input_transforms(model, {"blocks.0.mlp.fc1": (s, None)}, targets=["blocks.0.mlp.fc1"])
    assert set(fold.kernels) == {"blocks.0.mlp.fc1"}
    assert set(fold.params) == {"blocks.0.adaLN_modulation.kernel", "blocks.0.adaLN_modulation.bias"}
    assert fold.folded == {"blocks.0.mlp.fc1": "blocks.0.adaLN_modulation[scale 4/6, shift 3/6]"}
    w = model.blocks[0].adaLN_modulation.kernel[...]
    np.testing.assert_allclose(fold.params["blocks.0.adaLN_modulation.kernel"][:, 96:128], w[:, 96:128] / 2.0)
    np.testing.assert_array_equal(fold.params["blocks.0.adaLN_modulation.kernel"][:, :96], w[:, :96])
    with_target = folds.fold_input_transforms(model, {"blocks.0.mlp.fc1": (s, None)},
                                              targets=["blocks.0.mlp.fc1", "blocks.0.adaLN_modulation"])
    assert set(with_target.kernels) == {"blocks.0.mlp.fc1", "blocks.0.adaLN_modulation"}
    assert set(with_target.params) == {"blocks.0.adaLN_modulation.bias"}


def test_a_shift_moves_into_the_predecessor_and_the_consumer_bias():
    model = _dit()
    s, delta = jnp.full((32,), 2.0), jnp.linspace(-1.0, 1.0, 32)
    fold = folds.fold_input_transforms(model, {"blocks.0.mlp.fc1": (s, delta)})
    ada_bias, fc1 = model.blocks[0].adaLN_modulation.bias[...], model.blocks[0].mlp.fc1
    np.testing.assert_allclose(fold.params["blocks.0.adaLN_modulation.bias"][96:128],  # shift_mlp: (b - delta) / s
                               (ada_bias[96:128] - delta) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(fold.params["blocks.0.adaLN_modulation.bias"][128:160],  # scale_mlp: (1 + b) / s - 1
                               (1.0 + ada_bias[128:160]) / 2.0 - 1.0, rtol=1e-6)
    np.testing.assert_allclose(fold.params["blocks.0.mlp.fc1.bias"], fc1.bias[...] + delta @ fc1.kernel[...],
                               rtol=1e-5, atol=1e-6)


def test_shifts_that_cannot_fold_are_errors_naming_the_layer():
    model = _var()
    s = jnp.ones((32,))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.mat_qkv .*L2-normalised"):
        folds.fold_input_transforms(model, {"blocks.0.attn.mat_qkv": (s, s)})
    with pytest.raises(ValueError, match=r"blocks\.1\.ada_lin \(no preceding op"):
        folds.fold_input_transforms(model, {"blocks.1.ada_lin": (s, s)})
    with pytest.raises(ValueError, match=r"head \(folding is off"):
        folds.fold_input_transforms(model, {"head": (s, s)}, fold=False)
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.fc2 \(s has shape \(32,\), the layer has 128"):
        folds.fold_input_transforms(model, {"blocks.0.ffn.fc2": (s, None)})
    with pytest.raises(ValueError, match=r"non-positive"):
        folds.fold_input_transforms(model, {"head": (-s, None)})


def test_rewrite_consumer_is_the_identity_on_the_layer_function():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    s, delta = np.exp(rng.standard_normal(8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    w2, b2 = folds.rewrite_consumer(jnp.asarray(w), jnp.asarray(b), jnp.asarray(s), jnp.asarray(delta))
    np.testing.assert_allclose(((x - delta) / s) @ w2 + b2, x @ w + b, rtol=1e-5, atol=1e-5)


def _with_outliers(model: VAR) -> VAR:
    """Three outlier channels (x30) in every modulated input: large adaLN shift biases."""
    model = nnx.clone(model)
    channels = jnp.asarray([3, 17, 29])
    for ada_lin, shift_chunks in [(block.ada_lin, (4, 5)) for block in model.blocks] + [(model.head_nm.ada_lin, (1,))]:
        bias = ada_lin.bias[...]
        for chunk in shift_chunks:
            bias = bias.at[chunk * 32 + channels].set(30.0)
        ada_lin.bias.set_value(bias)
    return model


def _w8a8(pattern):
    return [QuantRule(module_path=pattern, weight=QuantSpec(format="int8"),
                      act=QuantSpec(format="int8", granularity="token"))]


def _synthetic_stats(model, pattern, seed: int = 0) -> dict[str, ActStats]:
    """Per-layer statistics without a calibration run: log-normal ``absmax``/``mean|x|``, ``X^T X`` of random rows."""
    rng = np.random.default_rng(seed)
    stats = {}
    for path, layer in quant_layers(model):
        if re.fullmatch(pattern, path):
            n_in = layer.kernel_shape[-2]
            spread = np.exp(rng.standard_normal(n_in)).astype(np.float32)  # per-channel magnitudes
            x = rng.standard_normal((64, n_in)).astype(np.float32) * spread
            stats[path] = dataclasses.replace(ActStats.empty(n_in), absmax=jnp.asarray(np.abs(x).max(0)),
                                              sum_abs=jnp.asarray(np.abs(x).sum(0)), count=jnp.asarray(64.0),
                                              hessian=jnp.asarray(x.T @ x))
    return stats


def test_smoothquant_with_and_without_folds_keeps_the_float_function():
    model = _dit()
    rules = _w8a8(DIT_PATTERN)
    stats = _synthetic_stats(model, DIT_PATTERN)
    _check_fold_and_no_fold_keep_the_float_function(model, rules, stats, _dit_forward, _dit_batch(), set(stats))


def _check_fold_and_no_fold_keep_the_float_function(model, rules, stats, forward, data, targets):
    """SmoothQuant with and without folds, quantization off: both equal the float model within 1e-5, and only
    the layers without a fold site keep an `InputScale` when folding."""
    reference = forward(model, data)
    outputs = {}
    for fold in (True, False):
        smooth = apply_method(model, rules, "smoothquant", materialize="fake", calib_stats=stats,
                              params={"fold": fold})
        outputs[fold] = forward(with_mode(smooth, "fp"), data)  # quantization off
        scaled = {path for path, layer in quant_layers(smooth) if layer.input_scale is not None}
        assert scaled == (targets - set(folds.fold_sites(model)) if fold else targets)
    assert _rel(outputs[True], reference) < 1e-5
    assert _rel(outputs[True], outputs[False]) < 1e-5


@pytest.mark.slow
def test_smoothquant_fold_matches_unfolded_and_beats_rtn_at_w8a8():
    model = _with_outliers(_var())
    rules = _w8a8(VAR_PATTERN)
    stats = run_calibration(model, rules, _var_forward, [_var_batch(seed=7, n=8)])
    data = _var_batch()
    reference = _var_forward(model, data)
    every = {path for path, _ in quant_layers(model)}
    _check_fold_and_no_fold_keep_the_float_function(model, rules, stats, _var_forward, data, every)
    # W8A8 where the outliers are (the modulated inputs): folded SmoothQuant well below RTN
    rules = _w8a8(r"blocks\.\d+\.(attn\.mat_qkv|ffn\.fc1)|head")
    errors = {}
    for method in ("smoothquant", "rtn"):
        quantized = apply_method(model, rules, method, materialize="packed", calib_stats=stats)
        errors[method] = float(jnp.mean((_var_forward(quantized, data) - reference) ** 2) / jnp.mean(reference**2))
        if method == "smoothquant":
            assert all(quantized.blocks[i].attn.mat_qkv.input_scale is None for i in range(2))
    assert errors["smoothquant"] < 0.5 * errors["rtn"], errors


def test_awq_records_folds_and_quantizes_the_folded_kernels():
    model = _dit()
    pattern = r"blocks\.0\.(attn\.(qkv|proj)|mlp\.fc2|adaLN_modulation)"
    rule = _w8a8(pattern)[0]  # the specs of the SmoothQuant test: its RTN compilations are reused
    stats = _synthetic_stats(model, pattern)
    targets = tuple(methods.Target(path, layer.kernel[...], rule, stats[path])
                    for path, layer in quant_layers(model) if rule.matches(path))
    awq = methods.get_method("awq")
    result = awq.fn(methods.MethodProblem(model, targets, awq.resolve_params({"n_grid": 2})))
    assert result.info["blocks.0.attn.proj"]["folded"] is True
    assert result.info["blocks.0.attn.proj"]["fold_into"] == "blocks.0.attn.qkv[v 2/3]"
    assert result.info["blocks.0.attn.qkv"]["folded"] is True
    assert result.info["blocks.0.mlp.fc2"]["folded"] is False and "fold_into" not in result.info["blocks.0.mlp.fc2"]
    assert set(result.input_scales) == {"blocks.0.mlp.fc2", "blocks.0.adaLN_modulation"}
    for path in ("blocks.0.adaLN_modulation", "blocks.0.attn.qkv"):  # consumers and predecessors at once
        kernel = np.asarray(result.kernels[path])  # rows scaled by its own s, columns folded
        error = np.abs(np.asarray(dequantize(result.weights[path])) - kernel)
        assert np.all(error <= np.max(np.abs(kernel), axis=0) / 200), path  # half an int8 step of each column
    data = _dit_batch()
    assert _rel(_dit_forward(_apply(model, result), data), _dit_forward(model, data)) < 1e-5  # quantization off
