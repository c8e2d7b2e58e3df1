"""Pareto choices and the lower-left verdict on hand-made rows."""

import numpy as np
import pytest

from bitlaws.laws import fit, pareto

SIZES = (1e4, 2e4, 4e4, 8e4, 1.6e5)


def _rows(family: str, quantized_factor: dict) -> list[dict]:
    """W16A16 cells on FID = 50·MT^(−0.3) + 1 and quantized cells at `factor` × that curve at their own MT."""
    rows = []
    for depth, n in enumerate(SIZES):
        model = f"{family}-d{depth}"
        rows.append(dict(key=f"{model}|W16A16", model=model, setting="W16A16", format="none", method="none",
                         fid=50.0 * (16 * n) ** -0.3 + 1.0, mt_bits=16 * n, ct_bits=256 * n, n_params=n))
        for setting, factor in quantized_factor.items():
            w_bits, a_bits = (int(v) for v in setting[1:].split("A"))
            mt = w_bits * n
            rows.append(dict(key=f"{model}|{setting}", model=model, setting=setting, format="int", method="rtn",
                             fid=(50.0 * mt ** -0.3 + 1.0) * factor, mt_bits=mt, ct_bits=mt * a_bits, n_params=n))
    return rows


def _verdict(rows, family):
    return pareto.verdicts(rows, fit.fit_all(rows, n_boot=0), "mt_bits")[family]


def test_lower_left_claim_for_var_holds():
    result = _verdict(_rows("var", {"W8A16": 0.8, "W4A16": 0.7}), "var")
    assert result.verdict == "holds"
    assert [c.position for c in result.comparisons] == ["lower-left", "lower-left"]
    assert all(c.frac_lower == 1.0 and c.mean_log_ratio < 0 for c in result.comparisons)


def test_lower_left_claim_for_var_does_not_hold_when_quantized_is_worse():
    assert _verdict(_rows("var", {"W8A16": 1.2, "W4A16": 1.5}), "var").verdict == "does not hold"


def test_dit_claim_holds_when_quantized_is_worse_and_fails_when_better():
    assert _verdict(_rows("dit", {"W8A16": 1.2, "W4A16": 1.5}), "dit").verdict == "holds"
    assert _verdict(_rows("dit", {"W8A16": 0.9, "W4A16": 0.8}), "dit").verdict == "does not hold"


def test_split_series_give_mixed():
    result = _verdict(_rows("var", {"W8A16": 0.8, "W4A16": 1.3}), "var")
    assert result.verdict == "mixed" and result.share_lower_left == pytest.approx(0.5)


def test_unknown_family_has_no_claim_and_missing_baseline_is_inconclusive():
    assert _verdict(_rows("sd", {"W8A16": 0.8}), "sd").verdict == "no claim"
    rows = [r for r in _rows("var", {"W8A16": 0.8}) if r["setting"] != "W16A16"]
    assert pareto.verdicts(rows, fit.fit_all(rows, n_boot=0))["var"].verdict == "inconclusive"


def test_non_overlapping_ranges_are_not_compared():
    fits = {"W16A16": fit.fit_power_law([1e6, 2e6, 4e6], [3.0, 2.5, 2.2]),
            "W4A16-int": fit.fit_power_law([1e3, 2e3, 4e3], [9.0, 8.0, 7.5])}
    (comparison,) = pareto.compare_to_baseline(fits)
    assert comparison.position == "no overlap"
    assert pareto.family_verdict("var", [comparison]).verdict == "inconclusive"


def test_crossing_curves():
    x = np.geomspace(1e4, 1e6, 5)
    fits = {"W16A16": fit.fit_power_law(x, 10.0 * (x / 1e4) ** -0.5),
            "W8A8-fp": fit.fit_power_law(x, 6.0 * (x / 1e4) ** -0.2)}  # lower at small x, higher at large x
    (comparison,) = pareto.compare_to_baseline(fits)
    assert comparison.position == "crossing" and 0.0 < comparison.frac_lower < 1.0


