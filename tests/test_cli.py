"""The `bitlaws` console script."""

import subprocess
import sys

from bitlaws import cli


def test_help_lists_subcommands(capsys):
    try:
        cli.main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "formats" in capsys.readouterr().out


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
