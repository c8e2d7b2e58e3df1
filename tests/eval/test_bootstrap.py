"""Bootstrap intervals of Frechet distances: against a direct per-resample computation, pairing, errors."""

import numpy as np
import pytest

from bitlaws.eval import bootstrap
from bitlaws.eval.frechet import frechet_distance


def _data(n=60, d=5, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    features = rng.standard_normal((n, d)) @ mix + 0.3
    reference = rng.standard_normal((4000, d)) @ mix
    return features, reference.mean(axis=0), np.cov(reference, rowvar=False)


def _direct(resampled_of, estimate, indices, level):
    """The interval from scipy-sqrtm Frechet distances of each resample, computed one by one."""
    values = np.array([resampled_of(row) for row in indices])
    tail = (1 - level) / 2
    q_lo, q_hi = np.quantile(values, [tail, 1 - tail])
    return estimate - (q_hi - values.mean()), estimate + (values.mean() - q_lo)


def test_interval_matches_a_direct_computation():
    x, mu, sigma = _data()
    interval = bootstrap.frechet_interval(x, mu, sigma, n_boot=64, seed=3, level=0.9)
    dist = lambda f: frechet_distance(f.mean(axis=0), np.cov(f, rowvar=False), mu, sigma)  # noqa: E731
    estimate = dist(x)
    lo, hi = _direct(lambda row: dist(x[row]), estimate, bootstrap.resample_indices(len(x), 64, 3), 0.9)
    assert interval.estimate == pytest.approx(estimate, rel=1e-12)
    assert interval.lo == pytest.approx(lo, rel=1e-8) and interval.hi == pytest.approx(hi, rel=1e-8)
    assert (interval.level, interval.n_boot) == (0.9, 64)
    assert interval.lo < estimate < interval.hi


def test_paired_difference_matches_a_direct_computation_and_is_tighter():
    x, mu, sigma = _data(seed=1)
    rng = np.random.default_rng(2)
    y = x * 1.05 + 0.02 * rng.standard_normal(x.shape)  # the same samples, slightly perturbed (a "quantized" set)
    dist = lambda f: frechet_distance(f.mean(axis=0), np.cov(f, rowvar=False), mu, sigma)  # noqa: E731
    paired = bootstrap.paired_difference_interval(y, x, mu, sigma, n_boot=64, seed=5)
    lo, hi = _direct(lambda row: dist(y[row]) - dist(x[row]), dist(y) - dist(x),
                     bootstrap.resample_indices(len(x), 64, 5), 0.95)
    assert paired.estimate == pytest.approx(dist(y) - dist(x), rel=1e-10)
    assert paired.lo == pytest.approx(lo, rel=1e-7, abs=1e-10) and paired.hi == pytest.approx(hi, rel=1e-7, abs=1e-10)
    single = bootstrap.frechet_interval(y, mu, sigma, n_boot=64, seed=5)
    assert paired.hi - paired.lo < 0.5 * (single.hi - single.lo)  # shared noise cancels


def test_identical_sets_give_a_zero_difference_and_the_caller_estimate_is_used():
    x, mu, sigma = _data(seed=4)
    same = bootstrap.paired_difference_interval(x, x, mu, sigma, n_boot=16)
    assert same.estimate == 0.0 and same.lo == 0.0 and same.hi == 0.0 and not same.excludes(0.0)
    shifted = bootstrap.frechet_interval(x, mu, sigma, n_boot=16, estimate=100.0)
    plain = bootstrap.frechet_interval(x, mu, sigma, n_boot=16)
    assert shifted.hi - shifted.lo == pytest.approx(plain.hi - plain.lo)
    assert shifted.estimate == 100.0 and shifted.lo < 100.0 < shifted.hi


def test_interval_width_tracks_the_seed_to_seed_spread():
    """Across independent sample sets of one distribution, the interval is about as wide as the spread of the
    estimates (the quantity it describes)."""
    rng = np.random.default_rng(7)
    d, n = 4, 200
    ref = rng.standard_normal((20000, d))
    mu, sigma = ref.mean(axis=0), np.cov(ref, rowvar=False)
    sets = [rng.standard_normal((n, d)) * 1.2 + 0.1 for _ in range(40)]
    estimates = [frechet_distance(s.mean(axis=0), np.cov(s, rowvar=False), mu, sigma) for s in sets]
    widths = [(lambda i: i.hi - i.lo)(bootstrap.frechet_interval(s, mu, sigma, n_boot=200)) for s in sets[:8]]
    spread = np.quantile(estimates, 0.975) - np.quantile(estimates, 0.025)
    assert 0.5 * spread < np.median(widths) < 2.0 * spread


def test_bad_input_is_named():
    x, mu, sigma = _data()
    with pytest.raises(ValueError, match="features must be"):
        bootstrap.frechet_interval(x[:1], mu, sigma)
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap.frechet_interval(np.where(np.eye(60, 5) > 0, np.nan, x), mu, sigma)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap.frechet_interval(x, mu, sigma, n_boot=1)
    with pytest.raises(ValueError, match="level"):
        bootstrap.frechet_interval(x, mu, sigma, level=1.0)
    with pytest.raises(ValueError, match="reference statistics"):
        bootstrap.frechet_interval(x, mu, sigma[:3])
    with pytest.raises(ValueError, match="d=5"):
        bootstrap.frechet_interval(x, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="same shape"):
        bootstrap.paired_difference_interval(x, x[:30], mu, sigma)
