"""`bitlaws ptq`: writes a loadable quantized checkpoint; bad input is one line on stderr and writes nothing.

A tiny random DiT written like a ``bitlaws port`` output stands in for a model (RTN needs no data); the variant
grammar of ``configs/ptq/demo.py`` is checked on its own.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from flax import nnx

import bitlaws
from bitlaws import checkpoint, cli, configlib
from bitlaws.models.common import random_model
from bitlaws.port.convert import KINDS

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "ptq" / "demo.py"
DIT_TINY = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
MLP = r"--set=module_path=blocks\.\d+\.mlp\.fc[12]"


@pytest.fixture(scope="module", name="ported")
def ported_fixture(tmp_path_factory) -> pathlib.Path:
    """A folder like ``bitlaws port dit`` writes (kind, ctor, orbax state)."""
    model = random_model(lambda: KINDS["dit"].build(DIT_TINY), seed=0)
    directory = tmp_path_factory.mktemp("port") / "dit-tiny"
    checkpoint.save_model(model, directory, {"kind": "dit", "ctor": DIT_TINY, "source": {"file": "x.pt"}})
    return directory


def _ptq(variant: str, out: pathlib.Path, *extra: str) -> int:
    return cli.main(["ptq", "--config", f"{CONFIG}:{variant}", MLP, "--out", str(out), *extra])


def _error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bitlaws ptq: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def _snapshot(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.is_dir()) for p in sorted(root.rglob("*"))}


def test_ptq_writes_a_checkpoint_that_loads_and_refuses_to_overwrite_without_force(ported, tmp_path, capsys):
    out = tmp_path / "w8"
    assert _ptq(f"{ported},W8A16,rtn", out) == 0
    summary = capsys.readouterr().out
    assert "W8A16 int  method rtn" in summary and "4 of 15 seam layers packed" in summary and str(out) in summary
    loaded = bitlaws.load_quantized(out)
    metadata = loaded.metadata
    assert metadata["model"]["source"]["type"] == "ported" and metadata["model"]["kind"] == "dit"
    assert metadata["method"] == {"name": "rtn", "params": {}, "seed": 0, "backend": "xla", "materialize": "packed"}
    assert metadata["setting"] == "W8A16" and metadata["calibration"] is None
    assert [r.weight.format.name for r in loaded.rules] == ["int8"]
    errors = json.loads((out / "layer_errors.json").read_text())["layers"]
    assert len(errors) == 4 and all(0 < e["weight_rel_error"] < 0.01 and e["output_proxy"] is None
                                    for e in errors.values())
    packed = [p for p, m in nnx.iter_modules(loaded.model) if getattr(m, "qkernel", None) is not None]
    assert len(packed) == 4

    before = _snapshot(tmp_path)
    assert _ptq(f"{ported},W4A16,rtn", out) == 2
    _error_line(capsys, str(out), "--force")
    assert _snapshot(tmp_path) == before

    assert _ptq(f"{ported},W4A16,rtn", out, "--force") == 0
    assert bitlaws.load_quantized(out).metadata["setting"] == "W4A16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w8"]  # no temporary folders left


BAD = {
    "two methods": ("{port},W4A16,gptq,rtn", ["'rtn' is not a setting", "already 'gptq'"]),
    "no fp3": ("{port},W3A16,fp", ["W3A16", "no 3-bit float format"]),
    "unknown method": ("{port},W4A16,gptz", ["unknown quantization method 'gptz'"]),
    "unknown hyper-parameter": ("{port},W4A16,rtn,alpha=0.5", ["'rtn' has no hyper-parameter(s) ['alpha']"]),
    "unknown member": ("var-d99,W4A16,rtn", ["var-d99"]),
    "ported model without data": ("{port},W4A16,gptq", ["method 'gptq' needs calibration data",
                                                         "calibration.data_fn"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configs_are_one_line_errors_and_write_nothing(case, ported, tmp_path, capsys):
    variant, needles = BAD[case]
    before = _snapshot(tmp_path)
    assert _ptq(variant.format(port=ported), tmp_path / "out") == 2
    _error_line(capsys, *needles)
    assert _snapshot(tmp_path) == before


def test_a_non_empty_folder_is_refused_even_with_force(ported, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep")
    assert _ptq(f"{ported},W8A16,rtn", tmp_path, "--force") == 2
    _error_line(capsys, "holds no quantized checkpoint", "notes.txt")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_variant_grammar():
    config = configlib.load_config(f"{CONFIG}:dit-d3,w8a8,smoothquant,g32,fp,alpha=0.6,runlocal")
    assert (config.model.source, config.setting, config.format, config.weight_group_size, config.method) == (
        "dit-d3", "W8A8", "fp", 32, "smoothquant")
    assert config.method_params.to_dict() == {"alpha": 0.6}
    assert (config.calibration.num_batches, config.calibration.batch_size) == (1, 8)
    default = configlib.load_config(f"{CONFIG}:var-d4")
    assert (default.setting, default.format, default.weight_group_size, default.method) == ("W4A16", "int", 0, "rtn")
    with pytest.raises(ValueError, match="needs a variant"):
        configlib.load_config(str(CONFIG))
    with pytest.raises(ValueError, match="the first item must be the model"):
        configlib.load_config(f"{CONFIG}:W4A16,var-d4")
