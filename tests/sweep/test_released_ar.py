"""The released study on ported LlamaGen and MAR (``released.py:smoke,ar``: the parity fixtures' tiny models)."""

import json
import math

import numpy as np
import pytest

from bitlaws.analysis import subjects
from bitlaws.eval.sharded import local_data_mesh
from bitlaws.sweep import released, released_sampling, runner
from bitlaws.sweep.released_smoke import smoke_inputs

CONFIG = "configs/sweeps/released.py"
AR_SAMPLING = {"llamagen": {}, "mar": {"num_iter": 2, "num_sampling_steps": "2"}}


@pytest.fixture(scope="module")
def ar_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("released_ar")
    smoke_inputs(folder, classic=False, ar=True)
    return folder


@pytest.mark.parametrize("family", ["llamagen", pytest.param("mar", marks=pytest.mark.slow)])  # mar: ~18 s
def test_sample_i_depends_only_on_seed_and_i(ar_cache, family):
    paths = smoke_inputs(ar_cache, classic=False, ar=True)
    subject = subjects.PORTED[family](*(paths[kind] for kind in released.FAMILY_DIRS[family]), AR_SAMPLING[family])
    sampler = released_sampling.ShardedSampler(family, subject.model, subject.decoder, subject.protocol,
                                               mesh=local_data_mesh(), per_device_batch=4,
                                               num_classes=subject.num_classes)
    images = sampler.sample(7, np.arange(4))  # [4, 32, 32, 3] uint8
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert len({image.tobytes() for image in images}) == 4
    np.testing.assert_array_equal(sampler.sample(7, np.array([3, 1])), images[[3, 1]])  # other batch neighbours
    assert not np.array_equal(sampler.sample(8, np.array([3])), images[3:])


def test_protocols_come_from_the_released_model_configs(tmp_path):
    def port_folder(name: str, kind: str, config: str) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "bitlaws.json").write_text(json.dumps({"kind": kind, "config": config}))
        return str(folder)

    xl = port_folder("xl", "llamagen", "configs/models/llamagen_gpt.py:xl,image_size=384")
    assert subjects.stored_sampling(xl, subjects.LLAMAGEN_PROTOCOL) == {
        **subjects.LLAMAGEN_PROTOCOL, "cfg_scale": 1.75, "image_size_eval": 256}
    mar_h = port_folder("mar_h", "mar", "configs/models/mar.py:h")
    assert subjects.stored_sampling(mar_h, subjects.MAR_PROTOCOL) == {**subjects.MAR_PROTOCOL, "cfg": 3.2}


def test_uint8_conversion_of_mar_rounds():
    values = np.array([-1.0, -0.999, 0.0, 0.999, 1.0, 1.5])
    assert released_sampling.mar_to_uint8(values).tolist() == [0, 0, 128, 255, 255, 255]


def test_options_and_config_validation(tmp_path):
    import ml_collections

    from bitlaws.configlib import load_config

    block = {"checkpoints": {"g": {"llamagen": "/g", "llamagen_vq": "/q"}, "m": {"mar": "/m", "mar_vae": "/v"}},
             "reference": "/r.npz", "mar_sampling": {"num_iter": 8, "cfg": None}}
    options = released.StudyOptions.from_config(ml_collections.ConfigDict({"released": block}))
    assert options.family("g") == "llamagen" and options.family("m") == "mar"
    assert options.sampling("mar") == {"num_iter": 8} and options.sampling("llamagen") == {}
    with pytest.raises(ValueError, match="released.mar_sampling.*top_k"):
        released.StudyOptions.from_config(ml_collections.ConfigDict(
            {"released": {**block, "mar_sampling": {"top_k": 3}}}))
    with pytest.raises(ValueError, match="llamagen_vq"):
        released.StudyOptions(checkpoints={"x": {"llamagen": "/g", "vae": "/v"}}, reference="/r").family("x")
    # The default model list and block are the VAR / DiT ones; a LlamaGen / MAR model adds its entries.
    default = load_config(CONFIG)
    assert "llamagen_sampling" not in default.released and "mar_b" not in default.released.checkpoints
    mar = load_config(f"{CONFIG}:model=mar_l,root=/p")
    assert mar.models == ("mar_l",) and dict(mar.released.checkpoints.mar_l) == {
        "mar": "/p/mar_l", "mar_vae": "/p/mar_vae_kl16"}
    assert "mar_sampling" in mar.released and "llamagen_sampling" not in mar.released
    assert load_config(f"{CONFIG}:model=llamagen_3b").released.checkpoints.llamagen_3b.llamagen.endswith(
        "/llamagen_3b")
    with pytest.raises(ValueError, match="model must be one of"):
        load_config(f"{CONFIG}:model=mar_x")
    with pytest.raises(ValueError, match="with 'smoke'"):
        load_config(f"{CONFIG}:ar")
    message = released._missing_port("llamagen_xl", "llamagen", tmp_path / "none")
    assert "c2i_XL_384.pt" in message and "huggingface.co/FoundationVision/LlamaGen" in message
    assert "llamagen_gpt.py:xl,image_size=384" in message and "\n" not in message
    message = released._missing_port("mar_h", "mar", tmp_path / "none")
    assert "pretrained_models/mar/mar_huge/checkpoint-last.pth" in message and "util/download.py" in message
    assert "kl16.ckpt" in released._missing_port("mar_h", "mar_vae", tmp_path / "none")


@pytest.mark.slow
def test_llamagen_and_mar_smoke_end_to_end(ar_cache, tmp_path):
    """Float and W4A16 cells of both families; a rerun after losing a cell's record resumes from its shards."""
    spec, out = f"{CONFIG}:smoke,ar,cache={ar_cache}", tmp_path / "ar"
    overrides = ["released.n_samples=8", "released.progress=False"]
    assert runner.run_sweep_from_config(spec, out, overrides, progress=False).exit_code == 0
    records = {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert sorted(records) == sorted(f"{m}|{s}" for m in ("llamagen_fixture", "mar_fixture")
                                     for s in ("W16A16|none|none|s0", "W4A16|int|rtn|s0"))
    for record in records.values():
        assert math.isfinite(record["fid"]) and math.isfinite(record["inception_score"])
        assert record["n_samples"] == 8 and record["family"] in ("llamagen", "mar")
    for family in ("llamagen", "mar"):
        assert records[f"{family}_fixture|W4A16|int|rtn|s0"]["mt_bits"] < records[
            f"{family}_fixture|W16A16|none|none|s0"]["mt_bits"]
    assert records["mar_fixture|W16A16|none|none|s0"]["protocol"]["num_iter"] == 4
    key = "mar_fixture|W4A16|int|rtn|s0"
    shard = out / "cells" / key.replace("|", "_") / "shard_00000.npz"
    first = np.load(shard)["samples"]
    kept = [line for line in (out / "results.jsonl").read_text().splitlines() if json.loads(line)["key"] != key]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    assert runner.run_sweep_from_config(spec, out, overrides, progress=False).evaluated == [key]
    again = {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}[key]
    assert again["n_samples_resumed"] == 8 and again["fid"] == records[key]["fid"]
    np.testing.assert_array_equal(np.load(shard)["samples"], first)
