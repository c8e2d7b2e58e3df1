"""The report's per-method tables (the paper's PTQ tables) and per-method verdicts on a synthetic sweep."""

from bitlaws.laws import fit, methods_report, report

SIZES = {"d2": 2e5, "d4": 4e5, "d8": 1.6e6}
METHOD_FACTOR = {"rtn": 1.0, "gptq": 0.5, "worse": 2.0}  # multiplies the quantization penalty


def _rows() -> list[dict]:
    rows = []
    for family, penalty_exp in (("var", 0.2), ("dit", 0.9)):
        for depth, params in SIZES.items():
            base = 300.0 * params ** -0.4 + 2.0
            rows.append(dict(key=f"{family}-{depth}|W16A16|none|none", model=f"{family}-{depth}", setting="W16A16",
                             format="none", method="none", fid=base, mt_bits=params * 16, ct_bits=params * 256))
            for setting, w_bits in (("W4A16", 4), ("W3A16", 3)):
                for method, factor in METHOD_FACTOR.items():
                    fid = base * (1 + factor * penalty_exp * (16 / w_bits - 1) / 4)
                    rows.append(dict(key=f"{family}-{depth}|{setting}|int|{method}", model=f"{family}-{depth}",
                                     setting=setting, format="int", method=method, fid=fid, mt_bits=params * w_bits,
                                     ct_bits=params * w_bits * 16))
    return rows


def test_tables_bold_the_best_and_count_wins_over_rtn():
    cells = fit.cells_from_rows(_rows())
    lines = methods_report.method_tables(cells, "FID")
    text = "\n".join(lines)
    assert "## Methods" in text and "**W4A16-int**" in text and "**W3A16-int**" in text
    header = next(line for line in lines if line.startswith("| model |"))
    assert header == "| model | rtn | gptq | worse |"  # RTN, the paper's order, then by name
    row = next(line for line in lines if line.startswith("| var-d2 |"))
    assert row.split("|")[3].strip().startswith("**")  # gptq is the best of the row
    assert "**gptq** beats RTN in 6 of 6 comparable cells: better than RTN on most" in text
    assert "**worse** beats RTN in 0 of 6 comparable cells: not better than RTN on most" in text
    assert "Bit-level verdict on MT per method" in text


def test_ratio_table_gives_the_geometric_mean_ratio_to_rtn_per_precision():
    rows = _rows()
    rows[-1] = dict(rows[-1], fid=float("nan"))  # dit-d8 W3A16 'worse': not finite, left out of the ratio
    lines = methods_report.method_tables(fit.cells_from_rows(rows), "FID")
    by = {(r["model"], r["setting"], r["method"]): r["fid"] for r in rows}
    first_dit = next(i for i, line in enumerate(lines) if line == "### DiT")
    for family, part in (("var", lines[:first_dit]), ("dit", lines[first_dit:])):
        assert any(line.startswith("Relative to RTN: geometric mean") for line in part)
        for setting in ("W4A16", "W3A16"):
            row = next(line for line in part if line.startswith(f"| {setting}-int |")).split("|")[2:4]
            for method, entry in zip(("gptq", "worse"), row):
                ratios = [by[(f"{family}-{d}", setting, method)] / by[(f"{family}-{d}", setting, "rtn")]
                          for d in SIZES if by[(f"{family}-{d}", setting, method)] == by[(f"{family}-{d}", setting,
                                                                                              method)]]
                mean = 1.0
                for r in ratios:
                    mean *= r ** (1 / len(ratios))
                wins = sum(r < 1 for r in ratios)
                assert entry.strip() == f"{mean:.2f} ({wins}/{len(ratios)})", (family, setting, method, entry)
    dit_w3 = next(line for line in lines[first_dit:] if line.startswith("| W3A16-int |"))
    assert dit_w3.split("|")[3].strip().endswith("(0/2)")  # the NaN cell is not counted


def test_single_method_sweeps_get_no_method_section(tmp_path):
    rows = [r for r in _rows() if r["method"] in ("rtn", "none")]
    assert methods_report.method_tables(fit.cells_from_rows(rows), "FID") == []
    path = report.write_report(rows, tmp_path, n_boot=0)
    assert "## Methods" not in path.read_text()
    path = report.write_report(_rows(), tmp_path, n_boot=0)
    assert "## Methods (the paper's PTQ and distillation tables)" in path.read_text()


def test_several_seeds_per_cell_are_averaged_not_overwritten():
    """Two seeds of every cell: the tables show the mean over seeds (before, the last seed read won)."""
    rows = []
    for row in _rows():
        for seed, scale in ((0, 0.9), (1, 1.1)):
            rows.append(dict(row, key=f"{row['key']}|s{seed}", seed=seed, fid=row["fid"] * scale))
    cells = fit.cells_from_rows(rows)
    means = fit.mean_over_seeds(cells)
    one = fit.mean_over_seeds(fit.cells_from_rows(_rows()))
    assert means.keys() == one.keys() and all(abs(means[k] - one[k]) < 1e-9 * one[k] for k in one)
    assert methods_report.method_tables(cells, "FID") == methods_report.method_tables(fit.cells_from_rows(_rows()),
                                                                                       "FID")
