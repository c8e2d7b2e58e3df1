"""The analyses on ported release-format checkpoints: the parity fixtures' tiny random-weight models, ported with
`bitlaws port` (VAR + VQVAE, DiT + SD-VAE), through `bitlaws analyze --var/--dit`."""

import json
import pathlib

import pytest

from bitlaws import cli
from bitlaws.analysis import subjects
from bitlaws.port import convert
from bitlaws.port.recipe import regenerate
from bitlaws.port.safetensors_io import write_safetensors

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


def _config(path: pathlib.Path, sections: dict) -> str:
    clean = {name: {k: v for k, v in ctor.items() if k not in ("cls", "vae_local")} for name, ctor in sections.items()}
    path.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                    f"    return ml_collections.ConfigDict({clean!r})\n")
    return str(path)


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ported")
    fixtures = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
    var_config = _config(root / "var.py", {"var": fixtures["var"]["ctor"], "vqvae": fixtures["vqvae"]["ctor"]})
    vqvae_file = root / "vqvae.safetensors"
    write_safetensors(vqvae_file, regenerate(FIXTURES / "vqvae_weights_manifest.json"))
    dit_config = _config(root / "dit.py", {"model": fixtures["dit"]["ctor"]})
    vae_config = _config(root / "vae.py", {"model": json.loads((FIXTURES / "sdvae_config.json").read_text())})
    dirs = {}
    for kind, ckpt, config in (("var", FIXTURES / "var_weights.pth", var_config), ("vqvae", vqvae_file, var_config),
                               ("dit", FIXTURES / "dit_weights.pth", dit_config),
                               ("vae", FIXTURES / "sdvae_weights.safetensors", vae_config)):
        dirs[kind] = str(convert.convert(kind, ckpt, root / kind, config=config))
    return dirs


def test_ported_subjects_follow_the_release_protocol(ported):
    var = subjects.ported_var(ported["var"], ported["vqvae"])
    assert var.protocol == {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "more_smooth": False}
    assert var.step_names == ("1x1", "2x2", "3x3", "4x4")
    dit = subjects.ported_dit(ported["dit"], ported["vae"])
    assert dit.num_steps == 250 and dit.protocol["sampler"] == "ddpm" and dit.protocol["cfg_scale"] == 1.5
    with pytest.raises(ValueError, match="holds a ported 'dit' checkpoint"):
        subjects.ported_var(ported["dit"], ported["vqvae"])
    with pytest.raises(ValueError, match="needs calibration data"):
        subjects.quantized(var, subjects.Precision("W4A16", "int", "gptq"))


@pytest.mark.slow  # 12-42 s; moved out of the default suite to keep it under ~15 min
def test_analyze_ported_models_from_the_command_line(ported, tmp_path):
    common = ["--models", "", "--var", ported["var"], ported["vqvae"], "--dit", ported["dit"], ported["vae"],
              "--dit-respacing", "5", "--n", "2", "--out", str(tmp_path)]
    assert cli.main(["analyze", "errors", "--precision", "W4A16", *common]) == 0
    records = json.loads((tmp_path / "errors.json").read_text())["records"]
    assert [r["family"] for r in records] == ["var", "dit"]
    assert len(records[0]["feature_error"]) == 4 and len(records[1]["feature_error"]) == 5
    assert records[1]["protocol"]["timestep_respacing"] == "5"
    assert all(r["feature_error"][0] > 0 for r in records)
    assert cli.main(["analyze", "activations", "--blocks", "0,9", *common]) == 0
    layers = json.loads((tmp_path / "activations.json").read_text())["records"][1]["layers"]
    assert {layer["block"] for layer in layers} == {0, 1} and all(len(layer["steps"]) == 5 for layer in layers)
