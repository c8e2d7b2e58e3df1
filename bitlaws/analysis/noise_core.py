"""The math of the error analyses: signal power, noise at a given SNR, relative errors, rank correlation.

Pure functions of arrays, no models. Conventions:

* SNR in decibels, ``snr_db = 10 log10(P_signal / P_noise)``, with the power measured *per feature vector* (one
  token's logits of VAR, one sample's model output of DiT) so that every vector gets exactly the requested SNR
  whatever its scale; ``+inf`` dB is no noise at all (the perturbed array equals the input bit for bit).
* ``centred`` power subtracts the mean over the vector first: VAR's logits only matter up to a constant shift
  (softmax), so their signal is the centred part; a model output (DiT's epsilon) is used as it is.
* Relative error ``||a - b||_F / ||b||_F`` over a whole batch (b is the float reference).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def signal_power(x: jax.Array, axes: Sequence[int], *, centred: bool = False) -> jax.Array:
    """Mean square of `x` over `axes` (kept as size-1 dims), optionally after removing the mean over them.

    Args:
        x: ``[...]`` float array.
        axes: The axes of one feature vector (e.g. ``(-1,)`` for logits ``[B, l, V]``).
        centred: Subtract the mean over `axes` first.

    Returns:
        ``x.shape`` with `axes` reduced to 1, float32.
    """
    x = jnp.asarray(x, jnp.float32)
    axes = tuple(int(a) for a in axes)
    if centred:
        x = x - jnp.mean(x, axis=axes, keepdims=True)
    return jnp.mean(jnp.square(x), axis=axes, keepdims=True)


def noise_std(power: jax.Array, snr_db: float) -> jax.Array:
    """Standard deviation of Gaussian noise that gives `snr_db` against a signal of `power` (0 at ``+inf``).

    Raises:
        ValueError: `snr_db` is NaN or ``-inf``.
    """
    snr_db = float(snr_db)
    if math.isnan(snr_db) or snr_db == -math.inf:
        raise ValueError(f"snr_db must be a number or +inf, got {snr_db}")
    if snr_db == math.inf:
        return jnp.zeros_like(power)
    return jnp.sqrt(power / (10.0 ** (snr_db / 10.0)))


def add_noise(x: jax.Array, noise: jax.Array, snr_db: float, axes: Sequence[int], *,
              centred: bool = False) -> jax.Array:
    """``x + std * noise`` with ``std`` per feature vector such that the SNR is `snr_db`.

    Args:
        x: ``[...]`` float32 signal.
        noise: Standard normal draws of ``x.shape`` (the same draws for every SNR give smooth sweeps).
        snr_db: Target SNR in dB (``+inf``: `x` unchanged, bit for bit).
        axes: Axes of one feature vector.
        centred: Measure the signal power after removing each vector's mean.

    Returns:
        The noisy array, `x`'s shape and dtype.
    """
    if noise.shape != x.shape:
        raise ValueError(f"noise of shape {noise.shape} for a signal of shape {x.shape}")
    std = noise_std(signal_power(x, axes, centred=centred), snr_db)
    # Where std is 0 (infinite SNR, or an all-zero vector) x is kept as it is (x + 0 would turn -0.0 into +0.0).
    return jnp.where(std == 0, x, x + std * noise).astype(x.dtype)


def measured_snr_db(x: jax.Array, noisy: jax.Array, axes: Sequence[int], *, centred: bool = False) -> float:
    """The SNR (dB) realised by `noisy` against `x`: mean signal power over mean noise power of all vectors."""
    signal = float(jnp.mean(signal_power(x, axes, centred=centred)))
    noise = float(jnp.mean(jnp.square(jnp.asarray(noisy, jnp.float32) - jnp.asarray(x, jnp.float32))))
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """``||value - reference||_F / ||reference||_F`` in float64 (0 when both are zero; inf when only the
    reference is)."""
    value = np.asarray(value, np.float64)
    reference = np.asarray(reference, np.float64)
    if value.shape != reference.shape:
        raise ValueError(f"relative_error: shapes {value.shape} and {reference.shape} differ")
    diff = float(np.linalg.norm((value - reference).ravel()))
    norm = float(np.linalg.norm(reference.ravel()))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def mean_squared_error(value: np.ndarray, reference: np.ndarray) -> float:
    """Mean of ``(value - reference)**2`` in float64."""
    value = np.asarray(value, np.float64)
    reference = np.asarray(reference, np.float64)
    if value.shape != reference.shape:
        raise ValueError(f"mean_squared_error: shapes {value.shape} and {reference.shape} differ")
    return float(np.mean(np.square(value - reference)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = 0.5 * (start + end) + 1.0
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks (ties share their mean rank).

    NaN when fewer than 2 finite pairs or when either side is constant (no ranking to correlate).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: needs two 1-D sequences of equal length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return math.nan
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(np.sum(rx * rx)) * float(np.sum(ry * ry)))
    return math.nan if denominator == 0.0 else float(np.sum(rx * ry)) / denominator


def first_steps(num_steps: int, fraction: float) -> int:
    """How many leading steps make up `fraction` of `num_steps` (at least one; ``ceil``)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, min(num_steps, math.ceil(round(fraction * num_steps, 9))))
