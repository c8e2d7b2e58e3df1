"""The ``released`` sweep evaluator: FID-50K / IS of quantized released VAR, DiT, LlamaGen and MAR models
(``bitlaws port`` output).

For a cell (model, setting, format, method, seed) it loads the model's ported folders named in
``config.released.checkpoints[model]`` (``{"var", "vqvae"}``, ``{"dit", "vae"}``, ``{"llamagen", "llamagen_vq"}``
or ``{"mar", "mar_vae"}``; `FAMILY_DIRS`) with the sampling protocol stored with the port
(`bitlaws.analysis.subjects.PORTED`: VAR cfg 1.5, top-k 900, top-p 0.96, no smoothing; DiT 250 DDPM steps, cfg 1.5,
no clipping, SD-VAE decode; LlamaGen the ``sample_c2i_ddp.py`` FID commands: per-variant cfg, no top-k / top-p,
384px decoded and resized to 256px; MAR 256 iterations, 100 head steps, per-variant linear cfg;
``released.<family>_sampling`` override single knobs), quantizes the generator with the cell's method through the
sweep's method registry (`settings.quantize_for_cell`), and then, shard by shard (`released_shards`):

1. samples ``shard_size`` images, ``per_device_batch`` per device, sample ``i`` keyed by ``fold_in(seed, i)`` with
   a label that depends on ``i`` only (`released_sampling`), converted to uint8 as the official scripts do;
2. computes their FID-Inception pool3 features and logits on the same devices (`bitlaws.eval.fid.inception_stats`);
3. writes samples, features and logits to ``OUT/cells/<cell key>/shard_<k>.npz`` atomically.

When all shards exist it accumulates the features in float64 on the host (shard order), merges the processes'
statistics (`bitlaws.eval.sharded.merge_across_processes`) and scores FID against ``released.reference`` (an npz
with ``mu``/``sigma``: the ADM evaluator's ``VIRTUAL_imagenet256_labeled.npz`` or `save_reference_stats` output)
and the Inception Score (``released.is_splits`` contiguous splits, float64 sums per split).

Record fields: ``fid``, ``inception_score``, ``inception_score_std``, ``n_samples`` (all samples the statistics
hold), ``n_samples_resumed`` (those read back from shards of an earlier run), ``metric_name`` (``FID-50K``),
``mt_bits`` / ``ct_bits`` / ``storage_bytes`` / ``n_params`` (`bit_accounting` of the generator under the cell's
rules), ``family``, ``protocol``, ``labels``, ``sample_seed``, ``reference``, ``inception``, ``frechet``,
``devices``, ``processes``, ``samples_per_s`` (sampling throughput of this run), ``shards`` (folder relative to
the sweep folder).

Resume: shards survive any kill; rerunning the sweep command recomputes only the missing shards of the
unfinished cell. Pre-check (`check_cells`, before anything is sampled or written): one line naming the missing
ported folder, reference file or Inception weights and where to get them; rules that do not fit a model; methods
that need calibration data (the study has none: RTN and the other data-free methods only).

Multi-host: run ``python -m bitlaws.sweep.released`` (`bitlaws.sweep.released_multihost`) on every host.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
import zipfile
from typing import Any, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from bitlaws import checkpoint
from bitlaws.analysis import subjects
from bitlaws.eval.fid import fid_from_features, fid_from_stats, inception_stats, load_reference, random_fid_inception
from bitlaws.eval.sharded import allgather_float64, local_data_mesh, merge_across_processes
from bitlaws.eval.stats import FeatureStats
from bitlaws.models import attention as attention_lib
from bitlaws.quant import bit_accounting, transform
from bitlaws.quant.seam import COMPUTE_DTYPES
from bitlaws.sweep import released_sampling, released_shards, runner, settings
from bitlaws.sweep.grid import Cell
from bitlaws.sweep.released_smoke import RANDOM_INCEPTION

CELLS_DIR = "cells"
FEATURE_DIM = 2048
LOGIT_CLASSES = 1008
FRECHET = ("sqrtm", "features")
FAMILY_DIRS = {"var": ("var", "vqvae"), "dit": ("dit", "vae"), "llamagen": ("llamagen", "llamagen_vq"),
               "mar": ("mar", "mar_vae")}
DOCS = "docs/released_study.md"
# Where the files a ported folder is made from come from (shown when a folder is missing).
_SOURCES = {
    "var": ("{model}.pth", "https://huggingface.co/FoundationVision/var", "configs/models/{model}.py"),
    "vqvae": ("vae_ch160v4096z32.pth", "https://huggingface.co/FoundationVision/var", "configs/models/var_d16.py"),
    "dit": ("DiT-XL-2-256x256.pt", "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
            "configs/models/{model}.py"),
    "vae": ("diffusion_pytorch_model.safetensors", "https://huggingface.co/stabilityai/sd-vae-ft-ema",
            "configs/models/sd_vae_ft_ema.py"),
    "llamagen": ("c2i_{VARIANT}_384.pt", "https://huggingface.co/FoundationVision/LlamaGen",
                 "configs/models/llamagen_gpt.py:{variant},image_size=384"),
    "llamagen_vq": ("vq_ds16_c2i.pt", "https://huggingface.co/FoundationVision/LlamaGen",
                    "configs/models/llamagen_vq16.py"),
    "mar": ("pretrained_models/mar/mar_{mar_size}/checkpoint-last.pth",
            "https://github.com/LTH14/mar (`python util/download.py`)", "configs/models/mar.py:{variant}"),
    "mar_vae": ("pretrained_models/vae/kl16.ckpt", "https://github.com/LTH14/mar (`python util/download.py`)",
                "configs/models/mar_vae_kl16.py"),
}
_MAR_SIZES = {"b": "base", "l": "large", "h": "huge"}
REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                 "VIRTUAL_imagenet256_labeled.npz")


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    """The ``config.released`` block (see ``configs/sweeps/released.py``); errors name the ``released.`` field."""

    checkpoints: Mapping[str, Mapping[str, str]]
    reference: str
    inception: str = ""
    n_samples: int = 50_000
    shard_size: int = 1000
    per_device_batch: int = 8
    inception_batch: int = 25
    labels: str = "cyclic"
    per_class: int = 50
    is_splits: int = 10
    frechet: str = "sqrtm"
    keep_samples: bool = True
    progress: bool = True
    var_sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dit_sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    llamagen_sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    mar_sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    attention: str = attention_lib.DEFAULT
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.attention not in attention_lib.IMPLEMENTATIONS:
            raise ValueError(f"config field released.attention must be one of {attention_lib.IMPLEMENTATIONS}, got "
                             f"{self.attention!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"config field released.compute_dtype must be one of {COMPUTE_DTYPES}, got "
                             f"{self.compute_dtype!r}")
        for name in ("n_samples", "shard_size", "per_device_batch", "inception_batch", "per_class", "is_splits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config field released.{name} must be a positive integer, got {value!r}")
        if self.is_splits > self.n_samples:
            raise ValueError(f"config field released.is_splits ({self.is_splits}) exceeds released.n_samples "
                             f"({self.n_samples})")
        if self.labels not in released_sampling.LABEL_ORDERS:
            raise ValueError(f"config field released.labels must be one of {released_sampling.LABEL_ORDERS}, got "
                             f"{self.labels!r}")
        if self.frechet not in FRECHET:
            raise ValueError(f"config field released.frechet must be one of {FRECHET}, got {self.frechet!r}")
        if self.frechet == "features" and self.n_samples > FEATURE_DIM:
            raise ValueError(f"config field released.frechet='features' needs released.n_samples <= {FEATURE_DIM}, "
                             f"got {self.n_samples}; use 'sqrtm'")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "StudyOptions":
        """Reads ``config.released``; sampling knobs set to None keep the port's stored protocol."""
        block = config.get("released", None)
        if block is None:
            raise ValueError("sweep config has no 'released' block (see configs/sweeps/released.py)")
        values = block.to_dict() if hasattr(block, "to_dict") else dict(block)
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"config block 'released' has unknown field(s) {unknown}; valid: {sorted(names)}")
        for family in FAMILY_DIRS:
            name = f"{family}_sampling"
            values[name] = {k: v for k, v in dict(values.get(name) or {}).items() if v is not None}
            unknown = sorted(set(values[name]) - set(subjects.PROTOCOLS[family]))
            if unknown:
                raise ValueError(f"config block 'released.{name}' has unknown field(s) {unknown}; valid: "
                                 f"{sorted(subjects.PROTOCOLS[family])}")
        return cls(**values)

    def family(self, model: str) -> str:
        """``var``, ``dit``, ``llamagen`` or ``mar`` from the folders ``checkpoints[model]`` names."""
        entry = self.checkpoints.get(model)
        if entry is None:
            raise ValueError(f"model {model!r} has no entry in released.checkpoints (known: "
                             f"{sorted(self.checkpoints)})")
        for family, kinds in FAMILY_DIRS.items():
            if set(entry) == set(kinds):
                return family
        choices = " or ".join(f"{kinds} ({family})" for family, kinds in FAMILY_DIRS.items())
        raise ValueError(f"released.checkpoints.{model} must name the folders {choices}, got {sorted(entry)}")

    def sampling(self, family: str) -> dict[str, Any]:
        """The ``released.<family>_sampling`` overrides (knobs set to None dropped)."""
        return dict(getattr(self, f"{family}_sampling"))

    def folder(self, model: str, kind: str) -> pathlib.Path:
        return pathlib.Path(str(self.checkpoints[model][kind])).expanduser()


