"""SmoothQuant and AWQ as registered methods (``smoothquant``, ``awq``): thin integrations of their cores.

Both move a per-input-channel factor ``s`` between a layer's activations and its kernel: the kernel becomes
``s * W`` (`MethodResult.kernels`, quantized with the rule's weight spec) and the layer's input must arrive
divided by ``s``. With quantization off the rewritten model equals the float one up to float rounding.

Where the input comes from an op that can absorb ``1 / s`` (hyper-parameter ``fold``, default True), it is
folded there at no run-time cost (`bitlaws.ptq.folds`): VAR's ``ada_lin`` / DiT's ``adaLN_modulation``
scale and shift columns for the modulated qkv / fc1 inputs, VAR's ``head_nm.ada_lin`` for the head, DiT's
``final_layer.adaLN_modulation`` for its linear, and the v columns of qkv for ``proj``. Every other layer
(fc2, the adaLN linears themselves, ``word_embed``, VAR blocks with ``shared_aln``, and all layers of
models without fold sites) keeps an explicit `InputScale` (one elementwise division per call). ``fold=False``
keeps an `InputScale` everywhere. All scales are computed on the float model and all folds applied to float
kernels before any weight is quantized, so a folded predecessor that is itself a target (``ada_lin``, qkv)
is quantized with its folded columns; folding divides whole kernel columns, which per-channel and per-group
weight quantization absorb exactly (per-tensor weight scales do not). ``MethodResult.info[path]`` records
``folded`` (bool) and, when folded, ``fold_into`` (the predecessor and its column chunks).

* ``smoothquant`` (statistics: per-channel ``max|x|``): ``s = max|X_j|^alpha / max|W_j|^(1-alpha)``;
  hyper-parameter ``alpha`` (0.5). For weight-activation settings (W8A8, W4A8).
* ``awq`` (Hessians): ``s = mean|X_j|^alpha`` with alpha searched on a grid of ``n_grid`` (20) values to
  minimise ``tr(dW^T H dW)``; ``clip`` (False) adds AWQ's per-group clipping search on the scaled kernel.
  For weight-only settings (W4A16, W3A16).
"""

from __future__ import annotations

import jax.numpy as jnp

from bitlaws.ptq import awq_core, folds, smoothquant_core
from bitlaws.quant import MethodProblem, MethodResult, register_method
from bitlaws.quant.methods import rtn


def _smoothquant(problem: MethodProblem) -> MethodResult:
    alpha = float(problem.params["alpha"])
    transforms = {target.path: folds.InputTransform(
        smoothquant_core.smoothing_scales(target.stats.absmax, target.kernel, alpha)) for target in problem.targets}
    return _folded_result(problem, transforms, {}, {})


def _awq(problem: MethodProblem) -> MethodResult:
    transforms, kernels, info = {}, {}, {}
    n_grid = int(problem.params["n_grid"])
    for target in problem.targets:
        if target.rule.weight is None:
            continue  # activation-only layer: AWQ only protects weights
        hessian = target.stats.hessian / jnp.maximum(target.stats.count, 1.0)
        s, alpha, _ = awq_core.search_scales(target.kernel, target.rule.weight, act_mean_abs=target.stats.mean_abs,
                                             hessian=hessian, n_grid=n_grid)
        kernel = smoothquant_core.smooth(target.kernel, s)
        if problem.params["clip"]:
            repeat = hessian.shape[0] // s.shape[0]  # conv: kh*kw im2col rows per input channel
            ratio, _ = awq_core.search_clip(kernel, target.rule.weight, awq_core.scale_hessian(hessian, s, repeat),
                                            n_grid=n_grid)
            kernel = awq_core.clip_weights(kernel, ratio, target.rule.weight)
        transforms[target.path] = folds.InputTransform(s)
        kernels[target.path] = kernel
        info[target.path] = {"alpha": float(alpha)}
    return _folded_result(problem, transforms, kernels, info)


def _folded_result(problem: MethodProblem, transforms, kernels, info) -> MethodResult:
    """Folds the transforms (or keeps `InputScale` s), then quantizes every target's final kernel."""
    fold = folds.fold_input_transforms(problem.model, transforms, kernels,
                                       targets=[target.path for target in problem.targets],
                                       fold=bool(problem.params["fold"]))
    result = MethodResult(kernels=fold.kernels, params=fold.params, input_scales=fold.input_scales, info=info)
    for target in problem.targets:  # only now, with every fold applied
        if target.rule.weight is not None:
            result.weights[target.path] = rtn(fold.kernels.get(target.path, target.kernel), target.rule.weight)
    for path in transforms:
        entry = result.info.setdefault(path, {})
        entry["folded"] = path in fold.folded
        if path in fold.folded:
            entry["fold_into"] = fold.folded[path]
    return result


register_method("smoothquant", _smoothquant, needs_stats=True, defaults={"alpha": 0.5, "fold": True})
register_method("awq", _awq, needs_hessian=True, defaults={"n_grid": 20, "clip": False, "fold": True})
