"""Parity check of the FID Inception network (and the Frechet distance) against pytorch-fid.

The fixture holds the outputs of ``pytorch_fid.inception.InceptionV3(output_blocks=..., resize_input=True,
normalize_input=True, use_fid_inception=True)`` with recipe weights (torchvision `Inception3` key names),
on NCHW images in [0, 1]; block shapes are NCHW.
"""

from __future__ import annotations

import pathlib
import re
from typing import Optional

import jax
import numpy as np

from bitlaws.eval.inception import INPUT_SIZE, FIDInceptionV3, resize_bilinear
from bitlaws.port import read_state_dict
from bitlaws.port.recipe import regenerate
from bitlaws.port.tables.inception import port_inception
from bitlaws.port.verify import Comparison, compare

FIXTURE = "fid"
_SUPPORTED_CTOR = {"resize_input": True, "normalize_input": True, "use_fid_inception": True}


def _to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def _to_nchw(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _weights_manifest_path(folder: pathlib.Path, manifest: dict) -> pathlib.Path:
    """The fixture's ``*_weights_manifest.json`` (listed in ``manifest["files"]`` under the fixture's prefix)."""
    names = [n for n in manifest.get("files", {})
             if n.startswith(FIXTURE + "_") and n.endswith("weights_manifest.json")]
    if not names:
        names = sorted(p.name for p in folder.glob(FIXTURE + "_*weights_manifest.json"))
    if len(names) != 1:
        raise FileNotFoundError(f"expected one {FIXTURE}_*weights_manifest.json in {folder}, found {names}")
    return folder / names[0]


def load_state_dict(folder: pathlib.Path, manifest: dict) -> dict[str, np.ndarray]:
    """Stored fixture weights if the manifest names a weight file that exists, else the recipe regeneration."""
    stored = manifest["fixtures"][FIXTURE].get("weights", "")
    if stored and (folder / stored).is_file():
        return read_state_dict(folder / stored)
    return regenerate(_weights_manifest_path(folder, manifest))


@jax.jit
def run_inception(model: FIDInceptionV3, images: jax.Array
                  ) -> tuple[jax.Array, Optional[jax.Array], list[jax.Array]]:
    """Jitted forward pass: ``images [B, H, W, 3]`` in [0, 1] -> ``(pool3 [B, 2048], logits [B, 1008] or None
    when the model has no fc, [block0..block3] NHWC)``. Module-level so that repeated calls reuse the compile."""
    pool3, blocks = model.features(images, return_blocks=True)
    logits = model.fc(pool3) if model.fc is not None else None
    return pool3, logits, blocks


def _check_ctor(ctor: dict) -> None:
    unsupported = {k: ctor[k] for k, v in _SUPPORTED_CTOR.items() if k in ctor and ctor[k] != v}
    if unsupported:
        raise ValueError(f"FIDInceptionV3 implements pytorch-fid's InceptionV3 with {_SUPPORTED_CTOR}; "
                         f"the fixture asks for {unsupported}")


def _frechet_comparisons(arrays: dict[str, np.ndarray]) -> list[Comparison]:
    try:
        from bitlaws.eval.frechet import frechet_distance  # pylint: disable=g-import-not-at-top
    except ImportError:
        return []
    needed = ("fd.mu1", "fd.sigma1_f64", "fd.mu2", "fd.sigma2_f64", "fd.value_f64")
    if not all(k in arrays for k in needed):
        return []
    value = frechet_distance(arrays["fd.mu1"], arrays["fd.sigma1_f64"], arrays["fd.mu2"], arrays["fd.sigma2_f64"])
    ref = arrays["fd.value_f64"]
    return [compare(FIXTURE, "fd.value_f64", np.reshape(np.asarray(value, np.float64), ref.shape), ref)]


def check(folder: pathlib.Path, manifest: dict) -> list[Comparison]:
    """Runs our FID Inception on the fixture images and compares every stored output.

    Args:
        folder: Fixture folder.
        manifest: Parsed ``manifest.json``.

    Returns:
        Comparisons for ``resized_crop_0_16``, ``block{k}_shape`` / ``block{k}_spatial_mean`` (every block the
        file holds), ``features``, ``pool3_raw`` and, when `bitlaws.eval.frechet` is importable, ``fd.value_f64``.
    """
    folder = pathlib.Path(folder)
    spec = manifest["fixtures"][FIXTURE]
    ctor = spec.get("ctor", {})
    _check_ctor(ctor)
    arrays = read_state_dict(folder / spec["file_io"])
    model = port_inception(load_state_dict(folder, manifest))
    images = _to_nhwc(arrays["images"])  # [B, H, W, 3] in [0, 1]

    pool3, _, blocks = run_inception(model, images)
    results: list[Comparison] = []

    if "resized_crop_0_16" in arrays:
        crop = arrays["resized_crop_0_16"]  # [B, 3, h, w]
        resized = resize_bilinear(images, INPUT_SIZE)  # [B, 299, 299, 3]
        ours = _to_nchw(resized)[:, :, :crop.shape[2], :crop.shape[3]]
        results.append(compare(FIXTURE, "resized_crop_0_16", ours, crop))

    for name in sorted(arrays):
        match = re.fullmatch(r"block(\d+)_(shape|spatial_mean)", name)
        if not match or int(match.group(1)) >= len(blocks):
            continue
        block = blocks[int(match.group(1))]  # [B, H, W, C]
        if match.group(2) == "shape":
            b, h, w, c = block.shape
            ours = np.asarray([b, c, h, w], np.int64)
        else:
            ours = np.mean(np.asarray(block, np.float64), axis=(1, 2)).astype(np.float32)  # [B, C]
        results.append(compare(FIXTURE, name, ours, arrays[name]))

    if "features" in arrays:
        results.append(compare(FIXTURE, "features", pool3, arrays["features"]))
    if "pool3_raw" in arrays:
        first_block = sorted(ctor.get("output_blocks", [3]))[0]
        results.append(compare(FIXTURE, "pool3_raw", _to_nchw(blocks[first_block]), arrays["pool3_raw"]))

    results.extend(_frechet_comparisons(arrays))
    return results
