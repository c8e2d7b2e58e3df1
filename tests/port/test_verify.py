"""The parity tool itself: pass, fail on a perturbed reference, skip unknown fixtures."""

import json
import pathlib
import shutil

import numpy as np

from bitlaws.port import read_safetensors, verify, write_safetensors

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
SDVAE_FILES = ["sdvae_io.safetensors", "sdvae_weights.safetensors", "sdvae_config.json",
               "sdvae_weights_manifest.json"]


def _folder(tmp_path, extra_fixtures=None):
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    manifest["fixtures"] = {"sdvae": manifest["fixtures"]["sdvae"], **(extra_fixtures or {})}
    for name in SDVAE_FILES:
        shutil.copy(FIXTURES / name, tmp_path / name)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_passes_and_skips_unknown_fixtures(tmp_path, capsys):
    folder = _folder(tmp_path, {"future_model": {"ctor": {"cls": "models.future.Model"}}})
    assert verify.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "skip future_model" in out and "ok   sdvae/decoded" in out and "5 passed, 0 failed" in out


def test_fails_on_a_perturbed_reference(tmp_path, capsys):
    folder = _folder(tmp_path)
    io = read_safetensors(folder / "sdvae_io.safetensors")
    io["decoded"] = io["decoded"] + np.float32(1e-2) * np.abs(io["decoded"]).max()
    write_safetensors(folder / "sdvae_io.safetensors", io)
    assert verify.main([str(folder)]) == 1
    assert "FAIL sdvae/decoded" in capsys.readouterr().out


def test_compare_integers_exactly():
    assert verify.compare("x", "idx", np.array([1, 2]), np.array([1, 2])).passed()
    assert not verify.compare("x", "idx", np.array([1, 3]), np.array([1, 2])).passed()
    assert not verify.compare("x", "f", np.zeros((2, 2)), np.zeros((2, 3))).passed()


def test_nothing_checked_is_an_error(tmp_path, capsys):
    folder = _folder(tmp_path, {"future_model": {"ctor": {"cls": "models.future.Model"}}})
    manifest = json.loads((folder / "manifest.json").read_text())
    assert verify.main([str(folder), "--only", "var", "dit"]) == 2  # the manifest lists neither
    err = capsys.readouterr().err
    assert "--only var dit" in err and "lists none of them" in err and "nothing was checked" in err
    del manifest["fixtures"]["sdvae"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert verify.main([str(folder)]) == 2  # only a fixture this version has no check for
    captured = capsys.readouterr()
    assert "skip future_model" in captured.out and "nothing was checked" in captured.err and "passed" not in captured.out


def test_unreadable_manifest_and_missing_folder(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{not json")
    assert verify.main([str(tmp_path)]) == 2
    assert "manifest.json is not valid JSON" in capsys.readouterr().err
    assert verify.main([str(tmp_path / "nowhere")]) == 2
    assert f"fixture folder {tmp_path / 'nowhere'} not found" in capsys.readouterr().err
