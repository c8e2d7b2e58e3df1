"""FID pipeline: image sources (array / ADM npz / PNG folder / iterator), sharding, CLI functions, errors.

The real FID weights are not available here, so the network has random recipe-style weights
(`random_fid_inception`). The Inception runs at 299x299 internally, so the image count is tiny (3 images of
32x32) and a persistent compilation cache (scoped to this module) lets every run after the first reuse the
compiled step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

import bitlaws.eval.fid as fid_module
import bitlaws.port.tables.inception as inception_table
from bitlaws.eval.cli_impl import cmd_eval_fid, cmd_eval_stats
from bitlaws.eval.fid import (compute_fid, fid_from_stats, inception_stats, iter_samples_npz, load_reference,
                              random_fid_inception, save_reference_stats)
from bitlaws.eval.inception_score import inception_score
from bitlaws.eval.stats import FeatureStats

REPO = Path(__file__).resolve().parents[2]
SEED = 7
N_IMAGES, SIZE, BATCH = 3, 32, 2  # 2 steps, the second one padded


def make_images() -> np.ndarray:
    """uint8 ``[N, 32, 32, 3]``: noise around a different colour per image (distinct pool3 features)."""
    rng = np.random.default_rng(SEED)
    colours = rng.uniform(30, 225, (N_IMAGES, 1, 1, 3))
    noise = rng.normal(0, 25, (N_IMAGES, SIZE, SIZE, 3))
    return np.clip(colours + noise, 0, 255).astype(np.uint8)


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_default_matmul_precision")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_default_matmul_precision", "highest")
    compilation_cache.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def model():
    return random_fid_inception(SEED)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return make_images()


@pytest.fixture(scope="module")
def array_run(model, images):
    return inception_stats(images, model=model, batch_size=BATCH, progress=False)


@pytest.fixture(scope="module")
def samples_npz(tmp_path_factory, images) -> Path:
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    np.savez(path, arr_0=images, arr_1=np.arange(N_IMAGES))
    return path


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory, images) -> Path:
    from PIL import Image
    folder = tmp_path_factory.mktemp("pngs")
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture
def random_weights(monkeypatch, model):
    """Makes the default weight loader return the random test model."""
    monkeypatch.setattr(inception_table, "load_fid_inception", lambda path=None: model)


# ------------------------------------------------------------------------------------------------ sources

def test_array_run_shapes_and_counts(array_run):
    assert array_run.n == N_IMAGES and array_run.stats.n == N_IMAGES
    assert array_run.stats.mu.shape == (2048,) and array_run.stats.sigma.shape == (2048, 2048)
    assert array_run.logits.shape == (N_IMAGES, 1008)
    assert np.all(np.isfinite(array_run.logits)) and np.std(array_run.stats.mu) > 1e-3
    assert array_run.images_per_sec > 0


def test_npz_streaming_yields_the_stored_images(samples_npz, images, tmp_path):
    batches = list(iter_samples_npz(samples_npz, 2))
    assert [b.shape[0] for b in batches] == [2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, arr_0=images)
    np.testing.assert_array_equal(np.concatenate(list(iter_samples_npz(compressed, 5))), images)


def test_cmd_eval_stats_from_npz_equals_array_stats(random_weights, samples_npz, array_run, tmp_path, capsys):
    out = tmp_path / "ref.npz"
    assert cmd_eval_stats(str(samples_npz), str(out), batch_size=BATCH, progress=False) == 0
    printed = capsys.readouterr().out
    assert f"n={N_IMAGES}" in printed and "images/s" in printed
    with np.load(out) as data:
        assert set(data.keys()) == {"mu", "sigma", "n"} and int(data["n"]) == N_IMAGES
        assert data["mu"].dtype == np.float64
    mu, sigma, n = load_reference(out)
    assert n == N_IMAGES
    assert rel(mu, array_run.stats.mu) <= 1e-12
    assert rel(sigma, array_run.stats.sigma) <= 1e-12


def test_png_folder_equals_array_stats(model, png_folder, array_run):
    run = inception_stats(png_folder, model=model, batch_size=BATCH, progress=False, with_logits=False)
    assert run.n == N_IMAGES and run.logits is None
    assert rel(run.stats.mu, array_run.stats.mu) <= 1e-12
    assert rel(run.stats.sigma, array_run.stats.sigma) <= 1e-12


# ------------------------------------------------------------------------------------------------ FID

def test_compute_fid_wiring_counts_and_inception_score(monkeypatch, model, images, array_run, tmp_path):
    """The 2048-d Frechet distance (a scipy sqrtm, ~40 s CPU here) is replaced by a spy that checks its inputs;
    the real one runs once, in `test_cmd_eval_fid_png_against_npz_stats`."""
    ref = save_reference_stats(tmp_path / "own.npz", array_run)
    seen = {}

    def spy(mu1, sigma1, mu2, sigma2):
        seen.update(mu1=mu1, sigma1=sigma1, mu2=mu2, sigma2=sigma2)
        return 1.25

    monkeypatch.setattr(fid_module, "frechet_distance", spy)
    batches = iter([images[:2], images[2:]])  # an iterator of batches as the sample source
    result = compute_fid(batches, ref, model=model, batch_size=BATCH, progress=False, is_splits=N_IMAGES)
    assert result["fid"] == 1.25
    for key in ("mu1", "mu2"):
        assert rel(seen[key], array_run.stats.mu) <= 1e-12
    for key in ("sigma1", "sigma2"):
        assert rel(seen[key], array_run.stats.sigma) <= 1e-12
    assert result["n_samples"] == N_IMAGES and result["n_ref"] == N_IMAGES
    expected_is = inception_score(array_run.logits, splits=N_IMAGES)
    assert result["inception_score"] == pytest.approx(expected_is[0], rel=1e-5)
    assert result["inception_score_std"] == pytest.approx(expected_is[1], rel=1e-4, abs=1e-7)
    assert result["images_per_sec"] > 0 and result["seconds"] > 0


def test_fid_from_stats_accepts_pairs_and_accumulators():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 6))
    stats = FeatureStats.from_features(features)
    shifted = (stats.mu + 0.5, stats.sigma)
    assert fid_from_stats(stats, shifted) == pytest.approx(6 * 0.25, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_from_stats(FeatureStats.from_features(features[:1]), shifted)


def test_cmd_eval_fid_png_against_npz_stats(monkeypatch, random_weights, png_folder, array_run, tmp_path,
                                            capsys):
    ref = save_reference_stats(tmp_path / "ref.npz", array_run.stats)
    seen = {}

    def spy(mu1, sigma1, mu2, sigma2):
        seen.update(mu1=mu1, mu2=mu2)
        return 0.123456789

    monkeypatch.setattr(fid_module, "frechet_distance", spy)
    assert cmd_eval_fid(str(png_folder), str(ref), batch_size=BATCH, progress=False) == 0
    assert rel(seen["mu1"], array_run.stats.mu) <= 1e-12 and rel(seen["mu2"], array_run.stats.mu) <= 1e-12
    printed = capsys.readouterr().out
    assert f"FID: 0.123457  (n_samples={N_IMAGES}, n_ref={N_IMAGES})" in printed
    assert "IS: n/a" in printed  # 3 samples < 10 splits
    assert "warning: n_samples and n_ref < 2048" in printed and "images/s" in printed


@pytest.mark.slow
def test_fid_against_own_stats_is_zero(model, images, array_run, tmp_path):
    """Real 2048-d Frechet distance (scipy sqrtm: ~40 s CPU on a 2-core machine)."""
    ref = save_reference_stats(tmp_path / "own.npz", array_run)
    result = compute_fid(images, ref, model=model, batch_size=BATCH, progress=False)
    # n = 3 < 2048: rank-deficient covariances leave round-off of ~1e-6 of the trace in the square root.
    assert abs(result["fid"]) <= 1e-5 * np.trace(array_run.stats.sigma)
    assert result["n_samples"] == N_IMAGES and result["n_ref"] == N_IMAGES


# ------------------------------------------------------------------------------------------------ sharding

_FOUR_DEVICES = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 4, jax.devices()
    sys.path.insert(0, {tests!r})
    from test_fid_pipeline import BATCH, SEED, make_images
    from bitlaws.eval.fid import inception_stats, random_fid_inception, save_reference_stats
    batch_size = 3  # neither a multiple of 4 devices (padded to 4) nor a divisor of the image count
    run = inception_stats(make_images(), model=random_fid_inception(SEED), batch_size=batch_size, progress=False)
    assert run.n == 3 and run.logits.shape == (3, 1008)
    save_reference_stats(sys.argv[1], run)
    """)


