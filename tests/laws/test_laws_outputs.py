"""Plots, report and the bit-budget advisor on a small synthetic sweep."""

import json
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest

from bitlaws.laws import BudgetTooSmallError, advise, fit, plots, render_advice, report

SIZES = {"d2": 2e5, "d4": 4e5, "d6": 8e5, "d8": 1.6e6}
SETTINGS = (("W16A16", "none"), ("W8A16", "int"), ("W4A16", "int"), ("W4A16", "fp"), ("W8A8", "int"))
# (A, α, β, E): VAR favours fewer bits per parameter (β < α), DiT does not (β > α).
LAWS = {"var": (400.0, 0.45, 0.2, 2.0), "dit": (400.0, 0.3, 0.7, 2.0)}
METRIC = "classifier-feature Fréchet distance (FID analogue)"


def _true_fid(family: str, params: float, w_bits: int, a_bits: int) -> float:
    amplitude, alpha, beta, floor = LAWS[family]
    return amplitude * params ** -alpha * w_bits ** -beta * a_bits ** -0.1 + floor


def _sweep_rows(noise: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for family in LAWS:
        for depth, params in SIZES.items():
            for setting, fmt in SETTINGS:
                w_bits, a_bits = (int(v) for v in setting[1:].split("A"))
                fid = _true_fid(family, params, w_bits, a_bits) * (1.0 + noise * rng.standard_normal())
                rows.append(dict(key=f"{family}-{depth}|{setting}|{fmt}|rtn", model=f"{family}-{depth}",
                                 setting=setting, format=fmt, method="rtn", fid=fid, mt_bits=params * w_bits,
                                 ct_bits=params * w_bits * a_bits, metric_name=METRIC, n_samples=128))
    return rows


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sweep")
    (directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sweep_rows(0.005)))
    return directory


@pytest.fixture(scope="module")
def law_fits(results_dir):
    return fit.fit_all(fit.load_results(results_dir), n_boot=15, seed=0)


def test_fits_in_worker_processes_equal_one_process(results_dir, law_fits):
    parallel = fit.fit_all(fit.load_results(results_dir), n_boot=15, seed=0, workers=2)
    assert repr(parallel) == repr(law_fits)  # every series keeps its own seed (repr: NaN intervals compare equal)
    assert sum(f.n_boot_ok for f in parallel.families["var"].mt.values()) > 0
    with pytest.raises(ValueError, match="workers must be >= 1"):
        fit.fit_all(fit.load_results(results_dir), n_boot=15, workers=0)


def test_plots_are_written(results_dir, law_fits, tmp_path):
    paths = plots.plot_scaling(fit.load_results(results_dir), tmp_path / "plots", law_fits)
    assert sorted(p.name for p in paths) == ["scaling_ct.png", "scaling_ct.svg", "scaling_mt.png", "scaling_mt.svg"]
    for path in paths:
        assert path.is_file()
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
        else:
            root = ElementTree.parse(path).getroot()
            assert root.tag.endswith("svg")
            assert "VAR" in path.read_text() and "DiT" in path.read_text()


def test_plots_reject_empty_rows(tmp_path):
    with pytest.raises(ValueError, match="no usable cells"):
        plots.plot_scaling([], tmp_path)


def test_report_has_table_fits_and_computed_verdicts(results_dir, law_fits, tmp_path):
    path = report.write_report(fit.load_results(results_dir), tmp_path, fits=law_fits, source=str(results_dir))
    text = path.read_text()
    assert path.name == "report.md"
    assert "## All cells" in text and "| var-d8 |" in text and "| dit-d2 |" in text
    assert text.count("| var-") == len(SIZES) * len(SETTINGS)  # one table row per VAR cell
    assert "Samples per cell: 128" in text
    assert text.count(METRIC) == 1  # the full metric name once (provenance), its short label elsewhere
    assert "## Fitted power laws: classifier-feature Fréchet distance = a·x^(−α) + c" in text
    assert "Fitted power laws" in text and "Bivariate law" in text and "Which precision wins" in text
    assert "Result on MT: **holds**" in text
    var_line = next(line for line in text.splitlines() if line.startswith("* **VAR**"))
    dit_line = next(line for line in text.splitlines() if line.startswith("* **DiT**"))
    assert "**holds**" in var_line and "**holds**" in dit_line


def test_report_verdict_follows_the_data(tmp_path):
    rows = _sweep_rows()
    for row in rows:  # make quantized VAR clearly worse than its W16A16 curve
        if row["model"].startswith("var") and row["setting"] != "W16A16":
            row["fid"] *= 3.0
    text = report.write_report(rows, tmp_path, n_boot=0).read_text()
    var_line = next(line for line in text.splitlines() if line.startswith("* **VAR**"))
    assert "Result on MT: **does not hold**" in var_line


