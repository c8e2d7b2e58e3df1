"""AWQ core: scale search and clipping search against plain-numpy loops, and the gain over RTN."""

import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.ptq import awq_core as awq
from bitlaws.quant import QuantSpec


def _layer(seed, m=256, k=64, n=32, outliers=(2, 11, 30, 47), gain=25.0):
    """Correlated inputs ``x = z @ A`` with outlier channels, and a kernel [k, n]."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((m, k)).astype(np.float32)
    a = (np.eye(k) + 0.3 * rng.standard_normal((k, k))).astype(np.float32)
    x = z @ a
    x[:, [j for j in outliers if j < k]] *= gain
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    return x, w


def _np_rtn(w, bits, signed, group):
    """Plain-numpy min-max RTN of a [K, N] float32 kernel (float32 scales, per group and column)."""
    k, n = w.shape
    group = group or k
    out = np.empty_like(w)
    for g in range(k // group):
        for c in range(n):
            col = w[g * group:(g + 1) * group, c]
            if signed:
                qmax = np.float32(2 ** (bits - 1) - 1)
                scale = np.maximum(np.max(np.abs(col)) / qmax, np.float32(2.0**-126))
                q = np.clip(np.round(col / scale), -qmax - 1, qmax)
                out[g * group:(g + 1) * group, c] = q * scale
            else:
                qmax = np.float32(2**bits - 1)
                lo, hi = min(np.min(col), np.float32(0)), max(np.max(col), np.float32(0))
                scale = np.maximum(hi / qmax - lo / qmax, np.float32(2.0**-126))
                zero = np.float32(np.clip(np.round(-lo / scale), 0, qmax))
                q = np.clip(np.round(col / scale + zero), 0, qmax)
                out[g * group:(g + 1) * group, c] = (q - zero) * scale
    return out


def _np_search_scales(w, x, mean_abs, bits, signed, group, n_grid=20):
    errors = []
    for i in range(n_grid):
        alpha = np.float32(i / n_grid)
        m = np.maximum(mean_abs, np.float32(1e-5) * np.max(mean_abs))
        s = np.power(m, alpha).astype(np.float32)
        s = s / (np.sqrt(np.max(s)) * np.sqrt(np.min(s)))
        w_hat = _np_rtn(w * s[:, None], bits, signed, group) / s[:, None]
        dw = (w_hat - w).astype(np.float64)
        errors.append(np.sum((x.astype(np.float64) @ dw) ** 2))
    return np.asarray(errors)


def _spec(bits, signed, group):
    fmt = f"{'' if signed else 'u'}int{bits}"
    if group:
        return QuantSpec(format=fmt, granularity="group", group_size=group, scale_dtype="float32")
    return QuantSpec(format=fmt, granularity="channel", scale_dtype="float32")


@pytest.mark.parametrize("bits,signed,group", [(4, False, 16), (3, True, None)])
def test_search_scales_matches_numpy_reference(bits, signed, group):
    x, w = _layer(0)
    mean_abs = np.mean(np.abs(x), axis=0)
    s, alpha, errors = awq.search_scales(jnp.asarray(w), _spec(bits, signed, group), x=jnp.asarray(x),
                                         act_mean_abs=jnp.asarray(mean_abs))
    ref = _np_search_scales(w, x, mean_abs, bits, signed, group)
    np.testing.assert_allclose(np.asarray(errors), ref, rtol=1e-4)
    best = int(np.argmin(ref))
    assert float(alpha) == pytest.approx(best / 20)
    m = np.maximum(mean_abs, 1e-5 * mean_abs.max()).astype(np.float64) ** (best / 20)
    np.testing.assert_allclose(np.asarray(s), m / np.sqrt(m.max() * m.min()), rtol=1e-4)


def test_hessian_and_sample_forms_agree():
    x, w = _layer(1)
    spec = _spec(4, False, 16)
    mean_abs = jnp.asarray(np.mean(np.abs(x), axis=0))
    h = jnp.asarray(x.astype(np.float64).T @ x.astype(np.float64), jnp.float32)
    s_x, a_x, e_x = awq.search_scales(jnp.asarray(w), spec, x=jnp.asarray(x), act_mean_abs=mean_abs)
    s_h, a_h, e_h = awq.search_scales(jnp.asarray(w), spec, hessian=h, act_mean_abs=mean_abs)
    np.testing.assert_allclose(np.asarray(e_h), np.asarray(e_x), rtol=1e-4)
    assert float(a_x) == float(a_h)
    np.testing.assert_array_equal(np.asarray(s_x), np.asarray(s_h))


@pytest.mark.parametrize("bits,signed,group", [(4, False, 16), (3, True, 16)])
def test_awq_beats_rtn_on_outlier_channels(bits, signed, group):
    x, w = _layer(2, gain=40.0)
    spec = _spec(bits, signed, group)
    fmt = spec.format.name
    h = jnp.asarray(x.astype(np.float64).T @ x.astype(np.float64), jnp.float32)
    s, alpha, errors = awq.search_scales(jnp.asarray(w), spec, hessian=h,
                                         act_mean_abs=jnp.asarray(np.mean(np.abs(x), axis=0)))
    errors = np.asarray(errors)
    ratio = errors.min() / errors[0]
    print(f"AWQ {fmt}/g{group}: best alpha {float(alpha):.2f}, error ratio vs RTN {ratio:.3f}")
    assert errors.min() <= errors[0]
    assert ratio < 0.9
    # the returned scale reproduces the best error
    dw = np.asarray(awq.scaled_fake_quant(jnp.asarray(w), s, spec), np.float64) - w
    direct = np.sum((x.astype(np.float64) @ dw) ** 2)
    assert direct == pytest.approx(errors.min(), rel=1e-3)


def test_column_padding_keeps_the_search():
    """search_scales pads the output axis (one program per input size) and masks the padded columns out of the
    error: the same alpha and scales, errors equal up to float32 summation order."""
    rng = np.random.default_rng(5)
    before = awq._search_scales._cache_size()
    for n in (40, 7, 33):
        x = (rng.standard_normal((256, 48)) * np.exp(rng.standard_normal(48))).astype(np.float32)
        w = (rng.standard_normal((48, n)) * 0.02).astype(np.float32)
        spec = QuantSpec(format="int3", granularity="group", group_size=16)
        mean_abs = jnp.asarray(np.abs(x).mean(0))
        s, alpha, errors = awq.search_scales(w, spec, act_mean_abs=mean_abs, x=jnp.asarray(x))
        s0, alpha0, errors0 = awq._search_scales(jnp.asarray(w), mean_abs, None, jnp.asarray(x), None, spec, 20)
        assert float(alpha) == float(alpha0)
        np.testing.assert_array_equal(np.asarray(s), np.asarray(s0))
        np.testing.assert_allclose(np.asarray(errors), np.asarray(errors0), rtol=1e-5)
    assert awq._search_scales._cache_size() - before == 4  # one padded program + three unpadded references


def test_alpha_zero_is_rtn_and_degenerate_stats_are_safe():
    x, w = _layer(3)
    spec = _spec(4, False, 16)
    rtn = _np_rtn(w, 4, False, 16)
    np.testing.assert_allclose(awq.scaled_fake_quant(jnp.asarray(w), awq.scale_candidates(jnp.ones(64), 0.0), spec),
                               rtn, rtol=1e-6, atol=0)
    for mean_abs in (np.zeros(64, np.float32), np.r_[np.zeros(63), 5.0].astype(np.float32)):
        s, _, errors = awq.search_scales(jnp.asarray(w), spec, x=jnp.asarray(x), act_mean_abs=jnp.asarray(mean_abs))
        assert np.all(np.isfinite(np.asarray(s))) and np.all(np.asarray(s) > 0)
        assert np.all(np.isfinite(np.asarray(errors)))


def test_conv_shaped_kernel():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 3, 8, 16)).astype(np.float32)  # HWIO, K = 72
    x = rng.standard_normal((128, 72)).astype(np.float32) * np.tile(np.r_[np.ones(7), 20.0], 9)
    mean_abs = np.abs(x).reshape(128, 9, 8).mean(axis=(0, 1))
    s, _, errors = awq.search_scales(jnp.asarray(w), QuantSpec(format="int4"), x=jnp.asarray(x),
                                     act_mean_abs=jnp.asarray(mean_abs))
    assert s.shape == (8,) and float(np.min(errors)) <= float(errors[0])


# -------------------------------------------------------------------------------------------------- clipping


def _np_search_clip(w, h, bits, signed, group, n_grid=20, max_shrink=0.5):
    """Loops over groups, output channels and ratios; the error is the group's partial-sum error."""
    k, n = w.shape
    group = group or k
    ratios = [np.float32(1.0) - np.float32(i) / np.float32(n_grid) for i in range(int(max_shrink * n_grid))]
    table = np.empty((len(ratios), k // group, n))
    for g in range(k // group):
        rows = slice(g * group, (g + 1) * group)
        h_gg = h[rows, rows].astype(np.float64)
        for c in range(n):
            col = w[rows, c]
            lo, hi = (np.min(col), np.max(col)) if not signed else (-np.max(np.abs(col)), np.max(np.abs(col)))
            for i, r in enumerate(ratios):
                clipped = np.clip(col, lo * r, hi * r)[:, None]
                d = (_np_rtn(clipped, bits, signed, None)[:, 0] - col).astype(np.float64)
                table[i, g, c] = d @ h_gg @ d
    return np.asarray(ratios), table


@pytest.mark.parametrize("bits,signed,group", [(3, False, 16), (4, True, None)])
def test_search_clip_matches_numpy_reference(bits, signed, group):
    x, w = _layer(5)
    w[:, 3] *= 0.0  # a dead column
    w[7, 5] = 2.5  # a weight outlier worth clipping
    h = (x.astype(np.float64).T @ x.astype(np.float64)).astype(np.float32)
    spec = _spec(bits, signed, group)
    ratio, err = awq.search_clip(jnp.asarray(w), spec, jnp.asarray(h))
    ratios, table = _np_search_clip(w, h, bits, signed, group)
    ratio, err = np.asarray(ratio), np.asarray(err)
    np.testing.assert_allclose(err, table.min(axis=0), rtol=1e-4, atol=1e-6 * table.max())
    index = np.searchsorted(-ratios, -ratio)  # position of each chosen ratio in the descending list
    chosen = np.take_along_axis(table, index[None], axis=0)[0]
    np.testing.assert_allclose(chosen, table.min(axis=0), rtol=1e-4, atol=1e-6 * table.max())
    assert np.all(err <= table[0] * (1 + 1e-5) + 1e-6 * table.max())  # never worse than no clipping
    # applying the chosen ratios and quantizing reproduces the searched errors
    clipped = awq.clip_weights(jnp.asarray(w), jnp.asarray(ratio), spec)
    w_hat = awq.scaled_fake_quant(clipped, jnp.ones(w.shape[0]), spec)  # s = 1: plain RTN
    d = (np.asarray(w_hat) - w).astype(np.float64)
    g = group or w.shape[0]
    per_group = np.stack([np.einsum("in,ij,jn->n", d[i:i + g], h[i:i + g, i:i + g].astype(np.float64), d[i:i + g])
                          for i in range(0, w.shape[0], g)])
    np.testing.assert_allclose(per_group, err, rtol=1e-4, atol=1e-6 * table.max())


def test_search_clip_lowers_error():
    x, w = _layer(6)
    w = w * np.where(np.random.default_rng(0).random(w.shape) < 0.02, 6.0, 1.0).astype(np.float32)
    spec = _spec(3, False, 16)
    h = jnp.asarray(x.astype(np.float64).T @ x.astype(np.float64), jnp.float32)
    ratio, err = awq.search_clip(jnp.asarray(w), spec, h)
    assert ratio.shape == (4, 32) and float(np.min(ratio)) >= 0.55 - 1e-6
    d = (_np_rtn(w, 3, False, 16) - w).astype(np.float64).reshape(4, 16, 32)
    xg = x.astype(np.float64).reshape(-1, 4, 16)
    rtn_err = np.sum(np.einsum("mgi,gin->mgn", xg, d) ** 2, axis=0)  # [G, N] partial-sum errors
    assert np.all(np.asarray(err) <= rtn_err * (1 + 1e-4) + 1e-6 * rtn_err.max())
    total = float(np.sum(err)) / float(np.sum(rtn_err))
    print(f"AWQ clip search uint3/g16: partial-sum error ratio vs no clipping {total:.3f}")
    assert total < 0.95


def test_search_clip_tensor_granularity_from_samples():
    x, w = _layer(7, m=64, k=16, n=8)
    spec = QuantSpec(format="int4", granularity="tensor")
    ratio, err = awq.search_clip(jnp.asarray(w), spec, x=jnp.asarray(x))
    assert ratio.shape == (1, 1) and err.shape == (1, 1)
    clipped = np.asarray(awq.clip_weights(jnp.asarray(w), ratio, spec))
    amax = np.max(np.abs(w)) * float(ratio[0, 0])
    np.testing.assert_allclose(clipped, np.clip(w, -amax, amax), rtol=1e-6)


def test_rejects_bad_arguments():
    w = jnp.ones((8, 4))
    spec = QuantSpec(format="int4")
    with pytest.raises(ValueError, match="exactly one"):
        awq.search_scales(w, spec, act_mean_abs=jnp.ones(8))
    with pytest.raises(ValueError, match="exactly one"):
        awq.search_clip(w, spec, jnp.eye(8), x=jnp.ones((3, 8)))
    with pytest.raises(ValueError, match="hessian must be"):
        awq.search_scales(w, spec, hessian=jnp.eye(4), act_mean_abs=jnp.ones(8))
    with pytest.raises(ValueError, match="act_mean_abs"):
        awq.search_scales(w, spec, x=jnp.ones((3, 8)), act_mean_abs=jnp.ones(4))
    with pytest.raises(ValueError, match="group_size"):
        awq.search_scales(w, QuantSpec(format="int4", granularity="group", group_size=3), x=jnp.ones((3, 8)),
                          act_mean_abs=jnp.ones(8))
