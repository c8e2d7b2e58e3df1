"""Feature statistics (mean / covariance) and the file formats that carry them.

`FeatureStats` accumulates the first and second moments of feature vectors
batch by batch on the host, in float64, so that e.g. 50,000 x 2048 Inception
features never have to be held in memory at once.

Numerical formulation: the accumulator stores *shifted* sums

    shift    = mean of the first non-empty batch            (d,)
    sum_x    = sum_i (x_i - shift)                           (d,)
    sum_xxT  = sum_i (x_i - shift) (x_i - shift)^T           (d, d)

and recovers ``mu = shift + sum_x / n`` and
``sigma = (sum_xxT - n m m^T) / (n - 1)`` with ``m = sum_x / n``.  With plain
(unshifted) sums the covariance is the difference of two terms of size
``|mean|^2`` and loses ``log10(|mean|^2 / var)`` significant digits (for a mean
offset of 1000 and unit variance, 6 of float64's 16 digits).  Because the
first batch's mean is already close to the global mean, ``m`` is small and the
subtraction is benign; the result matches ``np.cov`` (a two-pass algorithm) to
~1e-12 relative in that situation.  `merge` re-expresses the other
accumulator's sums around this accumulator's shift, which is exact algebra.

File formats read and written here:

* statistics npz: keys ``mu`` (d,) and ``sigma`` (d, d).  This is both
  pytorch-fid's ``--save-stats`` format and the statistics part of the ADM
  evaluator's reference batches (which additionally hold ``arr_0``, the uint8
  NHWC reference images; that key is ignored by `load_stats_npz`).
* sample npz (ADM format): key ``arr_0`` with uint8 images of shape
  (N, H, W, 3) (``arr_1`` with labels may be present and is ignored).
* a folder of PNG files (read in sorted file-name order).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FeatureStats",
    "save_stats_npz",
    "load_stats_npz",
    "load_samples_npz",
    "load_png_folder",
]

PathLike = str | os.PathLike[str]


class FeatureStats:
    """Running float64 mean/covariance accumulator for feature vectors.

    Attributes:
      n: Number of feature vectors accumulated so far.
      dim: Feature dimension d, or None until it is known (first update or
        constructor argument).
      shift: (d,) float64, the shift subtracted before summing (see module
        docstring); zeros until the first non-empty update.
      sum_x: (d,) float64, sum of shifted features.
      sum_xxT: (d, d) float64, sum of outer products of shifted features.
    """

    def __init__(self, dim: int | None = None) -> None:
        """Creates an empty accumulator.

        Args:
          dim: Feature dimension d if known in advance.  Required before
            `bitlaws.eval.sharded.merge_across_processes` on processes that
            may have seen no data.
        """
        self.n: int = 0
        self.dim: int | None = None
        self.shift: np.ndarray | None = None
        self.sum_x: np.ndarray | None = None
        self.sum_xxT: np.ndarray | None = None
        if dim is not None:
            self._init_dim(int(dim))

    def _init_dim(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"feature dimension must be >= 1, got {dim}")
        self.dim = dim
        self.shift = np.zeros(dim, np.float64)
        self.sum_x = np.zeros(dim, np.float64)
        self.sum_xxT = np.zeros((dim, dim), np.float64)

    def __repr__(self) -> str:
        return f"FeatureStats(n={self.n}, dim={self.dim})"

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStats":
        """Accumulator holding the statistics of one feature array.

        Args:
          features: (n, d) array of any real dtype.

        Returns:
          A new `FeatureStats`.
        """
        stats = cls()
        stats.update(features)
        return stats

    def update(self, features: Any, mask: Any = None) -> "FeatureStats":
        """Adds a batch of features (in place).

        Args:
          features: (n, d) array (numpy or JAX, any real dtype); converted to
            float64 on the host.
          mask: Optional (n,) boolean array; only rows where it is True are
            accumulated (used to drop padding rows).

        Returns:
          self, for chaining.

        Raises:
          ValueError: On a bad shape, a dimension mismatch or non-finite
            features.
        """
        x = np.asarray(features)
        if x.ndim != 2:
            raise ValueError(f"features must have shape (n, d), got shape {x.shape}")
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype != np.bool_ or m.shape != (x.shape[0],):
                raise ValueError(
                    f"mask must be a boolean array of shape ({x.shape[0]},), "
                    f"got dtype {m.dtype} shape {m.shape}"
                )
            x = x[m]
        x = x.astype(np.float64, copy=False)
        if self.dim is None:
            self._init_dim(x.shape[1])
        if x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, accumulator has {self.dim}")
        if x.shape[0] == 0:
            return self
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain non-finite values (NaN or inf)")
        if self.n == 0:
            self.shift = x.mean(axis=0)
        y = x - self.shift
        self.sum_x += y.sum(axis=0)
        self.sum_xxT += y.T @ y
        self.n += x.shape[0]
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Adds another accumulator's data to this one (in place).

        The result equals accumulating both data sets into one accumulator.

        Args:
          other: Accumulator to add; left unchanged.

        Returns:
          self, for chaining.

        Raises:
          ValueError: If the feature dimensions differ.
        """
        if other.n == 0:
            if self.dim is None and other.dim is not None:
                self._init_dim(other.dim)
            elif other.dim is not None and other.dim != self.dim:
                raise ValueError(f"cannot merge dimension {other.dim} into dimension {self.dim}")
            return self
        if self.dim is not None and other.dim != self.dim:
            raise ValueError(f"cannot merge dimension {other.dim} into dimension {self.dim}")
        if self.n == 0:
            self.dim = other.dim
            self.shift = other.shift.copy()
            self.sum_x = other.sum_x.copy()
            self.sum_xxT = other.sum_xxT.copy()
            self.n = other.n
            return self
        # other's rows are y = x - other.shift; relative to self.shift they are y + delta.
        delta = other.shift - self.shift
        self.sum_x += other.sum_x + other.n * delta
        self.sum_xxT += (
            other.sum_xxT
            + np.outer(other.sum_x, delta)
            + np.outer(delta, other.sum_x)
            + other.n * np.outer(delta, delta)
        )
        self.n += other.n
        return self

    def copy(self) -> "FeatureStats":
        """Returns an independent copy."""
        out = FeatureStats(self.dim)
        if self.dim is not None:
            out.n = self.n
            out.shift = self.shift.copy()
            out.sum_x = self.sum_x.copy()
            out.sum_xxT = self.sum_xxT.copy()
        return out

    @property
    def mu(self) -> np.ndarray:
        """Mean of the accumulated features, shape (d,), float64.

        Raises:
          ValueError: If no feature has been accumulated.
        """
        if self.n == 0:
            raise ValueError("mu is undefined: no features have been accumulated")
        return self.shift + self.sum_x / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (ddof=1, as ``np.cov(x, rowvar=False)``), (d, d) float64.

        Exactly symmetric.

        Raises:
          ValueError: If fewer than two features have been accumulated.
        """
        if self.n < 2:
            raise ValueError(f"sigma needs at least 2 features, have {self.n}")
        m = self.sum_x / self.n
        cov = (self.sum_xxT - self.n * np.outer(m, m)) / (self.n - 1)
        return 0.5 * (cov + cov.T)


def _npz_keys_error(path: PathLike, needed: str, keys: list[str]) -> ValueError:
    return ValueError(f"{os.fspath(path)}: expected {needed}; keys present: {sorted(keys)}")


def save_stats_npz(path: PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Writes statistics as an npz with keys ``mu`` and ``sigma``.

    The file is readable by pytorch-fid (as a precomputed ``.npz``) and by
    `load_stats_npz`.  Arrays are stored as float64.  The file is written at
    exactly ``path`` (numpy's implicit ``.npz`` suffix is not added).

    Args:
      path: Destination file.
      mu: Mean, shape (d,).
      sigma: Covariance, shape (d, d).

    Returns:
      The path written, as a `Path`.

    Raises:
      ValueError: On inconsistent shapes.
    """
    mu_a = np.asarray(mu, dtype=np.float64)
    sigma_a = np.asarray(sigma, dtype=np.float64)
    _check_stats_shapes(path, mu_a, sigma_a)
    out = Path(path)
    with open(out, "wb") as f:
        np.savez(f, mu=mu_a, sigma=sigma_a)
    return out


