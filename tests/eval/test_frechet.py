"""Tests for bitlaws.eval.frechet against the pytorch-fid fixture and invariants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from bitlaws.eval import frechet_distance
from bitlaws.eval.frechet import frechet_distance_eigh
from bitlaws.port import read_safetensors

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fid_io.safetensors"


@pytest.fixture(scope="module")
def fd() -> dict[str, np.ndarray]:
    return {k[3:]: v for k, v in read_safetensors(FIXTURE).items() if k.startswith("fd.")}


def _random_cov(rng: np.random.Generator, n: int, d: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d))) + offset
    return x.mean(axis=0), np.cov(x, rowvar=False)


def test_matches_pytorch_fid_fixture(fd):
    assert fd["mu1"].dtype == np.float32 and fd["sigma1_f64"].dtype == np.float64
    value = frechet_distance(fd["mu1"], fd["sigma1_f64"], fd["mu2"], fd["sigma2_f64"])
    expected = float(fd["value_f64"][0])
    assert isinstance(value, float)
    assert value == pytest.approx(expected, rel=1e-6)


def test_fixture_from_feature_stats(fd):
    from bitlaws.eval import FeatureStats

    s1 = FeatureStats.from_features(fd["feats1"])
    s2 = FeatureStats.from_features(fd["feats2"])
    value = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert value == pytest.approx(float(fd["value_f64"][0]), rel=1e-6)


def test_fixture_through_eigh_variant(fd):
    value = frechet_distance_eigh(fd["mu1"], fd["sigma1_f64"], fd["mu2"], fd["sigma2_f64"])
    assert value == pytest.approx(float(fd["value_f64"][0]), rel=1e-6)


def test_matches_direct_formula():
    rng = np.random.default_rng(0)
    mu1, s1 = _random_cov(rng, 200, 24)
    mu2, s2 = _random_cov(rng, 200, 24, offset=0.5)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-10)


@pytest.mark.parametrize("n, d", [(300, 16), (50, 64), (5, 16), (10, 64)])
def test_sqrtm_and_eigh_variants_agree(n, d):
    """Including rank-deficient covariances (n < d)."""
    rng = np.random.default_rng(n * 1000 + d)
    mu1, s1 = _random_cov(rng, n, d)
    mu2, s2 = _random_cov(rng, n, d, offset=0.2)
    a = frechet_distance(mu1, s1, mu2, s2)
    b = frechet_distance_eigh(mu1, s1, mu2, s2)
    assert np.isfinite(a) and np.isfinite(b)
    assert a == pytest.approx(b, rel=1e-6)


def test_symmetric_in_arguments():
    rng = np.random.default_rng(1)
    mu1, s1 = _random_cov(rng, 100, 12)
    mu2, s2 = _random_cov(rng, 100, 12, offset=1.0)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


@pytest.mark.parametrize("n, d", [(500, 32), (40, 16)])
def test_identical_statistics_give_zero(n, d):
    rng = np.random.default_rng(2)
    mu, sigma = _random_cov(rng, n, d, offset=3.0)
    for fn in (frechet_distance, frechet_distance_eigh):
        value = fn(mu, sigma, mu, sigma)
        assert abs(value) < 1e-6
        assert value >= 0.0


def test_diagonal_known_value():
    # Commuting covariances: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a = np.array([1.0, 4.0, 9.0])
    b = np.array([4.0, 1.0, 9.0])
    mu1 = np.zeros(3)
    mu2 = np.array([1.0, 2.0, 2.0])
    expected = 9.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n, d", [(5, 16), (3, 64)])
def test_singular_covariance_is_finite(n, d):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.standard_normal((n, d)).astype(np.float32) + 0.5
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    assert np.linalg.matrix_rank(s1) < d
    value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > 0
    # Identical rank-deficient statistics: the square root of the null space
    # carries O(sqrt(eps)) round-off per null direction (see module docstring),
    # so only a small value relative to the traces is guaranteed, not 1e-6.
    same = frechet_distance(mu1, s1, mu1, s1)
    assert np.isfinite(same) and abs(same) <= 1e-6 * 2 * np.trace(s1)


def test_zero_and_constant_feature_covariances():
    zero = np.zeros((4, 4))
    assert frechet_distance(np.zeros(4), zero, np.ones(4), zero) == pytest.approx(4.0)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((100, 6))
    x[:, 2] = 7.0  # a dead feature: zero row/column in sigma
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_nonfinite_sqrtm_retries_with_eps(monkeypatch):
    import bitlaws.eval.frechet as mod

    calls = []
    real_sqrtm = mod._sqrtm

    def flaky(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(mod, "_sqrtm", flaky)
    rng = np.random.default_rng(5)
    mu1, s1 = _random_cov(rng, 100, 8)
    mu2, s2 = _random_cov(rng, 100, 8)
    value = frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    off = 1e-3 * np.eye(8)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(real_sqrtm(calls[1]).real)
    assert value == pytest.approx(expected, rel=1e-12)


def test_falls_back_to_eigh_when_retry_fails(monkeypatch):
    import bitlaws.eval.frechet as mod

    monkeypatch.setattr(mod, "_sqrtm", lambda a: np.full_like(a, np.inf))
    rng = np.random.default_rng(6)
    mu1, s1 = _random_cov(rng, 100, 8)
    mu2, s2 = _random_cov(rng, 100, 8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance_eigh(mu1, s1, mu2, s2))


def test_significant_imaginary_part_raises(monkeypatch):
    import bitlaws.eval.frechet as mod

    monkeypatch.setattr(mod, "_sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 0.1j))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_small_imaginary_part_is_dropped(monkeypatch):
    import bitlaws.eval.frechet as mod

    monkeypatch.setattr(mod, "_sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 1e-5j))
    assert frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) == 0.0


def test_negative_clamp_only_for_roundoff(monkeypatch):
    import bitlaws.eval.frechet as mod

    # scale = tr(s1) + tr(s2) = 6; tiny negative (-6e-10) -> 0, larger (-6e-6) kept.
    monkeypatch.setattr(mod, "_sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 1e-10))
    assert frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) == 0.0
    monkeypatch.setattr(mod, "_sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 1e-6))
    assert frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) == pytest.approx(-6e-6)


@pytest.mark.parametrize(
    "args, name",
    [
        ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), "mu1"),
        ((np.zeros(3), np.zeros(3), np.zeros(3), np.eye(3)), "sigma1"),
        ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(3)), "mu2"),
        ((np.zeros(3), np.eye(3), np.zeros(3), np.ones((3, 4))), "sigma2"),
        ((np.zeros(3), np.eye(3), np.zeros(3), np.eye(4)), "sigma2"),
        ((np.zeros(3), np.eye(3), np.full(3, np.nan), np.eye(3)), "mu2"),
    ],
)
def test_shape_validation_names_argument(args, name):
    with pytest.raises(ValueError, match=name):
        frechet_distance(*args)
    with pytest.raises(ValueError, match=name):
        frechet_distance_eigh(*args)
