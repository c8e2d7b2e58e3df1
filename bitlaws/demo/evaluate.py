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
* ``samples_image``: a PNG grid of the cell's first samples per digit, relative to the sweep folder;
* ``fid_interval``: ``{"lo", "hi", "se", "level", "groups"}``, a 95 % jackknife interval of the DFD over the
  cell's samples against the fixed reference statistics (`bitlaws.eval.intervals`; ``config.demo.jackknife``
  groups, default 50 or the sample count if smaller, 0 turns it off);
* ``features_file``: an ``.npz`` (relative to the sweep folder) with the samples' classifier features
  ``features [N, 64]`` float32 and the jackknife's leave-one-group-out DFDs ``replicates [groups]``, so that
  ``bitlaws report`` can compare cells *paired* (same seed and labels: the precision-vs-float difference with its
  own, much tighter, interval); ``features_reference``: the reference statistics (``mu``, ``sigma``).

Methods that need calibration statistics (static activation scales, GPTQ's Hessians, SmoothQuant's channel
maxima ...) get them through `MethodContext.calibrate` / `MethodContext.data`: `family.calibration_data` of the
member (by default the paper's protocol — VAR teacher-forced on its own samples, DiT along its own sampling
trajectories; ``config.demo.calibration.source = "data"`` for real digits), computed once per member and reused
by every cell; the record's ``calibration`` field says which data it was.

