"""The samplers' perturbation hook: a function that changes the network's output at a step before it is used.

VAR's sampler takes one on its guided logits (`bitlaws.sample.var_sampler.autoregressive_infer_cfg`'s
``perturb_logits``), the error analyses' step-wise DiT loop on the model output (`bitlaws.analysis.trajectory`);
both apply it through `apply_perturbation`, so a hook that changes the shape or dtype fails the same way.
"""

from __future__ import annotations

from typing import Callable

import jax

Perturbation = Callable[[int, jax.Array], jax.Array]
"""``perturb(step, output) -> output`` of the same shape and dtype (VAR: the scale's padded guided logits
``[B, L, V]`` with ``L`` the last scale's ``pn**2``, rows past ``pn**2`` are padding; DiT: the CFG output ``[2B, H, W, C_out]``)."""


def apply_perturbation(perturb: Perturbation, step: int, output: jax.Array, what: str) -> jax.Array:
    """``perturb(step, output)``, checked to keep `output`'s shape and dtype.

    Raises:
        ValueError: the perturbation changed the shape or dtype (the message names `what` and the step).
    """
    perturbed = perturb(step, output)
    if perturbed.shape != output.shape or perturbed.dtype != output.dtype:
        raise ValueError(f"{what} changed step {step}'s output from {output.shape} {output.dtype} to "
                         f"{perturbed.shape} {perturbed.dtype}")
    return perturbed
