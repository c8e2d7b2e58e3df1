"""Tests for bitlaws.eval.stats: FeatureStats and the npz / PNG readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitlaws.eval import FeatureStats
from bitlaws.eval.stats import load_png_folder, load_samples_npz, load_stats_npz, save_stats_npz
from bitlaws.port import read_safetensors

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fid_io.safetensors"


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------- FeatureStats


@pytest.mark.parametrize("which", ["1", "2"])
def test_fixture_mu_sigma(which):
    fd = read_safetensors(FIXTURE)
    feats = fd[f"fd.feats{which}"]
    stats = FeatureStats()
    for chunk in np.array_split(feats, [7, 20, 21]):
        stats.update(chunk)
    assert stats.n == 50
    assert _rel_err(stats.mu, fd[f"fd.mu{which}"].astype(np.float64)) < 1e-6
    assert _rel_err(stats.sigma, fd[f"fd.sigma{which}_f64"]) < 1e-6


def test_large_offset_matches_np_cov():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)) * rng.uniform(0.5, 2.0, 32) + 1000.0
    stats = FeatureStats()
    for chunk in np.array_split(x, 13):
        stats.update(chunk)
    assert _rel_err(stats.mu, x.mean(axis=0)) < 1e-12
    assert _rel_err(stats.sigma, np.cov(x, rowvar=False)) < 1e-10
    assert np.array_equal(stats.sigma, stats.sigma.T)


def test_plain_sums_would_fail_large_offset():
    """Documents why the shift matters: naive sums lose digits at offset 1e6."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 8)) + 1e6
    n = len(x)
    naive = (x.T @ x - n * np.outer(x.mean(0), x.mean(0))) / (n - 1)
    ref = np.cov(x, rowvar=False)
    stats = FeatureStats.from_features(x)
    assert _rel_err(naive, ref) > 1e-6
    assert _rel_err(stats.sigma, ref) < 1e-10


def test_mask_drops_rows():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    mask = rng.random(40) < 0.6
    masked = FeatureStats().update(x, mask)
    direct = FeatureStats.from_features(x[mask])
    assert masked.n == int(mask.sum())
    np.testing.assert_allclose(masked.mu, direct.mu, rtol=1e-13)
    np.testing.assert_allclose(masked.sigma, direct.sigma, rtol=1e-12)
    # An all-False mask is a no-op, also as the very first update.
    empty_first = FeatureStats().update(x, np.zeros(40, bool)).update(x[mask])
    np.testing.assert_allclose(empty_first.sigma, direct.sigma, rtol=1e-12)


def test_merge_equals_single_accumulator():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 12)) * 3 + 50.0
    parts = np.array_split(x, [1, 100, 101, 350])
    merged = FeatureStats()
    for part in parts:
        merged.merge(FeatureStats.from_features(part + 0.0))
    merged.merge(FeatureStats())  # empty, no-op
    assert merged.n == 500
    assert _rel_err(merged.mu, x.mean(0)) < 1e-13
    assert _rel_err(merged.sigma, np.cov(x, rowvar=False)) < 1e-10