Pre-check (`check_cells`, run by the sweep before any cell): every unfinished cell names a shipped member
and its rules fit the member's abstract network (``nnx.eval_shape`` from the checkpoint's constructor
metadata; no weights are read), e.g. ``quant.weight_group_size`` must divide every quantized layer's
reduction axis.
"""

from __future__ import annotations

import functools
import importlib
import os
import pathlib
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from bitlaws import checkpoint
from bitlaws.demo import dit_family, family, metric, var_family  # noqa: F401  (registers the families)
from bitlaws.quant import CalibrationData, bit_accounting, cached_calibration, calibrate_on, transform
from bitlaws.sweep import runner, settings
from bitlaws.sweep.grid import Cell

# PTQ calibration data (methods that need statistics or Hessians; RTN does not): `family.DEFAULT_CALIBRATION`
# (the float model's own samples) overridden by ``config.demo.calibration``.
# Each cell saves the first ``config.demo.grid_per_class`` samples of every digit as a PNG grid under
# ``OUT/samples/<model>/`` (when the sweep gives an ``out_dir``); 0 turns it off.
DEFAULT_GRID_PER_CLASS = 4
DEFAULT_JACKKNIFE = 50
SAMPLES_DIR = "samples"
FEATURES_DIR = "features"
GRID_ZOOM = 2  # pixels per image pixel in the saved grid
METRIC_NAME = "DFD (Frechet distance in digits-classifier features; the demo's FID analogue, not FID)"
NUM_CLASSES = 10


def make_evaluator(config: ml_collections.ConfigDict):
    """Returns ``evaluate(cell) -> metrics`` for a demo sweep config (block ``config.demo``)."""
    n_per_class = int(config.demo.n_per_class)
    reference_split = str(config.demo.get("reference_split", "all"))
    samples_per_class = int(config.demo.get("grid_per_class", DEFAULT_GRID_PER_CLASS))
    groups = config.demo.get("jackknife", DEFAULT_JACKKNIFE)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0 or groups == 1:
        raise ValueError(f"config.demo.jackknife must be 0 (no intervals) or an integer >= 2, got {groups!r}")
    groups = min(groups, NUM_CLASSES * n_per_class)  # at most one sample per group (leave-one-out)
    out_dir = pathlib.Path(config.out_dir) if config.get("out_dir", None) else None
    options = settings.quant_options(config)
    backend = settings.backend_for(config)
    load = functools.lru_cache(maxsize=None)(family.load_member)
    calibration_options = config.demo.get("calibration", None)
    if hasattr(calibration_options, "to_dict"):
        calibration_options = calibration_options.to_dict()
    family.calibration_options(calibration_options)  # validate now, not at the first cell that needs data

    @functools.lru_cache(maxsize=None)
    def member_calibration(name: str) -> tuple[CalibrationData, settings.CalibrateFn]:
        """One calibration data set and one cached calibration per member: statistics depend on (member,
        matched layers, act specs) only."""
        data = family.calibration_data(load(name), calibration_options)
        return data, cached_calibration(calibrate_on(data))

    current = {"model": None}

    def evaluate(cell: Cell) -> dict[str, Any]:
        if cell.model != current["model"]:
            # Cells come model by model: drop the previous member's compiled programs and calibration. A long
            # sweep otherwise accumulates thousands of executables (each LLVM-compiled program holds memory
            # mappings; the process hit "LLVM compilation error: Cannot allocate memory" after ~75 PTQ cells).
            jax.clear_caches()
            member_calibration.cache_clear()
            current["model"] = cell.model
        member = load(cell.model)
        rules = cell.rules(member.quant_pattern, **options)
        materialize = settings.materialize_for(config, cell.setting)
        method = settings.get_method(cell.method)
        uses_data = bool(rules) and (method.needs_data or any(r.act is not None and r.act.static for r in rules))
        data, calibrate = member_calibration(member.name) if uses_data else (None, None)
        quantized = settings.quantize_for_cell(
            member.model, rules, cell.method,
            settings.MethodContext(params=cell.params, calibrate=calibrate, data=data, seed=cell.prng_seed,
                                   materialize=materialize, backend=backend))
        labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), n_per_class)
        images = np.clip(np.asarray(member.sample(quantized, labels, jax.random.key(cell.model_seed))), -1.0, 1.0)
        scores = metric.evaluate_samples(images, labels, reference_split=reference_split, groups=groups)
        report = bit_accounting(member.model, rules)
        # Packed cells: the storage of the arrays the cell really ran with (QArray.nbytes of every packed kernel).
        storage = bit_accounting(quantized).storage_bytes if materialize == "packed" else report.storage_bytes
        record = dict(fid=float(scores["dfd"]), accuracy=float(scores["accuracy"]), n_samples=int(scores["n"]),
                      metric_name=METRIC_NAME, family=member.family, n_params=int(report.total_params),
                      mt_bits=int(report.mt_bits), ct_bits=int(report.ct_bits),
                      storage_bytes=int(storage), materialize=materialize if rules else "float")
        if rules and materialize == "packed":
            record["backend"] = backend
        if "interval" in scores:
            interval = scores["interval"]
            record["fid_interval"] = {"lo": interval.lo, "hi": interval.hi, "se": interval.se,
                                      "level": interval.level, "groups": interval.groups}
            if out_dir is not None:
                relative = pathlib.Path(FEATURES_DIR) / cell.model / f"{cell.key.replace('|', '_')}.npz"
                (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                np.savez(out_dir / relative, features=scores["features"], replicates=scores["replicates"])
                record["features_file"] = relative.as_posix()
                record["features_reference"] = _save_reference(out_dir, reference_split)
        if data is not None:
            record["calibration"] = dict(data.description)
        if out_dir is not None and samples_per_class > 0:
            relative = pathlib.Path(SAMPLES_DIR) / cell.model / f"{cell.key.replace('|', '_')}.png"
            save_sample_grid(images, n_per_class, min(samples_per_class, n_per_class), out_dir / relative)
            record["samples_image"] = relative.as_posix()
        return record

    return evaluate


def _save_reference(out_dir: pathlib.Path, split: str) -> str:
    """Writes the reference statistics the DFD uses (``mu`` [64], ``sigma`` [64, 64] float64) once per sweep
    folder; returns the path relative to it (what paired comparisons of saved features need)."""
    relative = pathlib.Path(FEATURES_DIR) / f"reference_{split}.npz"
    path = out_dir / relative
    if not path.is_file():
        stats = metric.reference_stats(split)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")  # two workers may race: write, then rename
        np.savez(tmp, mu=stats.mu, sigma=stats.sigma)
        os.replace(tmp, path)
    return relative.as_posix()


def _abstract_var(name: str) -> nnx.Module:
    directory = var_family.CHECKPOINT_ROOT / name
    if not (directory / checkpoint.METADATA_FILE).is_file():
        raise ValueError(f"no VAR demo member {name!r}; available: {var_family.member_names()}")
    ctor = checkpoint.load_metadata(directory)["ctor"]
    tokenizer_ctor = checkpoint.load_metadata(var_family.CHECKPOINT_ROOT / var_family.TOKENIZER_NAME)["ctor"]
    return nnx.eval_shape(lambda: var_family.build_var(ctor, tokenizer_ctor))


def _abstract_dit(name: str) -> nnx.Module:
    directory = dit_family.CHECKPOINT_ROOT / name
    if not (directory / checkpoint.METADATA_FILE).is_file():
        raise ValueError(f"no DiT demo member {name!r}; available: {dit_family.member_names()}")
    kwargs = dict(checkpoint.load_metadata(directory)["model"])
    return nnx.eval_shape(lambda: dit_family.DiT(**kwargs, rngs=nnx.Rngs(0)))


def _abstract_from(module_name: str) -> tuple[Callable[[str], nnx.Module], str]:
    """``(abstract_member, QUANT_PATTERN)`` of a family module that provides both (LlamaGen, MAR)."""
    module = importlib.import_module(module_name)
    return module.abstract_member, module.QUANT_PATTERN


# family -> () -> (abstract network of a member name, module-path regex of its quantized layers)
_ABSTRACT: dict[str, Callable[[], tuple[Callable[[str], nnx.Module], str]]] = {
    "var": lambda: (_abstract_var, var_family.QUANT_PATTERN),
    "dit": lambda: (_abstract_dit, dit_family.QUANT_PATTERN),
    "llamagen": lambda: _abstract_from("bitlaws.demo.llamagen_family"),
    "mar": lambda: _abstract_from("bitlaws.demo.mar_family"),
}


@functools.lru_cache(maxsize=None)
def abstract_member(name: str) -> tuple[nnx.Module, str]:
    """``(abstract network, quant pattern)`` of a shipped member, built from its metadata without weights.

    Raises:
        ValueError: an unknown family or member (the message lists the available ones).
    """
    family_name = name.split("-", 1)[0]
    if family_name not in _ABSTRACT:
        raise ValueError(f"unknown demo family {family_name!r} in model {name!r}; families: {sorted(_ABSTRACT)}")
    build, pattern = _ABSTRACT[family_name]()
    return build(name), pattern


def check_cells(config: ml_collections.ConfigDict, cells: Sequence[Cell]) -> None:
    """The sweep's pre-check: each cell's member exists and its rules fit the member's abstract network.

    Raises:
        ValueError: naming the first failing cell (and counting the others), see `runner.check_each`.
    """
    options = settings.quant_options(config)

    def check_one(cell: Cell) -> None:
        model, pattern = abstract_member(cell.model)
        rules = cell.rules(pattern, **options)
        if rules:
            transform.check_rules(model, rules)

    runner.check_each(cells, check_one, key=lambda cell: (cell.model, cell.setting, cell.format))


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


runner.register_evaluator("demo", make_evaluator, check=check_cells)
