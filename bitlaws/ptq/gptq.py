"""GPTQ as a registered method (``gptq``): the thin integration of `bitlaws.ptq.gptq_core`.

Each matched layer is quantized from its calibration Hessian, the mean of ``x x^T`` over the inputs the model
feeds it (``ActStats.hessian / ActStats.count``; for convolutions the im2col rows, ordered like the flattened
HWIO kernel). Hyper-parameters (``config.method_params`` in sweeps): ``block_size`` (128), ``damp`` (0.01),
``act_order`` (False) and ``sequential`` (False).

* ``sequential=False``: every Hessian comes from the *float* model (one calibration pass for all layers).
* ``sequential=True`` (GPTQ's own procedure): layers are processed stage by stage in graph order — a stage is
  one transformer block (the layers under ``blocks.<i>``), or a single layer outside blocks — and each stage is
  calibrated on the model whose earlier stages are already quantized, so later layers compensate for the
  error of earlier ones. Needs the calibration data itself (`MethodProblem.data`): one calibration pass per
  stage.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bitlaws.ptq import gptq_core
from bitlaws.quant import MethodProblem, MethodResult, QArray, QuantSpec, qarray, register_method
from bitlaws.quant.methods import calibrate_on
from bitlaws.quant.seam import ActStats
from bitlaws.quant.transform import quant_layers

DEFAULTS = {"block_size": 128, "damp": 0.01, "act_order": False, "sequential": False}
_STAGE = re.compile(r"^(.*?\bblocks\.\d+)\.")


def mean_hessian(stats: ActStats) -> jax.Array:
    """``X^T X / n`` from recorded statistics (``[K, K]`` float32)."""
    if stats is None or stats.hessian is None:
        raise ValueError("GPTQ needs calibration statistics with a Hessian (calibrate with record_hessian=True)")
    return stats.hessian / jnp.maximum(stats.count, 1.0)


def gptq_kernel(kernel: jax.Array, spec: QuantSpec, stats: Optional[ActStats], *, block_size: int = 128,
                damp: float = 0.01, act_order: bool = False) -> QArray:
    """GPTQ-quantizes one kernel ``[..., in, out]`` along its input axes with its layer's mean Hessian."""
    return gptq_core.quantize_weight(kernel, mean_hessian(stats), spec, block_size=int(block_size),
                                     damp=float(damp), act_order=bool(act_order))


def stages(paths: list[str]) -> list[list[str]]:
    """Groups layer paths (graph order) into sequential stages: one per ``blocks.<i>`` prefix, else one per layer."""
    grouped: list[list[str]] = []
    keys: list[str] = []
    for path in paths:
        match = _STAGE.match(path)
        key = match.group(1) if match else path
        if keys and keys[-1] == key:
            grouped[-1].append(path)
        else:
            keys.append(key)
            grouped.append([path])
    return grouped


def _gptq(problem: MethodProblem) -> MethodResult:
    params = dict(problem.params)
    sequential = bool(params.pop("sequential"))
    result = MethodResult()
    targets = [t for t in problem.targets if t.rule.weight is not None]
    if not sequential:
        for target in targets:
            result.weights[target.path] = gptq_kernel(target.kernel, target.rule.weight, target.stats, **params)
        return result
    if problem.data is None:
        raise ValueError("gptq with sequential=True needs the calibration data itself (MethodProblem.data: pass "
                         "data=CalibrationData(...) to apply_method / quantize_model)")
    calibrate = calibrate_on(problem.data)  # uncached: every stage sees a different partly quantized model
    partial = nnx.clone(problem.model)  # shares arrays; quantized kernels are swapped in stage by stage
    layers = dict(quant_layers(partial))
    by_path = {t.path: t for t in targets}
    for stage in stages([t.path for t in targets]):
        rules = [dataclasses.replace(by_path[path].rule, module_path=re.escape(path)) for path in stage]
        stats = calibrate(partial, rules, True)
        for path in stage:
            target = by_path[path]
            weight = gptq_kernel(target.kernel, target.rule.weight, stats[path], **params)
            result.weights[path] = weight
            layers[path].kernel.set_value(qarray.dequantize(weight, target.kernel.dtype))
        result.info.update({path: {"stage": stage[0]} for path in stage})
    return result


register_method("gptq", _gptq, needs_hessian=True, defaults=DEFAULTS)
