"""How sure a Frechet distance (FID, the demo's DFD) is: jackknife intervals over the generated samples.

A cell's FID compares the statistics of its N generated samples with *fixed* reference statistics (the data
set's); its uncertainty comes from the finite sample set: another seed gives another FID. The interval here is
``estimate +- z * se`` with ``se`` the **delete-a-group jackknife** standard error: the N samples are dealt into
G interleaved groups (sample i in group ``i % G``, so with class-ordered samples every group holds every class),
the distance is recomputed G times with one group left out, and ``se^2 = (G - 1) / G * sum_g (d_g - mean)^2``.

Two sample sets generated with the same seeds and labels (sample i of both cells from the same noise and class:
the sweep's cells of one model and seed at different precisions) are *paired*: leaving the same group out of
both gives the jackknife of the difference ``d(a) - d(b)``, far tighter than the two single intervals because
most of the sampling noise is shared. That is the interval to read when asking whether a precision is worse
than float.

Why not the bootstrap. Resampling with replacement repeats ~37 % of the samples, which shrinks the
covariance's effective sample size; FID's small-sample bias (of order ``d / N``) then moves every resample and
varies between resamples. On Gaussian features of the demo's size (d = 64, N = 500, 40 independent sample sets
at three distances; `python benchmarks/frechet_intervals.py`), the bootstrap's standard deviation was 1.4-1.9x
the real seed-to-seed spread and its resamples sat 3.0-3.9 above the estimate (for FIDs of 3.3-15.7), while the
jackknife's standard error was 1.2x the spread (slightly conservative, as the jackknife is known to be). These intervals describe where the FID *at this sample count*
scatters from seed to seed, which is what comparisons between cells of equal N need; they are not intervals
for the infinite-sample FID, which lies lower.

Each replicate's distance uses the symmetric form of the trace term, ``tr((S R^2)^(1/2)) = tr((R S R)^(1/2))``
with ``R`` the reference covariance's square root computed once (eigh), so a replicate costs one ``d x d``
product and one ``eigvalsh``; it agrees with `frechet_distance` (scipy ``sqrtm``) to float64 round-off on valid
covariances. The point estimate is always `frechet_distance`'s (or the caller's).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Optional

import numpy as np

from bitlaws.eval.frechet import frechet_distance

__all__ = ["Interval", "FrechetReference", "group_of", "jackknife_replicates", "interval_from_replicates",
           "frechet_interval", "paired_difference_interval"]

DEFAULT_GROUPS = 50
DEFAULT_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A jackknife interval around a point estimate.

    Attributes:
        estimate: The statistic on the full sample set.
        lo: ``estimate - z * se``.
        hi: ``estimate + z * se``.
        se: The jackknife standard error.
        level: Confidence level (0.95: z = 1.96).
        groups: Jackknife groups behind `se`.
    """

    estimate: float
    lo: float
    hi: float
    se: float
    level: float
    groups: int

    def excludes(self, value: float) -> bool:
        """Whether `value` lies outside ``[lo, hi]`` (e.g. a difference interval that excludes 0 is resolved)."""
        return not self.lo <= value <= self.hi

    def overlaps(self, other: "Interval") -> bool:
        """Whether the two intervals share a point."""
        return self.lo <= other.hi and other.lo <= self.hi


def _validate_features(features: Any, name: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be [N >= 2, d] feature vectors, got shape {np.shape(features)}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contain {int(np.sum(~np.isfinite(x)))} non-finite values")
    return x


def _validate_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _validate_groups(groups: int, n: int) -> None:
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 2:
        raise ValueError(f"groups (jackknife groups) must be an integer >= 2, got {groups!r}")
    if groups > n or n - -(-n // groups) < 2:
        raise ValueError(f"{n} samples are too few for {groups} jackknife groups (at most N groups, and each "
                         "replicate keeps >= 2 samples)")


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
        values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
        root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
        return cls(mu, sigma, root, float(np.trace(sigma)))

    def check(self, features: np.ndarray, name: str = "features") -> None:
        """Raises ValueError when `features` ``[N, d]`` do not have the reference's d."""
        if features.shape[1] != self.mu.shape[0]:
            raise ValueError(f"{name} have d={features.shape[1]} features, the reference has d={self.mu.shape[0]}")

    def distance(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """The Frechet distance of ``N(mu, sigma)`` to the reference (the symmetric eigh form)."""
        inner = self.root @ sigma @ self.root
        tr_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None))))
        diff = mu - self.mu
        return float(diff @ diff + np.trace(sigma) + self.trace - 2 * tr_sqrt)


def group_of(n: int, groups: int = DEFAULT_GROUPS) -> np.ndarray:
    """``[n]`` group of each sample: ``i % groups`` (interleaved, so class-ordered samples spread evenly)."""
    return np.arange(n) % groups


