"""Pieces of the released study: labels, shards, Inception Score sums, the small-sample FID, stored protocols."""

import json
import math
import pathlib

import numpy as np
import pytest

from bitlaws.analysis import subjects
from bitlaws.eval.fid import fid_from_features, fid_from_stats
from bitlaws.eval.inception_score import inception_score
from bitlaws.sweep import released, released_sampling, released_shards
from bitlaws.sweep.grid import Cell

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_labels_depend_on_the_index_only():
    indices = np.arange(25)
    assert released_sampling.sample_labels(indices, 10).tolist() == [i % 10 for i in range(25)]
    blocks = released_sampling.sample_labels(indices, 3, "blocks", per_class=4)
    assert blocks.tolist() == [(i // 4) % 3 for i in range(25)] and blocks.dtype == np.int32
    counts = np.bincount(released_sampling.sample_labels(np.arange(50_000), 1000))
    assert counts.min() == counts.max() == 50  # the official 50 per class at 50k samples
    with pytest.raises(ValueError, match="label order"):
        released_sampling.sample_labels(indices, 10, "random")


def test_uint8_conversions_follow_the_official_scripts():
    assert released_sampling.var_to_uint8(np.array([0.0, 0.5, 0.999, 1.0, 1.2])).tolist() == [0, 127, 254, 255, 255]
    assert released_sampling.dit_to_uint8(np.array([-1.0, -0.999, 0.0, 0.99, 1.0])).tolist() == [0, 0, 128, 254, 255]


def test_shard_plan_ownership_covers_every_index_once():
    plan = released_shards.ShardPlan(n_samples=23, shard_size=5)
    assert plan.num_shards == 5 and plan.indices(4).tolist() == [20, 21, 22]
    owned = [plan.owned(p, 3) for p in range(3)]
    assert owned == [[0, 3], [1, 4], [2]]
    covered = np.concatenate([plan.indices(k) for shards in owned for k in shards])
    assert sorted(covered.tolist()) == list(range(23))
    with pytest.raises(ValueError, match="shard_size"):
        released_shards.ShardPlan(10, 0)


def test_shards_are_atomic_and_stale_ones_are_ignored(tmp_path):
    path = released_shards.shard_path(tmp_path, 3)
    rng = np.random.default_rng(0)
    indices = np.arange(6, 9)
    samples = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    released_shards.write_shard(path, indices, rng.standard_normal((3, 5)), rng.standard_normal((3, 7)), samples)
    assert path.name == "shard_00003.npz" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    shard = released_shards.read_shard(path, indices)
    np.testing.assert_array_equal(shard["samples"], samples)
    assert shard["features"].dtype == np.float32
    assert released_shards.read_shard(path, np.arange(6, 10)) is None  # another n_samples / shard_size
    path.write_bytes(path.read_bytes()[:100])  # what a full disk could leave
    assert released_shards.read_shard(path, indices) is None
    with pytest.raises(ValueError, match="disagree"):
        released_shards.write_shard(path, indices, np.zeros((2, 5)), np.zeros((3, 7)))


def test_inception_score_sums_equal_the_direct_score_in_any_shard_order():
    logits = np.random.default_rng(1).standard_normal((103, 11)) * 3
    sums = released_shards.InceptionScoreSums(103, 10, 11)
    for start in (90, 0, 40, 17, 60):  # shards of different sizes, any order
        stop = {90: 103, 0: 17, 40: 60, 17: 40, 60: 90}[start]
        sums.update(np.arange(start, stop), logits[start:stop])
    mean, std = sums.score()
    expected = inception_score(logits, splits=10)
    assert math.isclose(mean, expected[0], rel_tol=1e-12) and math.isclose(std, expected[1], rel_tol=1e-9)
    half = released_shards.InceptionScoreSums(103, 10, 11)
    half.update(np.arange(50), logits[:50])
    with pytest.raises(ValueError, match="without samples"):
        half.score()
    other = released_shards.InceptionScoreSums(103, 10, 11)
    other.update(np.arange(50, 103), logits[50:])
    half.add(other.sums)  # what merging two processes does
    assert math.isclose(half.score()[0], expected[0], rel_tol=1e-12)


def test_fid_from_features_is_fid_from_stats_for_few_samples():
    rng = np.random.default_rng(2)
    features, reference = rng.standard_normal((20, 64)), 1.3 * rng.standard_normal((200, 64)) + 0.2
    ref = (reference.mean(0), np.cov(reference, rowvar=False))
    direct = fid_from_stats((features.mean(0), np.cov(features, rowvar=False)), ref)
    assert math.isclose(fid_from_features(features, ref), direct, rel_tol=1e-6)
    with pytest.raises(ValueError, match="n <= d"):
        fid_from_features(rng.standard_normal((65, 64)), ref)


def test_metric_names_and_cell_folders():
    assert released.metric_name(50_000) == "FID-50K" and released.metric_name(24) == "FID-24"
    cell = Cell("var_d16", "W4A16", "int", "rtn", 0)
    assert released.cell_folder(pathlib.Path("/o"), cell) == pathlib.Path("/o/cells/var_d16_W4A16_int_rtn_s0")


def test_ported_protocols_come_from_the_stored_model_config(tmp_path):
    def port_folder(name: str, config: str) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "bitlaws.json").write_text(json.dumps({"kind": "var", "config": config}))
        return str(folder)

    release = port_folder("release", str(REPO / "configs/models/var_d16.py"))
    assert subjects.stored_sampling(release, subjects.VAR_PROTOCOL) == subjects.VAR_PROTOCOL
    dit = port_folder("dit", str(REPO / "configs/models/dit.py") + ":xl2")
    assert subjects.stored_sampling(dit, subjects.DIT_PROTOCOL) == subjects.DIT_PROTOCOL
    custom = tmp_path / "custom.py"
    custom.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                      "    return ml_collections.ConfigDict({'sampling': {'cfg': 2.0, 'top_k': 10}})\n")
    assert subjects.stored_sampling(port_folder("custom", str(custom)), subjects.VAR_PROTOCOL) == {
        **subjects.VAR_PROTOCOL, "cfg": 2.0, "top_k": 10}
    gone = port_folder("gone", str(tmp_path / "deleted.py"))
    assert subjects.stored_sampling(gone, subjects.VAR_PROTOCOL) == subjects.VAR_PROTOCOL


def test_study_options_name_the_bad_field():
    import ml_collections

    def config(**released_fields):
        block = {"checkpoints": {"m": {"dit": "/d", "vae": "/v"}}, "reference": "/r.npz", **released_fields}
        return ml_collections.ConfigDict({"released": block})

    options = released.StudyOptions.from_config(config(dit_sampling={"cfg_scale": None, "sampler": "ddim"}))
    assert options.family("m") == "dit" and dict(options.dit_sampling) == {"sampler": "ddim"}
    for fields, field in (({"n_samples": 0}, "released.n_samples"), ({"labels": "random"}, "released.labels"),
                          ({"frechet": "features", "n_samples": 5000}, "released.frechet"),
                          ({"is_splits": 30, "n_samples": 20}, "released.is_splits"),
                          ({"attention": "flash"}, "released.attention"),
                          ({"compute_dtype": "int8"}, "released.compute_dtype"), ({"bogus": 1}, "bogus")):
        with pytest.raises(ValueError, match=field):
            released.StudyOptions.from_config(config(**fields))
    with pytest.raises(ValueError, match="no entry"):
        options.family("other")
