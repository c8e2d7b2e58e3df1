"""Cross-check of our Frechet distance with TF-GAN's ``frechet_classifier_distance_from_activations``.

Skipped unless ``tensorflow_gan`` is installed (it is not a dependency; see docs/fid.md). tensorflow-gan 2.1
imports ``tf.estimator``, which TensorFlow >= 2.16 removed; `_install_estimator_stub` defines a placeholder
module (only the estimator classes need to exist at import time; the metric functions never touch them).
"""

from __future__ import annotations

import importlib.util
import types

import numpy as np
import pytest

from bitlaws.eval.fid import fid_from_stats
from bitlaws.eval.frechet import frechet_distance
from bitlaws.eval.stats import FeatureStats

if importlib.util.find_spec("tensorflow_gan") is None:
    pytest.skip("tensorflow_gan is not installed (optional cross-check, see docs/fid.md)", allow_module_level=True)

tf = pytest.importorskip("tensorflow")


class _Placeholder(type):
    """A class whose every public attribute is another placeholder class (``tf.estimator.ModeKeys.TRAIN``)."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _EstimatorStub(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


def _install_estimator_stub() -> None:
    """Defines ``tf.estimator`` / ``tf.compat.v1.estimator`` placeholders where TensorFlow no longer has them."""
    for owner in (tf, tf.compat.v1):
        try:
            getattr(owner, "estimator")
        except (AttributeError, ImportError):
            setattr(owner, "estimator", _EstimatorStub("estimator"))


_install_estimator_stub()
tfgan = pytest.importorskip("tensorflow_gan")


def _tfgan_fid(a: np.ndarray, b: np.ndarray) -> float:
    value = tfgan.eval.frechet_classifier_distance_from_activations(tf.constant(a), tf.constant(b))
    return float(np.asarray(value))


@pytest.mark.parametrize("n, d, shift", [(300, 16, 0.5), (500, 64, 0.0), (400, 32, 2.0)])
def test_matches_tfgan_on_the_same_activations(n, d, shift):
    rng = np.random.default_rng(n + d)
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    real = rng.standard_normal((n, d)) @ mixing  # float64 [n, d], correlated features
    fake = 1.3 * rng.standard_normal((n, d)) @ mixing + shift
    ours = fid_from_stats(FeatureStats.from_features(real), FeatureStats.from_features(fake))
    theirs = _tfgan_fid(real, fake)
    assert theirs > 0.0
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)
    direct = frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    assert direct == pytest.approx(theirs, rel=1e-6, abs=1e-9)
