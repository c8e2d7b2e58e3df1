"""Interval-aware curve comparisons and family verdicts: positions the cells' noise does not settle are
"not resolved"."""

import json
import math

import numpy as np
import pytest

from bitlaws.laws import fit, pareto, report, uncertainty

SIZES = (1e4, 2e4, 4e4, 8e4, 1.6e5)
GAP = 0.7  # quantized curves at 0.7 x the W16A16 law at their own MT: lower-left, mean log ratio well below 0


def _fid(mt: float) -> float:
    return 50.0 * mt ** -0.3 + 1.0


def _rows(family="var", factors=None, rel_se=None, seeds=(0,), jitter=0.0):
    """W16A16 cells on FID = 50·MT^(−0.3) + 1 and quantized cells at `factor` × that law at their own MT.

    rel_se: each record's ``fid_interval`` se as a fraction of its metric (None: no interval). jitter: relative
    noise on each seed's metric (deterministic).
    """
    factors = {"W8A16": GAP, "W4A16": GAP} if factors is None else factors
    rng = np.random.default_rng(42)
    rows = []
    for depth, n in enumerate(SIZES):
        model = f"{family}-d{depth}"
        for setting, factor in {"W16A16": 1.0, **factors}.items():
            w_bits, a_bits = (int(v) for v in setting[1:].split("A"))
            fmt, method = ("none", "none") if setting == "W16A16" else ("int", "rtn")
            for seed in seeds:
                fid_value = _fid(w_bits * n) * factor * (1.0 + jitter * rng.standard_normal())
                row = dict(key=f"{model}|{setting}|{fmt}|{method}|s{seed}", model=model, setting=setting,
                           format=fmt, method=method, seed=seed, fid=fid_value, mt_bits=w_bits * n,
                           ct_bits=w_bits * n * a_bits, n_params=n)
                if rel_se is not None:
                    se = rel_se * fid_value
                    row["fid_interval"] = {"lo": fid_value - 1.96 * se, "hi": fid_value + 1.96 * se, "se": se,
                                           "level": 0.95, "groups": 50}
                rows.append(row)
    return rows


def _verdict(rows, family="var", x="mt_bits", **kwargs):
    cells = fit.cells_from_rows(rows)
    draws = uncertainty.metric_draws(cells, **kwargs)
    return pareto.verdicts(cells, fit.fit_all(cells, n_boot=0), x, draws=draws)[family]


def test_curves_far_apart_relative_to_the_cells_se_are_resolved_lower_left():
    result = _verdict(_rows(rel_se=0.01))
    assert result.verdict == "holds" and result.unresolved == 0 and result.n_draws == uncertainty.DEFAULT_DRAWS
    for c in result.comparisons:
        assert c.position == c.resolved_position == "lower-left" and c.resolved
        assert c.agreement == 1.0 and c.n_draws == uncertainty.DEFAULT_DRAWS
        low, high = c.log_ratio_interval
        assert low < c.mean_log_ratio < high < 0  # the gap's interval excludes 0
        assert c.mean_log_ratio == pytest.approx(math.log(GAP), abs=1e-6)
    assert result.explanation == ("on MT, 2 of 2 compared quantized curves keep their position in ≥ 95% of 200 "
                                  "draws of the cells' metrics: 2 lie lower-left of W16A16, 0 cross it and 0 lie "
                                  "upper-right; lower-left share 1.00 on the point fits")
    assert result.share_range == (1.0, 1.0)


def test_the_same_curves_with_huge_se_are_not_resolved():
    result = _verdict(_rows(rel_se=0.6))
    assert result.verdict == "not resolved" and result.unresolved == 2
    assert result.share_lower_left == 1.0 and result.share_range[0] < pareto.LOWER_LEFT_FRACTION
    for c in result.comparisons:
        assert c.position == "lower-left"  # the point fits still say so ...
        assert not c.resolved and c.resolved_position == "not resolved"  # ... but the draws do not settle it
        assert c.agreement < pareto.RESOLVED_AGREEMENT and len(c.possible) > 1 and c.possible[0] == "lower-left"
        assert sum(c.draw_shares.values()) == pytest.approx(1.0)
        low, high = c.log_ratio_interval
        assert low < 0 < high
    assert "0 of 2 compared quantized curves keep their position" in result.explanation
    assert "; not resolved: W8A16-int (lower-left or " in result.explanation
    # DiT's "do not lie lower-left" claim is not resolved either, rather than "does not hold".
    assert _verdict(_rows("dit", rel_se=0.6), "dit").verdict == "not resolved"
    assert _verdict(_rows("dit", rel_se=0.01), "dit").verdict == "does not hold"