def _check_stats_shapes(path: PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{os.fspath(path)}: expected mu of shape (d,) and sigma of shape (d, d), "
            f"got mu {mu.shape} and sigma {sigma.shape}"
        )


def load_stats_npz(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``mu`` and ``sigma`` from a statistics npz.

    Accepts pytorch-fid statistics files and ADM evaluator reference batches
    (whose ``arr_0`` image array is ignored and not loaded).

    Args:
      path: An ``.npz`` file with keys ``mu`` (d,) and ``sigma`` (d, d).

    Returns:
      ``(mu, sigma)`` as float64 arrays of shapes (d,) and (d, d).

    Raises:
      ValueError: If a key is missing (the message lists the keys present) or
        the shapes are inconsistent.
    """
    with np.load(path, allow_pickle=False) as data:
        keys = list(data.keys())
        if "mu" not in keys or "sigma" not in keys:
            raise _npz_keys_error(path, "keys 'mu' and 'sigma' (FID statistics)", keys)
        mu = np.asarray(data["mu"], dtype=np.float64)
        sigma = np.asarray(data["sigma"], dtype=np.float64)
    _check_stats_shapes(path, mu, sigma)
    return mu, sigma


def check_nhwc_uint8(images: np.ndarray, source: str) -> np.ndarray:
    """Validates an image batch layout.

    Args:
      images: Candidate array.
      source: Where it came from, used in the error message.

    Returns:
      ``images`` unchanged.

    Raises:
      ValueError: Unless it is uint8 with shape (N, H, W, 3).
    """
    expected = "expected uint8 images in NHWC layout, shape (N, H, W, 3)"
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: {expected}; got dtype {images.dtype} with shape {images.shape}")
    if images.ndim != 4:
        raise ValueError(f"{source}: {expected}; got rank {images.ndim} with shape {images.shape}")
    if images.shape[-1] != 3:
        raise ValueError(
            f"{source}: {expected}; got {images.shape[-1]} channels in the last axis "
            f"(shape {images.shape}; NCHW input must be transposed to NHWC)"
        )
    return images


def load_samples_npz(path: PathLike) -> np.ndarray:
    """Reads a sample batch in the ADM npz format.

    Args:
      path: An ``.npz`` file whose ``arr_0`` holds the images (``arr_1``, the
        class labels, may be present and is ignored).

    Returns:
      uint8 array of shape (N, H, W, 3).

    Raises:
      ValueError: If ``arr_0`` is missing (the message lists the keys present)
        or is not a uint8 NHWC RGB array.
    """
    with np.load(path, allow_pickle=False) as data:
        keys = list(data.keys())
        if "arr_0" not in keys:
            raise _npz_keys_error(path, "key 'arr_0' (ADM sample batch, uint8 NHWC)", keys)
        images = data["arr_0"]
    return check_nhwc_uint8(images, f"{os.fspath(path)}['arr_0']")


def load_png_folder(path: PathLike) -> np.ndarray:
    """Reads every ``*.png`` file of a folder (not recursive) into one batch.

    Files are read in sorted file-name order and converted to RGB.

    Args:
      path: Directory containing PNG files of identical size.

    Returns:
      uint8 array of shape (N, H, W, 3).

    Raises:
      ValueError: If ``path`` is not a directory, holds no PNG file, or the
        images differ in size (the message names the first offending file).
    """
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow is present with matplotlib
        raise ImportError("load_png_folder needs Pillow (`pip install pillow`)") from err
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    if not files:
        raise ValueError(f"{folder}: no .png files found")
    images: list[np.ndarray] = []
    for file in files:
        with Image.open(file) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        if images and arr.shape != images[0].shape:
            raise ValueError(
                f"{file}: image size {arr.shape[1]}x{arr.shape[0]} (WxH) differs from "
                f"{images[0].shape[1]}x{images[0].shape[0]} of {files[0].name}; "
                "all images must have the same size"
            )
        images.append(arr)
    return np.stack(images)
