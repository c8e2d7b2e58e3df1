"""Data-parallel feature extraction with host-side float64 statistics.

`accumulate_features` runs a feature network (any JAX function mapping an
image batch to (n, d) features, e.g. the FID Inception network) under
``jax.jit`` with the batch sharded over a 1-D device mesh whose axis is named
``'data'``.  Every batch is padded with zero images to a fixed size that is a
multiple of the number of data shards (one compilation for the whole run); a
boolean mask marks the real rows.  The features are copied back to the host,
the padding rows are dropped and `FeatureStats.update` accumulates float64
sums, so the full (50,000, 2048) feature matrix never has to be stored.
Optionally the classifier logits (small: n x 1008) are collected for the
Inception Score.  Dispatch is pipelined one batch deep: batch i+1 is launched
before the results of batch i are copied to the host.

Mesh: by default ``jax.make_mesh((jax.device_count(),), ('data',),
axis_types=(AxisType.Auto,))``.  ``Auto`` (not the ``Explicit`` default of
``make_mesh`` in JAX 0.10) lets XLA propagate the batch sharding through an
arbitrary feature function; with explicit axes the sharding becomes part of
the array types and some operations of an unannotated network can be rejected.

Multi-host use::

    jax.distributed.initialize()          # once per process, before any JAX use
    run = accumulate_features(fn, my_shard_of_images, batch_size=256)
    stats = merge_across_processes(run.stats)   # identical on every process
    mu, sigma = stats.mu, stats.sigma

Each process feeds only its own shard of the images (``batch_size`` is the
per-process batch); the per-process batches are assembled into one global
array with ``jax.make_array_from_process_local_data`` and every process reads
back only the rows it contributed.  Every process must therefore run the same
number of batches (a process that runs out of data must keep feeding empty
batches, shape (0, H, W, C), which are pure padding) or the collective step
will hang.  The per-process sums are combined by `merge_across_processes`,
which all-gathers them with ``jax.experimental.multihost_utils.process_allgather``
(bit-exactly, see there) and merges them in process order; with a single
process it returns its argument unchanged.  Logits and ``n`` in the returned
`FeatureRun` are per process.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from bitlaws.eval.stats import FeatureStats
from bitlaws.xla_options import COMPILER_OPTIONS

__all__ = ["FeatureRun", "accumulate_features", "allgather_float64", "data_mesh", "local_data_mesh",
           "merge_across_processes"]

DATA_AXIS = "data"


@dataclasses.dataclass
class FeatureRun:
    """Result of `accumulate_features`.

    Attributes:
      stats: Accumulated feature statistics (this process's data merged into
        the ``stats`` argument, if one was given).
      logits: (n, num_classes) logits of the real images in input order, in
        the dtype the network produced, or None if no logits were requested.
      images_per_sec: Real images processed per second of wall-clock time of
        the whole call (including compilation and host-side accumulation).
      n: Number of real images processed by this call (on this process).
      seconds: Wall-clock duration of the call.
      features: (n, d) features of the real images in input order (this
        process's), as the network produced them, when ``keep_features`` was
        set (for the intervals of `bitlaws.eval.intervals`); else None.
    """

    stats: FeatureStats
    logits: np.ndarray | None
    images_per_sec: float
    n: int
    seconds: float
    features: np.ndarray | None = None


def data_mesh(num_devices: int | None = None) -> Mesh:
    """1-D mesh over the devices with the single axis ``'data'`` (Auto type).

    Args:
      num_devices: Number of devices to use (the first ones); all by default.

    Returns:
      A `jax.sharding.Mesh` of shape (num_devices,).
    """
    n = jax.device_count() if num_devices is None else int(num_devices)
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def local_data_mesh() -> Mesh:
    """1-D ``'data'`` mesh (Auto type) over this process's devices only.

    For work that each process does on its own (e.g. the shards of sample indices a process owns in
    `bitlaws.sweep.released`): programs on it need no other process, so processes never wait for each other;
    results are combined afterwards (`merge_across_processes`, `allgather_float64`). With one process it is
    `data_mesh()`.
    """
    devices = jax.local_devices()
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def _local_data_shards(mesh: Mesh) -> int:
    """Number of distinct batch slices held by this process's devices."""
    axis = mesh.axis_names.index(DATA_AXIS)
    pid = jax.process_index()
    devices = mesh.devices
    coords = {idx[axis] for idx in np.ndindex(devices.shape) if devices[idx].process_index == pid}
    return len(coords)


def _iter_batches(images: Any, batch_size: int) -> Iterator[np.ndarray]:
    """Yields host batches of at most ``batch_size`` rows.

    Args:
      images: One array (N, ...) or an iterable of arrays (n_i, ...).
      batch_size: Maximum rows per yielded batch; larger inputs are split.

    Yields:
      numpy arrays with leading batch axis.
    """
    sources: Iterable[Any] = [images] if hasattr(images, "shape") else images
    for source in sources:
        arr = np.asarray(source)
        if arr.ndim < 1:
            raise ValueError(f"image batches need a leading batch axis, got shape {arr.shape}")
        if arr.shape[0] == 0:
            yield arr
        for start in range(0, arr.shape[0], batch_size):
            yield arr[start : start + batch_size]


def _pad(batch: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pads ``batch`` to ``size`` rows.

    Args:
      batch: (n, ...) array with n <= size.
      size: Target number of rows.

    Returns:
      ``(padded (size, ...), mask (size,) bool)`` with mask True on real rows.
    """
    n = batch.shape[0]
    mask = np.zeros(size, dtype=bool)
    mask[:n] = True
    if n == size:
        return batch, mask
    padded = np.zeros((size,) + batch.shape[1:], dtype=batch.dtype)
    padded[:n] = batch
    return padded, mask


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order.

    Args:
      array: Global array sharded along axis 0 (possibly replicated along
        other mesh axes).

    Returns:
      The rows held by this process's devices, concatenated by row index.
    """
    if array.is_fully_addressable:
        return np.asarray(array)
    by_start: dict[int, Any] = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        by_start.setdefault(start, shard.data)
    return np.concatenate([np.asarray(by_start[s]) for s in sorted(by_start)], axis=0)


@functools.lru_cache(maxsize=8)
def _make_step(
    feature_fn: Callable[..., Any],
    logits_fn: Callable[[Any], Any] | None,
    with_params: bool,
    data_sharding: NamedSharding,
    replicated: NamedSharding,
) -> Callable[..., Any]:
    """Builds the jitted, batch-sharded step returning (features, logits|None).

    Cached on its arguments, so repeated `accumulate_features` calls with the same function and mesh (one call
    per shard of samples) reuse one compiled program.
    """

    def split_outputs(out: Any) -> tuple[Any, Any]:
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise ValueError(
                    "feature_fn must return features (n, d) or a pair (features, logits); "
                    f"got a sequence of length {len(out)}"
                )
            if logits_fn is not None:
                raise ValueError("feature_fn already returns logits; do not also pass logits_fn")
            return out[0], out[1]
        return out, (None if logits_fn is None else logits_fn(out))

    if with_params:

        def step(params: Any, images: jax.Array) -> tuple[Any, Any]:
            return split_outputs(feature_fn(params, images))

        in_shardings: Any = (replicated, data_sharding)
    else:

        def step(images: jax.Array) -> tuple[Any, Any]:  # type: ignore[misc]
            return split_outputs(feature_fn(images))

        in_shardings = (data_sharding,)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=data_sharding, compiler_options=COMPILER_OPTIONS)


def _check_output(name: str, value: np.ndarray, rows: int) -> None:
    if value.ndim != 2 or value.shape[0] != rows:
        raise ValueError(
            f"{name} must have shape (batch, {'d' if name == 'features' else 'num_classes'}) "
            f"= ({rows}, ...), got shape {value.shape}"
        )


def accumulate_features(
    feature_fn: Callable[..., Any],
    images_iter: Any,
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    stats: FeatureStats | None = None,
    logits_fn: Callable[[Any], Any] | None = None,
    progress: bool = True,
    params: Any = None,
    total: int | None = None,
    keep_features: bool = False,
) -> FeatureRun:
    """Extracts features batch by batch on all devices and accumulates statistics.

    Args:
      feature_fn: JAX-traceable ``feature_fn(images) -> features`` (or
        ``feature_fn(params, images)`` if ``params`` is given) with features
        of shape (batch, d).  It may instead return a pair ``(features,
        logits)`` with logits (batch, num_classes), e.g. a network computing
        both in one pass.  Padding rows are zero images; the function must be
        row-wise (no cross-example interaction such as batch statistics).
      images_iter: Either one array (N, ...) or an iterable of batches
        (n_i, ...) (numpy or JAX; typically uint8 NHWC, passed to
        ``feature_fn`` unchanged apart from zero padding).  Batches larger
        than ``batch_size`` are split.
      batch_size: Maximum number of real images per step (per process).  Each
        step's input is zero-padded to ``batch_size`` rounded up to a multiple
        of the number of data shards, so all steps share one compilation.
      mesh: Mesh with an axis named ``'data'`` over which the batch is
        sharded (other axes replicate).  Default: `data_mesh()` over all
        devices.
      stats: Accumulator to add to (e.g. to resume); a new one by default.
      logits_fn: Optional JAX function ``logits_fn(features) -> logits``
        (batch, num_classes) applied to the features inside the same jitted
        step (for FID Inception: the 1008-way fc layer on pool3 features).
      progress: Show a tqdm progress bar.
      params: Optional pytree of weights, replicated on every device and passed
        as the first argument of ``feature_fn`` (avoids baking large weights
        into the compiled program as constants).
      total: Expected number of images, for the progress bar only (inferred
        when ``images_iter`` is a single array).
      keep_features: Also return the per-image features (host memory n x d;
        meant for small sample sets such as the demo's).

    Returns:
      A `FeatureRun` with the statistics, the logits (or None), the number of
      images and the throughput.

    Raises:
      ValueError: If ``batch_size < 1``, the mesh has no ``'data'`` axis, or
        the function outputs have the wrong shape.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    mesh = data_mesh() if mesh is None else mesh
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must have an axis named {DATA_AXIS!r}, got axes {mesh.axis_names}")
    stats = FeatureStats() if stats is None else stats
    shards = _local_data_shards(mesh)
    padded_size = -(-batch_size // shards) * shards

    data_sharding = NamedSharding(mesh, P(DATA_AXIS))
    replicated = NamedSharding(mesh, P())
    step = _make_step(feature_fn, logits_fn, params is not None, data_sharding, replicated)
    args: tuple[Any, ...] = () if params is None else (jax.device_put(params, replicated),)
    if total is None and hasattr(images_iter, "shape"):
        total = int(images_iter.shape[0])

    logits_parts: list[np.ndarray] = []
    feature_parts: list[np.ndarray] = []
    n_done = 0
    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc="features", disable=not progress) as bar:

        def consume(pending: tuple[Any, np.ndarray]) -> None:
            nonlocal n_done
            (feats, logits), mask = pending
            feats_host = _local_rows(feats)
            _check_output("features", feats_host, padded_size)
            stats.update(feats_host, mask)
            if keep_features:
                feature_parts.append(feats_host[mask])
            if logits is not None:
                logits_host = _local_rows(logits)
                _check_output("logits", logits_host, padded_size)
                logits_parts.append(logits_host[mask])
            real = int(mask.sum())
            n_done += real
            bar.update(real)

        pending = None
        for batch in _iter_batches(images_iter, batch_size):
            padded, mask = _pad(batch, padded_size)
            global_batch = jax.make_array_from_process_local_data(data_sharding, padded)
            outputs = step(*args, global_batch)
            if pending is not None:
                consume(pending)
            pending = (outputs, mask)
        if pending is not None:
            consume(pending)
        seconds = time.perf_counter() - start
        rate = n_done / seconds if seconds > 0 else float("inf")
        bar.set_postfix(img_per_s=f"{rate:.1f}")

    logits = np.concatenate(logits_parts, axis=0) if logits_parts else None
    features = np.concatenate(feature_parts, axis=0) if feature_parts else None
    return FeatureRun(stats=stats, logits=logits, images_per_sec=rate, n=n_done, seconds=seconds,
                      features=features)


def _f64_bits(a: Any) -> np.ndarray:
    """float64 array -> uint32 array holding the same bytes (last axis doubled)."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64)).reshape(-1).view(np.uint32)


def _pack(stats: FeatureStats) -> dict[str, np.ndarray]:
    """Flattens an accumulator into uint32 bit patterns (exact through any transport)."""
    return {
        "n": _f64_bits([float(stats.n)]),
        "shift": _f64_bits(stats.shift),
        "sum_x": _f64_bits(stats.sum_x),
        "sum_xxT": _f64_bits(stats.sum_xxT),
    }


def _unpack(packed: dict[str, np.ndarray], dim: int) -> FeatureStats:
    """Inverse of `_pack`."""
    out = FeatureStats(dim)
    out.n = int(np.asarray(packed["n"], np.uint32).view(np.float64)[0])
    out.shift = np.asarray(packed["shift"], np.uint32).view(np.float64).reshape(dim).copy()
    out.sum_x = np.asarray(packed["sum_x"], np.uint32).view(np.float64).reshape(dim).copy()
    out.sum_xxT = np.asarray(packed["sum_xxT"], np.uint32).view(np.float64).reshape(dim, dim).copy()
    return out


def allgather_float64(values: Any) -> np.ndarray:
    """Every process's float64 `values` (the same shape on all), stacked in process order (collective).

    Transported as uint32 bit patterns like `merge_across_processes`, so the values arrive bit-exactly even in
    JAX's default float32 mode.

    Args:
      values: This process's array (any shape).

    Returns:
      ``[process_count, *values.shape]`` float64; with a single process ``values[None]``.
    """
    values = np.asarray(values, np.float64)
    if jax.process_count() == 1:
        return values[None].copy()
    gathered = np.asarray(multihost_utils.process_allgather(_f64_bits(values)), np.uint32)  # [P, 2 * size]
    return gathered.view(np.float64).reshape((jax.process_count(),) + values.shape)


def merge_across_processes(stats: FeatureStats) -> FeatureStats:
    """Combines every process's accumulator (collective; call on all processes).

    The float64 sums are transported as uint32 bit patterns, so they survive
    JAX's default float32 mode bit-exactly, and merged in process order, so
    every process obtains the identical result.

    Args:
      stats: This process's accumulator.  Its dimension must be known (pass
        ``FeatureStats(dim=d)`` on processes that may see no data).

    Returns:
      A new accumulator over all processes' data; with a single process,
      ``stats`` itself.

    Raises:
      ValueError: If ``stats.dim`` is unknown in a multi-process run.
    """
    if jax.process_count() == 1:
        return stats
    if stats.dim is None:
        raise ValueError(
            "merge_across_processes needs the feature dimension on every process; "
            "create the accumulator as FeatureStats(dim=d)"
        )
    gathered = multihost_utils.process_allgather(_pack(stats))
    merged = FeatureStats(stats.dim)
    for p in range(jax.process_count()):
        merged.merge(_unpack({k: v[p] for k, v in gathered.items()}, stats.dim))
    return merged