def test_merge_into_empty_and_copy_are_independent():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((30, 4))
    a = FeatureStats.from_features(x)
    b = FeatureStats().merge(a)
    c = a.copy()
    a.update(x + 5)
    assert b.n == 30 and c.n == 30 and a.n == 60
    np.testing.assert_allclose(b.sigma, np.cov(x, rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(c.mu, x.mean(0), rtol=1e-12)


def test_jax_input_accepted():
    jnp = pytest.importorskip("jax.numpy")
    x = np.arange(24, dtype=np.float32).reshape(6, 4) ** 1.5
    stats = FeatureStats().update(jnp.asarray(x))
    np.testing.assert_allclose(stats.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_feature_stats_errors():
    stats = FeatureStats()
    with pytest.raises(ValueError, match="no features"):
        _ = stats.mu
    stats.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.sigma
    with pytest.raises(ValueError, match="dimension"):
        stats.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        stats.update(np.ones(3))
    with pytest.raises(ValueError, match="mask"):
        stats.update(np.ones((2, 3)), mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="mask"):
        stats.update(np.ones((2, 3)), mask=np.ones(2, np.int32))
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="merge"):
        stats.merge(FeatureStats.from_features(np.ones((2, 5))))


# ----------------------------------------------------------------------------- npz files


def test_stats_npz_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    mu = rng.standard_normal(6).astype(np.float32)
    sigma = np.cov(rng.standard_normal((20, 6)), rowvar=False)
    path = save_stats_npz(tmp_path / "stats_file", mu, sigma)
    assert path == tmp_path / "stats_file" and path.exists()  # no implicit .npz suffix
    mu2, sigma2 = load_stats_npz(path)
    assert mu2.dtype == np.float64 and sigma2.dtype == np.float64
    np.testing.assert_array_equal(mu2, mu.astype(np.float64))
    np.testing.assert_array_equal(sigma2, sigma)


def test_load_pytorch_fid_and_adm_reference_formats(tmp_path):
    rng = np.random.default_rng(6)
    mu = rng.standard_normal(4).astype(np.float32)  # pytorch-fid: float32 mu
    sigma = np.eye(4)
    np.savez_compressed(tmp_path / "pt.npz", mu=mu, sigma=sigma)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=mu.astype(np.float64), sigma=sigma,
             mu_s=np.zeros(2), sigma_s=np.eye(2))
    for name in ("pt.npz", "ref.npz"):
        mu2, sigma2 = load_stats_npz(tmp_path / name)
        np.testing.assert_array_equal(mu2, mu)
        np.testing.assert_array_equal(sigma2, sigma)
    np.testing.assert_array_equal(load_samples_npz(tmp_path / "ref.npz"), images)


def test_load_stats_missing_keys_lists_present(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, arr_0=np.zeros((1, 2, 2, 3), np.uint8), foo=np.zeros(1))
    with pytest.raises(ValueError, match="bad.npz") as err:
        load_stats_npz(path)
    assert "arr_0" in str(err.value) and "foo" in str(err.value) and "'mu'" in str(err.value)


def test_load_stats_bad_shapes(tmp_path):
    path = tmp_path / "shape.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"shape \(d, d\)"):
        load_stats_npz(path)
    with pytest.raises(ValueError, match=r"shape \(d,\)"):
        save_stats_npz(tmp_path / "x.npz", np.zeros((3, 1)), np.eye(3))


def test_load_samples_npz_adm_format_with_labels(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images, np.arange(5))  # arr_0, arr_1
    out = load_samples_npz(tmp_path / "samples.npz")
    assert out.dtype == np.uint8 and out.shape == (5, 4, 6, 3)
    np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((2, 4, 4, 3), np.float32), "dtype float32"),
        (np.zeros((4, 4, 3), np.uint8), "rank 3"),
        (np.zeros((2, 3, 4, 4), np.uint8), "4 channels"),
    ],
)
def test_load_samples_npz_layout_errors(tmp_path, array, match):
    path = tmp_path / "s.npz"
    np.savez(path, array)
    with pytest.raises(ValueError, match=match) as err:
        load_samples_npz(path)
    assert "NHWC" in str(err.value) and "uint8" in str(err.value)


def test_load_samples_npz_missing_key(tmp_path):
    path = tmp_path / "named.npz"
    np.savez(path, images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"named\.npz.*arr_0.*\['images'\]"):
        load_samples_npz(path)


# ----------------------------------------------------------------------------- PNG folders


def _write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(array, mode=mode).save(path)


def test_load_png_folder_sorted_rgb(tmp_path):
    rng = np.random.default_rng(8)
    imgs = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    for name, img in zip(["b.png", "a.png", "c.PNG"], imgs):
        _write_png(tmp_path / name, img)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    _write_png(tmp_path / "d.png", gray)
    (tmp_path / "notes.txt").write_text("ignored")
    out = load_png_folder(tmp_path)
    assert out.dtype == np.uint8 and out.shape == (4, 5, 7, 3)
    # sorted by file name: a.png, b.png, c.PNG, d.png
    np.testing.assert_array_equal(out[0], imgs[1])
    np.testing.assert_array_equal(out[1], imgs[0])
    np.testing.assert_array_equal(out[2], imgs[2])
    np.testing.assert_array_equal(out[3], np.repeat(gray[..., None], 3, axis=-1))


def test_load_png_folder_size_mismatch_names_file(tmp_path):
    _write_png(tmp_path / "0.png", np.zeros((4, 4, 3), np.uint8))
    _write_png(tmp_path / "1.png", np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match=r"1\.png.*same size"):
        load_png_folder(tmp_path)


def test_load_png_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no .png"):
        load_png_folder(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_png_folder(tmp_path / "missing")
