"""The demo data set: scikit-learn's bundled ``load_digits`` (1797 real 8x8 handwritten digits, 10 classes).

No download: the data ship inside scikit-learn. Images are upsampled to 16x16 with bilinear interpolation
(half-pixel centres), replicated to 3 channels so the same model code as the ImageNet models applies, and
scaled to [-1, 1]. The split is fixed: every 5th image (by index) is held out for validation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SIZE = 16
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """Images ``[N, 16, 16, 3]`` float32 in [-1, 1] and labels ``[N]`` int32."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@functools.lru_cache(maxsize=None)
def load_digits(split: str = "all", size: int = IMAGE_SIZE) -> DigitsData:
    """Loads the digits as NHWC float32 in [-1, 1].

    Args:
        split: ``all``, ``train`` (4 of every 5 images) or ``val`` (every 5th).
        size: Output side (bilinear upsampling from 8x8).

    Returns:
        The `DigitsData`.
    """
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    if split not in ("all", "train", "val"):
        raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")
    bunch = datasets.load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    images = np.asarray(jax.image.resize(jnp.asarray(images), (images.shape[0], size, size), "bilinear"))
    images = np.clip(images, 0.0, 1.0) * 2.0 - 1.0
    images = np.repeat(images[..., None], 3, axis=-1).astype(np.float32)
    labels = bunch.target.astype(np.int32)
    index = np.arange(labels.shape[0])
    keep = {"all": np.ones_like(index, bool), "train": index % 5 != 0, "val": index % 5 == 0}[split]
    return DigitsData(images[keep], labels[keep])


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float images -> uint8 [0, 255] (same shape)."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)