def test_without_intervals_the_verdicts_are_the_point_fits_as_before():
    rows = _rows()
    cells = fit.cells_from_rows(rows)
    assert uncertainty.metric_draws(cells) is None  # nothing to draw: callers keep the old verdicts
    fits = fit.fit_all(cells, n_boot=0)
    for x in ("mt_bits", "ct_bits"):
        old = pareto.verdicts(cells, fits, x)
        assert repr(pareto.verdicts(cells, fits, x, draws=None)) == repr(old)
        result = old["var"]
        assert result.verdict == "holds" and result.unresolved == 0 and result.n_draws == 0
        assert all(c.n_draws == 0 and c.resolved and math.isnan(c.agreement) for c in result.comparisons)
        axis = "MT" if x == "mt_bits" else "CT"
        assert result.explanation == (f"on {axis}, 2 of 2 compared quantized curves lie lower-left of W16A16, 0 "
                                      "cross it and 0 lie upper-right (lower-left share 1.00)")


def test_draws_are_deterministic_and_independent_of_row_order():
    rows = _rows(rel_se=0.2)
    cells = fit.cells_from_rows(rows)
    first = uncertainty.metric_draws(cells, seed=3)
    again = uncertainty.metric_draws(fit.cells_from_rows(rows[::-1]), seed=3)
    assert first.values.keys() == again.values.keys() and first.independent == len(rows) and first.paired == 0
    assert all(np.array_equal(first.values[k], again.values[k]) for k in first.values)
    other = uncertainty.metric_draws(cells, seed=4)
    assert not np.array_equal(first.values[rows[0]["key"]], other.values[rows[0]["key"]])
    fits = fit.fit_all(cells, n_boot=0)
    assert repr(pareto.verdicts(cells, fits, draws=first)) == repr(pareto.verdicts(cells, fits, draws=again))
    with pytest.raises(ValueError, match="n_draws"):
        uncertainty.metric_draws(cells, n_draws=0)
    with pytest.raises(ValueError, match="appears more than once"):
        uncertainty.metric_draws(cells + cells[:1])


def test_several_seeds_per_cell_act_as_their_mean():
    """Four records per cell with se s each pin a curve down like one record with se s/2 (the se of the mean)."""
    one = _verdict(_rows(rel_se=0.1))
    four = _verdict(_rows(rel_se=0.2, seeds=(0, 1, 2, 3)))
    for a, b in zip(one.comparisons, four.comparisons):
        width_one = a.log_ratio_interval[1] - a.log_ratio_interval[0]
        width_four = b.log_ratio_interval[1] - b.log_ratio_interval[0]
        assert width_four == pytest.approx(width_one, rel=0.25)
    # Seeds scattering around the law (as real seeds do) still average out to the same verdict.
    assert _verdict(_rows(rel_se=0.02, seeds=(0, 1, 2, 3), jitter=0.02)).verdict == "holds"


def test_cell_se_falls_back_to_the_interval_width():
    (row,) = [r for r in _rows(rel_se=0.1) if r["key"].startswith("var-d0|W16A16")]
    cell = fit.cells_from_rows([row])[0]
    assert uncertainty.cell_se(cell) == pytest.approx(0.1 * row["fid"])
    del row["fid_interval"]["se"]
    row["fid_interval"]["level"] = 0.9
    expected = (row["fid_interval"]["hi"] - row["fid_interval"]["lo"]) / (2 * 1.6448536)
    assert uncertainty.cell_se(fit.cells_from_rows([row])[0]) == pytest.approx(expected, rel=1e-6)
    del row["fid_interval"]
    assert uncertainty.cell_se(fit.cells_from_rows([row])[0]) is None


