"""The SNR, error and rank-correlation math of the analyses against direct numpy / scipy computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bitlaws.analysis import noise_core


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 13.0, 40.0])
def test_add_noise_gives_the_requested_snr_per_vector(snr_db):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 64)).astype(np.float32) * rng.uniform(0.1, 30, size=(3, 5, 1)).astype(np.float32) + 7
    noise = rng.standard_normal(x.shape).astype(np.float32)
    noisy = np.asarray(noise_core.add_noise(jnp.asarray(x), jnp.asarray(noise), snr_db, (-1,), centred=True))
    centred = x.astype(np.float64) - x.mean(axis=-1, keepdims=True)
    power = np.mean(centred ** 2, axis=-1, keepdims=True)  # [3, 5, 1]
    expected = x + np.sqrt(power / 10 ** (snr_db / 10)) * noise
    np.testing.assert_allclose(noisy, expected, rtol=1e-5, atol=1e-5)
    # the realised noise per vector is exactly std * draws: its scale against the centred signal is the SNR
    scale = np.sqrt(np.mean((noisy - x) ** 2, axis=-1) / np.mean(noise ** 2, axis=-1))  # [3, 5]
    np.testing.assert_allclose(10 * np.log10(power[..., 0] / scale ** 2), snr_db, atol=1e-3)


def test_uncentred_power_and_measured_snr():
    x = jnp.asarray(np.full((2, 4, 4, 3), 2.0, np.float32))
    np.testing.assert_allclose(np.asarray(noise_core.signal_power(x, (1, 2, 3))), 4.0)
    assert float(jnp.max(noise_core.signal_power(x, (1, 2, 3), centred=True))) == 0.0
    noise = jax.random.normal(jax.random.key(0), x.shape)
    noisy = noise_core.add_noise(x, noise, 10.0, (1, 2, 3))
    # 10 dB: noise power = 0.4 * mean(noise**2); measured over the whole batch
    expected = 10 * math.log10(4.0 / (0.4 * float(jnp.mean(noise ** 2))))
    assert noise_core.measured_snr_db(x, noisy, (1, 2, 3)) == pytest.approx(expected, abs=1e-3)


def test_infinite_snr_is_no_noise_bit_for_bit():
    x = jnp.asarray(np.array([[0.0, -0.0, 1e-30, -3.5e30, 7.25]], np.float32))
    noise = jnp.asarray(np.array([[-1.0, 2.0, -3.0, 4.0, -5.0]], np.float32))
    out = noise_core.add_noise(x, noise, math.inf, (-1,), centred=True)
    assert np.asarray(out).tobytes() == np.asarray(x).tobytes()
    assert noise_core.measured_snr_db(x, out, (-1,)) == math.inf


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_bad_snr_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="snr_db"):
        noise_core.noise_std(jnp.ones(()), bad)


def test_noise_shape_must_match():
    with pytest.raises(ValueError, match="noise of shape"):
        noise_core.add_noise(jnp.ones((2, 3)), jnp.ones((3, 2)), 10.0, (-1,))


def test_spearman_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(1)
    for trial in range(20):
        n = int(rng.integers(3, 30))
        x = rng.normal(size=n)
        y = x * rng.uniform(-1, 1) + rng.normal(size=n)
        if trial % 2:  # ties on both sides
            x, y = np.round(x), np.round(y * 2) / 2
        expected = stats.spearmanr(x, y).statistic
        assert noise_core.spearman(x, y) == pytest.approx(expected, abs=1e-12)


def test_spearman_edge_cases():
    assert noise_core.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(noise_core.spearman([1, 2, 3], [5, 5, 5]))  # constant: no ranking
    assert math.isnan(noise_core.spearman([1.0], [2.0]))
    assert noise_core.spearman([1, 2, math.nan, 4], [1, 2, 9, 4]) == pytest.approx(1.0)  # non-finite pairs dropped
    with pytest.raises(ValueError, match="equal length"):
        noise_core.spearman([1, 2], [1, 2, 3])


def test_relative_error_and_mse():
    a = np.array([[3.0, 4.0]])
    b = np.array([[0.0, 0.0]])
    assert noise_core.relative_error(a, a) == 0.0
    assert noise_core.relative_error(b, b) == 0.0
    assert noise_core.relative_error(a, b) == math.inf
    assert noise_core.relative_error(b, a) == pytest.approx(1.0)
    assert noise_core.relative_error(a * 1.1, a) == pytest.approx(0.1)
    assert noise_core.mean_squared_error(a, b) == pytest.approx(12.5)
    with pytest.raises(ValueError, match="shapes"):
        noise_core.relative_error(a, a.T)


@pytest.mark.parametrize("steps,fraction,expected", [(6, 0.1, 1), (10, 0.1, 1), (25, 0.1, 3), (250, 0.1, 25),
                                                     (30, 0.1, 3), (4, 1.0, 4), (1, 0.1, 1)])
def test_first_steps(steps, fraction, expected):
    assert noise_core.first_steps(steps, fraction) == expected


def test_first_steps_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fraction"):
        noise_core.first_steps(10, 0.0)
    with pytest.raises(ValueError, match="num_steps"):
        noise_core.first_steps(0, 0.1)