@pytest.mark.slow  # 30 s (a subprocess re-imports JAX); sharding is covered by tests/eval/test_sharded.py
def test_four_devices_match_one_device(array_run, tmp_path):
    out = tmp_path / "four.npz"
    script = tmp_path / "four.py"
    script.write_text(_FOUR_DEVICES.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mu, sigma, n = load_reference(out)
    assert n == N_IMAGES
    assert rel(mu, array_run.stats.mu) <= 1e-6
    assert rel(sigma, array_run.stats.sigma) <= 1e-6


# ------------------------------------------------------------------------------------------------ errors

def test_missing_weights_exit_code_and_message(monkeypatch, samples_npz, tmp_path, capsys):
    monkeypatch.delenv(inception_table.ENV_VAR, raising=False)
    missing = tmp_path / "nowhere" / inception_table.WEIGHTS_FILE
    assert cmd_eval_fid(str(samples_npz), str(samples_npz), inception=str(missing), progress=False) == 2
    err = capsys.readouterr().err
    assert "bitlaws eval fid: error:" in err
    assert str(missing) in err and inception_table.WEIGHTS_FILE in err and inception_table.ENV_VAR in err
    with pytest.raises(FileNotFoundError, match="never downloads"):
        compute_fid(samples_npz, samples_npz, inception_path=missing, progress=False)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 8, 8, 3), np.int32), "neither floating nor uint8"),
    (np.zeros((2, 3, 8, 8), np.uint8), "looks like NCHW"),
    (np.full((2, 8, 8, 3), 2.0, np.float32), "outside \\[0, 1\\]"),
    (np.zeros((8, 8, 3), np.uint8), "rank 3"),
])
def test_bad_images_raise_clear_errors(model, bad, message):
    with pytest.raises(ValueError, match=message):
        inception_stats(bad, model=model, progress=False)
    with pytest.raises(ValueError, match=message):
        inception_stats(iter([bad]), model=model, progress=False)