# ------------------------------------------------------------------------------------------ pre-check


def _missing_port(model: str, kind: str, folder: pathlib.Path) -> str:
    variant = model.rsplit("_", 1)[-1]
    fields = dict(model=model, variant=variant, VARIANT=variant.upper(), mar_size=_MAR_SIZES.get(variant, variant))
    file, url, config = (text.format(**fields) for text in _SOURCES[kind])
    return (f"ported {kind} folder {folder} not found (no {checkpoint.METADATA_FILE}): download "
            f"{file} from {url}, run `bitlaws port {kind} --ckpt {pathlib.Path(file).name} "
            f"--config {config} --out {folder}` or set released.checkpoints.{model}.{kind} (see {DOCS})")


def _check_folder(model: str, kind: str, folder: pathlib.Path) -> dict:
    """The metadata of a ported folder of `kind`; raises a one-line ValueError otherwise."""
    if not (folder / checkpoint.METADATA_FILE).is_file():
        raise ValueError(_missing_port(model, kind, folder))
    metadata = checkpoint.load_metadata(folder)
    if metadata.get("kind") != kind:
        raise ValueError(f"{folder} holds a ported {metadata.get('kind')!r} checkpoint, but "
                         f"released.checkpoints.{model}.{kind} must name a ported {kind!r} folder")
    return metadata


