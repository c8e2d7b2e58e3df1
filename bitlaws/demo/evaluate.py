"""The ``demo`` sweep evaluator: quantize a demo member, sample digits, score them with the DFD.

For a cell (model, setting, format, method, seed) it loads the member (cached), builds the setting's rules
for the member's quantized layers, applies the method, draws ``n_per_class`` class-conditional samples per
digit with a key derived from ``Cell.model_seed`` (so every precision of a model sees the same labels and
noise), and records:

* ``fid``: the **Digits Fréchet Distance** (DFD) — the Fréchet distance between the samples and the data in
  the penultimate features of the shipped digits classifier, computed by the same code path as the real FID
  (`bitlaws.eval`). It is an FID *analogue*, not an FID; ``metric_name`` says so in every record;
* ``accuracy``: how often the classifier assigns a sample to its conditioning digit;
* ``mt_bits`` / ``ct_bits`` / ``params`` / ``storage_bytes`` of the quantized network (`bit_accounting`);
* ``samples_image``: a PNG grid of the cell's first samples per digit, relative to the sweep folder.

Methods that need calibration statistics (static activation scales, GPTQ's Hessians, SmoothQuant's channel
maxima ...) get them through `MethodContext.calibrate`: the member's ``calibration_forward`` over
``calibration_batches`` (real training digits, computed once per member and reused by every cell).
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from bitlaws.demo import dit_family, family, metric, var_family  # noqa: F401  (registers the families)
from bitlaws.quant import bit_accounting, transform
from bitlaws.sweep import runner, settings
from bitlaws.sweep.grid import Cell

# PTQ calibration data (methods that need statistics or Hessians; RTN does not): real training digits, see
# `family.calibration_digits`. Override with ``config.demo.calibration``.
DEFAULT_CALIBRATION = {"num_batches": 4, "batch_size": 32, "seed": 0}
# Each cell saves the first ``config.demo.grid_per_class`` samples of every digit as a PNG grid under
# ``OUT/samples/<model>/`` (when the sweep gives an ``out_dir``); 0 turns it off.
DEFAULT_GRID_PER_CLASS = 4
SAMPLES_DIR = "samples"
GRID_ZOOM = 2  # pixels per image pixel in the saved grid
METRIC_NAME = "DFD (Frechet distance in digits-classifier features; the demo's FID analogue, not FID)"
NUM_CLASSES = 10


def make_evaluator(config: ml_collections.ConfigDict):
    """Returns ``evaluate(cell) -> metrics`` for a demo sweep config (block ``config.demo``)."""
    n_per_class = int(config.demo.n_per_class)
    reference_split = str(config.demo.get("reference_split", "all"))
    samples_per_class = int(config.demo.get("grid_per_class", DEFAULT_GRID_PER_CLASS))
    out_dir = pathlib.Path(config.out_dir) if config.get("out_dir", None) else None
    options = settings.quant_options(config)
    load = functools.lru_cache(maxsize=None)(family.load_member)
    calibration = dict(DEFAULT_CALIBRATION, **dict(config.demo.get("calibration", None) or {}))
    unknown = set(calibration) - set(DEFAULT_CALIBRATION)
    if unknown:
        raise ValueError(f"config.demo.calibration: unknown field(s) {sorted(unknown)}; "
                         f"valid: {sorted(DEFAULT_CALIBRATION)}")

    @functools.lru_cache(maxsize=None)
    def calibration_batches(name: str) -> list:
        return load(name).calibration_batches(int(calibration["num_batches"]), int(calibration["batch_size"]),
                                              int(calibration["seed"]))

    def calibrate_fn(member: family.DemoMember) -> settings.CalibrateFn:
        def calibrate(model, rules, record_hessian):
            return transform.run_calibration(model, rules, member.calibration_forward,
                                             calibration_batches(member.name), record_hessian=record_hessian)

        return calibrate

    def evaluate(cell: Cell) -> dict[str, Any]:
        member = load(cell.model)
        rules = cell.rules(member.quant_pattern, **options)
        quantized = settings.quantize_for_cell(
            member.model, rules, cell.method,
            settings.MethodContext(params=cell.params, calibrate=calibrate_fn(member), seed=cell.prng_seed))
        labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), n_per_class)
        images = np.clip(np.asarray(member.sample(quantized, labels, jax.random.key(cell.model_seed))), -1.0, 1.0)
        scores = metric.evaluate_samples(images, labels, reference_split=reference_split)
        report = bit_accounting(member.model, rules)
        record = dict(fid=float(scores["dfd"]), accuracy=float(scores["accuracy"]), n_samples=int(scores["n"]),
                      metric_name=METRIC_NAME, family=member.family, n_params=int(report.total_params),
                      mt_bits=int(report.mt_bits), ct_bits=int(report.ct_bits),
                      storage_bytes=int(report.storage_bytes))
        if out_dir is not None and samples_per_class > 0:
            relative = pathlib.Path(SAMPLES_DIR) / cell.model / f"{cell.key.replace('|', '_')}.png"
            save_sample_grid(images, n_per_class, min(samples_per_class, n_per_class), out_dir / relative)
            record["samples_image"] = relative.as_posix()
        return record

    return evaluate


def save_sample_grid(images: np.ndarray, n_per_class: int, per_class: int, path: pathlib.Path) -> None:
    """Saves ``per_class`` samples of each digit as a PNG: one column per digit, one row per sample.

    Args:
        images: ``[10 * n_per_class, H, W, 3]`` float in [-1, 1], grouped by class (class 0 first).
        n_per_class: Samples per class in `images`.
        per_class: Rows of the grid (<= n_per_class).
        path: Output PNG (parents created; written atomically, so a killed sweep leaves no half image).
    """
    from matplotlib import image as mpl_image  # pylint: disable=g-import-not-at-top  (optional dependency)

    height, width = images.shape[1:3]
    picked = images.reshape(NUM_CLASSES, n_per_class, height, width, -1)[:, :per_class]  # [10, k, H, W, C]
    grid = picked.transpose(1, 2, 0, 3, 4).reshape(per_class * height, NUM_CLASSES * width, -1)  # [k*H, 10*W, C]
    grid = np.repeat(np.repeat(grid, GRID_ZOOM, axis=0), GRID_ZOOM, axis=1)
    pixels = np.round((grid + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    mpl_image.imsave(tmp, pixels, format="png")
    os.replace(tmp, path)


runner.register_evaluator("demo", make_evaluator)