def test_best_under_budget_and_frontier_on_a_hand_made_example():
    rows = [
        dict(key="a", model="var-d1", setting="W16A16", format="none", method="none", fid=10.0, mt_bits=160, ct_bits=1),
        dict(key="b", model="var-d2", setting="W16A16", format="none", method="none", fid=6.0, mt_bits=320, ct_bits=1),
        dict(key="c", model="var-d1", setting="W4A16", format="int", method="rtn", fid=12.0, mt_bits=40, ct_bits=1),
        dict(key="d", model="var-d2", setting="W4A16", format="int", method="rtn", fid=7.0, mt_bits=80, ct_bits=1),
        dict(key="e", model="var-d2", setting="W8A16", format="fp", method="rtn", fid=8.0, mt_bits=160, ct_bits=1),
        dict(key="f", model="dit-d1", setting="W4A16", format="int", method="rtn", fid=1.0, mt_bits=10, ct_bits=1),
    ]
    table = pareto.best_under_budget(rows, "var", [30, 40, 100, 200, 400])
    assert table[0].observed is None
    assert [t.observed.series for t in table[1:]] == ["W4A16-int", "W4A16-int", "W4A16-int", "W16A16"]
    assert [t.observed.model for t in table[1:]] == ["var-d1", "var-d2", "var-d2", "var-d2"]
    assert table[4].observed.fid == 6.0
    frontier = pareto.pareto_frontier(rows, "var")
    assert [r.key for r in frontier] == ["c", "d", "b"]  # e (160 bits, 8.0) and a are dominated by d


def test_fitted_budget_choice_does_not_extrapolate():
    rows = _rows("var", {"W4A16": 0.7})
    fits = fit.fit_family(rows, "var", "mt_bits", n_boot=0)
    largest_w4 = 4 * SIZES[-1]
    (row,) = pareto.best_under_budget(rows, "var", [1e9], "mt_bits", fits)
    assert row.fitted.series == "W4A16-int"
    assert row.fitted.x_bits == pytest.approx(largest_w4)
    (small,) = pareto.best_under_budget(rows, "var", [16 * SIZES[0] * 0.99], "mt_bits", fits)
    assert small.fitted.series == "W4A16-int" and small.observed.series == "W4A16-int"


def test_appendix_pairs_follow_or_not_from_the_data():
    rows = (_rows("var", {"W8A16": 0.8, "W4A16": 0.7}) + _rows("llamagen", {"W8A16": 0.85, "W4A16": 0.75})
            + _rows("dit", {"W8A16": 1.2, "W4A16": 1.5}) + _rows("mar", {"W8A16": 0.8, "W4A16": 0.7}))
    verdicts = pareto.verdicts(rows, fit.fit_all(rows, n_boot=0), "mt_bits")
    assert verdicts["llamagen"].verdict == "holds" and pareto.behaviour(verdicts["llamagen"]) == "lower-left"
    assert verdicts["mar"].verdict == "does not hold" and pareto.behaviour(verdicts["mar"]) == "lower-left"
    assert pareto.behaviour(verdicts["dit"]) == "not lower-left"
    assert pareto.follows(verdicts["llamagen"], verdicts["var"]) == "follows"
    assert pareto.follows(verdicts["mar"], verdicts["dit"]) == "does not follow"
    mixed = pareto.verdicts(_rows("var", {"W8A16": 0.8, "W4A16": 1.3}), fit.fit_all(
        _rows("var", {"W8A16": 0.8, "W4A16": 1.3}), n_boot=0), "mt_bits")["var"]
    assert pareto.follows(verdicts["llamagen"], mixed) == "does not follow"  # lower-left vs mixed
    inconclusive = pareto.Verdict("var", "claim", float("nan"), "inconclusive", (), "nothing compared")
    assert pareto.follows(verdicts["llamagen"], inconclusive) == "not resolved"
