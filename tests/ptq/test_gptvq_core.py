"""GPTVQ core: EM / assignment / the whole algorithm against plain-numpy float64 references, VQArray storage,
the codebook least-squares fit, and GPTVQ against GPTQ at equal storage."""

import jax
import numpy as np
import pytest

from bitlaws.ptq import gptq_core, gptvq_core
from bitlaws.quant import QuantSpec, packing


def _layer(k, n, tokens=1024, seed=0, held_out=0):
    """Random kernel [k, n] and correlated inputs x = z @ A; returns (w, H = x^T x / tokens, x_held_out)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, k)) / np.sqrt(k) + 0.5 * np.eye(k)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    x = rng.standard_normal((tokens, k)) @ a
    x_held_out = (rng.standard_normal((held_out, k)) @ a).astype(np.float32)
    return w, (x.T @ x / tokens).astype(np.float32), x_held_out


# ------------------------------------------------------------------------------------- numpy references


def mahalanobis_init_reference(x, k):
    m, d = x.shape
    centred = x - x.mean(0)
    cov = centred.T @ centred / m
    cov = cov + (1e-6 * np.trace(cov) / d + 1e-30) * np.eye(d)
    dist = np.einsum("md,de,me->m", centred, np.linalg.inv(cov), centred)
    order = np.argsort(dist, kind="stable")
    return x[order[[round(i * (m - 1) / (k - 1)) for i in range(k)]]]


def kmeans_reference(x, weights, centroids, iters):
    """Weighted Lloyd iterations, float64, written with explicit differences."""
    c = np.array(centroids, np.float64)
    for _ in range(iters):
        dist = np.sum(weights[:, None, :] * (x[:, None, :] - c[None, :, :]) ** 2, axis=2)
        idx = np.argmin(dist, axis=1)
        for j in range(len(c)):
            members = idx == j
            den = weights[members].sum(0)
            c[j] = np.where(den > 0, (weights[members] * x[members]).sum(0) / np.where(den > 0, den, 1), c[j])
    return c


def gptvq_reference(w, h, *, bits, d, gs, gc, em_iters, metric, damp=0.01):
    """GPTVQ without blocking: one vector row (d input rows) at a time, float64, float32-free codebooks."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    k, n = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    ncent = 2 ** (bits * d)
    em_weight = np.concatenate([1 / np.diag(u[j:j + d, j:j + d].T @ u[j:j + d, j:j + d]) for j in range(0, k, d)])
    deq = np.zeros_like(w)
    codebooks = None
    for j in range(0, k, d):
        if j % gs == 0:
            codebooks = []
            for c in range(n // gc):
                block = w[j:j + gs, c * gc:(c + 1) * gc]  # [gs, gc]
                x = block.reshape(gs // d, d, gc).transpose(0, 2, 1).reshape(-1, d)
                wt = np.repeat(em_weight[j:j + gs].reshape(gs // d, 1, d), gc, axis=1).reshape(-1, d)
                codebooks.append(kmeans_reference(x, wt, mahalanobis_init_reference(x, ncent), em_iters))
        u_dd = u[j:j + d, j:j + d]
        t = np.linalg.inv(u_dd)
        x = w[j:j + d]  # [d, N]
        q = np.zeros_like(x)
        for col in range(n):
            cb = codebooks[col // gc]
            if metric == "full":
                dist = np.sum(((x[:, col] - cb) @ t) ** 2, axis=1)
            else:
                dist = np.sum(em_weight[j:j + d] * (x[:, col] - cb) ** 2, axis=1)
            q[:, col] = cb[np.argmin(dist)]
        err = t.T @ (x - q)
        w[j:] -= u[j:j + d, j:].T @ err
        deq[j:j + d] = q
    return deq


# ------------------------------------------------------------------------------------------------- tests


def test_init_and_em_match_reference():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((600, 2)) @ np.array([[1.0, 0.4], [0.0, 0.5]])).astype(np.float32)
    weights = rng.uniform(0.2, 3.0, (600, 2)).astype(np.float32)
    init = np.asarray(jax.jit(gptvq_core.mahalanobis_init, static_argnums=1)(x, 16))
    np.testing.assert_array_equal(init, mahalanobis_init_reference(x.astype(np.float64), 16))
    ours = np.asarray(jax.jit(gptvq_core.em_codebook, static_argnums=3)(x, weights, init, 12))
    ref = kmeans_reference(x.astype(np.float64), weights.astype(np.float64), init, 12)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4
    # Assignment: weighted nearest centroid.
    idx = np.asarray(jax.jit(gptvq_core.assign)(x, ours, weights))
    dist = np.sum(weights[:, None] * (x[:, None].astype(np.float64) - ours[None]) ** 2, axis=2)
    np.testing.assert_array_equal(idx, np.argmin(dist, axis=1))


@pytest.mark.parametrize("metric", ["full", "diag"])
def test_gptvq_matches_reference_algorithm(metric):
    k, n = 64, 32
    w, h, _ = _layer(k, n, seed=1)
    kw = dict(bits_per_dim=2, dim=2, group_size=32, group_cols=16, em_iters=8)
    result = gptvq_core.gptvq(w, h, **kw, codebook_update=False, block_size=8, metric=metric,
                              codebook_dtype="float32")
    ref = gptvq_reference(w, h, bits=2, d=2, gs=32, gc=16, em_iters=8, metric=metric)
    ours = np.asarray(result.deq)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4
    hd = h.astype(np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(k)
    diff = ours.astype(np.float64) - w
    np.testing.assert_allclose(float(np.sum(np.asarray(result.losses, np.float64))), np.trace(diff.T @ hd @ diff),
                               rtol=1e-4)


def test_vqarray_storage_and_codebook_update():
    k, n = 64, 32
    w, h, _ = _layer(k, n, seed=2)
    kw = dict(bits_per_dim=2, dim=2, group_size=32, group_cols=16, em_iters=8, block_size=8)  # shares a compile
    vqa = gptvq_core.quantize_weight(w, h, **kw)
    result = gptvq_core.gptvq(w, h, **kw)
    np.testing.assert_array_equal(np.asarray(gptvq_core.dequantize_vq(vqa)), np.asarray(result.deq))
    # nbytes: packed 4-bit indices of 32 vector rows x 32 columns + 4 float16 codebooks of 16x2 + 4 int16 exponents.
    assert vqa.indices.shape == (packing.packed_length(32, 4), 32) and vqa.indices.dtype == np.uint8
    assert vqa.codebooks.shape == (2, 2, 16, 2) and vqa.codebooks.dtype == np.float16
    assert vqa.nbytes == 16 * 32 + 4 * 16 * 2 * 2 + 4 * 2
    assert vqa.bits_per_weight == vqa.nbytes * 8 / (k * n)
    # Codebook update: never worse than the assignment pass, here strictly better.
    hd = h.astype(np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(k)
    err = lambda deq: np.trace((np.asarray(deq, np.float64) - w).T @ hd @ (np.asarray(deq, np.float64) - w))  # noqa
    no_update = gptvq_core.gptvq(w, h, **kw, codebook_update=False)
    assert err(result.deq) < err(no_update.deq)
    np.testing.assert_array_equal(np.asarray(result.indices), np.asarray(no_update.indices))


def test_float16_codebooks_keep_relative_precision_at_any_magnitude():
    rng = np.random.default_rng(0)
    roundtrip = jax.jit(lambda c: gptvq_core.decode_codebooks(*gptvq_core.encode_codebooks(c)))
    for magnitude in (1e-9, 1.0, 1e7):  # beyond float16's range at both ends
        cb = (rng.standard_normal((2, 3, 16, 2)) * magnitude).astype(np.float32)
        back = np.asarray(roundtrip(cb))
        top = np.abs(cb).max(axis=(2, 3), keepdims=True)
        assert np.all(np.abs(back - cb) <= 2.0**-11 * np.maximum(np.abs(cb), top * 2.0**-14))
        np.testing.assert_array_equal(np.asarray(roundtrip(back)), back)  # stored values are fixed points


def test_codebook_least_squares_is_the_exact_minimiser():
    k, n = 32, 16
    w, h, _ = _layer(k, n, seed=3)
    rng = np.random.default_rng(3)
    indices = rng.integers(0, 4, (k // 2, n)).astype(np.int32)  # 1x2 codebooks of 4 centroids, d=2
    start = rng.standard_normal((2, 2, 4, 2)).astype(np.float32) * 0.02
    fitted = np.asarray(jax.jit(lambda c: gptvq_core.codebook_least_squares(
        w, h, indices, c, group_size=16, group_cols=8, iters=64))(start))
    # Dense normal equations in float64: Q = S c with S the selection matrix.
    params = start.size
    select = np.zeros((k * n, params))
    for v in range(k // 2):
        for col in range(n):
            for t in range(2):
                p = np.ravel_multi_index(((2 * v) // 16, col // 8, indices[v, col], t), start.shape)
                select[(2 * v + t) * n + col, p] = 1.0
    big_h = np.kron(h.astype(np.float64), np.eye(n))  # row-major vec of [K, N]
    a = select.T @ big_h @ select
    b = select.T @ big_h @ w.astype(np.float64).reshape(-1)
    exact = np.linalg.lstsq(a, b, rcond=None)[0]
    objective = lambda c: float((w.reshape(-1) - select @ c) @ big_h @ (w.reshape(-1) - select @ c))  # noqa
    np.testing.assert_allclose(objective(fitted.reshape(-1)), objective(exact), rtol=1e-4)


def test_gptvq_below_gptq_at_equal_storage():
    k, n = 256, 64
    w, h, x_test = _layer(k, n, tokens=2048, seed=4, held_out=4096)
    vqa = gptvq_core.quantize_weight(w, h, bits_per_dim=3, dim=2, group_size=256, em_iters=20)
    spec = QuantSpec(format="int3", granularity="group", group_size=128)
    qa = gptq_core.quantize_weight(w, h, spec, act_order=True)
    gq = gptq_core.gptq(w, h, spec, act_order=True)

    def rel_err(wq):
        return float(np.sum((x_test @ (np.asarray(wq) - w)) ** 2) / np.sum((x_test @ w) ** 2))

    e_vq = rel_err(gptvq_core.dequantize_vq(vqa))
    e_gptq = rel_err(gq.deq)
    bits_vq, bits_gptq = vqa.bits_per_weight, qa.nbytes * 8 / qa.size
    print(f"\nheld-out ||X(Wq-W)||^2/||XW||^2: GPTVQ 2D b3 ({bits_vq:.4f} bits/w) {e_vq:.5f}   "
          f"GPTQ int3/g128 act_order ({bits_gptq:.4f} bits/w) {e_gptq:.5f}   ratio {e_vq / e_gptq:.3f}")
    assert bits_gptq >= bits_vq
    assert e_vq < 0.8 * e_gptq


def test_argument_errors():
    w = np.zeros((64, 8), np.float32)
    h = np.eye(64, dtype=np.float32)
    with pytest.raises(ValueError, match="index bits"):
        gptvq_core.gptvq(w, h, bits_per_dim=3, dim=3, group_size=63)
    with pytest.raises(ValueError, match="does not divide"):
        gptvq_core.gptvq(w, h, bits_per_dim=2, dim=2, group_size=48)
    with pytest.raises(ValueError, match="fewer than"):
        gptvq_core.gptvq(w, h, bits_per_dim=4, dim=2, group_size=32)
    with pytest.raises(ValueError, match="group_cols"):
        gptvq_core.gptvq(w, h, bits_per_dim=2, dim=2, group_size=32, group_cols=3)
    with pytest.raises(ValueError, match="metric"):
        gptvq_core.gptvq(w, h, bits_per_dim=2, dim=2, group_size=32, metric="l1")
