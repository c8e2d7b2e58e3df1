"""`analysis.md` and the report's analysis section, from hand-made analysis JSON (no models)."""

import json

from bitlaws.analysis import summary
from bitlaws.laws import report

ERRORS = {"model": "var-d4", "precision": "W4A8-int-rtn", "step_kind": "scale", "steps": ["1x1", "2x2", "3x3"],
          "feature_error": [0.1, 0.2, 0.4], "representation_error": [0.0, 0.1, 0.5], "image_error": 0.3,
          "reduced_steps": 2}
SINGLE = {"model": "dit-d4", "family": "dit", "step_kind": "timestep", "step_name": "t=480",
          "snr_db": [0.0, 10.0, "inf"], "loss": [0.5, 0.1, 0.0], "spearman": 1.0,
          "spearman_per_sample_median": 0.9, "samples_with_a_ranking": 4}
ACCUMULATED = {"model": "dit-d4", "step_kind": "timestep", "steps": ["t=900", "t=500", "t=0"], "noisy_steps": 1,
               "curves": [{"snr_db": 10.0, "representation_error": [0.2, 0.3, 0.4],
                           "representation_rmse": [1.0, 1.5, 3.0], "loss": 0.01},
                          {"snr_db": 30.0, "representation_error": [0.0, 0.0, 0.0],
                           "representation_rmse": [0.0, 0.0, 0.0], "loss": 0.0}]}
ACTIVATIONS = {"model": "var-d4", "step_kind": "scale",
               "layers": [{"kind": "fc1", "block": 3, "temporal_variation": 0.0074},
                          {"kind": "qkv", "block": 3, "temporal_variation": None}]}


def _write(folder):
    folder.mkdir(parents=True)
    (folder / "errors.json").write_text(json.dumps({"records": [ERRORS]}))
    (folder / "noise.json").write_text(json.dumps({"single_step": [SINGLE], "accumulation": [ACCUMULATED]}))
    (folder / "activations.json").write_text(json.dumps({"records": [ACTIVATIONS]}))
    (folder / "errors.png").write_bytes(b"png")


def test_sentences_carry_the_numbers(tmp_path):
    _write(tmp_path / "analysis")
    text = "\n".join(summary.summary_lines(tmp_path / "analysis", relative_to=tmp_path))
    assert "goes from 0 (scale 1x1) to 0.5 (3x3)" in text and "at 2 of 3 scales" in text
    assert "representation / feature 1.25" in text
    assert "[errors](analysis/errors.png)" in text  # links relative to the report folder; absent figures not linked
    assert "noise_single_step" not in text.split("Figures:")[2].split("\n")[0]
    assert "Spearman(noise intensity, image loss) = 1 over the batch mean, 0.9 per image (median of 4); " \
           "paper: 0.99; +inf dB reproduced the noise-free images exactly" in text
    assert "10.0 dB: last/noisy-step error 2 relative, 3 absolute" in text
    assert "30.0 dB: no change at any timestep" in text
    assert "fc1@3 0.0074, qkv@3 n/a" in text


def test_growth():
    curve = ACCUMULATED["curves"][0]
    assert summary.growth(curve, 1) == 2.0 and summary.growth(curve, 2) == 0.4 / 0.3
    assert summary.growth(curve, 1, "representation_rmse") == 3.0
    assert summary.growth(ACCUMULATED["curves"][1], 1) is None


def test_report_links_the_analyses_of_a_sweep_folder(tmp_path):
    rows = []
    for family in ("var", "dit"):
        for i, params in enumerate((1e5, 4e5, 1.6e6)):
            base = 100 * params ** -0.3
            rows.append(dict(key=f"{family}-{i}|W16A16|none|none", model=f"{family}-d{i}", setting="W16A16",
                             format="none", method="none", fid=base, mt_bits=16 * params, ct_bits=256 * params))
            rows.append(dict(key=f"{family}-{i}|W4A16|int|rtn", model=f"{family}-d{i}", setting="W4A16", format="int",
                             method="rtn", fid=base * 1.1, mt_bits=4 * params, ct_bits=64 * params))
    sweep = tmp_path / "sweep"
    out = tmp_path / "report"
    without = report.write_report(rows, out, n_boot=0, samples_root=sweep).read_text()
    assert "Error-tolerance analyses" not in without
    _write(sweep / summary.ANALYSIS_DIR)
    text = report.write_report(rows, out, n_boot=0, samples_root=sweep).read_text()
    assert "## Error-tolerance analyses (paper section 3.2)" in text
    assert "[errors](../sweep/analysis/errors.png)" in text