def test_analyze_writes_everything(results_dir, tmp_path):
    outputs = report.analyze(results_dir / "results.jsonl", tmp_path, n_boot=0)
    assert outputs.report.is_file() and len(outputs.plots) == 4
    assert "![scaling_mt](scaling_mt.png)" in outputs.report.read_text()


def test_advisor_picks_an_observed_cell_under_a_generous_budget(results_dir):
    result = advise(results_dir, budget_mb=1e3, family="var")
    assert result.best.family == "var" and result.best.source == "observed"
    assert result.best.model == "var-d8" and result.best.observed_fid is not None
    assert result.best.size_mb <= 1e3
    scores = [result.best.predicted_fid] + [c.predicted_fid for c in result.alternatives]
    assert scores == sorted(scores)
    text = render_advice(result)
    assert "Best:" in text and result.best.series in text and "var-d8" in text


def test_advisor_interpolates_between_trained_sizes_with_the_law():
    rows = _sweep_rows(noise=0.0)
    budget_mb = 3e5 * 16 / 8e6  # W16A16 would fit 3e5 parameters: between d2 and d4
    result = advise(rows, budget_mb, family="dit")
    best = result.best
    assert best.size_mb <= budget_mb * (1 + 1e-9)
    assert best.series == "W16A16"  # DiT: bits are worth more than parameters in this synthetic law
    assert best.source == "interpolated" and best.model == "between dit-d2 and dit-d4"
    assert best.params == pytest.approx(3e5, rel=1e-6)
    assert best.predicted_fid == pytest.approx(_true_fid("dit", 3e5, 16, 16), rel=0.01)
    for other in result.alternatives:
        assert other.size_mb <= budget_mb * (1 + 1e-9)


def test_advisor_ct_metric_and_errors(results_dir):
    assert advise(results_dir, budget_mb=1e4, metric="ct").best.size_mb <= 1e4
    with pytest.raises(BudgetTooSmallError, match=r"smallest option is (var|dit)-d2 W4A16-(int|fp) at 0\.1 MB"):
        advise(results_dir, budget_mb=0.01)
    with pytest.raises(ValueError, match="no usable cells"):
        advise(results_dir, budget_mb=1.0, family="sd")
    with pytest.raises(ValueError, match="metric"):
        advise(results_dir, budget_mb=1.0, metric="flops")


def test_metric_label_is_the_name_before_its_parenthesis():
    cells = fit.cells_from_rows([dict(key="a", model="m-d1", setting="W16A16", format="none", method="none", fid=1.0,
                                      mt_bits=16, ct_bits=256, n_params=1, metric_name="DFD (digits; not FID)")])
    assert fit.metric_label(cells) == "DFD" and fit.metric_name(cells) == "DFD (digits; not FID)"
    assert fit.metric_label([]) == fit.metric_name([]) == "FID"



