"""FID / Inception Score pipeline: images -> sharded Inception features -> statistics -> distance.

`inception_stats` runs `FIDInceptionV3` over an image source with `accumulate_features` (batch sharded over
all devices, one compilation, host-side float64 statistics). The network's weights travel as the ``params``
argument of the jitted step, so they are replicated device buffers and never constants of the compiled
program; pool3 features and the 1008-way logits (the ``fc`` head applied to pool3) come out of the same step.

Image sources (``images_source``):

* a uint8 ``[N, H, W, 3]`` array, or a float array in [0, 1];
* an iterable of such batches (validated batch by batch as they are consumed);
* a path to an ADM sample ``.npz`` (key ``arr_0``, uint8 NHWC), streamed from the archive in batches, so
  50,000 samples never have to be held in memory;
* a path to a folder of PNG files (read in sorted file-name order).

Any H and W work: the network resizes to 299x299 itself (bilinear, ``align_corners=False``).

Sample counts: FID is biased upwards at small ``n`` (and with ``n < 2048`` the 2048x2048 covariance is
singular), so FIDs are only comparable at equal sample counts. `compute_fid` therefore returns ``n_samples``
and ``n_ref`` next to the distance; report them with every FID (the standard protocol is 50,000 samples
against the reference statistics of the training set).

Reference statistics files are npz with keys ``mu`` (2048,) and ``sigma`` (2048, 2048), float64 (the format
of pytorch-fid's ``--save-stats`` and of the ADM evaluator's reference batches). `save_reference_stats`
adds an int64 scalar ``n`` (the number of images) that both tools ignore and `compute_fid` reports.

Matmul precision: the extraction runs under ``jax.default_matmul_precision("highest")`` by default, because
on GPUs the default float32 precision (TF32) and on TPUs the default bfloat16 passes move the features away
from the published float32 network.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bitlaws.eval.frechet import frechet_distance
from bitlaws.eval.inception import FIDInceptionV3, validate_images
from bitlaws.eval.inception_score import inception_score
from bitlaws.eval.sharded import FeatureRun, accumulate_features
from bitlaws.eval.stats import FeatureStats, check_nhwc_uint8, load_png_folder, load_samples_npz, load_stats_npz

__all__ = [
    "inception_stats",
    "fid_from_stats",
    "fid_from_features",
    "compute_fid",
    "load_reference",
    "save_reference_stats",
    "iter_samples_npz",
    "random_fid_inception",
]

PathLike = Union[str, os.PathLike]
StatsLike = Union[FeatureStats, FeatureRun, tuple[np.ndarray, np.ndarray]]

# Below this many images the pool3 covariance (2048 x 2048) is singular.
MIN_FULL_RANK_IMAGES = 2048

_SAMPLES_KEY = "arr_0"


# ----------------------------------------------------------------------------------------------------------
# Image sources
# ----------------------------------------------------------------------------------------------------------

def _npz_member_keys(archive: zipfile.ZipFile) -> list[str]:
    return [name[:-4] if name.endswith(".npy") else name for name in archive.namelist()]


def _read_npy_header(stream: Any) -> Optional[tuple[tuple[int, ...], bool, np.dtype]]:
    """``(shape, fortran_order, dtype)`` of an ``.npy`` stream, or None for a format version we don't stream."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    return None


def _missing_samples_key(path: PathLike, keys: list[str]) -> ValueError:
    return ValueError(f"{os.fspath(path)}: expected key '{_SAMPLES_KEY}' (ADM sample batch, uint8 [N, H, W, 3]); "
                      f"keys present: {sorted(keys)}")


@contextlib.contextmanager
def _samples_member(path: PathLike):
    """Opens ``arr_0.npy`` of an npz: yields ``(stream positioned after the header, header or None)``.

    Raises:
        ValueError: The npz has no ``arr_0`` (the message lists the keys present).
    """
    with zipfile.ZipFile(path) as archive:
        keys = _npz_member_keys(archive)
        if _SAMPLES_KEY not in keys:
            raise _missing_samples_key(path, keys)
        with archive.open(_SAMPLES_KEY + ".npy") as stream:
            yield stream, _read_npy_header(stream)


