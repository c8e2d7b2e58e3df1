"""SmoothQuant core: the smoothing factors against a plain-numpy reference, exactness, and the W8A8 gain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.ptq import smoothquant_core as sq
from bitlaws.quant import QuantSpec, fake_quant


def _layer(seed, m=512, k=64, n=48, outliers=(3, 17, 40), outlier_gain=60.0):
    """Correlated inputs ``x = z @ A`` with a few outlier channels, and a random kernel [k, n]."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((m, k)).astype(np.float32)
    a = (np.eye(k) + 0.3 * rng.standard_normal((k, k))).astype(np.float32)
    x = z @ a
    x[:, list(outliers)] *= outlier_gain
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    return x, w


def _reference_scales(act_absmax, w, alpha, floor=1e-5, ceil=1e5):
    """Paper eq. 4 with a loop over input channels; dead channels get 1."""
    s = np.ones(w.shape[0], np.float64)
    for j in range(w.shape[0]):
        a_j = float(act_absmax[j])
        w_j = float(np.max(np.abs(w[j, :])))
        if a_j > 0 and w_j > 0:
            s[j] = min(max(a_j**alpha / w_j ** (1 - alpha), floor), ceil)
    return s


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_scales_match_numpy_reference(alpha):
    x, w = _layer(0)
    absmax = np.max(np.abs(x), axis=0)
    absmax[5] = 0.0  # a dead channel
    w[9] = 0.0  # a dead weight row
    s = np.asarray(sq.smoothing_scales(jnp.asarray(absmax), jnp.asarray(w), alpha))
    ref = _reference_scales(absmax, w, alpha)
    np.testing.assert_allclose(s, ref, rtol=1e-4)
    assert s[5] == 1.0 and s[9] == 1.0


def test_scales_are_guarded_for_extreme_finite_inputs():
    absmax = jnp.asarray([3e38, 1e-38, 0.0, 1.0, 1e-45, 5.0], jnp.float32)
    w = jnp.asarray([[1e-45], [3e38], [1.0], [0.0], [1.0], [jnp.inf]], jnp.float32)
    s = np.asarray(sq.smoothing_scales(absmax, w, 0.5))
    assert np.all(np.isfinite(s)) and np.all(s >= 1e-5) and np.all(s <= 1e5)
    assert s[2] == 1.0 and s[3] == 1.0 and s[5] == 1.0  # dead activation, dead row, non-finite row


def test_shared_input_takes_the_max_over_kernels_and_conv_rows():
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((2, 8, 4)).astype(np.float32)
    absmax = np.abs(rng.standard_normal(8)).astype(np.float32) + 0.1
    both = sq.smoothing_scales(absmax, [w1, w2])
    np.testing.assert_allclose(both, _reference_scales(absmax, np.concatenate([w1, w2], 1), 0.5), rtol=1e-4)
    conv = rng.standard_normal((3, 3, 8, 4)).astype(np.float32)  # HWIO: input channels on axis -2
    rows = np.moveaxis(conv, 2, 0).reshape(8, -1)
    np.testing.assert_allclose(sq.smoothing_scales(absmax, conv), _reference_scales(absmax, rows, 0.5), rtol=1e-4)


def test_smoothed_product_equals_float_product():
    x, w = _layer(2)
    s = sq.smoothing_scales(jnp.max(jnp.abs(jnp.asarray(x)), axis=0), jnp.asarray(w), 0.5)
    smoothed = jnp.dot(sq.unsmooth_input(jnp.asarray(x), s), sq.smooth(jnp.asarray(w), s),
                       precision=jax.lax.Precision.HIGHEST)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert np.linalg.norm(np.asarray(smoothed) - ref) <= 1e-5 * np.linalg.norm(ref)
    # folding into a preceding affine op gives the same input
    g = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape[1]), jnp.float32)
    b = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape[1]), jnp.float32)
    g2, b2 = sq.fold_into_preceding(g, b, s)
    np.testing.assert_allclose(jnp.asarray(x) * g2 + b2, (jnp.asarray(x) * g + b) / s, rtol=1e-5, atol=1e-6)
    assert sq.fold_into_preceding(None, b, s)[0] is None


@jax.jit
def _w8a8_output(x, w, s):
    act = QuantSpec(format="int8", granularity="token")
    wgt = QuantSpec(format="int8", granularity="channel")
    x, w = sq.unsmooth_input(x, s), sq.smooth(w, s)
    return jnp.dot(fake_quant(x, act, reduce_axes=(-1,)), fake_quant(w, wgt), precision=jax.lax.Precision.HIGHEST)


def test_smoothing_lowers_w8a8_error_on_outlier_channels():
    x, w = _layer(5, outlier_gain=100.0)
    x, w = jnp.asarray(x), jnp.asarray(w)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    s = sq.smoothing_scales(jnp.max(jnp.abs(x), axis=0), w, 0.5)
    err_plain = np.linalg.norm(np.asarray(_w8a8_output(x, w, jnp.ones_like(s))) - ref)
    err_smooth = np.linalg.norm(np.asarray(_w8a8_output(x, w, s)) - ref)
    ratio = err_smooth / err_plain
    print(f"SmoothQuant W8A8 output error ratio (smoothed / plain): {ratio:.3f}")
    assert ratio < 0.5


def test_rejects_bad_arguments():
    w = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="alpha"):
        sq.smoothing_scales(jnp.ones(4), w, 1.5)
    with pytest.raises(ValueError, match="input rows"):
        sq.smoothing_scales(jnp.ones(3), w)
    with pytest.raises(ValueError, match="same input channels"):
        sq.smoothing_scales(jnp.ones(4), [w, jnp.ones((3, 2))])
