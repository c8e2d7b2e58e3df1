"""Reading results.jsonl for the laws: read-only, cut-off tails skipped with a notice, other problems named."""

import json

import pytest

from bitlaws.laws import read_results, report

ROWS = [dict(key=f"var-{depth}|{setting}|{fmt}|rtn", model=f"var-{depth}", setting=setting, format=fmt, method="rtn",
             fid=400.0 * params ** -0.4 * bits ** -0.2 + 2.0, mt_bits=params * bits, ct_bits=params * bits * 16)
        for depth, params in (("d2", 2e5), ("d4", 4e5), ("d8", 1.6e6))
        for setting, fmt, bits in (("W16A16", "none", 16), ("W4A16", "int", 4))]


def _write(tmp_path, tail: bytes):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS) + tail)
    return path


def test_a_cut_off_last_line_is_skipped_with_a_notice_and_the_file_is_untouched(tmp_path):
    path = _write(tmp_path, b'{"key": "var-d8|W8A16')
    data = path.read_bytes()
    read = read_results(tmp_path)
    assert read.path == path and len(read.rows) == len(ROWS)
    assert len(read.notices) == 1 and read.notices[0].startswith(f"{path}:7: skipped the unreadable last line")
    assert path.read_bytes() == data
    assert read_results(_write(tmp_path, b"")).notices == ()
    assert len(read_results(_write(tmp_path, b'{"key": "x", "fid": 1}')).rows) == len(ROWS) + 1  # complete record


@pytest.mark.parametrize("line,message", [
    (b"null", r"results\.jsonl:3: results line is null, not a JSON object"),
    (b"[1, 2]", r"results\.jsonl:3: results line is an array, not a JSON object"),
    (b'"text"', r"results\.jsonl:3: results line is a string"),
    (b'{"key": "a", "fid": \xff}', r"results\.jsonl:3: results line is not UTF-8 text \(byte 21 of the line"),
    (b"{broken", r"results\.jsonl:3: corrupt results line"),
])
def test_other_unreadable_lines_are_errors_naming_file_and_line(tmp_path, line, message):
    rows = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS[:2])
    (tmp_path / "results.jsonl").write_bytes(rows + line + b"\n" + rows)
    with pytest.raises(ValueError, match=message):
        read_results(tmp_path)


def test_a_non_object_last_line_without_newline_is_an_error_too(tmp_path):
    _write(tmp_path, b"null")  # parses: not a cut-off record
    with pytest.raises(ValueError, match="results line is null"):
        read_results(tmp_path / "results.jsonl")


def test_analyze_reports_what_it_skipped(tmp_path):
    path = _write(tmp_path, b'{"key": "var-d8|W8A16')
    outputs = report.analyze(tmp_path, n_boot=0)
    assert outputs.notices and f"{path}:7" in outputs.notices[0]
    assert f"* Skipped: {path}:7: skipped the unreadable last line" in outputs.report.read_text()


def test_analyze_checks_its_arguments_before_writing(tmp_path):
    _write(tmp_path, b"")
    with pytest.raises(ValueError, match="n_boot"):
        report.analyze(tmp_path, n_boot=-1)
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ValueError, match="is an existing file"):
        report.analyze(tmp_path, tmp_path / "out", n_boot=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "results.jsonl"]
