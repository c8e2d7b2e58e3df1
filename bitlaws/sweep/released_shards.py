"""The released study's per-cell sample store: fixed shards of sample indices, written atomically as they finish.

A cell's ``n_samples`` indices are cut into shards of ``shard_size`` consecutive indices; shard ``k`` holds
``[k * shard_size, min((k + 1) * shard_size, n_samples))`` and is stored as ``<cell dir>/shard_<k:05d>.npz``::

    indices   int64 [s]              the sample indices (checked on load)
    features  float32 [s, 2048]      FID-Inception pool3 features
    logits    float32 [s, 1008]      FID-Inception logits (Inception Score)
    samples   uint8 [s, H, W, 3]     the images (absent when the study keeps no samples)

A shard is written to a temporary file in the same folder, flushed, fsynced and renamed into place
(``os.replace``), so a run killed at any point (SIGKILL included) leaves only complete shards; the rerun loads
them and computes the rest. A shard whose indices do not match (another ``n_samples`` or ``shard_size``) or that
cannot be read is computed again.

Ownership: with P processes, process p computes the shards ``k`` with ``k % P == p``; a shard's contents depend
only on its indices, so shards written under another process count are reused where they are visible.

`InceptionScoreSums` accumulates the Inception Score of all samples from per-shard logits in float64, chunk by
chunk (the contiguous splits of `bitlaws.eval.inception_score`), so processes can add their sums instead of
exchanging logits.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile
from typing import Optional

import numpy as np
import scipy.special

SHARD_PATTERN = "shard_{:05d}.npz"


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """How a cell's samples are cut into shards.

    Attributes:
        n_samples: Samples of the cell.
        shard_size: Consecutive indices per shard.
    """

    n_samples: int
    shard_size: int

    def __post_init__(self):
        for name in ("n_samples", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ShardPlan.{name} must be a positive integer, got {value!r}")

    @property
    def num_shards(self) -> int:
        return -(-self.n_samples // self.shard_size)

    def indices(self, shard: int) -> np.ndarray:
        """``[s]`` int64 sample indices of `shard`."""
        start = shard * self.shard_size
        return np.arange(start, min(start + self.shard_size, self.n_samples), dtype=np.int64)

    def owned(self, process_index: int, process_count: int) -> list[int]:
        """The shards process `process_index` of `process_count` computes (``k % process_count == index``)."""
        return list(range(process_index, self.num_shards, process_count))


def shard_path(folder: pathlib.Path, shard: int) -> pathlib.Path:
    return pathlib.Path(folder) / SHARD_PATTERN.format(shard)


def write_shard(path: pathlib.Path, indices: np.ndarray, features: np.ndarray, logits: np.ndarray,
                samples: Optional[np.ndarray] = None) -> None:
    """Writes one shard atomically (temporary file, fsync, ``os.replace``); see the module docstring.

    Args:
        path: The shard file.
        indices: ``[s]`` sample indices.
        features: ``[s, d]`` float32 pool3 features.
        logits: ``[s, k]`` float32 logits.
        samples: ``[s, H, W, 3]`` uint8 images, or None to store none.
    """
    path = pathlib.Path(path)
    arrays = {"indices": np.asarray(indices, np.int64), "features": np.asarray(features, np.float32),
              "logits": np.asarray(logits, np.float32)}
    if samples is not None:
        arrays["samples"] = np.asarray(samples, np.uint8)
    rows = {name: value.shape[0] for name, value in arrays.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"shard arrays disagree on the number of samples: {rows}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_shard(path: pathlib.Path, expected: np.ndarray) -> Optional[dict[str, np.ndarray]]:
    """The arrays of a complete shard holding exactly the indices `expected`, or None (missing or stale).

    ``samples`` is included when stored.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # unreadable (e.g. a full disk): compute it again
        return None
    indices = arrays.get("indices")
    if indices is None or not np.array_equal(indices, expected) or "features" not in arrays or "logits" not in arrays:
        return None
    if arrays["features"].shape[0] != expected.size or arrays["logits"].shape[0] != expected.size:
        return None
    return arrays


class InceptionScoreSums:
    """Float64 sufficient statistics of the Inception Score over ``n_samples`` samples in index order.

    Split ``c`` is the samples with index in ``[c * n // splits, (c + 1) * n // splits)`` (the chunks of
    `bitlaws.eval.inception_score.inception_score`). Per split it keeps the count, the sum over samples of
    ``sum_y p log p`` and the sum of ``p(y|x)``; then ``IS_c = exp(mean sum_y p log p - sum_y pbar log pbar)``
    with ``pbar`` the split's mean ``p(y|x)``, which equals ``exp(mean KL(p(y|x) || pbar))``.

    Args:
        n_samples: All samples of the cell.
        splits: Splits (10 in the standard protocol).
        num_classes: Logit columns.
    """

    def __init__(self, n_samples: int, splits: int, num_classes: int):
        if splits < 1 or n_samples < splits:
            raise ValueError(f"the Inception Score needs 1 <= splits <= n_samples, got splits={splits} for "
                             f"{n_samples} samples")
        self.n_samples, self.splits = int(n_samples), int(splits)
        self.bounds = np.array([c * n_samples // splits for c in range(splits + 1)], np.int64)  # [splits + 1]
        self.sums = np.zeros((splits, num_classes + 2), np.float64)  # [count, sum p log p, sum p (num_classes)]

    def update(self, indices: np.ndarray, logits: np.ndarray) -> None:
        """Adds samples ``indices [s]`` with their ``logits [s, num_classes]``."""
        log_p = scipy.special.log_softmax(np.asarray(logits, np.float64), axis=1)  # [s, K]
        p = np.exp(log_p)
        rows = np.concatenate([np.ones((p.shape[0], 1)), np.sum(p * log_p, axis=1, keepdims=True), p], axis=1)
        split = np.searchsorted(self.bounds, np.asarray(indices, np.int64), side="right") - 1  # [s]
        np.add.at(self.sums, split, rows)

    def add(self, sums: np.ndarray) -> None:
        """Adds another accumulator's ``sums`` (e.g. another process's)."""
        self.sums += np.asarray(sums, np.float64).reshape(self.sums.shape)

    def score(self) -> tuple[float, float]:
        """``(mean, std)`` of the per-split scores (population std), as `inception_score` returns them.

        Raises:
            ValueError: a split has no samples yet.
        """
        counts = self.sums[:, 0]
        if np.any(counts < 1):
            raise ValueError(f"Inception Score splits without samples: counts {counts.tolist()}")
        pbar = self.sums[:, 2:] / counts[:, None]  # [splits, K]
        with np.errstate(divide="ignore", invalid="ignore"):
            marginal = np.sum(np.where(pbar > 0, pbar * np.log(pbar), 0.0), axis=1)  # [splits]
        scores = np.exp(self.sums[:, 1] / counts - marginal)
        return float(np.mean(scores)), float(np.std(scores))
