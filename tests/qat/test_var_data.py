"""`bitlaws.qat.var_data.own_samples` on a tiny random VAR and tokenizer: shapes, labels, determinism, errors."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from flax import nnx

from bitlaws import checkpoint, configlib
from bitlaws.demo import family
from bitlaws.models.common import random_model
from bitlaws.models.var import VAR
from bitlaws.models.vqvae import VQVAE
from bitlaws.ptq import run
from bitlaws.qat import var_data

REPO = pathlib.Path(__file__).resolve().parents[2]
PATCH_NUMS = (1, 2)
VOCAB, CVAE, CLASSES = 16, 4, 5
VAR_TINY = dict(vocab_size=VOCAB, Cvae=CVAE, num_classes=CLASSES, depth=1, embed_dim=32, num_heads=2,
                patch_nums=PATCH_NUMS, cond_drop_rate=0.0)
VQVAE_TINY = dict(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, v_patch_nums=PATCH_NUMS)
OPTIONS = {"num_batches": 2, "batch_size": 8, "seed": 3, "top_k": 8}
SEQ = sum(p * p for p in PATCH_NUMS)  # L = 5


@pytest.fixture(scope="module", name="model")
def model_fixture() -> VAR:
    return random_model(lambda: VAR(**VAR_TINY, rngs=nnx.Rngs(0)), seed=0)


@pytest.fixture(scope="module", name="tokenizer_dir")
def tokenizer_dir_fixture(tmp_path_factory) -> pathlib.Path:
    """A folder like ``bitlaws port vqvae`` writes (kind, ctor, orbax state)."""
    tokenizer = random_model(lambda: VQVAE(**VQVAE_TINY, rngs=nnx.Rngs(0)), seed=1)
    directory = tmp_path_factory.mktemp("port") / "vqvae"
    ctor = {k: list(v) if isinstance(v, tuple) else v for k, v in VQVAE_TINY.items()}
    checkpoint.save_model(tokenizer, directory, {"kind": "vqvae", "ctor": ctor, "source": {"file": "vae.pth"}})
    return directory


@pytest.fixture(scope="module", name="data")
def data_fixture(model, tokenizer_dir):
    return var_data.own_samples(model, {**OPTIONS, "tokenizer": str(tokenizer_dir)})


def test_batches_have_the_teacher_forcing_shapes_and_the_logits_come_back(model, data):
    assert len(data.batches) == 2
    for labels, inputs in data.batches:
        assert labels.shape == (8,) and labels.dtype == np.int32
        assert inputs.shape == (8, SEQ - 1, CVAE) and inputs.dtype == np.float32
        assert np.all(np.isfinite(inputs))
    logits = data.forward(model, data.batches[0])  # [B, L, V]
    assert logits.shape == (8, SEQ, VOCAB)
    traced = nnx.eval_shape(lambda m: data.traceable()(m, data.batches[0]), model)  # the un-jitted apply
    assert traced.shape == logits.shape and data.apply is not None


def test_labels_are_spread_over_the_classes_with_about_half_null(data):
    labels = np.concatenate([b[0] for b in data.batches])  # [16]
    null = labels == CLASSES
    assert 0.25 <= null.mean() <= 0.75
    expected = var_data.spread_labels(16, CLASSES, 3)  # the sampled classes, before the null relabelling
    np.testing.assert_array_equal(labels[~null], expected[~null])
    assert np.bincount(expected, minlength=CLASSES).max() - np.bincount(expected, minlength=CLASSES).min() <= 1


def test_description_records_the_protocol(data, tokenizer_dir):
    d = data.description
    assert d["source"] == "samples" and (d["num_batches"], d["batch_size"], d["seed"]) == (2, 8, 3)
    assert (d["cfg"], d["top_k"], d["top_p"]) == (1.5, 8, 0.96)
    assert d["tokenizer"] == str(tokenizer_dir.resolve()) and "own samples" in d["protocol"]


def test_same_seed_same_batches_other_seed_other_tokens(model, data, tokenizer_dir):
    tokenizer, _ = var_data.load_tokenizer(str(tokenizer_dir))  # an in-memory tokenizer works too
    again = var_data.own_samples(model, {**OPTIONS, "tokenizer": tokenizer})
    for (l1, x1), (l2, x2) in zip(data.batches, again.batches):
        np.testing.assert_array_equal(l1, l2)
        np.testing.assert_array_equal(x1, x2)
    other = var_data.own_samples(model, {**OPTIONS, "seed": 4, "tokenizer": tokenizer})
    assert not np.array_equal(other.batches[0][1], data.batches[0][1])


def test_label_helpers_equal_the_demo_family_ones():
    for n, classes, seed in ((16, 5, 3), (100, 10, 0), (7, 1000, 2)):
        np.testing.assert_array_equal(var_data.spread_labels(n, classes, seed), family.spread_labels(n, classes, seed))
        labels = family.spread_labels(n, classes, seed)
        np.testing.assert_array_equal(
            var_data.with_null_labels(labels, classes, np.random.default_rng([seed, 1])),
            family.with_null_labels(labels, classes, np.random.default_rng([seed, 1])))


def test_release_sampling_matches_the_model_configs():
    sampling = configlib.load_module(REPO / "configs" / "models" / "_var_common.py").sampling_config()
    assert var_data.RELEASE_SAMPLING == {k: sampling[k] for k in ("cfg", "top_k", "top_p")}


def test_errors_name_the_problem(model, tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="calibration.tokenizer"):
        var_data.own_samples(model, {})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['n'\]"):
        var_data.own_samples(model, {"tokenizer": str(tokenizer_dir), "n": 3})
    with pytest.raises(ValueError, match="source must be 'samples'"):
        var_data.own_samples(model, {"tokenizer": str(tokenizer_dir), "source": "data"})
    with pytest.raises(ValueError, match="not found"):
        var_data.own_samples(model, {"tokenizer": str(tmp_path / "nope")})
    other = tmp_path / "var"
    checkpoint.save_model(model, other, {"kind": "var", "ctor": {}})
    with pytest.raises(ValueError, match="holds a ported 'var'"):
        var_data.own_samples(model, {"tokenizer": str(other)})
    wide = random_model(lambda: VAR(**{**VAR_TINY, "vocab_size": 32}, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="vocabulary 16 != 32"):
        var_data.own_samples(wide, {"tokenizer": str(tokenizer_dir)})
    with pytest.raises(ValueError, match="needs a VAR transformer"):
        var_data.check_pair(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), None)


def test_bitlaws_ptq_finds_it_as_calibration_data_fn(model, data, tokenizer_dir):
    source = run.Source(model, {"kind": "var"}, "tiny", None)
    calibration = {"data_fn": "bitlaws.qat.var_data:own_samples", "when": "needed", "source": "samples",
                   **OPTIONS, "tokenizer": str(tokenizer_dir)}
    found = run.calibration_data(source, calibration, "qat:topkld needs")
    np.testing.assert_array_equal(found.batches[1][1], data.batches[1][1])
    assert found.description == data.description