def inception_file(options: StudyOptions) -> Optional[pathlib.Path]:
    """The FID Inception weight file the study uses (None: the random-weight network of smoke runs)."""
    from bitlaws.port.tables.inception import default_weights_path  # pylint: disable=g-import-not-at-top

    if options.inception == RANDOM_INCEPTION:
        return None
    return pathlib.Path(options.inception).expanduser() if options.inception else default_weights_path()


def check_inputs(options: StudyOptions) -> None:
    """The reference statistics and the Inception weights exist (one-line ValueError naming the file)."""
    from bitlaws.port.tables.inception import WEIGHTS_FILE, WEIGHTS_URL  # pylint: disable=g-import-not-at-top

    reference = pathlib.Path(options.reference).expanduser()
    if not reference.is_file():
        raise ValueError(f"FID reference batch {reference} not found: download {REFERENCE_URL.rsplit('/', 1)[1]} "
                         f"from {REFERENCE_URL} or set released.reference to an npz with 'mu' and 'sigma' "
                         f"(see {DOCS})")
    try:
        with zipfile.ZipFile(reference) as archive:
            keys = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
    except zipfile.BadZipFile as e:
        raise ValueError(f"FID reference batch {reference} is not an npz file") from e
    if not {"mu", "sigma"} <= keys:
        raise ValueError(f"FID reference batch {reference} has no 'mu' and 'sigma' arrays (keys: {sorted(keys)}); "
                         f"use the ADM reference batch or `bitlaws eval stats` output")
    weights = inception_file(options)
    if weights is not None and not weights.is_file():
        raise ValueError(f"FID Inception weights {weights} not found: download {WEIGHTS_FILE} from {WEIGHTS_URL} "
                         f"to that path or set released.inception to where it is (see {DOCS})")


