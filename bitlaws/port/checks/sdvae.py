"""Parity check for the ``sdvae`` fixture (diffusers ``AutoencoderKL``) against our `AutoencoderKL`.

Reads from the fixture folder: the constructor config (the file the manifest's ``config`` entry names,
else the manifest's ``ctor``), the weights (the ``weights`` file, else regenerated from
``sdvae_weights_manifest.json``) and the inputs/outputs (``file_io``). Compares ``decoded``,
``enc_moments``, ``enc_mean``, ``enc_logvar`` and ``enc_std`` (all NCHW in the fixture).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx

from bitlaws.models.kl_vae import AutoencoderKL
from bitlaws.port import recipe
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.kl_vae import port_kl_vae
from bitlaws.port.verify import Comparison, compare

FIXTURE = "sdvae"
COMPARED = ("decoded", "enc_moments", "enc_mean", "enc_logvar", "enc_std")


def _nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def load_config(folder: pathlib.Path, entry: dict) -> dict[str, Any]:
    """Constructor kwargs: the fixture's config json if named and present, else ``ctor`` without ``cls``."""
    if entry.get("config") and (folder / entry["config"]).exists():
        return json.loads((folder / entry["config"]).read_text())
    return {k: v for k, v in entry["ctor"].items() if k != "cls"}


def load_weights(folder: pathlib.Path, entry: dict) -> dict[str, np.ndarray]:
    """The fixture's diffusers state dict: stored weights, else regenerated from the recipe manifest."""
    if entry.get("weights") and (folder / entry["weights"]).exists():
        return read_safetensors(folder / entry["weights"])
    return recipe.regenerate(folder / f"{FIXTURE}_weights_manifest.json")


@nnx.jit
def _run(model: AutoencoderKL, image: jax.Array, latent: jax.Array) -> dict[str, jax.Array]:
    moments = model.encode_moments(image)
    posterior = model.encode(image)
    return {"decoded": model.decode(latent), "enc_moments": moments, "enc_mean": posterior.mean,
            "enc_logvar": posterior.logvar, "enc_std": posterior.std}


def run_fixture_calls(model: AutoencoderKL, io: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs the fixture's calls on NCHW ``image`` / ``latent``; returns NCHW float32 outputs by name."""
    outputs = _run(model, _nchw_to_nhwc(io["image"]), _nchw_to_nhwc(io["latent"]))
    return {name: _nhwc_to_nchw(value) for name, value in outputs.items()}


def check(folder: pathlib.Path, manifest: dict) -> list[Comparison]:
    """Ports the fixture weights, runs the recorded calls and compares every output array."""
    folder = pathlib.Path(folder)
    entry = manifest["fixtures"][FIXTURE]
    model = port_kl_vae(load_weights(folder, entry), **load_config(folder, entry))
    io = read_safetensors(folder / entry["file_io"])
    ours = run_fixture_calls(model, io)
    return [compare(FIXTURE, name, ours[name], io[name]) for name in COMPARED if name in io]