def test_stored_replicates_keep_the_noise_a_quantized_cell_shares_with_its_float_cell(tmp_path):
    """Replicates that move together (here: every cell's, as if all shared one sample set's noise) keep the
    curves moving together: drawn jointly, a gap of 10% is resolved; drawn independently from the same (large)
    se, it is not. (Only noise shared across *models* helps a curve comparison: at equal MT a quantized cell
    faces the float cell of a smaller model.)"""
    rows = _rows(factors={"W8A16": 0.9, "W4A16": 0.9})
    deviation = np.random.default_rng(0).standard_normal(50) * 0.15 / math.sqrt(49)  # [G] relative, shared
    for row in rows:
        replicates = row["fid"] * (1.0 + deviation)
        se = float(np.sqrt(49 / 50 * np.sum((replicates - replicates.mean()) ** 2)))
        row["fid_interval"] = {"lo": row["fid"] - 1.96 * se, "hi": row["fid"] + 1.96 * se, "se": se, "level": 0.95,
                               "groups": 50}
        row["features_file"] = f"features/{row['key'].replace('|', '_')}.npz"
        (tmp_path / row["features_file"]).parent.mkdir(exist_ok=True)
        np.savez(tmp_path / row["features_file"], features=np.zeros((2, 2), np.float32), replicates=replicates)
    paired = _verdict(rows, root=tmp_path)
    independent = _verdict(rows)  # no root: no replicates read, each cell drawn from its own se
    assert paired.verdict == "holds" and paired.unresolved == 0
    assert independent.verdict == "not resolved"
    cells = fit.cells_from_rows(rows)
    assert uncertainty.metric_draws(cells, root=tmp_path).paired == len(rows)
    for c in paired.comparisons:
        assert c.log_ratio_interval[1] < 0 and c.mean_log_ratio == pytest.approx(math.log(0.9), abs=1e-6)
    # Two seeds' samples are independent: the same replicates give the same draws within a seed, not across.
    two = [dict(r, key=r["key"] + "|b", seed=1) for r in rows]
    draws = uncertainty.metric_draws(fit.cells_from_rows(rows + two), root=tmp_path)
    ratio = {key: draws.values[key] / row["fid"] for row in rows + two for key in [row["key"]]}
    np.testing.assert_allclose(ratio[rows[0]["key"]], ratio[rows[1]["key"]])
    assert not np.allclose(ratio[rows[0]["key"]], ratio[two[0]["key"]])
    # A file that cannot be read leaves its cell to its interval's se.
    (tmp_path / rows[0]["features_file"]).write_bytes(b"not an npz")
    draws = uncertainty.metric_draws(cells, root=tmp_path)
    assert (draws.paired, draws.independent) == (len(rows) - 1, 1)


@pytest.mark.parametrize("floor", [0.0, 1.0])
def test_batched_refits_match_fit_power_law(floor):
    rng = np.random.default_rng(int(floor))
    x = np.repeat(np.geomspace(1e5, 2e6, 5), 2)
    y = (50.0 * x ** -0.3 + floor) * np.exp(0.02 * rng.standard_normal(x.size))
    point = fit.fit_power_law(x, y)
    draws = y * np.exp(0.05 * rng.standard_normal((40, x.size)))  # [B, n]
    refits = uncertainty.refit_curve(point, x, draws)
    grid = np.geomspace(x.min(), x.max(), 30)
    expected = np.stack([fit.fit_power_law(x, row).predict(grid) for row in draws])  # [B, G]
    np.testing.assert_allclose(refits.predict(grid), expected, rtol=1e-4)
    two = fit.fit_power_law(x[:4], y[:4])  # 2 distinct x: a log-log line per draw
    np.testing.assert_allclose(uncertainty.refit_curve(two, x[:4], draws[:, :4]).predict(grid),
                               np.stack([fit.fit_power_law(x[:4], row).predict(grid) for row in draws[:, :4]]),
                               rtol=1e-9)
    assert uncertainty.refit_curve(fit.fit_power_law(x[:2], y[:2]), x[:2], draws[:, :2]) is None  # a constant


def _comparison(series, position, **shares):
    return pareto.SeriesComparison(series, (1.0, 2.0), 1.0 if position == "lower-left" else 0.0, -0.1, position,
                                   (-0.2, 0.1), {p.replace("_", "-"): v for p, v in shares.items()}, 200)