@functools.lru_cache(maxsize=16)
def _abstract_generator(folder: str) -> nnx.Module:
    from bitlaws.port.convert import KINDS  # pylint: disable=g-import-not-at-top

    metadata = checkpoint.load_metadata(folder)
    return nnx.eval_shape(lambda: KINDS[metadata["kind"]].build(metadata.get("ctor", {})))


def check_cells(config: ml_collections.ConfigDict, cells: Sequence[Cell]) -> None:
    """The sweep's pre-check (see the module docstring); raises ONE ValueError."""
    options = StudyOptions.from_config(config)
    check_inputs(options)
    quant = settings.quant_options(config)

    def check_one(cell: Cell) -> None:
        family = options.family(cell.model)
        for kind in FAMILY_DIRS[family]:
            _check_folder(cell.model, kind, options.folder(cell.model, kind))
        rules = cell.rules(quant_pattern(family), **quant)
        if rules and subjects.needs_calibration(cell.method, rules):
            raise ValueError(f"method {cell.method!r} needs calibration data, which the released study has none "
                             f"of; use a data-free method such as rtn")
        if rules:
            transform.check_rules(_abstract_generator(str(options.folder(cell.model, family))), rules)

    runner.check_each(cells, check_one, key=lambda cell: (cell.model, cell.setting, cell.format, cell.method))


def quant_pattern(family: str) -> str:
    """Module-path regex of the layers the paper quantizes in a generator of `family` (the demo family's)."""
    import importlib  # pylint: disable=g-import-not-at-top

    return importlib.import_module(f"bitlaws.demo.{family}_family").QUANT_PATTERN


# ------------------------------------------------------------------------------------------ evaluation


def metric_name(n_samples: int) -> str:
    """``FID-50K`` for 50,000 samples, ``FID-24`` for 24."""
    return f"FID-{n_samples // 1000}K" if n_samples % 1000 == 0 else f"FID-{n_samples}"


def cell_folder(out_dir: pathlib.Path, cell: Cell) -> pathlib.Path:
    """``OUT/cells/<cell key with '|' as '_'>``: where a cell's shards live."""
    return pathlib.Path(out_dir) / CELLS_DIR / cell.key.replace("|", "_")


@dataclasses.dataclass
class ShardTotals:
    """What `run_shards` produced on this process.

    Attributes:
        stats: Float64 pool3 statistics of this process's shards (in shard order).
        is_sums: Inception Score sums of the same samples.
        resumed: Samples read back from shards that existed before.
        new: Samples computed now.
        sample_seconds: Seconds spent sampling them.
        features: ``[n_samples, 2048]`` float64 with this process's rows filled (zeros elsewhere) when
            ``released.frechet == "features"``, else None.
    """

    stats: FeatureStats
    is_sums: released_shards.InceptionScoreSums
    resumed: int = 0
    new: int = 0
    sample_seconds: float = 0.0
    features: Optional[np.ndarray] = None