def test_report_shows_the_largest_models_sample_grids(tmp_path):
    rows = _sweep_rows()
    sweep = tmp_path / "sweep"
    for row in rows:
        if row["model"] in ("var-d8", "dit-d2"):  # var-d8 is VAR's largest; dit-d2 is not DiT's largest
            row["samples_image"] = f"samples/{row['model']}/{row['key'].replace('|', '_')}.png"
            (sweep / row["samples_image"]).parent.mkdir(parents=True, exist_ok=True)
            (sweep / row["samples_image"]).write_bytes(b"png")
    rows[-1]["samples_image"] = "samples/missing.png"  # a record pointing at no file is left out, not linked
    (sweep / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report.analyze(sweep, tmp_path / "elsewhere", n_boot=0).report.read_text()
    section = text[text.index("## Samples"):text.index("## Fitted power laws")]
    assert "### VAR: var-d8" in section and "### DiT: dit-d2" in section  # DiT's largest with a grid
    assert section.count("![var-d8 ") == len(SETTINGS)  # no '|' in alt texts: it would split the table cell
    assert "(../sweep/samples/var-d8/var-d8_W16A16_none_rtn.png)" in section  # relative to the report's folder
    assert "missing.png" not in section
    first_rows = [line for line in section.splitlines() if line.startswith("| W")]
    assert first_rows[0].startswith("| W16A16 |")  # the float baseline first


def test_report_without_sample_grids_has_no_samples_section(results_dir, tmp_path):
    text = report.analyze(results_dir, tmp_path, n_boot=0).report.read_text()
    assert "## Samples" not in text


def test_report_shows_intervals_and_paired_differences(tmp_path):
    """Records with a bootstrap interval and saved features: the cells table shows the intervals, and each
    quantized cell is compared with its float cell paired: clearly degraded samples are "worse", a copy of the
    float samples with tiny noise "not resolved"."""
    rng = np.random.default_rng(1)
    sweep = tmp_path / "sweep"
    (sweep / "features").mkdir(parents=True)
    reference = rng.standard_normal((3000, 6))
    np.savez(sweep / "features" / "reference_all.npz", mu=reference.mean(axis=0), sigma=np.cov(reference, rowvar=False))
    float_features = rng.standard_normal((300, 6))
    rows = [r for r in _sweep_rows() if r["model"] == "var-d4" or r["setting"] == "W16A16"]
    for row in rows:
        if row["model"] != "var-d4":
            continue
        name = f"features/{row['key'].replace('|', '_')}.npy"
        if row["setting"] == "W16A16":
            features = float_features
        elif row["setting"] == "W8A16":
            features = float_features + 1e-4 * rng.standard_normal(float_features.shape)  # indistinguishable
        else:
            features = float_features * 1.6 + 0.5  # clearly worse
        np.save(sweep / name, features.astype(np.float32))
        row.update(features_file=name, features_reference="features/reference_all.npz",
                   fid_interval={"lo": row["fid"] - 1.0, "hi": row["fid"] + 1.5, "se": 0.6, "level": 0.95,
                                 "groups": 50})
    (sweep / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report.analyze(sweep, tmp_path / "out", n_boot=0).report.read_text()
    section = text[text.index("## How sure: paired differences to float"):]
    section = section[:section.index("\n## ", 3)]
    assert "3 of 4 quantized cells are worse than float, 0 better, 1 not resolved." in section
    assert section.count("| var-d4 |") == 4 and "| not resolved |" in section
    assert "### DiT" not in section  # no DiT cell has features: nothing paired there
    table = text[text.index("## All cells"):]
    assert "95% interval" in table and table.count("| – |") >= 1  # cells without an interval show a dash

    # Stored jackknife replicates (what the demo evaluator writes) give the same pairs without recomputing.
    from bitlaws.eval import intervals  # pylint: disable=g-import-not-at-top
    from bitlaws.laws import uncertainty  # pylint: disable=g-import-not-at-top
    cells = fit.cells_from_rows(rows)
    computed = {p.cell.key: p for p in uncertainty.paired_differences(cells, sweep)}
    with np.load(sweep / "features" / "reference_all.npz") as stats:
        ref = intervals.FrechetReference.from_stats(stats["mu"], stats["sigma"])
    for row in rows:
        if "features_file" in row:
            features = np.load(sweep / row["features_file"])
            npz = row["features_file"].replace(".npy", ".npz")
            np.savez(sweep / npz, features=features, replicates=intervals.jackknife_replicates(features, ref))
            features64 = features.astype(np.float64)
            row.update(features_file=npz, fid=intervals.frechet_interval(features64, None, None, reference=ref).estimate)
            (sweep / row["features_file"].replace(".npz", ".npy")).unlink()
    stored = {p.cell.key: p for p in uncertainty.paired_differences(fit.cells_from_rows(rows), sweep)}
    assert stored.keys() == computed.keys() and len(stored) == 4
    broken = next(r for r in rows if r.get("features_file") and r["setting"] == "W8A8")
    (sweep / broken["features_file"]).write_bytes(b"not an npz")  # unreadable: that cell is left unpaired
    assert len(uncertainty.paired_differences(fit.cells_from_rows(rows), sweep)) == 3
    for key, pair in stored.items():
        assert pair.verdict == computed[key].verdict
        assert pair.interval.lo == pytest.approx(computed[key].interval.lo, rel=1e-6, abs=1e-9)
        assert pair.interval.hi == pytest.approx(computed[key].interval.hi, rel=1e-6, abs=1e-9)


def test_report_says_whether_llamagen_follows_var_and_mar_follows_dit(tmp_path):
    from test_laws_pareto import _rows  # pylint: disable=g-import-not-at-top  (tests/laws is on sys.path)

    rows = (_rows("var", {"W8A16": 0.8, "W4A16": 0.7}) + _rows("llamagen", {"W8A16": 1.3, "W4A16": 1.6})
            + _rows("dit", {"W8A16": 1.2, "W4A16": 1.5}) + _rows("mar", {"W8A16": 1.25, "W4A16": 1.4}))
    text = report.write_report(rows, tmp_path, n_boot=0).read_text()
    assert "Discrete or continuous (paper appendix C.2)" in text
    assert "**LlamaGen does not follow VAR**" in text and "**MAR follows DiT**" in text
    assert "* **LlamaGen** — claim: LlamaGen's quantized curves lie lower-left" in text
