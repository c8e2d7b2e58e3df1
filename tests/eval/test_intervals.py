"""Jackknife intervals of Frechet distances: against a direct computation, pairing, calibration, errors."""

import statistics

import numpy as np
import pytest

from bitlaws.eval import intervals
from bitlaws.eval.frechet import frechet_distance

Z95 = statistics.NormalDist().inv_cdf(0.975)


def _data(n=60, d=5, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    features = rng.standard_normal((n, d)) @ mix + 0.3
    reference = rng.standard_normal((4000, d)) @ mix
    return features, reference.mean(axis=0), np.cov(reference, rowvar=False)


def _direct_se(stat_without, n, groups):
    """The delete-a-group jackknife standard error, each replicate recomputed from scratch (np.cov, scipy)."""
    values = np.array([stat_without(np.arange(n) % groups != g) for g in range(groups)])
    return np.sqrt((groups - 1) / groups * np.sum((values - values.mean()) ** 2))


def test_interval_matches_a_direct_computation():
    x, mu, sigma = _data()
    interval = intervals.frechet_interval(x, mu, sigma, groups=12, level=0.9)
    dist = lambda f: frechet_distance(f.mean(axis=0), np.cov(f, rowvar=False), mu, sigma)  # noqa: E731
    se = _direct_se(lambda keep: dist(x[keep]), len(x), 12)
    z = statistics.NormalDist().inv_cdf(0.95)
    assert interval.estimate == pytest.approx(dist(x), rel=1e-12)
    assert interval.se == pytest.approx(se, rel=1e-7)
    assert interval.lo == pytest.approx(dist(x) - z * se, rel=1e-9) and interval.hi == pytest.approx(dist(x) + z * se)
    assert (interval.level, interval.groups) == (0.9, 12)


def test_paired_difference_matches_a_direct_computation_and_is_tighter():
    x, mu, sigma = _data(seed=1)
    y = x * 1.05 + 0.02 * np.random.default_rng(2).standard_normal(x.shape)  # the same samples, perturbed
    dist = lambda f: frechet_distance(f.mean(axis=0), np.cov(f, rowvar=False), mu, sigma)  # noqa: E731
    paired = intervals.paired_difference_interval(y, x, mu, sigma, groups=20)
    se = _direct_se(lambda keep: dist(y[keep]) - dist(x[keep]), len(x), 20)
    assert paired.estimate == pytest.approx(dist(y) - dist(x), rel=1e-10)
    assert paired.se == pytest.approx(se, rel=1e-6)
    single = intervals.frechet_interval(y, mu, sigma, groups=20)
    assert paired.se < 0.5 * single.se  # shared noise cancels


def test_stored_replicates_give_the_same_intervals_and_identical_sets_a_zero_difference():
    x, mu, sigma = _data(seed=6)
    ref = intervals.FrechetReference.from_stats(mu, sigma)
    direct = intervals.frechet_interval(x, mu, sigma)
    assert intervals.interval_from_replicates(direct.estimate, intervals.jackknife_replicates(x, ref)) == direct
    same = intervals.paired_difference_interval(x, x, mu, sigma)
    assert (same.estimate, same.lo, same.hi) == (0.0, 0.0, 0.0) and not same.excludes(0.0)
    shifted = intervals.frechet_interval(x, mu, sigma, estimate=100.0)
    assert shifted.se == direct.se and shifted.lo < 100.0 < shifted.hi


def test_groups_interleave_so_every_group_holds_every_class():
    labels = np.repeat(np.arange(10), 50)  # the demo's class-ordered samples
    member = intervals.group_of(500, 50)
    assert all(sorted(labels[member == g]) == list(range(10)) for g in range(50))


def test_interval_width_tracks_the_seed_to_seed_spread():
    """Across independent sample sets of one distribution (d = 16, N = 300), the jackknife standard error is
    about the standard deviation of the estimates, the quantity it describes."""
    rng = np.random.default_rng(7)
    d, n = 16, 300
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    ref = rng.standard_normal((20000, d)) @ mix
    mu, sigma = ref.mean(axis=0), np.cov(ref, rowvar=False)
    sets = [rng.standard_normal((n, d)) @ (1.2 * mix) + 0.1 for _ in range(40)]
    spread = np.std([frechet_distance(s.mean(axis=0), np.cov(s, rowvar=False), mu, sigma) for s in sets], ddof=1)
    se = np.median([intervals.frechet_interval(s, mu, sigma).se for s in sets[:10]])
    assert 0.7 * spread < se < 1.6 * spread


def test_bad_input_is_named():
    x, mu, sigma = _data()
    with pytest.raises(ValueError, match="features must be"):
        intervals.frechet_interval(x[:1], mu, sigma)
    with pytest.raises(ValueError, match="non-finite"):
        intervals.frechet_interval(np.where(np.eye(60, 5) > 0, np.nan, x), mu, sigma)
    with pytest.raises(ValueError, match="groups"):
        intervals.frechet_interval(x, mu, sigma, groups=1)
    with pytest.raises(ValueError, match="too few"):
        intervals.frechet_interval(x, mu, sigma, groups=61)
    with pytest.raises(ValueError, match="level"):
        intervals.frechet_interval(x, mu, sigma, level=1.0)
    with pytest.raises(ValueError, match="reference statistics"):
        intervals.frechet_interval(x, mu, sigma[:3])
    with pytest.raises(ValueError, match="d=5"):
        intervals.frechet_interval(x, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="same shape"):
        intervals.paired_difference_interval(x, x[:30], mu, sigma)
    with pytest.raises(ValueError, match="replicates must be"):
        intervals.interval_from_replicates(1.0, [1.0, np.nan, 2.0])
