"""Every error a user can provoke on the command line: exit status 2, one line on stderr, nothing written.

Each command runs as a subprocess (what a user sees, tracebacks included); the folders it could write to are
compared before and after (names, bytes and modification times).
"""

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
DIT_WEIGHTS = FIXTURES / "dit_weights.safetensors"
TOY = REPO / "configs" / "sweeps" / "toy.py"
DEMO = REPO / "configs" / "sweeps" / "demo.py"


def run(*args, module: str = "bitlaws.cli", cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300, check=False)


def error_line(proc: subprocess.CompletedProcess, prefix: str, *needles: str, status: int = 2) -> str:
    """Asserts the one-line error form and returns the line."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prefix}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(root: pathlib.Path) -> dict:
    """Every path under `root` (and `root` itself) with its kind, size, mtime and bytes."""
    if not root.exists():
        return {}
    paths = [root, *sorted(root.rglob("*"))]
    return {str(p.relative_to(root.parent)): (p.is_dir(), p.stat().st_mtime_ns, None if p.is_dir() else p.read_bytes())
            for p in paths}


# ------------------------------------------------------------------------------------------------- port

def test_port_config_with_a_syntax_error(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("def get_config(:\n    pass\n")
    before = snapshot(tmp_path)
    proc = run("port", "dit", "--ckpt", DIT_WEIGHTS, "--config", config, "--out", tmp_path / "out")
    error_line(proc, "bitlaws port", "broken.py", "syntax error", "line 1")
    assert snapshot(tmp_path) == before


def test_port_dit_with_a_var_config(tmp_path):
    proc = run("port", "dit", "--ckpt", DIT_WEIGHTS, "--config", REPO / "configs/models/var_d16.py",
               "--out", tmp_path / "out")
    error_line(proc, "bitlaws port", "var_d16.py", "'model'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", ["existing.bin", "existing.bin/sub"])
def test_port_out_naming_an_existing_file(tmp_path, out):
    (tmp_path / "existing.bin").write_bytes(b"keep me")
    before = snapshot(tmp_path)
    proc = run("port", "dit", "--ckpt", DIT_WEIGHTS, "--config", REPO / "configs/models/dit_xl2.py",
               "--out", tmp_path / out)
    error_line(proc, "bitlaws port", "existing.bin", "existing file")
    assert snapshot(tmp_path) == before


def _fake_port(folder: pathlib.Path) -> None:
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "data").write_bytes(b"\x00" * 16)
    (folder / "bitlaws.json").write_text(json.dumps({"kind": "dit", "ctor": {}}))


def test_port_into_an_earlier_port_needs_force_and_is_checked_before_the_checkpoint(tmp_path):
    _fake_port(tmp_path / "port")
    before = snapshot(tmp_path)
    # The checkpoint does not exist: the folder error must come first.
    proc = run("port", "dit", "--ckpt", tmp_path / "missing.pt", "--config", REPO / "configs/models/dit_xl2.py",
               "--out", tmp_path / "port")
    error_line(proc, "bitlaws port", str(tmp_path / "port"), "already holds", "'dit'", "--force")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("force", [False, True])
def test_port_into_an_unrelated_non_empty_folder_is_refused_even_with_force(tmp_path, force):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a port")
    before = snapshot(tmp_path)
    proc = run("port", "dit", "--ckpt", tmp_path / "missing.pt", "--config", REPO / "configs/models/dit_xl2.py",
               "--out", tmp_path / "mine", *(["--force"] if force else []))
    error_line(proc, "bitlaws port", str(tmp_path / "mine"), "notes.txt", "not empty")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------- verify

def test_verify_a_missing_folder(tmp_path):
    proc = run(tmp_path / "nowhere", module="bitlaws.port.verify")
    error_line(proc, "python -m bitlaws.port.verify", "nowhere", "not found")


def test_verify_a_manifest_without_fixtures_fails(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"fixtures": {}}))
    proc = run(tmp_path, module="bitlaws.port.verify")
    assert proc.returncode != 0
    error_line(proc, "python -m bitlaws.port.verify", "manifest.json", "nothing was checked")
    assert "passed" not in proc.stdout


# ----------------------------------------------------------------------------------------------- report

def _rows() -> list[dict]:
    """A small sweep that fits: one family, three sizes, float and W4."""
    rows = []
    for depth, params in (("d2", 2e5), ("d4", 4e5), ("d8", 1.6e6)):
        for setting, fmt, w_bits in (("W16A16", "none", 16), ("W4A16", "int", 4)):
            fid = 400.0 * params ** -0.4 * w_bits ** -0.2 + 2.0
            rows.append(dict(key=f"var-{depth}|{setting}|{fmt}|rtn", model=f"var-{depth}", setting=setting, format=fmt,
                             method="rtn", fid=fid, mt_bits=params * w_bits, ct_bits=params * w_bits * 16))
    return rows


def _results(folder: pathlib.Path, tail: bytes) -> pathlib.Path:
    folder.mkdir()
    path = folder / "results.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in _rows()) + tail)
    return path


@pytest.mark.parametrize("line,kind", [(b"null", "null"), (b"[1, 2]", "an array"), (b"\xff\xfe{}", "UTF-8")])
def test_report_on_a_line_that_is_not_a_record(tmp_path, line, kind):
    path = _results(tmp_path / "sweep", line + b"\n" + json.dumps(_rows()[0]).encode() + b"\n")
    before = snapshot(tmp_path)
    proc = run("report", "--results", tmp_path / "sweep", "--n-boot", "0")
    error_line(proc, "bitlaws report", f"{path}:7", kind)
    assert snapshot(tmp_path) == before


def test_report_names_the_cut_off_last_line_it_skips_and_leaves_the_file_alone(tmp_path):
    path = _results(tmp_path / "sweep", b'{"key": "var-d8|W8A16|int|rtn", "fi')
    data, mtime = path.read_bytes(), path.stat().st_mtime_ns
    proc = run("report", "--results", tmp_path / "sweep", "--n-boot", "0")
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if "notice" in line]
    assert len(notices) == 1 and f"{path}:7" in notices[0] and "Traceback" not in proc.stderr
    assert f"{path}:7" in (tmp_path / "sweep" / "report.md").read_text()
    assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
    assert not (tmp_path / "sweep" / "results.jsonl.corrupt").exists()


def test_report_rejects_a_negative_n_boot_before_writing(tmp_path):
    _results(tmp_path / "sweep", b"")
    before = snapshot(tmp_path)
    error_line(run("report", "--results", tmp_path / "sweep", "--n-boot", "-5"), "bitlaws report", "--n-boot", "-5")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("size", ["0", "-128", "100"])
def test_formats_size_must_be_a_positive_multiple_of_128(size):
    error_line(run("formats", "--size", size, "--no-progress"), "bitlaws formats", "--size", "128", size)


def test_formats_names_every_unknown_format():
    error_line(run("formats", "--size", "128", "--formats", "int4", "int17", "fp5", "--no-progress"),
               "bitlaws formats", "'int17'", "'fp5'", "valid formats")


# ------------------------------------------------------------------------------------------------ sweep

def test_sweep_rejects_zero_workers_before_creating_the_folder(tmp_path):
    error_line(run("sweep", "--config", TOY, "--out", tmp_path / "out", "--workers", "0", "--no-progress"),
               "bitlaws sweep", "--workers", "0")
    assert not (tmp_path / "out").exists()


def test_sweep_rejects_an_unknown_config_argument(tmp_path):
    line = error_line(run("sweep", "--config", f"{DEMO}:bogus", "--out", tmp_path / "out", "--no-progress"),
                      "bitlaws sweep", "'bogus'", "quick", "n_per_class")
    assert "demo.py:bogus" in line
    assert not (tmp_path / "out").exists()


def test_sweep_rejects_a_group_size_the_demo_layers_cannot_take(tmp_path):
    proc = run("sweep", "--config", f"{DEMO}:quick", "--set", "quant.weight_group_size=7", "--out", tmp_path / "out",
               "--no-progress")
    error_line(proc, "bitlaws sweep", "group_size=7", "var-d1|", "blocks.0.")
    assert not (tmp_path / "out").exists()


def test_sweep_group_size_check_runs_before_anything_is_written_in_an_existing_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}\n")
    (out / "results.jsonl").write_text(json.dumps({"key": "mlp-w16-d2|W16A16|none|none|s0", "fid": 0.0}) + "\n")
    before = snapshot(tmp_path)
    proc = run("sweep", "--config", f"{TOY}:small", "--set", "quant.weight_group_size=7", "--out", out, "--no-progress")
    error_line(proc, "bitlaws sweep", "group_size=7", "mlp-w16-d2|W8A16", "layers.0")
    assert snapshot(tmp_path) == before


def test_sweep_rejects_a_negative_group_size(tmp_path):
    proc = run("sweep", "--config", f"{TOY}:small", "--set", "quant.weight_group_size=-8", "--out", tmp_path / "out",
               "--no-progress")
    error_line(proc, "bitlaws sweep", "quant.weight_group_size", "-8")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- eval

def test_eval_checks_the_samples_before_the_inception_weights(tmp_path):
    proc = run("eval", "fid", "--samples", tmp_path / "nope.npz", "--ref", tmp_path / "nope.npz",
               "--inception", tmp_path / "missing.pth")
    line = error_line(proc, "bitlaws eval fid", "--samples", "nope.npz")
    assert "Inception" not in line


def test_eval_missing_weights_say_which_flag_to_use(tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    line = error_line(run("eval", "fid", "--samples", samples, "--ref", samples, "--inception", tmp_path / "w.pth"),
                      "bitlaws eval fid", "--inception FILE", "w.pth", "BITLAWS_FID_INCEPTION")
    assert "path=" not in line


def test_eval_nchw_samples_report_their_stored_shape(tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((4, 3, 32, 32), np.uint8))
    before = snapshot(tmp_path)
    proc = run("eval", "stats", "--samples", samples, "--out", tmp_path / "ref.npz",
               "--inception", tmp_path / "missing.pth")
    error_line(proc, "bitlaws eval stats", "samples.npz", "(4, 3, 32, 32)", "NCHW")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- version

def test_version():
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"bitlaws {importlib.metadata.version('bitlaws')}"
