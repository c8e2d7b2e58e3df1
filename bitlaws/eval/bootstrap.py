"""How sure a Frechet distance (FID, the demo's DFD) is: bootstrap intervals over the generated samples.

A cell's FID compares the statistics of its N generated samples with *fixed* reference statistics (the data
set's); its uncertainty comes from the finite sample set. Resampling the N feature vectors with replacement
B times and recomputing the distance against the same reference gives the bootstrap distribution.

Two sample sets generated with the same seeds and labels (sample i of both cells from the same noise and
class: the sweep's cells of one model and seed at different precisions) are *paired*: resampling both with the
same indices gives the distribution of the difference ``d(a) - d(b)``, far tighter than the two single
intervals because most of the sampling noise is shared. That is the interval to read when asking whether a
precision is worse than float.

Where the interval sits. A resample repeats ~37 % of the samples, which shrinks its covariance and moves every
resampled FID up (like FID's own small-sample bias, by an amount of the same order as the spread), so the plain
percentile interval ``[q_lo, q_hi]`` of the resampled distances sits above the estimate ``d``. The intervals
here keep the bootstrap's spread and remove that shift: ``[d - (q_hi - m), d + (m - q_lo)]`` with ``m`` the
resamples' mean (a reverse-percentile interval centred on the resample mean). They describe where the FID *at
this sample count* of the same model scatters (what another seed would give), which is what comparisons
between cells of equal N need; they are not intervals for the infinite-sample FID, which lies lower. For paired
differences the shift mostly cancels.

Each resample's distance uses the symmetric form of the trace term, ``tr((S R^2)^(1/2)) = tr((R S R)^(1/2))``
with ``R`` the reference covariance's square root computed once (eigh), so a resample costs one ``d x d``
product and one ``eigvalsh``; it agrees with `frechet_distance` (scipy ``sqrtm``) to float64 round-off on
valid covariances. The point estimate is always `frechet_distance`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from bitlaws.eval.frechet import frechet_distance

__all__ = ["Interval", "FrechetReference", "resample_indices", "frechet_interval", "paired_difference_interval"]

DEFAULT_BOOT = 200
DEFAULT_LEVEL = 0.95
_CHUNK = 32  # resamples per vectorised step ([chunk, N, d] float64 in memory)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A bootstrap interval around a point estimate.

    Attributes:
        estimate: The statistic on the full sample set.
        lo: Lower end.
        hi: Upper end.
        level: Confidence level (0.95).
        n_boot: Resamples behind the interval.
    """

    estimate: float
    lo: float
    hi: float
    level: float
    n_boot: int

    def excludes(self, value: float) -> bool:
        """Whether `value` lies outside ``[lo, hi]`` (e.g. a difference interval that excludes 0 is resolved)."""
        return not self.lo <= value <= self.hi

    def overlaps(self, other: "Interval") -> bool:
        """Whether the two intervals share a point."""
        return self.lo <= other.hi and other.lo <= self.hi

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate_features(features: Any, name: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be [N >= 2, d] feature vectors, got shape {np.shape(features)}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contain {int(np.sum(~np.isfinite(x)))} non-finite values")
    return x


def _validate_options(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 2:
        raise ValueError(f"n_boot (bootstrap resamples) must be an integer >= 2, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


@dataclasses.dataclass(frozen=True)
class FrechetReference:
    """Fixed reference statistics prepared for many distance evaluations.

    Attributes:
        mu: ``[d]`` float64 mean.
        sigma: ``[d, d]`` float64 covariance.
        root: ``[d, d]`` symmetric square root of `sigma` (eigh, negative round-off eigenvalues clipped).
        trace: ``tr(sigma)``.
    """

    mu: np.ndarray
    sigma: np.ndarray
    root: np.ndarray
    trace: float

    @classmethod
    def from_stats(cls, mu: Any, sigma: Any) -> "FrechetReference":
        mu = np.asarray(mu, dtype=np.float64)
        sigma = np.asarray(sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"reference statistics must be mu [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
            raise ValueError("reference statistics contain non-finite values")
        sym = (sigma + sigma.T) / 2
        values, vectors = np.linalg.eigh(sym)
        root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
        return cls(mu, sigma, root, float(np.trace(sigma)))

    def check(self, features: np.ndarray, name: str = "features") -> None:
        """Raises ValueError when `features` ``[N, d]`` do not have the reference's d."""
        if features.shape[1] != self.mu.shape[0]:
            raise ValueError(f"{name} have d={features.shape[1]} features, the reference has d={self.mu.shape[0]}")

    def distances(self, features: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Frechet distance of each resample ``features[indices[b]]`` to the reference. ``[B]`` float64."""
        self.check(features)
        n = features.shape[0]
        out = np.empty(indices.shape[0])
        for start in range(0, indices.shape[0], _CHUNK):
            x = features[indices[start:start + _CHUNK]]  # [c, N, d]
            mu = x.mean(axis=1)  # [c, d]
            centred = x - mu[:, None, :]
            sigma = np.matmul(np.swapaxes(centred, 1, 2), centred) / (n - 1)  # [c, d, d]
            inner = self.root @ sigma @ self.root
            eig = np.linalg.eigvalsh((inner + np.swapaxes(inner, 1, 2)) / 2)  # [c, d]
            tr_sqrt = np.sum(np.sqrt(np.clip(eig, 0.0, None)), axis=1)
            diff = mu - self.mu
            out[start:start + _CHUNK] = (np.sum(diff * diff, axis=1) + np.trace(sigma, axis1=1, axis2=2)
                                         + self.trace - 2 * tr_sqrt)
        return out


def resample_indices(n: int, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` int64 indices, each row n draws with replacement from ``range(n)`` (numpy PCG64 `seed`)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _centred(estimate: float, resampled: np.ndarray, level: float) -> Interval:
    """The resamples' quantile spread around `estimate`, their mean shift removed (see the module docstring)."""
    tail = (1 - level) / 2
    q_lo, q_hi = np.quantile(resampled, [tail, 1 - tail])
    mean = float(np.mean(resampled))
    return Interval(float(estimate), float(estimate - (q_hi - mean)), float(estimate + (mean - q_lo)), float(level),
                    int(resampled.size))


def frechet_interval(features: Any, reference_mu: Any, reference_sigma: Any, *, n_boot: int = DEFAULT_BOOT,
                     seed: int = 0, level: float = DEFAULT_LEVEL, reference: Optional[FrechetReference] = None,
                     estimate: Optional[float] = None) -> Interval:
    """The Frechet distance of `features` to the reference, with its bootstrap interval.

    Args:
        features: ``[N, d]`` per-sample features (N >= 2, finite).
        reference_mu: ``[d]`` reference mean.
        reference_sigma: ``[d, d]`` reference covariance.
        n_boot: Resamples (>= 2).
        seed: Seed of the resample indices (`resample_indices`).
        level: Confidence level.
        reference: A prepared `FrechetReference` of the same statistics (skips the eigh).
        estimate: The point estimate to centre on, when the caller already has it from other statistics of
            the same features (e.g. a float64 running accumulator); default `frechet_distance` of the
            features' mean and covariance (ddof 1).

    Returns:
        An `Interval` around the estimate.

    Raises:
        ValueError: naming the malformed argument.
    """
    x = _validate_features(features, "features")
    _validate_options(n_boot, level)
    ref = reference if reference is not None else FrechetReference.from_stats(reference_mu, reference_sigma)
    ref.check(x)
    if estimate is None:
        estimate = frechet_distance(x.mean(axis=0), np.cov(x, rowvar=False), ref.mu, ref.sigma)
    return _centred(float(estimate), ref.distances(x, resample_indices(x.shape[0], n_boot, seed)), level)


def paired_difference_interval(features_a: Any, features_b: Any, reference_mu: Any, reference_sigma: Any, *,
                               n_boot: int = DEFAULT_BOOT, seed: int = 0, level: float = DEFAULT_LEVEL,
                               reference: Optional[FrechetReference] = None) -> Interval:
    """``d(a) - d(b)`` for paired sample sets (row i of both from the same seed and label), with its interval.

    Both sets are resampled with the same indices, so noise they share cancels.

    Args:
        features_a: ``[N, d]`` features of the first set (e.g. a quantized cell).
        features_b: ``[N, d]`` features of the second set, paired row by row (e.g. the float cell).
        reference_mu, reference_sigma, n_boot, seed, level, reference: As in `frechet_interval`.

    Returns:
        An `Interval` of the difference (estimate: difference of the two `frechet_distance` values).

    Raises:
        ValueError: malformed arguments, or sets of different sizes (they cannot be paired).
    """
    a = _validate_features(features_a, "features_a")
    b = _validate_features(features_b, "features_b")
    if a.shape != b.shape:
        raise ValueError(f"paired feature sets must have the same shape, got {a.shape} and {b.shape}")
    _validate_options(n_boot, level)
    ref = reference if reference is not None else FrechetReference.from_stats(reference_mu, reference_sigma)
    ref.check(a, "features_a")
    estimate = (frechet_distance(a.mean(axis=0), np.cov(a, rowvar=False), ref.mu, ref.sigma)
                - frechet_distance(b.mean(axis=0), np.cov(b, rowvar=False), ref.mu, ref.sigma))
    indices = resample_indices(a.shape[0], n_boot, seed)
    return _centred(estimate, ref.distances(a, indices) - ref.distances(b, indices), level)
