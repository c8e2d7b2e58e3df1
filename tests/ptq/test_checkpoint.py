"""Quantized checkpoints: `load_quantized` rebuilds the in-memory quantized model bit for bit.

Tiny random VAR and DiT models (a few layers quantized, so that few shapes compile); the demo-member round trip
with sampling is marked slow.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bitlaws
from bitlaws import checkpoint
from bitlaws.ptq import checkpoint as ptq_checkpoint
from bitlaws.ptq import gptvq_core, run
from bitlaws.quant import spec as spec_lib
from bitlaws.port.convert import KINDS
from bitlaws.models.common import random_model
from bitlaws.quant import (CalibrationData, LutFormat, QuantRule, QuantSpec, apply_method, quantized_checkpoint as qc,
                           run_calibration)

VAR_TINY = dict(vocab_size=16, Cvae=8, num_classes=5, depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2, 3),
                cond_drop_rate=0.0)
DIT_TINY = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)
VAR_RECORD = {"kind": "var", "ctor": VAR_TINY, "source": {"type": "test"}}
DIT_RECORD = {"kind": "dit", "ctor": DIT_TINY, "source": {"type": "test"}}
MLP = r"blocks\.\d+\.(ffn|mlp)\.fc1"
MLP2 = r"blocks\.\d+\.(ffn|mlp)\.fc2"


def _model(record):
    """A random model whose arrays are committed to the device, as restored ones are: one jit cache for both."""
    model = random_model(lambda: KINDS[record["kind"]].build(record["ctor"]), seed=0)
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    return model


def _var_batch():
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.integers(0, 5, 3), jnp.int32),
            jnp.asarray(rng.standard_normal((3, 13, VAR_TINY["Cvae"])), jnp.float32))  # labels [3], x [3, L-1, Cvae]


def _dit_batch(seed: int = 1):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((3, 4, 4, 4)), jnp.float32),  # x [3, H, W, C]
            jnp.asarray(rng.integers(0, 1000, 3), jnp.int32), jnp.asarray(rng.integers(0, 5, 3), jnp.int32))


@nnx.jit
def _forward(model, batch):
    return model(*batch)


def _leaves(model) -> list:
    return jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]


def _assert_identical(loaded, qmodel, batch):
    assert nnx.graphdef(loaded) == nnx.graphdef(qmodel)
    ours, theirs = _leaves(loaded), _leaves(qmodel)
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    for (path, a), (_, b) in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
    np.testing.assert_array_equal(np.asarray(_forward(loaded, batch)), np.asarray(_forward(qmodel, batch)))


CASES = {
    # int: grouped signed, per-channel unsigned (zero points).
    "var-int4": (VAR_RECORD, _var_batch, [
        QuantRule(module_path=MLP, weight=QuantSpec(format="int4", granularity="group", group_size=16)),
        QuantRule(module_path=MLP2, weight=QuantSpec(format="uint4"))]),
    # fp: float16 scales with a per-tensor exponent (scale_exp), MX (E8M0 scales), fp8 activations.
    "dit-fp": (DIT_RECORD, _dit_batch, [
        QuantRule(module_path=MLP, weight=QuantSpec(format="fp4_e2m1"), act=QuantSpec(format="fp8_e4m3",
                                                                                     granularity="token")),
        QuantRule(module_path=MLP2, weight=QuantSpec(format="mxfp4"))]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_identical(case, tmp_path):
    record, batch, rules = CASES[case]
    model = _model(record)
    qmodel = apply_method(model, rules, "rtn", materialize="packed")
    ptq_checkpoint.save(qmodel, tmp_path / "ck", record, rules=rules, reference=model)
    loaded = bitlaws.load_quantized(tmp_path / "ck")
    _assert_identical(loaded.model, qmodel, batch())
    assert loaded.rules == rules
    manifest = loaded.metadata["manifest"]
    assert manifest["rewritten_params"] == []
    assert all(entry["packed_weight"]["type"] == "QArray" for entry in manifest["layers"].values())


def test_smoothquant_w8a8_round_trip_keeps_input_scales_act_params_and_folds(tmp_path):
    model = _model(DIT_RECORD)
    rules = [QuantRule(module_path=r"blocks\.\d+\.mlp\.fc[12]", weight=QuantSpec(format="int8"),
                       act=QuantSpec(format="int8", granularity="tensor", static=True))]
    data = CalibrationData(lambda m, b: _forward(m, b), [_dit_batch(2), _dit_batch(3)], {"source": "test"})
    qmodel = apply_method(model, rules, "smoothquant", materialize="packed", data=data)
    ptq_checkpoint.save(qmodel, tmp_path / "ck", DIT_RECORD, rules=rules, reference=model)
    loaded = bitlaws.load_quantized(tmp_path / "ck")
    _assert_identical(loaded.model, qmodel, _dit_batch())
    layers = loaded.metadata["manifest"]["layers"]
    assert all(e["act_qparams"] is not None for e in layers.values())
    assert any(e["input_scale"] is not None for e in layers.values())  # fc2 has no op to fold into
    assert loaded.metadata["manifest"]["rewritten_params"]  # fc1 folded into adaLN_modulation


@pytest.mark.slow
def test_gptvq_round_trip_stores_vq_arrays(tmp_path):
    model = _model(DIT_RECORD)
    rules = [QuantRule(module_path=MLP, weight=QuantSpec(format="int3", granularity="group", group_size=16))]
    data = CalibrationData(lambda m, b: _forward(m, b), [_dit_batch(2), _dit_batch(3)])
    qmodel = apply_method(model, rules, "gptvq", materialize="packed", data=data,
                          params={"em_iters": 3, "update_iters": 1})
    ptq_checkpoint.save(qmodel, tmp_path / "ck", DIT_RECORD, rules=rules, reference=model)
    loaded = bitlaws.load_quantized(tmp_path / "ck")
    _assert_identical(loaded.model, qmodel, _dit_batch())
    assert loaded.metadata["manifest"]["layers"]["blocks.0.mlp.fc1"]["packed_weight"]["type"] == "VQArray"


def test_layer_errors_are_finite_and_int8_beats_int4():
    model = _model(DIT_RECORD)
    both = f"{MLP}|{MLP2}"
    stats = run_calibration(model, [QuantRule(module_path=both, weight=QuantSpec(format="int8"))], _forward,
                            [_dit_batch(2)], record_hessian=True)
    errors = {}
    for fmt in ("int8", "int4"):
        rules = [QuantRule(module_path=both, weight=QuantSpec(format=fmt))]
        errors[fmt] = run.layer_errors(model, apply_method(model, rules, "rtn", materialize="packed"), stats)
    assert set(errors["int8"]) == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    for path in errors["int8"]:
        e8, e4 = errors["int8"][path], errors["int4"][path]
        for key in ("weight_rel_error", "output_proxy"):
            assert np.isfinite(e8[key]) and np.isfinite(e4[key])
            assert 0 < e8[key] < e4[key] < 1
        assert e8["weight_rel_error"] < 0.01 < e4["weight_rel_error"] < 0.2
        assert e4["storage_bytes"] < e8["storage_bytes"] < e8["float_bytes"] == 2 * e8["params"]


# --------------------------------------------------------------------------------------------- codecs
def test_spec_json_round_trip_every_format_kind():
    specs = [QuantSpec(format="uint3", granularity="group", group_size=32, calibrator="mse"),
             QuantSpec(format="fp8_e5m2", granularity="token"), QuantSpec(format="mxfp6"), QuantSpec(format="nf4"),
             QuantSpec(format="int8", granularity="tensor", static=True, scale_dtype="bfloat16")]
    table = json.loads(json.dumps(spec_lib.formats_table(specs)))
    for spec in specs:
        assert spec_lib.spec_from_json(json.loads(json.dumps(spec_lib.spec_to_json(spec))), table) == spec
    assert set(table) == {"fp8_e5m2", "mxfp6", "nf4"}  # integer formats parse from their names


def test_unregistered_lookup_table_format_loads_from_the_checkpoints_table():
    fmt = LutFormat("tst3-unregistered", (-1.0, -0.5, -0.25, 0.0, 0.125, 0.25, 0.5, 1.0))
    spec = QuantSpec(format=fmt, granularity="channel")
    table = spec_lib.formats_table([spec])
    assert spec_lib.spec_from_json(spec_lib.spec_to_json(spec), table) == spec
    with pytest.raises(ValueError, match="unknown quantization format"):
        spec_lib.spec_from_json(spec_lib.spec_to_json(spec))  # no table, not registered
    table["tst3-unregistered"]["values"][-1] = 2.0
    assert spec_lib.spec_from_json(spec_lib.spec_to_json(spec), table) != spec
    with pytest.raises(ValueError, match="unknown field"):
        spec_lib.spec_from_json({**spec_lib.spec_to_json(spec), "bits": 3}, table)


def test_nf4_registered_differently_is_refused():
    table = spec_lib.formats_table([QuantSpec(format="nf4")])
    table["nf4"]["values"][0] = -0.9
    with pytest.raises(ValueError, match="registered here"):
        spec_lib.spec_from_json({"format": "nf4"}, table)


def test_vq_array_manifest_entry_gives_its_abstract_twin():
    vq = gptvq_core.VQArray(indices=jnp.zeros((8, 16), jnp.uint8), codebooks=jnp.zeros((2, 1, 16, 2), jnp.float16),
                            codebook_exp=jnp.zeros((2, 1), jnp.int16), shape=(32, 16), dim=2, group_size=16,
                            group_cols=16, index_bits=4)
    entry = json.loads(json.dumps(qc.describe_packed_weight(vq)))
    assert entry["type"] == "VQArray"
    assert qc.abstract_packed_weight(entry) == jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), vq)


# ----------------------------------------------------------------------------------- errors, folders
@pytest.fixture(scope="module", name="saved")
def saved_fixture(tmp_path_factory) -> pathlib.Path:
    model = _model(DIT_RECORD)
    rules = [QuantRule(module_path=MLP, weight=QuantSpec(format="int4"))]
    directory = tmp_path_factory.mktemp("saved") / "ck"
    ptq_checkpoint.save(apply_method(model, rules, "rtn", materialize="packed"), directory, DIT_RECORD, rules=rules)
    return directory


def _copy(saved, tmp_path) -> pathlib.Path:
    shutil.copytree(saved, tmp_path / "ck")
    return tmp_path / "ck"


def _edit_metadata(directory, edit):
    path = directory / qc.METADATA_FILE
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


def _drop_first_layer(metadata):
    metadata["manifest"]["layers"].pop("blocks.0.mlp.fc1")


def _shrink_scale(metadata):
    metadata["manifest"]["layers"]["blocks.0.mlp.fc1"]["packed_weight"]["arrays"]["scale"]["shape"] = [1, 64]


def _unknown_kind(metadata):
    metadata["model"]["kind"] = "gpt"


BROKEN = {
    "missing metadata": (lambda d: (d / qc.METADATA_FILE).unlink(), ["bitlaws.json not found"]),
    "corrupt metadata": (lambda d: (d / qc.METADATA_FILE).write_text('{"kind": "quant'), ["bitlaws.json is corrupt"]),
    "newer format": (lambda d: _edit_metadata(d, lambda m: m.update(format_version=qc.FORMAT_VERSION + 1)),
                     ["format version 2", "upgrade bitlaws"]),
    "missing state": (lambda d: shutil.rmtree(d / qc.STATE_DIR), ["has no state"]),
    "layer left out of the manifest": (lambda d: _edit_metadata(d, _drop_first_layer),
                                       ["missing ['blocks.0.mlp.fc1.kernel']",
                                        "'blocks.0.mlp.fc1.qkernel.values'"]),
    "misshapen array": (lambda d: _edit_metadata(d, _shrink_scale),
                        ["misshapen ['blocks.0.mlp.fc1.qkernel.scale (stored (1, 128) float16, model (1, 64)"]),
    "unknown model kind": (lambda d: _edit_metadata(d, _unknown_kind), ["unknown model kind 'gpt'"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoints_are_one_line_errors_naming_the_file_or_key(case, saved, tmp_path):
    directory = _copy(saved, tmp_path)
    damage, needles = BROKEN[case]
    damage(directory)
    with pytest.raises(qc.CheckpointError) as info:
        bitlaws.load_quantized(directory)
    message = str(info.value)
    assert "\n" not in message and str(directory) in message
    for needle in needles:
        assert needle in message


def test_a_float_checkpoint_is_not_a_quantized_one(tmp_path):
    checkpoint.save_model(_model(DIT_RECORD), tmp_path / "float", {"kind": "dit", "ctor": DIT_TINY})
    with pytest.raises(qc.CheckpointError, match="describes no quantized checkpoint"):
        bitlaws.load_quantized(tmp_path / "float")


def test_output_folder_rules(saved, tmp_path):
    model = bitlaws.load_quantized(saved).model
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no quantized checkpoint"):
        ptq_checkpoint.save(model, other, DIT_RECORD, force=True)
    assert (other / "notes.txt").read_text() == "keep me"
    target = _copy(saved, tmp_path)
    before = (target / qc.METADATA_FILE).read_text()
    with pytest.raises(ValueError, match="pass --force"):
        ptq_checkpoint.save(model, target, DIT_RECORD)
    assert (target / qc.METADATA_FILE).read_text() == before
    ptq_checkpoint.save(model, target, DIT_RECORD, metadata={"note": "replaced"}, force=True)
    assert bitlaws.load_quantized(target).metadata["note"] == "replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "other"]  # no temporary folders left


# ------------------------------------------------------------------------------------------- demo member
@pytest.mark.slow
def test_demo_member_gptq_checkpoint_samples_bit_for_bit(tmp_path):
    from bitlaws import configlib  # pylint: disable=g-import-not-at-top
    from bitlaws.demo import family  # pylint: disable=g-import-not-at-top

    config = configlib.load_config("configs/ptq/demo.py:dit-d2,W4A16,gptq,runlocal", ["calibration.source=data"])
    run.run_ptq(config, tmp_path / "ck")
    loaded = bitlaws.load_quantized(tmp_path / "ck")
    member = loaded.demo_member()
    data = family.calibration_data(member, {"source": "data", "num_batches": 1, "batch_size": 8, "seed": 0})
    qmodel = apply_method(member.model, loaded.rules, "gptq", materialize="packed", data=data)
    _assert_identical(loaded.model, qmodel, member.calibration_batches(1, 2, 5, source="data")[0])
    labels, key = np.arange(4), jax.random.key(3)
    np.testing.assert_array_equal(member.sample(loaded.model, labels, key), member.sample(qmodel, labels, key))
    errors = loaded.layer_errors["layers"]
    assert all(0 < e["output_proxy"] < 1 and 0 < e["weight_rel_error"] < 0.3 for e in errors.values())
