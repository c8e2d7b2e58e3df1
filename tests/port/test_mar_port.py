"""MAR port: fixture parity through the checks, `bitlaws port mar` round trip, default key, port errors."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.port import convert
from bitlaws.port.checks import mar as mar_check
from bitlaws.port.mapping import PortError
from bitlaws.port.reader import read_state_dict
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.mar import DEFAULT_KEY, mar_ctor, port_mar
from bitlaws.port.verify import load_manifest

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest(FIXTURES)


@pytest.fixture(scope="module")
def ctor(manifest) -> dict:
    return mar_ctor(manifest["fixtures"]["mar"]["ctor"]["kwargs"])


@pytest.fixture(scope="module")
def io() -> dict:
    return read_safetensors(FIXTURES / "mar_io.safetensors")


def _write_config(path: pathlib.Path, body: dict) -> str:
    path.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                    f"    return ml_collections.ConfigDict({body!r})\n")
    return str(path)


@nnx.jit
def _z(model, x, mask, labels):
    return model(x, mask, model.class_embedding(labels))


def _z_error(model, io) -> float:
    z = _z(model, jnp.asarray(io["mae.x"]), jnp.asarray(io["mae.mask"]), jnp.asarray(io["labels"]))
    return float(np.abs(np.asarray(z) - io["mae.z"]).max() / np.abs(io["mae.z"]).max())


_INPUTS = ("labels", "mae.x_img", "net.x", "net.t", "net.c", "net.cfg_x", "net.c_uncond", "net.cfg_scale", "diff.z",
           "diff.z_uncond", "diff.temperature", "diff.cfg_scale", "pstep.x", "pstep.c", "pstep.t",
           "pstep.temperature", "loss.x_start", "loss.t", "loss.c", "loss.mask", "gen.seed", "train.np_seed",
           "train.torch_seed")
_DRAWS = (".init_noise", ".step_noise", ".noise", "train.t", "train.label_drop_rand")


def test_fixture_check_of_transformer_head_and_diffusion(manifest, io):
    results = mar_check.check(FIXTURES, manifest, groups=("sched", "mae", "net", "diff", "pstep"))
    names = {r.name for r in results}
    assert {"mae.z", "mae.z_allmasked", "net.cfg_out", "diff.cfg.out", "diff.plain.x_out", "pstep.sample"} <= names
    assert not any(n.startswith(("gen", "train", "loss")) for n in names)
    failed = [r.line() for r in results if not r.passed()]
    assert not failed, "\n".join(failed)
    with pytest.raises(ValueError, match="groups"):
        mar_check.check(FIXTURES, manifest, groups=("mae", "nope"))


@pytest.mark.slow
def test_fixture_check_passes_every_comparison(manifest, io):  # adds the training losses and the sampling loop
    results = mar_check.check(FIXTURES, manifest)
    unchecked = sorted(set(io) - {r.name for r in results})
    assert [n for n in unchecked if n not in _INPUTS and not n.endswith(_DRAWS)] == []  # only inputs and draws
    failed = [r.line() for r in results if not r.passed()]
    assert not failed, "\n".join(failed)


def test_convert_pth_defaults_to_model_ema_and_round_trips(tmp_path, ctor, io):
    config = _write_config(tmp_path / "mar_fixture.py", {"model": ctor})
    out = convert.convert("mar", FIXTURES / "mar_weights.pth", tmp_path / "mar", config=config)
    meta = json.loads((out / "bitlaws.json").read_text())
    assert meta["kind"] == "mar" and meta["source"]["key"] == DEFAULT_KEY == "model_ema"
    assert _z_error(convert.load_ported(out), io) < 1e-4
    # a flat state dict (no model_ema inside) is read as it is
    flat = convert.convert("mar", FIXTURES / "mar_weights.safetensors", tmp_path / "flat", config=config)
    assert json.loads((flat / "bitlaws.json").read_text())["source"]["key"] is None
    assert _z_error(convert.load_ported(flat), io) < 1e-4


def test_nested_checkpoint_needs_a_key_without_the_default(ctor):
    with pytest.raises(ValueError, match="model_ema"):
        read_state_dict(FIXTURES / "mar_weights.pth")
    assert set(read_state_dict(FIXTURES / "mar_weights.pth", key="model")) == set(
        read_state_dict(FIXTURES / "mar_weights.pth", key=DEFAULT_KEY))


def test_missing_and_misshapen_keys_are_named(ctor):
    state_dict = read_safetensors(FIXTURES / "mar_weights.safetensors")
    broken = {k: v for k, v in state_dict.items() if k != "diffloss.net.final_layer.linear.weight"}
    broken["mask_token"] = np.zeros((1, 2, 64), np.float32)
    with pytest.raises(PortError) as error:
        port_mar(broken, **ctor)
    assert error.value.missing == ["diffloss.final_layer.linear.kernel"]
    assert any(m.startswith("mask_token") for m in error.value.misshapen)


def test_config_sections_fit_the_kind():
    with pytest.raises(ValueError, match="does not describe a MAR"):
        convert._check_ctor("mar", {"encoder_embed_dim": 8, "wings": 2}, convert.KINDS["mar"].model_class(), "x")
    assert convert.KINDS["mar_vae"].default_config.endswith("mar_vae_kl16.py")