def test_family_verdict_stands_only_when_every_possible_position_gives_it():
    resolved = [_comparison("W8A16-int", "lower-left", lower_left=1.0),
                _comparison("W4A16-int", "lower-left", lower_left=0.97, crossing=0.03)]
    # Not resolved, but only between upper-right and crossing: the share is 2/3 to 5/6 either way.
    near = _comparison("W3A16-int", "upper-right", upper_right=0.6, crossing=0.4)
    assert near.possible == ("crossing", "upper-right") and not near.resolved
    result = pareto.family_verdict("var", resolved + [near])
    assert result.verdict == "holds" and result.unresolved == 1
    assert result.share_range == pytest.approx((2 / 3, 5 / 6)) and result.share_lower_left == pytest.approx(2 / 3)
    assert "2 of 3 compared quantized curves keep their position" in result.explanation
    assert "; not resolved: W3A16-int (crossing or upper-right); lower-left share 0.67 on the point fits, 0.67 to " \
           "0.83 over the positions the draws allow" in result.explanation
    # A curve that may lie either side moves the share across 2/3: not resolved.
    either = _comparison("W4A8-int", "lower-left", lower_left=0.9, upper_right=0.1)
    assert pareto.family_verdict("var", resolved + [near, either]).verdict == "not resolved"
    assert pareto.family_verdict("dit", resolved + [near, either]).verdict == "not resolved"
    assert pareto.family_verdict("sd", resolved + [near, either]).verdict == "no claim"
    # Draws under 5% do not keep a position possible.
    rare = _comparison("W4A8-int", "lower-left", lower_left=0.94, upper_right=0.04)
    assert rare.possible == ("lower-left",) and not rare.resolved


def _report_verdicts(rows, tmp_path, **kwargs):
    text = report.write_report(rows, tmp_path, n_boot=0, **kwargs).read_text()
    return text[text.index("## Verdict"):text.index("\n## ", text.index("## Verdict") + 3)]


def test_report_shows_per_curve_resolution_and_the_log_ratio_interval(tmp_path):
    section = _report_verdicts(_rows(rel_se=0.6), tmp_path / "wide")
    assert "How sure: every cell's metric is redrawn 200 times (seed 0)" in section
    assert "15 cells independently from their interval's standard error" in section
    assert "Result on MT: **not resolved**" in section
    assert "| precision | position (point fits) | MT range lower | mean log ratio | 95% interval | positions in the " \
           "draws | resolved |" in section
    assert section.count("| **not resolved** |") == 2 and "| W8A16-int | lower-left | 100% | -0.357 | [-" in section
    tight = _report_verdicts(_rows(rel_se=0.01), tmp_path / "tight")
    assert "Result on MT: **holds**" in tight and tight.count("| lower-left 100% | yes |") == 2


def test_report_without_intervals_or_draws_keeps_the_old_verdict_text(tmp_path):
    old = _report_verdicts(_rows(), tmp_path / "old")
    assert "How sure" not in old and "| resolved |" not in old
    assert "Per curve on MT: W8A16-int: lower-left (100% of range lower); W4A16-int: lower-left (100% of range " \
           "lower)." in old
    assert _report_verdicts(_rows(rel_se=0.6), tmp_path / "off", n_draws=0) == old
    keyless = [{k: v for k, v in row.items() if k != "key"} for row in _rows()]  # no interval: keys not needed
    assert _report_verdicts(keyless, tmp_path / "keyless") == old


def test_report_of_a_results_folder_reads_stored_replicates(tmp_path):
    rows = _rows(rel_se=0.05)
    for row in rows:
        row["features_file"] = f"features/{row['key'].replace('|', '_')}.npz"
        (tmp_path / "features").mkdir(exist_ok=True)
        np.savez(tmp_path / row["features_file"], features=np.zeros((2, 2), np.float32),
                 replicates=row["fid"] * (1 + 0.05 * np.linspace(-1, 1, 50) / 4))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report.analyze(tmp_path, tmp_path / "out", n_boot=0).report.read_text()
    assert "15 cells jointly from their stored jackknife replicates" in text
    assert "Result on MT: **holds**" in text
