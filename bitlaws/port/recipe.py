"""Regenerates the parity fixtures' random weights from a `*_weights_manifest.json` (numpy only).

The recipe (see ``tests/fixtures/README.md``): for every state-dict entry, in order, an RNG seeded with
``SEED + crc32(key)`` draws the tensor according to the entry's rule, in float64, then casts to float32.
Each regenerated tensor is checked against the manifest's SHA-256 prefix, so a wrong regeneration can
never pass silently.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import zlib
from typing import Union

import numpy as np


class RecipeError(ValueError):
    """A manifest entry cannot be regenerated or does not match its checksum."""


def _draw(rule: str, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if rule == "normal/sqrt(fan_in)":
        return rng.standard_normal(shape) / np.sqrt(float(np.prod(shape[1:])))
    if rule == "0.05*normal":
        return 0.05 * rng.standard_normal(shape)
    if rule == "1+0.1*normal":
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if rule == "0.1*normal":
        return 0.1 * rng.standard_normal(shape)
    if rule == "uniform(0.5,1.5)":
        return rng.uniform(0.5, 1.5, size=shape)
    raise RecipeError(f"unknown recipe rule {rule!r}")


def _checksum(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()[:16]


def regenerate(manifest: Union[str, pathlib.Path, dict], verify: bool = True) -> dict[str, np.ndarray]:
    """Regenerates every entry of a weights manifest.

    ``keep`` entries (constructor values) are regenerated only when they are all zeros (integer counters,
    zero biases); other kept values (masks, fixed position tables) are computed by our models and are
    omitted. ``special`` entries (VAR's ``scale_mul_1H11``) are ``linspace(1, 5, H)``.

    Args:
        manifest: Path to the JSON manifest, or its parsed content.
        verify: Check each float tensor's SHA-256 prefix against the manifest.

    Returns:
        ``{key: array}`` in manifest order (float32, or the entry's integer dtype).

    Raises:
        RecipeError: on an unknown rule or a checksum mismatch (naming the key).
    """
    if not isinstance(manifest, dict):
        manifest = json.loads(pathlib.Path(manifest).read_text())
    seed = int(manifest["seed"])
    out: dict[str, np.ndarray] = {}
    for entry in manifest["entries"]:
        key, shape, rule = entry["key"], tuple(entry["shape"]), entry["rule"]
        dtype = np.dtype(entry["dtype"])
        if rule == "keep":
            if entry.get("sum") == 0 and np.issubdtype(dtype, np.number):
                out[key] = np.zeros(shape, dtype)
            continue
        if rule == "special":
            heads = shape[1]
            value = np.linspace(1.0, 5.0, heads).reshape(shape)
        else:
            rng = np.random.default_rng(seed + zlib.crc32(key.encode("utf-8")))
            value = _draw(rule, rng, shape)
        value = value.astype(np.float32)
        if verify and "sha256_16" in entry and _checksum(value) != entry["sha256_16"]:
            raise RecipeError(f"regenerated weight {key!r} does not match the manifest checksum")
        out[key] = value
    return out
