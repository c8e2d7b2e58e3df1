"""The `bitlaws` console script."""

import pathlib
import subprocess
import sys

from bitlaws import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_help_lists_subcommands(capsys):
    try:
        cli.main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for command in ("formats", "port", "sweep", "report", "advise", "train", "eval"):
        assert command in out


def _help(capsys, *command: str) -> str:
    try:
        cli.main([*command, "--help"])
    except SystemExit as e:
        assert e.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_states_the_rules_the_commands_check(capsys):
    assert "a positive multiple of 128" in _help(capsys, "formats")
    port = _help(capsys, "port")
    assert "--force" in port and "any other non-empty directory is refused, even with --force" in port
    assert "N >= 1" in _help(capsys, "sweep")
    assert "bootstrap resamples, >= 0" in _help(capsys, "report")


def test_formats_table_small(capsys):
    assert cli.main(["formats", "--size", "256", "--formats", "int4", "fp4_e2m1", "mxfp4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line and line.split()[0] in
             ("int4", "fp4_e2m1", "mxfp4")}
    assert lines["int4"][1:4] == ["4.00", "16", "7"]
    assert lines["fp4_e2m1"][1:4] == ["4.00", "15", "6"]
    assert lines["mxfp4"][1:4] == ["4.25", "15", "6"] and lines["mxfp4"][4:6] == ["-", "-"]
    # Per group error < per channel < per tensor for int4 on Gaussian data.
    tensor, channel, group = map(float, lines["int4"][4:7])
    assert group < channel < tensor < 0.3


def test_bad_format_is_a_clear_error(capsys):
    assert cli.main(["formats", "--size", "256", "--formats", "int17"]) == 2
    assert "valid formats" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "bitlaws.cli", "--help"], capture_output=True, text=True, check=True)
    assert "formats" in out.stdout


def test_sweep_and_report_through_the_cli(tmp_path, capsys):
    out = tmp_path / "toy"
    args = ["sweep", "--config", f"{REPO}/configs/sweeps/toy.py:small", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 10
    assert cli.main(args) == 0  # resumes: nothing left to do
    assert "0 now" in capsys.readouterr().out
    assert cli.main(["train", "--config", f"{REPO}/configs/sweeps/toy.py"]) == 2  # not a trainable family
    assert "trainable families" in capsys.readouterr().err


def test_eval_fid_without_inception_weights_says_what_to_download(tmp_path, capsys):
    import numpy as np  # pylint: disable=g-import-not-at-top

    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    assert cli.main(["eval", "fid", "--samples", str(samples), "--ref", str(samples), "--inception", str(missing),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "BITLAWS_FID_INCEPTION" in err


def test_train_dispatches_on_family_and_resumes(tmp_path, capsys):
    args = ["train", "--config", f"{REPO}/configs/demo/dit.py:depth=2,quick", "--out", str(tmp_path / "dit")]
    assert cli.main(args) == 0
    assert "trained dit" in capsys.readouterr().out
    assert (tmp_path / "dit" / "model" / "bitlaws.json").exists()
