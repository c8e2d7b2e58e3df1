"""Scaling-law fits on synthetic data with known parameters."""

import json
import math

import numpy as np
import pytest

from bitlaws.laws import fit


def _synthetic_power(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """y = 50·x^(−0.35) + 1.5 with 1% multiplicative noise, 40 sizes × 3 replicates over MT 1e5..1e8."""
    rng = np.random.default_rng(seed)
    x = np.repeat(np.geomspace(1e5, 1e8, 40), 3)
    y = (50.0 * x ** -0.35 + 1.5) * (1.0 + 0.01 * rng.standard_normal(x.size))
    return x, y


def test_power_law_recovers_known_exponent_and_cis_contain_truth():
    x, y = _synthetic_power()
    result = fit.fit_power_law(x, y, n_boot=120, seed=3)
    assert result.kind == "power+floor"
    assert abs(result.alpha / 0.35 - 1.0) < 0.05
    assert abs(result.c / 1.5 - 1.0) < 0.05
    for name, truth in (("a", 50.0), ("alpha", 0.35), ("c", 1.5)):
        low, high = result.ci[name]
        assert low <= truth <= high, (name, low, high)
        assert high > low
    assert result.ci_reason == "" and result.n_boot_ok > 60


def test_power_law_exact_data_is_recovered_tightly():
    x = np.geomspace(1e5, 1e8, 12)
    result = fit.fit_power_law(x, 50.0 * x ** -0.35 + 1.5)
    np.testing.assert_allclose([result.a, result.alpha, result.c], [50.0, 0.35, 1.5], rtol=1e-4)
    np.testing.assert_allclose(result.predict(x), 50.0 * x ** -0.35 + 1.5, rtol=1e-6)


def test_bootstrap_is_seeded():
    x, y = _synthetic_power(seed=5)
    first = fit.bootstrap(x[::3], y[::3], n_boot=30, seed=7)
    second = fit.bootstrap(x[::3], y[::3], n_boot=30, seed=7)
    other = fit.bootstrap(x[::3], y[::3], n_boot=30, seed=8)
    assert first.ci == second.ci
    assert first.ci != other.ci


def test_bootstrap_fits_each_distinct_resample_once_with_the_same_intervals():
    """The demo's case (5 sizes): resamples repeat as multisets; fitting each once must not move the intervals."""
    x = np.geomspace(1e5, 1e8, 5)
    y = (50.0 * x ** -0.35 + 1.5) * (1.0 + 0.05 * np.random.default_rng(4).standard_normal(x.size))
    base = fit.fit_power_law(x, y)
    x_ref = float(np.exp(np.mean(np.log(x))))
    start = fit._theta_of(base, x_ref)
    calls = []
    original = fit._solve_power

    def counting(log_u, ys, inits):
        calls.append(1)
        return original(log_u, ys, inits)

    fit._solve_power = counting
    try:
        boot = fit.bootstrap(x, y, n_boot=200, seed=11, base=base)
    finally:
        fit._solve_power = original
    # Reference: every resample refitted in the order it was drawn (the same generator calls as `bootstrap`).
    rng = np.random.default_rng(11)
    estimates, distinct = [], set()
    for _ in range(200):
        idx = rng.integers(0, x.size, size=x.size)
        if np.unique(x[idx]).size < 3:
            continue
        distinct.add(tuple(sorted(idx)))
        theta, _ = original(np.log(x[idx] / x_ref), y[idx], [start])
        estimates.append([math.exp(theta[0] + theta[1] * math.log(x_ref)), theta[1], theta[2]])
    estimates = np.asarray(estimates)
    assert boot.n_ok == len(estimates) and len(calls) == len(distinct) < len(estimates)
    for i, name in enumerate(("a", "alpha", "c")):
        reference = (np.percentile(estimates[:, i], 2.5), np.percentile(estimates[:, i], 97.5))
        # Order-only float differences: relative to the parameter's scale (a floor at its bound 0 sits near 1e-18).
        np.testing.assert_allclose(boot.ci[name], reference, rtol=1e-6, atol=1e-9 * np.max(np.abs(estimates[:, i])))


@pytest.mark.parametrize("x, kind", [([1e6, 1e6, 1e6], "constant"), ([1e6, 1e7, 1e6], "power")])
def test_degenerate_inputs_give_nan_cis_with_a_reason(x, kind):
    y = [3.0, 2.0, 3.1]
    result = fit.fit_power_law(x, y, n_boot=20)
    assert result.kind == kind
    assert all(math.isnan(v) for pair in result.ci.values() for v in pair)
    assert "fewer than 3 distinct x" in result.ci_reason
    assert np.all(np.isfinite(result.predict([1e6, 1e7])))
    boot = fit.bootstrap(x, y, n_boot=20)
    assert math.isnan(boot.ci["alpha"][0]) and "distinct" in boot.reason


def test_two_distinct_x_fit_a_pure_power_law():
    result = fit.fit_power_law([1e4, 1e6], [10.0, 1.0])
    assert result.c == 0.0
    assert result.alpha == pytest.approx(0.5)


def test_bivariate_recovers_exponents():
    rng = np.random.default_rng(0)
    params = np.repeat(np.geomspace(1e4, 1e6, 8), 6)
    bits = np.tile([16.0, 8.0, 8.0, 4.0, 4.0, 3.0], 8)
    act_bits = np.tile([16.0, 16.0, 8.0, 16.0, 8.0, 16.0], 8)
    truth = dict(A=200.0, alpha=0.4, beta=0.8, gamma=0.3, E=0.5)
    fid = (truth["A"] * params ** -truth["alpha"] * bits ** -truth["beta"] * act_bits ** -truth["gamma"]
           + truth["E"]) * (1.0 + 0.01 * rng.standard_normal(params.size))
    result = fit.fit_bivariate_arrays(params, bits, act_bits, fid, n_boot=40, seed=1)
    assert result.ok and result.fit_gamma
    for name in ("alpha", "beta", "E"):
        assert abs(getattr(result, name) / truth[name] - 1.0) < 0.05, name
    # γ rests on two activation precisions only, so it is looser.
    assert abs(result.gamma / truth["gamma"] - 1.0) < 0.15
    for name in ("alpha", "beta"):
        low, high = result.ci[name]
        assert low < truth[name] < high, name


def test_bivariate_without_activation_variation_fixes_gamma():
    params = np.repeat(np.geomspace(1e4, 1e6, 4), 3)
    bits = np.tile([16.0, 8.0, 4.0], 4)
    fid = 100.0 * params ** -0.3 * bits ** -0.5 + 1.0
    result = fit.fit_bivariate_arrays(params, bits, np.full_like(bits, 16.0), fid)
    assert not result.fit_gamma and result.gamma == 0.0
    np.testing.assert_allclose([result.alpha, result.beta, result.E], [0.3, 0.5, 1.0], rtol=1e-3)


def test_bivariate_too_few_cells_is_reported_not_raised():
    result = fit.fit_bivariate_arrays([1e4, 1e5], [16.0, 16.0], [16.0, 16.0], [3.0, 2.0])
    assert not result.ok and "bit widths" in result.note


def _row(model, setting, fmt, fid, params, **extra):
    w_bits = int(setting[1:].split("A")[0])
    a_bits = int(setting.split("A")[1])
    return dict(key=f"{model}|{setting}|{fmt}", model=model, setting=setting, format=fmt, method="rtn", fid=fid,
                mt_bits=params * w_bits, ct_bits=params * w_bits * a_bits, **extra)


def test_load_results_dedupes_and_tolerates_truncated_tail(tmp_path):
    rows = [_row("var-d2", "W16A16", "none", 5.0, 1000), _row("var-d2", "W4A16", "int", 6.0, 1000),
            _row("var-d2", "W16A16", "none", 4.0, 1000)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + "\n" + '{"key": "trunc'
    (tmp_path / "results.jsonl").write_text(text)
    loaded = fit.load_results(tmp_path)
    assert len(loaded) == 2
    assert {r["fid"] for r in loaded} == {4.0, 6.0}
    (tmp_path / "results.jsonl").write_text('{"key": 1\n' + json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="corrupt"):
        fit.load_results(tmp_path)
    with pytest.raises(FileNotFoundError):
        fit.load_results(tmp_path / "missing")


def test_cells_derive_params_from_the_baseline_row():
    rows = [_row("dit-d2", "W16A16", "none", 5.0, 1000), _row("dit-d2", "W4A16", "fp", 6.0, 1000),
            dict(_row("dit-d4", "W8A8", "int", 4.0, 2000), n_params=1900), _row("dit-d6", "W4A16", "int", 3.0, 3000)]
    rows[1]["mt_bits"] = 4 * 900 + 16 * 100  # 10% of the parameters stay at 16 bits
    cells = {c.model + c.setting: c for c in fit.cells_from_rows(rows)}
    assert cells["dit-d2W4A16"].params == 1000 and cells["dit-d2W4A16"].params_derived
    assert cells["dit-d4W8A8"].params == 1900 and not cells["dit-d4W8A8"].params_derived
    assert cells["dit-d6W4A16"].params == 3000  # no baseline: MT / weight bits
    assert cells["dit-d2W4A16"].series == "W4A16-fp" and cells["dit-d2W16A16"].series == "W16A16"
    assert cells["dit-d2W4A16"].family == "dit"


def test_fit_family_fits_each_series():
    sizes = np.geomspace(1e4, 1e6, 5)
    rows = [_row(f"var-d{i}", s, f, 30.0 * (n * w) ** -0.3 + 1.0, n)
            for i, n in enumerate(sizes) for s, f, w in (("W16A16", "none", 16), ("W4A16", "int", 4))]
    fits = fit.fit_family(rows, "var", "mt_bits", n_boot=0)
    assert list(fits) == ["W16A16", "W4A16-int"]
    for result in fits.values():
        assert result.alpha == pytest.approx(0.3, rel=1e-3)
    with pytest.raises(ValueError):
        fit.fit_family(rows, "var", "bits")
