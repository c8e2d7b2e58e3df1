"""SmoothQuant and AWQ as registered methods (``smoothquant``, ``awq``): thin integrations of their cores.

Both move a per-input-channel factor ``s`` between a layer's activations and its kernel: the kernel becomes
``s * W`` (`MethodResult.kernels`, quantized with the rule's weight spec) and the layer divides its input by
``s`` (`MethodResult.input_scales`, an `InputScale` applied before the activation quantizer). With
quantization off the rewritten model equals the float one up to float rounding.

This integration keeps ``1 / s`` as an explicit `InputScale` on every layer (one elementwise division per
call). Folding it into the preceding op instead (VAR's ``ada_lin`` / DiT's ``adaLN_modulation`` columns, the
``v`` columns of qkv for ``proj``), which costs nothing at run time, needs the models' fold maps: roadmap [6/12].

* ``smoothquant`` (statistics: per-channel ``max|x|``): ``s = max|X_j|^alpha / max|W_j|^(1-alpha)``;
  hyper-parameter ``alpha`` (0.5). For weight-activation settings (W8A8, W4A8).
* ``awq`` (Hessians): ``s = mean|X_j|^alpha`` with alpha searched on a grid of ``n_grid`` (20) values to
  minimise ``tr(dW^T H dW)``; ``clip`` (False) adds AWQ's per-group clipping search on the scaled kernel.
  For weight-only settings (W4A16, W3A16).
"""

from __future__ import annotations

import jax.numpy as jnp

from bitlaws.ptq import awq_core, smoothquant_core
from bitlaws.quant import MethodProblem, MethodResult, qarray, register_method


def _smoothquant(problem: MethodProblem) -> MethodResult:
    result = MethodResult()
    for target in problem.targets:
        s = smoothquant_core.smoothing_scales(target.stats.absmax, target.kernel, float(problem.params["alpha"]))
        _rewrite(result, target, s)
    return result


def _awq(problem: MethodProblem) -> MethodResult:
    result = MethodResult()
    for target in problem.targets:
        if target.rule.weight is None:
            continue  # activation-only layer: AWQ only protects weights
        hessian = target.stats.hessian / jnp.maximum(target.stats.count, 1.0)
        s, alpha, _ = awq_core.search_scales(target.kernel, target.rule.weight, act_mean_abs=target.stats.mean_abs,
                                             hessian=hessian, n_grid=int(problem.params["n_grid"]))
        kernel = _rewrite(result, target, s)
        if problem.params["clip"]:
            repeat = hessian.shape[0] // s.shape[0]  # conv: kh*kw im2col rows per input channel
            ratio, _ = awq_core.search_clip(kernel, target.rule.weight, awq_core.scale_hessian(hessian, s, repeat),
                                            n_grid=int(problem.params["n_grid"]))
            clipped = awq_core.clip_weights(kernel, ratio, target.rule.weight)
            result.kernels[target.path] = clipped
            result.weights[target.path] = qarray.quantize(clipped, target.rule.weight)
        result.info[target.path] = {"alpha": float(alpha)}
    return result


def _rewrite(result: MethodResult, target, s) -> jnp.ndarray:
    """Records ``s * W`` (and its RTN weight) and the ``1/s`` input scale of one target; returns ``s * W``."""
    kernel = smoothquant_core.smooth(target.kernel, s)
    result.kernels[target.path] = kernel
    result.input_scales[target.path] = s
    if target.rule.weight is not None:
        result.weights[target.path] = qarray.quantize(kernel, target.rule.weight)
    return kernel


register_method("smoothquant", _smoothquant, needs_stats=True, defaults={"alpha": 0.5})
register_method("awq", _awq, needs_hessian=True, defaults={"n_grid": 20, "clip": False})