def jackknife_replicates(features: Any, reference: FrechetReference, *, groups: int = DEFAULT_GROUPS) -> np.ndarray:
    """The distance to `reference` with each group of `group_of` left out. ``[groups]`` float64.

    Sample sets of equal N paired row by row have paired replicates: the difference of two such arrays is the
    jackknife of the difference (`interval_from_replicates`), so callers may store these arrays and pair them
    later without the features. Leave-one-group-out statistics are downdates of the full sums (no pass over
    the data per replicate).
    """
    x = _validate_features(features, "features")
    reference.check(x)
    n = x.shape[0]
    _validate_groups(groups, n)
    centre = x.mean(axis=0)
    shifted = x - centre  # sums of shifted features keep the downdates accurate
    total, outer = shifted.sum(axis=0), shifted.T @ shifted
    member = group_of(n, groups)
    out = np.empty(groups)
    for g in range(groups):
        part = shifted[member == g]
        m = n - part.shape[0]
        s = total - part.sum(axis=0)
        mean = s / m
        sigma = (outer - part.T @ part - m * np.outer(mean, mean)) / (m - 1)
        out[g] = reference.distance(centre + mean, sigma)
    return out


def interval_from_replicates(estimate: float, replicates: Any, level: float = DEFAULT_LEVEL) -> Interval:
    """``estimate +- z * se`` with the jackknife ``se`` of `replicates` (leave-one-group-out values, or paired
    differences of them)."""
    values = np.asarray(replicates, dtype=np.float64)
    if values.ndim != 1 or values.size < 2 or not np.all(np.isfinite(values)):
        raise ValueError(f"replicates must be >= 2 finite values [G], got shape {values.shape}")
    _validate_level(level)
    g = values.size
    se = float(np.sqrt((g - 1) / g * np.sum(np.square(values - values.mean()))))
    z = statistics.NormalDist().inv_cdf(1 - (1 - level) / 2)
    return Interval(float(estimate), float(estimate - z * se), float(estimate + z * se), se, float(level), g)


def _prepared(reference: Optional[FrechetReference], mu: Any, sigma: Any) -> FrechetReference:
    return reference if reference is not None else FrechetReference.from_stats(mu, sigma)


def frechet_interval(features: Any, reference_mu: Any, reference_sigma: Any, *, groups: int = DEFAULT_GROUPS,
                     level: float = DEFAULT_LEVEL, reference: Optional[FrechetReference] = None,
                     estimate: Optional[float] = None) -> Interval:
    """The Frechet distance of `features` to the reference, with its jackknife interval.

    Args:
        features: ``[N, d]`` per-sample features (finite; N large enough for `groups`).
        reference_mu: ``[d]`` reference mean (ignored when `reference` is given).
        reference_sigma: ``[d, d]`` reference covariance (ignored when `reference` is given).
        groups: Jackknife groups (>= 2; N itself is the leave-one-out jackknife).
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
    _validate_level(level)
    ref = _prepared(reference, reference_mu, reference_sigma)
    ref.check(x)
    if estimate is None:
        estimate = frechet_distance(x.mean(axis=0), np.cov(x, rowvar=False), ref.mu, ref.sigma)
    return interval_from_replicates(float(estimate), jackknife_replicates(x, ref, groups=groups), level)


def paired_difference_interval(features_a: Any, features_b: Any, reference_mu: Any, reference_sigma: Any, *,
                               groups: int = DEFAULT_GROUPS, level: float = DEFAULT_LEVEL,
                               reference: Optional[FrechetReference] = None) -> Interval:
    """``d(a) - d(b)`` for paired sample sets (row i of both from the same seed and label), with its interval.

    The same group is left out of both sets, so noise they share cancels.

    Args:
        features_a: ``[N, d]`` features of the first set (e.g. a quantized cell).
        features_b: ``[N, d]`` features of the second set, paired row by row (e.g. the float cell).
        reference_mu, reference_sigma, groups, level, reference: As in `frechet_interval`.

    Returns:
        An `Interval` of the difference (estimate: difference of the two `frechet_distance` values).

    Raises:
        ValueError: malformed arguments, or sets of different sizes (they cannot be paired).
    """
    a = _validate_features(features_a, "features_a")
    b = _validate_features(features_b, "features_b")
    if a.shape != b.shape:
        raise ValueError(f"paired feature sets must have the same shape, got {a.shape} and {b.shape}")
    _validate_level(level)
    ref = _prepared(reference, reference_mu, reference_sigma)
    ref.check(a, "features_a")
    estimate = (frechet_distance(a.mean(axis=0), np.cov(a, rowvar=False), ref.mu, ref.sigma)
                - frechet_distance(b.mean(axis=0), np.cov(b, rowvar=False), ref.mu, ref.sigma))
    diff = jackknife_replicates(a, ref, groups=groups) - jackknife_replicates(b, ref, groups=groups)
    return interval_from_replicates(estimate, diff, level)