def test_bad_npz_files_raise_clear_errors(random_weights, model, tmp_path, capsys):
    no_images = tmp_path / "labels.npz"
    np.savez(no_images, labels=np.arange(3))
    with pytest.raises(ValueError, match=r"expected key 'arr_0'.*keys present: \['labels'\]"):
        inception_stats(no_images, model=model, progress=False)
    assert cmd_eval_stats(str(no_images), str(tmp_path / "out.npz"), progress=False) == 2
    assert "keys present: ['labels']" in capsys.readouterr().err
    float_images = tmp_path / "float.npz"
    np.savez(float_images, arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="expected uint8 images in NHWC layout"):
        inception_stats(float_images, model=model, progress=False)
    with pytest.raises(ValueError, match="'mu' and 'sigma'.*or 'arr_0'"):
        compute_fid(np.zeros((2, 8, 8, 3), np.uint8), no_images, model=model, progress=False)
    with pytest.raises(FileNotFoundError, match="no such sample file"):
        inception_stats(tmp_path / "absent.npz", model=model, progress=False)
    stats = save_reference_stats(tmp_path / "stats.npz", (np.zeros(2048), np.eye(2048)))
    assert cmd_eval_fid(str(tmp_path / "absent.npz"), str(stats), progress=False) == 2
    assert "no such sample file" in capsys.readouterr().err