def run_shards(sampler: released_sampling.ShardedSampler, inception: nnx.Module, options: StudyOptions,
               folder: pathlib.Path, seed: int, *, desc: str = "") -> ShardTotals:
    """Computes this process's missing shards of a cell, then accumulates all of its shards.

    Args:
        sampler: The cell's sampler.
        inception: The FID Inception network.
        options: The study options (sample count, shard size, batches, splits).
        folder: The cell's shard folder.
        seed: The base seed of the samples.
        desc: Progress bar label.

    Returns:
        The `ShardTotals` of the shards this process owns.
    """
    plan = released_shards.ShardPlan(options.n_samples, options.shard_size)
    owned = plan.owned(jax.process_index(), jax.process_count())
    done = {k for k in owned if released_shards.read_shard(released_shards.shard_path(folder, k),
                                                          plan.indices(k)) is not None}
    totals = ShardTotals(FeatureStats(FEATURE_DIM),
                         released_shards.InceptionScoreSums(options.n_samples, options.is_splits, LOGIT_CLASSES))
    totals.resumed = sum(plan.indices(k).size for k in done)
    if options.frechet == "features":
        totals.features = np.zeros((options.n_samples, FEATURE_DIM), np.float64)
    show = options.progress and jax.process_index() == 0
    with tqdm(total=sum(plan.indices(k).size for k in owned), initial=totals.resumed, unit="img", desc=desc,
              disable=not show, leave=False, dynamic_ncols=True) as bar:
        for k in owned:
            if k in done:
                continue
            indices = plan.indices(k)
            start = time.perf_counter()
            images = sampler.sample(seed, indices, on_batch=bar.update)  # [s, H, W, 3] uint8
            totals.sample_seconds += time.perf_counter() - start
            run = inception_stats(images, model=inception, batch_size=options.inception_batch * len(
                sampler.mesh.devices.flat), mesh=sampler.mesh, progress=False, keep_features=True)
            released_shards.write_shard(released_shards.shard_path(folder, k), indices, run.features, run.logits,
                                        images if options.keep_samples else None)
            totals.new += indices.size
    for k in owned:  # every shard read back from its file: a resumed run adds exactly what a fresh one adds
        shard = released_shards.read_shard(released_shards.shard_path(folder, k), plan.indices(k))
        if shard is None:
            raise RuntimeError(f"shard {k} of {folder} vanished or changed while the cell was evaluated")
        totals.stats.update(shard["features"])
        totals.is_sums.update(shard["indices"], shard["logits"])
        if totals.features is not None:
            totals.features[shard["indices"]] = shard["features"]
    return totals


