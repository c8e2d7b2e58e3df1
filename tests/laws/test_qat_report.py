"""The report's distillation section on a synthetic sweep with known answers."""

from bitlaws.laws import fit, qat_report, report

SIZES = {"d2": 2e5, "d4": 4e5, "d8": 1.6e6, "d16": 6.4e6}
# Quantization penalty (relative metric increase) per (setting, method).
PENALTY = {("W4A16", "rtn"): 0.30, ("W3A16", "rtn"): 1.50, ("W8A8", "rtn"): 0.05, ("W4A8", "rtn"): 0.60,
           ("W4A16", "qat:topkld"): 0.05, ("W3A16", "qat:topkld"): 0.08, ("W4A8", "qat:topkld"): 0.10,
           ("W4A16", "qat:fkl"): 0.10, ("W3A16", "qat:fkl"): 0.90, ("W4A8", "qat:fkl"): 0.50,
           ("W4A16", "qat:rkl"): 0.04, ("W3A16", "qat:rkl"): 0.12, ("W4A8", "qat:rkl"): 0.08}


def _rows() -> list[dict]:
    rows = []
    for depth, params in SIZES.items():
        base = 300.0 * params ** -0.4 + 2.0
        rows.append(dict(key=f"var-{depth}|W16A16|none|none", model=f"var-{depth}", setting="W16A16",
                         format="none", method="none", fid=base, mt_bits=params * 16, ct_bits=params * 256))
        for (setting, method), penalty in PENALTY.items():
            w_bits, a_bits = (int(x) for x in setting[1:].split("A"))
            rows.append(dict(key=f"var-{depth}|{setting}|int|{method}", model=f"var-{depth}", setting=setting,
                             format="int", method=method, fid=base * (1 + penalty), mt_bits=params * w_bits,
                             ct_bits=params * w_bits * a_bits))
    return rows


def test_section_states_head_to_heads_and_crossings_from_the_data():
    lines = qat_report.qat_section(fit.cells_from_rows(_rows()), "FID")
    text = "\n".join(lines)
    assert "## Distillation" in text and "### VAR" in text
    assert "**qat:topkld** beats **qat:fkl**: lower in 12 of 12 (model, precision) cells" in text
    # rkl has the lower penalty at W4A16 and W4A8 (8 cells), topkld at W3A16 (4 cells).
    assert "**qat:topkld** does not beat **qat:rkl**: lower in 4 of 12" in text
    assert "* W3A16-int-qat:topkld moves past W4A16-int on MT" in text
    assert "* W3A16-int-qat:fkl does not move past W4A16-int on MT" in text
    assert "* W4A8-int-qat:topkld moves past W8A8-int on MT" in text
    # at equal model bits W3A16 has 4/3 the parameters: a 0.08 penalty still beats W4A16's 0.05, 0.90 not 0.10
    assert "* W3A16-int-qat:topkld moves past W4A16-int-qat:topkld on MT" in text
    assert "* W3A16-int-qat:fkl does not move past W4A16-int-qat:fkl on MT" in text


def test_no_qat_cells_no_section_and_the_report_includes_it(tmp_path):
    rows = [r for r in _rows() if not r["method"].startswith("qat:")]
    assert qat_report.qat_section(fit.cells_from_rows(rows), "FID") == []
    text = report.write_report(_rows(), tmp_path, n_boot=0).read_text()
    assert "## Distillation" in text and "| qat:fkl | qat:rkl | qat:topkld |" in text
