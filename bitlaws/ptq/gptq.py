"""GPTQ as a registered method (``gptq``): the thin integration of `bitlaws.ptq.gptq_core`.

Each matched layer is quantized from its own calibration Hessian, the mean of ``x x^T`` over the inputs the
*float* model feeds it (``ActStats.hessian / ActStats.count``; for convolutions the im2col rows, ordered like
the flattened HWIO kernel). Hyper-parameters (``config.method_params`` in sweeps): ``block_size`` (128),
``damp`` (0.01) and ``act_order`` (False). Not yet offered: the sequential variant, where later layers are
calibrated on already-quantized earlier ones.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from bitlaws.ptq import gptq_core
from bitlaws.quant import QArray, QuantSpec, register_weight_method
from bitlaws.quant.seam import ActStats

DEFAULTS = {"block_size": 128, "damp": 0.01, "act_order": False}


def mean_hessian(stats: ActStats) -> jax.Array:
    """``X^T X / n`` from recorded statistics (``[K, K]`` float32)."""
    if stats is None or stats.hessian is None:
        raise ValueError("GPTQ needs calibration statistics with a Hessian (calibrate with record_hessian=True)")
    return stats.hessian / jnp.maximum(stats.count, 1.0)


@register_weight_method("gptq", needs_hessian=True, defaults=DEFAULTS)
def gptq(kernel: jax.Array, spec: QuantSpec, stats: Optional[ActStats] = None,
         reduce_axes: Optional[tuple[int, ...]] = None, *, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False) -> QArray:
    """GPTQ-quantizes one kernel ``[..., in, out]`` with its layer's Hessian (see the module docstring)."""
    if reduce_axes is not None and tuple(reduce_axes) != tuple(range(kernel.ndim - 1)):
        raise ValueError(f"gptq quantizes kernels along their input axes only, got reduce_axes={reduce_axes}")
    return gptq_core.quantize_weight(kernel, mean_hessian(stats), spec, block_size=int(block_size),
                                     damp=float(damp), act_order=bool(act_order))