def make_evaluator(config: ml_collections.ConfigDict):
    """``evaluate(cell) -> metrics`` for a released study config (block ``config.released``)."""
    options = StudyOptions.from_config(config)
    out_dir = pathlib.Path(config.get("out_dir", None) or ".")
    quant = settings.quant_options(config)
    materialize_of = functools.partial(settings.materialize_for, config)
    backend = settings.backend_for(config)
    mesh = local_data_mesh()
    state: dict[str, Any] = {"model": None, "subject": None, "inception": None, "reference": None}

    def subject_of(model: str) -> subjects.Subject:
        if state["model"] != model:
            jax.clear_caches()  # the previous model's compiled samplers (see bitlaws.demo.evaluate)
            family = options.family(model)
            state["subject"] = subjects.PORTED[family](
                *(str(options.folder(model, kind)) for kind in FAMILY_DIRS[family]), options.sampling(family))
            state["model"] = model
        return state["subject"]

    def inputs() -> tuple[nnx.Module, tuple[np.ndarray, np.ndarray]]:
        if state["inception"] is None:
            from bitlaws.port.tables.inception import load_fid_inception  # pylint: disable=g-import-not-at-top

            weights = inception_file(options)
            state["inception"] = random_fid_inception(0) if weights is None else load_fid_inception(weights)
            loaded = load_reference(pathlib.Path(options.reference).expanduser())
            if loaded is None:
                raise ValueError(f"{options.reference} holds images, not FID statistics ('mu', 'sigma')")
            state["reference"] = loaded[:2]
        return state["inception"], state["reference"]

    def evaluate(cell: Cell) -> dict[str, Any]:
        subject = subject_of(cell.model)
        inception, (ref_mu, ref_sigma) = inputs()
        rules = cell.rules(subject.quant_pattern, **quant)
        if rules and subjects.needs_calibration(cell.method, rules):
            raise ValueError(f"method {cell.method!r} needs calibration data; the released study has none")
        materialize = materialize_of(cell.setting)
        generator = settings.quantize_for_cell(subject.model, rules, cell.method, settings.MethodContext(
            params=cell.params, seed=cell.prng_seed, materialize=materialize, backend=backend))
        # Accelerator options: which kernels run attention, and the matmul operand dtype (after quantization,
        # which sets every layer's quantization afresh).
        attention_lib.set_attention(generator, options.attention)
        transform.set_compute_dtype(generator, None if options.compute_dtype == "float32" else options.compute_dtype)
        sampler = released_sampling.ShardedSampler(
            subject.family, generator, subject.decoder, subject.protocol, mesh=mesh,
            per_device_batch=options.per_device_batch, num_classes=subject.num_classes, label_order=options.labels,
            per_class=options.per_class)
        folder = cell_folder(out_dir, cell)
        totals = run_shards(sampler, inception, options, folder, cell.model_seed, desc=cell.key)
        stats = merge_across_processes(totals.stats)
        totals.is_sums.sums = allgather_float64(totals.is_sums.sums).sum(axis=0)
        resumed, new = allgather_float64([totals.resumed, totals.new]).sum(axis=0)
        # Collectives first, on every process; each feature row is non-zero on one process only (exact sum).
        features = None if totals.features is None else allgather_float64(totals.features).sum(axis=0)
        if jax.process_index() != 0:  # only process 0 scores and records; the others return their counts
            return {"n_samples": int(stats.n), "n_samples_new": int(new)}
        if stats.n != options.n_samples:
            raise RuntimeError(f"the shards of {folder} hold {stats.n} samples, expected {options.n_samples}")
        if features is not None:
            fid = fid_from_features(features, (ref_mu, ref_sigma))
        else:
            fid = fid_from_stats(stats, (ref_mu, ref_sigma))
        is_mean, is_std = totals.is_sums.score()
        report = bit_accounting(subject.model, rules)
        storage = bit_accounting(generator).storage_bytes if rules and materialize == "packed" else report.storage_bytes
        weights = inception_file(options)
        return dict(
            fid=float(fid), inception_score=is_mean, inception_score_std=is_std, n_samples=int(stats.n),
            n_samples_resumed=int(resumed),
            metric_name=metric_name(int(stats.n)), family=subject.family, n_params=int(report.total_params),
            mt_bits=int(report.mt_bits), ct_bits=int(report.ct_bits), storage_bytes=int(storage),
            materialize=materialize if rules else "float", protocol=dict(subject.protocol),
            attention=options.attention, compute_dtype=options.compute_dtype,
            labels={"order": options.labels, "per_class": options.per_class} if options.labels == "blocks"
            else {"order": "cyclic"}, sample_seed=cell.model_seed, is_splits=options.is_splits,
            reference=pathlib.Path(options.reference).name, frechet=options.frechet,
            inception="random weights (smoke test: the FID means nothing)" if weights is None else weights.name,
            devices=jax.device_count(), processes=jax.process_count(),
            samples_per_s=round(totals.new / totals.sample_seconds, 3) if totals.sample_seconds else None,
            shards=folder.relative_to(out_dir).as_posix() if folder.is_relative_to(out_dir) else str(folder))

    return evaluate


runner.register_evaluator("released", make_evaluator, check=check_cells)