def _npz_sample_count(path: PathLike) -> Optional[int]:
    """Number of images in an npz's ``arr_0``, read from its header (None for an unstreamable header).

    Raises:
        ValueError: The npz has no ``arr_0`` (raised here, before any network is compiled).
    """
    with _samples_member(path) as (_, header):
        return None if header is None or not header[0] else int(header[0][0])


def iter_samples_npz(path: PathLike, batch_size: int) -> Iterator[np.ndarray]:
    """Streams the images of an ADM sample npz (``arr_0``, uint8 NHWC) in batches.

    Only one batch is in memory at a time (the archive member is read sequentially, compressed or not).
    Falls back to loading the whole array for ``.npy`` format versions other than 1.0/2.0 or Fortran order.

    Args:
        path: The ``.npz`` file.
        batch_size: Images per yielded batch (the last one may be smaller).

    Yields:
        uint8 ``[b, H, W, 3]`` arrays, in file order.

    Raises:
        ValueError: ``arr_0`` is missing (the message lists the keys present), is not uint8 ``[N, H, W, 3]``,
            or the file is truncated.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = f"{os.fspath(path)}['{_SAMPLES_KEY}']"
    with _samples_member(path) as (stream, header):
        if header is not None and not header[1]:
            shape, _, dtype = header
            check_nhwc_uint8(np.broadcast_to(np.zeros((), dtype), shape), source)  # the stored shape, no memory
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                rows = min(batch_size, shape[0] - start)
                data = stream.read(rows * row_bytes)
                if len(data) != rows * row_bytes:
                    raise ValueError(f"{source}: file truncated after {start} of {shape[0]} images")
                yield np.frombuffer(data, np.uint8).reshape((rows,) + tuple(shape[1:]))
            return
    images = load_samples_npz(path)
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


def _validated(batches: Iterable[Any]) -> Iterator[Any]:
    """Checks every batch of an iterable with `validate_images` as it is consumed."""
    for batch in batches:
        validate_images(batch)
        yield batch


def _open_source(images_source: Any, batch_size: int) -> tuple[Any, Optional[int]]:
    """Turns any supported image source into (array or iterable of batches, total count if known)."""
    if isinstance(images_source, (str, os.PathLike)):
        path = Path(images_source).expanduser()
        if path.is_dir():
            images = load_png_folder(path)
            return images, images.shape[0]
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such sample file or folder (expected an ADM .npz with "
                                    f"'{_SAMPLES_KEY}' or a folder of .png files)")
        if path.suffix.lower() != ".npz":
            raise ValueError(f"{path}: unsupported sample source; expected an ADM .npz (key '{_SAMPLES_KEY}', "
                             "uint8 [N, H, W, 3]) or a folder of .png files")
        total = _npz_sample_count(path)
        return iter_samples_npz(path, batch_size), total
    if hasattr(images_source, "shape") and hasattr(images_source, "dtype"):
        validate_images(images_source)
        return images_source, int(images_source.shape[0])
    if isinstance(images_source, Iterable):
        return _validated(images_source), None
    raise ValueError("images_source must be an image array [N, H, W, 3] (uint8, or float in [0, 1]), an iterable "
                     f"of such batches, an .npz path or a PNG folder path; got {type(images_source).__name__}")


# ----------------------------------------------------------------------------------------------------------
# Features and statistics
# ----------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _feature_fn(graphdef: nnx.GraphDef, with_logits: bool):
    """``fn(state, images) -> pool3 [B, 2048]`` or ``(pool3 [B, 2048], logits [B, 1008])``.

    Cached on the network's graph, so repeated `inception_stats` calls (one per shard of samples) hand
    `accumulate_features` the same function and reuse its compiled step.
    """

    def features(state: nnx.State, images: jax.Array):
        model = nnx.merge(graphdef, state)
        return model(images) if with_logits else model.features(images)

    return features


def inception_stats(images_source: Any, *, model: Optional[FIDInceptionV3] = None,
                    inception_path: Optional[PathLike] = None, batch_size: int = 50, mesh: Optional[Mesh] = None,
                    progress: bool = True, with_logits: bool = True,
                    precision: Optional[str] = "highest", keep_features: bool = False) -> FeatureRun:
    """Inception pool3 statistics (and logits) of a set of images, sharded over all devices.

    Args:
        images_source: uint8 ``[N, H, W, 3]`` (or float in [0, 1]) array, an iterable of such batches, an ADM
            ``.npz`` path (``arr_0``) or a folder of PNG files; see the module docstring.
        model: The network; default `load_fid_inception(inception_path)` (the published FID weights).
        inception_path: Weight file for the default model (default ``$BITLAWS_FID_INCEPTION`` or
            ``~/.cache/bitlaws/pt_inception-2015-12-05-6726825d.pth``). Ignored when ``model`` is given.
        batch_size: Images per step per process (padded to a multiple of the device count).
        mesh: Mesh with a ``'data'`` axis; default all devices.
        progress: Show a progress bar.
        with_logits: Also collect the 1008-way logits (for the Inception Score). Ignored (logits None) when the
            model has no ``fc`` layer.
        precision: ``jax.default_matmul_precision`` during extraction; None keeps the global setting.
        keep_features: Also return the ``[N, 2048]`` pool3 features (``FeatureRun.features``, for
            `bitlaws.eval.intervals`; 8 KB per image).

    Returns:
        `FeatureRun` with ``stats`` (pool3 mean/covariance, float64), ``logits`` (``[N, 1008]`` float32 or
        None), ``n``, ``images_per_sec``, ``seconds`` and ``features`` (None unless `keep_features`).

    Raises:
        FileNotFoundError: The weight file or the sample path does not exist (the message says what to do).
        ValueError: The images are not NHWC with 3 channels, uint8 or float in [0, 1]; an npz has no ``arr_0``.
    """
    if model is None:
        from bitlaws.port.tables.inception import load_fid_inception  # pylint: disable=g-import-not-at-top
        model = load_fid_inception(inception_path)
    images, total = _open_source(images_source, batch_size)
    with_logits = with_logits and model.fc is not None
    graphdef, state = nnx.split(model)
    context = contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)
    with context:
        return accumulate_features(_feature_fn(graphdef, with_logits), images, batch_size=batch_size, mesh=mesh,
                                   progress=progress, params=state, total=total, keep_features=keep_features)


def _mu_sigma(stats: StatsLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(stats, FeatureRun):
        stats = stats.stats
    if isinstance(stats, FeatureStats):
        if stats.n < 2:
            raise ValueError(f"{name}: FID needs the statistics of at least 2 images, got {stats.n}")
        return stats.mu, stats.sigma
    if isinstance(stats, tuple) and len(stats) == 2:
        return np.asarray(stats[0]), np.asarray(stats[1])
    raise ValueError(f"{name} must be FeatureStats, a FeatureRun or a (mu, sigma) pair; got {type(stats).__name__}")


def fid_from_stats(a: StatsLike, b: StatsLike) -> float:
    """Frechet distance between two sets of pool3 statistics (pytorch-fid's procedure, float64).

    Args:
        a: `FeatureStats`, `FeatureRun` or ``(mu [d], sigma [d, d])``.
        b: The same kinds.

    Returns:
        The FID as a Python float.
    """
    mu1, sigma1 = _mu_sigma(a, "a")
    mu2, sigma2 = _mu_sigma(b, "b")
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def fid_from_features(features: np.ndarray, ref: StatsLike) -> float:
    """FID of a small sample set (``n <= d``) from its features, through the ``n x n`` Gram form (exact, fast).

    With ``A = (F - mean) / sqrt(n - 1)`` (``[n, d]``), the sample covariance is ``S1 = A^T A`` and the non-zero
    eigenvalues of ``S1 S2`` are those of the symmetric positive semi-definite ``A S2 A^T`` (``[n, n]``), so
    ``tr((S1 S2)^(1/2)) = sum sqrt(eigvalsh(A S2 A^T))``: a few ``n x d x d`` products instead of the ``d^3``
    matrix square root of `fid_from_stats` (seconds to minutes for ``d = 2048`` on a busy CPU). The value is the
    same quantity as `fid_from_stats` (equal up to float64 rounding where ``sqrtm`` is accurate); use it for
    the small sample counts of tests and smoke runs, whose covariance has rank ``n - 1 < d`` anyway.

    Args:
        features: ``[n, d]`` features of the samples, ``2 <= n <= d``.
        ref: Reference statistics: `FeatureStats`, `FeatureRun` or ``(mu [d], sigma [d, d])``.

    Returns:
        The FID as a Python float.

    Raises:
        ValueError: ``n < 2``, ``n > d`` (use `fid_from_stats`) or mismatched dimensions.
    """
    features = np.asarray(features, np.float64)
    mu2, sigma2 = (np.asarray(a, np.float64) for a in _mu_sigma(ref, "ref"))
    if features.ndim != 2 or not 2 <= features.shape[0] <= features.shape[1] or features.shape[1] != mu2.shape[0]:
        raise ValueError(f"fid_from_features needs features [n, d] with 2 <= n <= d = {mu2.shape[0]}, got shape "
                         f"{features.shape}")
    mu1 = features.mean(axis=0)
    a = (features - mu1) / np.sqrt(features.shape[0] - 1)  # [n, d]
    gram = a @ sigma2 @ a.T  # [n, n]
    eigenvalues = np.linalg.eigvalsh(0.5 * (gram + gram.T))
    tr_covmean = float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(a * a) + np.trace(sigma2) - 2.0 * tr_covmean)


def save_reference_stats(path: PathLike, stats: StatsLike, n: Optional[int] = None) -> Path:
    """Writes reference statistics: npz with ``mu`` (d,), ``sigma`` (d, d) float64 and ``n`` (int64 scalar).

    ``mu``/``sigma`` are the pytorch-fid / ADM format; ``n`` (the number of images) is an extra key those
    tools ignore. ``n`` is omitted when unknown. The file is written at exactly ``path``.

    Args:
        path: Destination file.
        stats: `FeatureStats`, `FeatureRun` or ``(mu, sigma)``.
        n: Image count; default ``stats.n`` for `FeatureStats` / `FeatureRun`.

    Returns:
        The path written.
    """
    mu, sigma = _mu_sigma(stats, "stats")
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"expected mu (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    if n is None and isinstance(stats, (FeatureStats, FeatureRun)):
        n = stats.n if isinstance(stats, FeatureStats) else stats.stats.n
    arrays = {"mu": mu, "sigma": sigma}
    if n is not None:
        arrays["n"] = np.asarray(n, np.int64)
    out = Path(path)
    with open(out, "wb") as f:
        np.savez(f, **arrays)
    return out


def load_reference(path: PathLike) -> Optional[tuple[np.ndarray, np.ndarray, Optional[int]]]:
    """Reads ``(mu, sigma, n)`` from a statistics npz, or None if the file holds images (``arr_0``) instead.

    ``n`` comes from the optional ``n`` key (written by `save_reference_stats`) and is None otherwise
    (pytorch-fid and ADM statistics do not record it).

    Raises:
        ValueError: The file has neither ``mu`` and ``sigma`` nor ``arr_0`` (the message lists its keys).
    """
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.keys())
        if not {"mu", "sigma"} <= keys:
            if _SAMPLES_KEY in keys:
                return None
            raise ValueError(f"{os.fspath(path)}: a reference needs keys 'mu' and 'sigma' (FID statistics) or "
                             f"'{_SAMPLES_KEY}' (uint8 images); keys present: {sorted(keys)}")
        n = int(data["n"]) if "n" in keys else None
    mu, sigma = load_stats_npz(path)
    return mu, sigma, n


def _is_npz_path(ref: Any) -> bool:
    return isinstance(ref, (str, os.PathLike)) and Path(ref).expanduser().is_file() \
        and Path(ref).suffix.lower() == ".npz"


def compute_fid(samples: Any, ref: Any, *, model: Optional[FIDInceptionV3] = None,
                inception_path: Optional[PathLike] = None, batch_size: int = 50, mesh: Optional[Mesh] = None,
                progress: bool = True, is_splits: int = 10) -> dict[str, Any]:
    """FID of ``samples`` against ``ref`` (and the Inception Score of ``samples``).

    Args:
        samples: Any `inception_stats` image source (array, iterable of batches, ADM ``.npz``, PNG folder).
        ref: A statistics ``.npz`` (``mu``/``sigma``, e.g. an ADM reference batch or pytorch-fid stats),
            `FeatureStats` / `FeatureRun` / ``(mu, sigma)``, or any image source (its statistics are computed).
        model: The network; default the published FID weights (`load_fid_inception(inception_path)`), loaded
            once for both sets.
        inception_path: Weight file for the default model.
        batch_size: Images per step per process.
        mesh: Mesh with a ``'data'`` axis; default all devices.
        progress: Show progress bars.
        is_splits: Splits of the Inception Score (10 in the standard protocol).

    Returns:
        ``{"fid": float, "inception_score": float | None, "inception_score_std": float | None,
        "n_samples": int, "n_ref": int | None, "images_per_sec": float, "seconds": float}``.
        The Inception Score is None when the model has no ``fc`` or ``n_samples < is_splits``; ``n_ref`` is
        None for a statistics file without ``n``; ``images_per_sec`` is the sample extraction throughput and
        ``seconds`` the wall time of the whole call.

    Raises:
        FileNotFoundError: Missing weight file (message from `load_fid_inception`) or sample path.
        ValueError: Bad image layout/dtype/range, an npz without the needed keys, or fewer than 2 images.
    """
    start = time.perf_counter()
    if model is None:
        from bitlaws.port.tables.inception import load_fid_inception  # pylint: disable=g-import-not-at-top
        model = load_fid_inception(inception_path)
    ref_stats: StatsLike
    if isinstance(ref, (FeatureStats, FeatureRun, tuple)):
        ref_stats = ref
        n_ref = ref.n if isinstance(ref, FeatureStats) else (ref.stats.n if isinstance(ref, FeatureRun) else None)
    else:
        loaded = load_reference(ref) if _is_npz_path(ref) else None
        if loaded is not None:
            ref_stats, n_ref = (loaded[0], loaded[1]), loaded[2]
        else:
            ref_run = inception_stats(ref, model=model, batch_size=batch_size, mesh=mesh, progress=progress,
                                      with_logits=False)
            ref_stats, n_ref = ref_run.stats, ref_run.n
    run = inception_stats(samples, model=model, batch_size=batch_size, mesh=mesh, progress=progress)
    fid = fid_from_stats(run, ref_stats)
    is_mean = is_std = None
    if run.logits is not None and run.n >= is_splits:
        is_mean, is_std = inception_score(run.logits, splits=is_splits)
    return {"fid": fid, "inception_score": is_mean, "inception_score_std": is_std, "n_samples": run.n,
            "n_ref": n_ref, "images_per_sec": run.images_per_sec, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------------------
# Random weights (tests and benchmarks only)
# ----------------------------------------------------------------------------------------------------------

def _recipe_draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Fixture-recipe distributions by leaf name (kernels ``normal / sqrt(fan_in)``, BN near identity)."""
    if name == "kernel":
        return rng.standard_normal(shape) / np.sqrt(float(np.prod(shape[:-1])))  # HWIO / [in, out]
    if name == "scale":
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name == "bias":
        return 0.05 * rng.standard_normal(shape)
    if name == "mean":
        return 0.1 * rng.standard_normal(shape)
    if name == "var":
        return rng.uniform(0.5, 1.5, size=shape)
    raise ValueError(f"no recipe for parameter {name!r}")


def random_fid_inception(seed: int = 0, *, include_fc: bool = True) -> FIDInceptionV3:
    """`FIDInceptionV3` with random recipe-style weights, built without eager initialisation (about 1 s).

    For tests and throughput benchmarks only: its FIDs mean nothing. The weights follow the fixture recipe's
    distributions (conv/linear kernels ``N(0, 1) / sqrt(fan_in)``, BN scale ``1 + 0.1 N``, bias ``0.05 N``,
    running mean ``0.1 N``, running var ``U(0.5, 1.5)``), which keep activations O(1) through the network.

    Args:
        seed: numpy RNG seed.
        include_fc: Build the 2048 -> 1008 ``fc`` head.

    Returns:
        The model (float32 parameters).
    """
    abstract = nnx.eval_shape(lambda: FIDInceptionV3(nnx.Rngs(0), include_fc=include_fc))
    graphdef, abstract_state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        name = [k for k in keys if k != "value"][-1]
        return np.asarray(_recipe_draw(str(name), tuple(leaf.shape), rng), leaf.dtype)

    state = jax.tree_util.tree_map_with_path(draw, abstract_state)
    return nnx.merge(graphdef, state)
