"""`bitlaws port`: official checkpoint -> orbax -> model, on the fixture checkpoints."""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from bitlaws import cli
from bitlaws.port import convert, read_safetensors

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


def _write_config(path: pathlib.Path, body: dict) -> str:
    path.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                    f"    return ml_collections.ConfigDict({body!r})\n")
    return str(path)


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIXTURES / "manifest.json").read_text())


def test_port_dit_nested_checkpoint_roundtrip(tmp_path, manifest):
    jax.config.update("jax_default_matmul_precision", "highest")
    ctor = {k: v for k, v in manifest["fixtures"]["dit"]["ctor"].items() if k != "cls"}
    config = _write_config(tmp_path / "dit_fixture.py", {"model": ctor})
    out = tmp_path / "dit"
    assert cli.main(["port", "dit", "--ckpt", str(FIXTURES / "dit_train_ckpt.pt"), "--key", "ema",
                     "--config", config, "--out", str(out)]) == 0
    model = convert.load_ported(out)
    io = read_safetensors(FIXTURES / "dit_io.safetensors")
    x = np.transpose(io["fwd.x"], (0, 2, 3, 1))
    y = np.transpose(np.asarray(model(x, io["fwd.t"], io["fwd.y"])), (0, 3, 1, 2))
    assert np.abs(y - io["fwd.out"]).max() / np.abs(io["fwd.out"]).max() < 1e-4
    meta = json.loads((out / "bitlaws.json").read_text())
    assert meta["kind"] == "dit" and meta["source"]["key"] == "ema" and len(meta["source"]["sha256"]) == 64


def test_port_over_an_earlier_port_needs_force(tmp_path, manifest, capsys):
    ctor = {k: v for k, v in manifest["fixtures"]["dit"]["ctor"].items() if k != "cls"}
    config = _write_config(tmp_path / "dit_fixture.py", {"model": ctor})
    out = tmp_path / "dit"
    args = ["port", "dit", "--ckpt", str(FIXTURES / "dit_weights.safetensors"), "--config", config, "--out", str(out)]
    assert cli.main(args) == 0
    meta = (out / "bitlaws.json").read_bytes()
    assert cli.main(args) == 2
    assert "already holds a ported 'dit' checkpoint" in capsys.readouterr().err
    assert (out / "bitlaws.json").read_bytes() == meta
    assert cli.main(["port", "dit", "--ckpt", str(FIXTURES / "dit_weights.pth"), "--config", config, "--out", str(out),
                     "--force"]) == 0
    assert json.loads((out / "bitlaws.json").read_text())["source"]["file"] == "dit_weights.pth"
    assert isinstance(convert.load_ported(out), nnx.Module)


def test_check_out_dir(tmp_path):
    convert.check_out_dir(tmp_path / "new")
    convert.check_out_dir(tmp_path)  # empty
    (tmp_path / "bitlaws.json").write_text(json.dumps({"kind": "nope"}))
    with pytest.raises(ValueError, match="holds no port"):
        convert.check_out_dir(tmp_path, force=True)  # metadata of an unknown kind: not a port
    (tmp_path / "bitlaws.json").write_text(json.dumps({"kind": "vae"}))
    with pytest.raises(ValueError, match="already holds a ported 'vae' checkpoint; pass --force"):
        convert.check_out_dir(tmp_path)
    convert.check_out_dir(tmp_path, force=True)


def test_config_of_another_model_kind_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"dit_xl2\.py' has no 'var', 'vqvae' section"):
        convert.convert("var", tmp_path / "missing.pth", tmp_path / "out",
                        config=str(convert.REPO_CONFIGS / "dit_xl2.py"))
    config = _write_config(tmp_path / "odd.py", {"model": {"hidden_size": 8, "wings": 2}})
    with pytest.raises(ValueError, match=r"does not describe a DiT.*unknown constructor argument\(s\) \['wings'\]"):
        convert.convert("dit", tmp_path / "missing.pth", tmp_path / "out", config=config)
    assert not (tmp_path / "out").exists()


def test_port_var_from_pth_matches_teacher_forcing(tmp_path, manifest):
    jax.config.update("jax_default_matmul_precision", "highest")
    var_ctor = {k: v for k, v in manifest["fixtures"]["var"]["ctor"].items() if k not in ("cls", "vae_local")}
    vq_ctor = {k: v for k, v in manifest["fixtures"]["vqvae"]["ctor"].items() if k != "cls"}
    config = _write_config(tmp_path / "var_fixture.py", {"var": var_ctor, "vqvae": vq_ctor})
    out = convert.convert("var", FIXTURES / "var_weights.pth", tmp_path / "var", config=config)
    model = convert.load_ported(out)
    io = read_safetensors(FIXTURES / "var_io.safetensors")
    x = read_safetensors(FIXTURES / "vqvae_io.safetensors")["x_BLCv_wo_first_l"]
    logits = np.asarray(model(io["label_B"], x))
    assert np.abs(logits - io["logits_tf"]).max() / np.abs(io["logits_tf"]).max() < 1e-4


def test_port_errors_are_clear(tmp_path, capsys, manifest):
    assert cli.main(["port", "dit", "--ckpt", str(FIXTURES / "dit_weights.pth"), "--out", str(tmp_path)]) == 2
    assert "--config" in capsys.readouterr().err
    ctor = {k: v for k, v in manifest["fixtures"]["dit"]["ctor"].items() if k != "cls"}
    ctor["depth"] += 1  # a config of another size: the extra block's keys are missing
    config = _write_config(tmp_path / "wrong.py", {"model": ctor})
    assert cli.main(["port", "dit", "--ckpt", str(FIXTURES / "dit_weights.pth"), "--config", config,
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and f"blocks.{ctor['depth'] - 1}." in err
    assert cli.main(["port", "dit", "--ckpt", str(tmp_path / "nope.pth"), "--config", config,
                     "--out", str(tmp_path / "o")]) == 2
    assert "nope.pth" in capsys.readouterr().err


def test_the_command_line_offers_every_kind():
    assert set(cli.PORT_KINDS) == set(convert.KINDS)


def test_lazy_table_kinds_agree_with_their_tables():
    """The LlamaGen/MAR kinds import their tables (and models) only when used; their default keys match the tables'."""
    import importlib
    import subprocess
    import sys

    code = ("import sys; from bitlaws.port import convert; "
            "print(any(m.startswith(('bitlaws.models.mar', 'bitlaws.models.llamagen')) for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip() == "False"
    for kind in ("mar", "mar_vae"):
        table = importlib.import_module(f"bitlaws.port.tables.{kind}")
        assert convert.KINDS[kind].default_key == table.DEFAULT_KEY
        assert convert.KINDS[kind].model_class() is table.model_class()
