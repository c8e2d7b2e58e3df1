"""``bitlaws analyze noise`` (paper Figure 3): how much controlled noise on the network's output hurts the image.

Quantization error is modelled as Gaussian noise at a set SNR on the network's output (`Subject.noise`: VAR's
logits, DiT's mean prediction; `bitlaws.analysis.trajectory` says why there), with the same draws for every SNR
and the float network otherwise:

* `single_step` (Figure 3a): noise at one step, swept over the SNR; the loss is the mean squared difference of
  the final images to the noise-free run (same key), and Spearman's rank correlation between the noise intensity
  (noise-to-signal power ``10**(-snr/10)``) and the loss says how monotonically the image degrades (paper: 0.99
  for DiT, 0.86 for VAR, whose discrete code choice gives a step-like curve). The batch-mean loss averages
  steps of single images into a smooth curve, so the correlation is also given per sample (median over the
  batch).
* `accumulation` (Figure 3b): the same noise in the first 10 % of the steps only (at least one); the relative
  error of the representation against the noise-free run at every step shows whether later, clean steps
  absorb it (VAR) or carry and grow it (DiT).

``+inf`` dB is no noise: it reproduces the noise-free run exactly (a check included in every sweep).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np

from bitlaws.analysis import noise_core
from bitlaws.analysis.subjects import Subject, finite_or_none
from bitlaws.analysis.trajectory import Trajectory

DEFAULT_SNRS = tuple(float(s) for s in range(0, 41, 2))
"""The single-step sweep: 0 to 40 dB in 2 dB steps (and +inf, the noise-free control)."""
DEFAULT_ACCUMULATION_SNRS = (10.0, 20.0, 30.0)
DEFAULT_FRACTION = 0.1


def _snr_text(snr: float) -> Any:
    return "inf" if snr == math.inf else float(snr)


def default_step(subject: Subject) -> int:
    """The middle step (``num_steps // 2``): early enough for later steps to react, late enough to matter."""
    return subject.num_steps // 2


def noise_free_run(subject: Subject, n: int = 20, seed: int = 0) -> Trajectory:
    """The run every noisy run of `single_step` / `accumulation` with the same `n` and `seed` is compared with."""
    return subject.trajectory(subject.labels(n), jax.random.key(seed))


def single_step(subject: Subject, *, snrs: Sequence[float] = DEFAULT_SNRS, step: Optional[int] = None,
                n: int = 20, seed: int = 0, noise_seed: int = 1,
                reference: Optional[Trajectory] = None) -> dict[str, Any]:
    """Noise at one step, swept over `snrs` (dB); loss of the final images against the noise-free run.

    Args:
        subject: The model and its sampler.
        snrs: SNRs in dB (``inf`` allowed; the correlation uses the finite ones).
        step: The noisy step (default `default_step`); negative counts from the end.
        n: Samples.
        seed: PRNG seed of the sampling draws; `noise_seed` of the noise draws.
        reference: `noise_free_run` of the same `n` and `seed`, when the caller has it already.

    Returns:
        A JSON-ready record with ``snr_db``, ``loss`` (image MSE), ``image_error`` (relative), ``spearman``
        (noise intensity vs loss over the finite SNRs), ``spearman_per_sample_median`` (the same per image, the
        median over the images whose loss is not constant, ``samples_with_a_ranking`` of them) and the settings.
    """
    step = default_step(subject) if step is None else int(step)
    if step < 0:
        step += subject.num_steps
    if not 0 <= step < subject.num_steps:
        raise ValueError(f"step {step} is outside {subject.name}'s {subject.num_steps} {subject.step_kind}s")
    snrs = [float(s) for s in snrs]
    if not snrs:
        raise ValueError("noise: give at least one SNR")
    labels = subject.labels(n)
    key, noise_key = jax.random.key(seed), jax.random.key(noise_seed)
    reference = noise_free_run(subject, n, seed) if reference is None else reference
    losses, errors, per_sample = [], [], []
    for snr in snrs:
        noisy = subject.trajectory(labels, key, perturb=subject.noise(snr, [step], noise_key))
        losses.append(noise_core.mean_squared_error(noisy.images, reference.images))
        errors.append(noise_core.relative_error(noisy.images, reference.images))
        squared = np.square(noisy.images.astype(np.float64) - reference.images.astype(np.float64))
        per_sample.append(squared.reshape(squared.shape[0], -1).mean(axis=1))  # [n]
    finite = [i for i, s in enumerate(snrs) if math.isfinite(s)]
    intensity = [10.0 ** (-snrs[i] / 10.0) for i in finite]
    rho = noise_core.spearman(intensity, [losses[i] for i in finite])
    sample_rhos = [noise_core.spearman(intensity, [per_sample[i][j] for i in finite]) for j in range(len(labels))]
    sample_rhos = [r for r in sample_rhos if math.isfinite(r)]
    return {
        "analysis": "noise_single_step", "model": subject.name, "family": subject.family, "source": subject.source,
        "protocol": dict(subject.protocol), "n": int(n), "seed": int(seed), "noise_seed": int(noise_seed),
        "step_kind": subject.step_kind, "step": step, "step_name": subject.step_names[step],
        "num_steps": subject.num_steps, "feature": subject.feature_name,
        "snr_db": [_snr_text(s) for s in snrs], "loss": losses, "image_error": [finite_or_none(e) for e in errors],
        "spearman": finite_or_none(rho),
        "spearman_per_sample_median": finite_or_none(float(np.median(sample_rhos))) if sample_rhos else None,
        "samples_with_a_ranking": len(sample_rhos),
    }


def accumulation(subject: Subject, *, snrs: Sequence[float] = DEFAULT_ACCUMULATION_SNRS,
                 fraction: float = DEFAULT_FRACTION, n: int = 20, seed: int = 0,
                 noise_seed: int = 1, reference: Optional[Trajectory] = None) -> dict[str, Any]:
    """Noise at each of `snrs` in the first `fraction` of the steps; the representation error at every step.

    Arguments as `single_step` (`reference`: the `noise_free_run`, when the caller has it already).

    Returns:
        A JSON-ready record with ``noisy_steps`` (how many leading steps got noise), per SNR the per-step
        ``representation_error`` (relative) and ``representation_rmse`` (absolute) against the noise-free run and
        the final ``loss`` (image MSE), and the settings.
    """
    noisy_steps = noise_core.first_steps(subject.num_steps, fraction)
    labels = subject.labels(n)
    key, noise_key = jax.random.key(seed), jax.random.key(noise_seed)
    reference = noise_free_run(subject, n, seed) if reference is None else reference
    curves = []
    for snr in (float(s) for s in snrs):
        noisy = subject.trajectory(labels, key, perturb=subject.noise(snr, range(noisy_steps), noise_key))
        curves.append({
            "snr_db": _snr_text(snr),
            "representation_error": [finite_or_none(noise_core.relative_error(q, f))
                                     for q, f in zip(noisy.representations, reference.representations)],
            "representation_rmse": [noise_core.mean_squared_error(q, f) ** 0.5
                                    for q, f in zip(noisy.representations, reference.representations)],
            "loss": noise_core.mean_squared_error(noisy.images, reference.images),
        })
    return {
        "analysis": "noise_accumulation", "model": subject.name, "family": subject.family, "source": subject.source,
        "protocol": dict(subject.protocol), "n": int(n), "seed": int(seed), "noise_seed": int(noise_seed),
        "step_kind": subject.step_kind, "steps": list(subject.step_names), "fraction": float(fraction),
        "noisy_steps": int(noisy_steps), "feature": subject.feature_name,
        "representation": subject.representation_name, "curves": curves,
    }
