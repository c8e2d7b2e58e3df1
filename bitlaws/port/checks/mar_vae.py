"""Parity check of the ``mar_vae`` fixture (MAR's KL VAE, LTH14/mar ``models/vae.py``).

The constructor comes from the manifest (``ctor.args`` for ``embed_dim``/``ch_mult``, ``ctor.encoder.kwargs``
for ``ch``, ``num_res_blocks``, ``attn_resolutions``, ``resolution``); the weights are regenerated from
``mar_vae_weights_manifest.json`` (or read from a stored ``weights`` file). Compares the posterior
(``enc_moments``, ``enc_mean``, ``enc_logvar``, ``enc_std``), ``post_sample`` (from the recorded ``post_eps``),
``decoded`` and ``rec_mean`` (all NCHW in the fixture).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx

from bitlaws.models.mar_vae import MarAutoencoderKL
from bitlaws.port import recipe
from bitlaws.port.reader import read_state_dict
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.mar_vae import port_mar_vae
from bitlaws.port.verify import Comparison, compare

FIXTURE = "mar_vae"
_ENCODER_ARGS = ("ch", "num_res_blocks", "attn_resolutions", "resolution", "in_channels", "out_ch")


def ctor_from_manifest(entry: dict) -> dict[str, Any]:
    """`MarAutoencoderKL` kwargs from the fixture's ``ctor`` (AutoencoderKL args + replaced encoder kwargs)."""
    ctor = entry["ctor"]
    args = ctor.get("args", {})
    encoder = ctor.get("encoder", {}).get("kwargs", {})
    decoder = ctor.get("decoder", {}).get("kwargs", {})
    if decoder.get("attn_resolutions"):
        raise ValueError(f"{FIXTURE}: decoder attn_resolutions {decoder['attn_resolutions']} is not supported "
                         f"(MAR's decoder has attention only in mid)")
    kwargs = {k: encoder[k] for k in _ENCODER_ARGS if k in encoder}
    kwargs.update(embed_dim=args.get("embed_dim", encoder.get("z_channels")),
                  ch_mult=tuple(encoder.get("ch_mult", args.get("ch_mult"))),
                  use_variational=args.get("use_variational", True))
    kwargs["attn_resolutions"] = tuple(kwargs.get("attn_resolutions", (16,)))
    return kwargs


def load_weights(folder: pathlib.Path, entry: dict) -> dict[str, np.ndarray]:
    """The stored weights file if the manifest names one that exists, else the recipe regeneration."""
    stored = folder / str(entry.get("weights", ""))
    if entry.get("weights") and stored.is_file():
        return read_state_dict(stored)
    return recipe.regenerate(folder / entry.get("weights_manifest", f"{FIXTURE}_weights_manifest.json"))


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def _nchw(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


@nnx.jit
def _run(model: MarAutoencoderKL, image: jax.Array, latent: jax.Array, eps: jax.Array) -> dict[str, jax.Array]:
    posterior = model.encode(image)
    return {"enc_moments": model.encode_moments(image), "enc_mean": posterior.mean, "enc_logvar": posterior.logvar,
            "enc_std": posterior.std, "post_sample": posterior.mean + posterior.std * eps,
            "decoded": model.decode(latent), "rec_mean": model.decode(posterior.mean)}


def check(folder: pathlib.Path, manifest: dict) -> list[Comparison]:
    """Ports the fixture weights, runs the recorded calls and compares every float output."""
    folder = pathlib.Path(folder)
    entry = manifest["fixtures"][FIXTURE]
    model = port_mar_vae(load_weights(folder, entry), **ctor_from_manifest(entry))
    io = read_safetensors(folder / entry.get("file_io", f"{FIXTURE}_io.safetensors"))
    ours = _run(model, _nhwc(io["img"]), _nhwc(io["latent"]), _nhwc(io["post_eps"]))
    return [compare(FIXTURE, name, _nchw(value), io[name]) for name, value in sorted(ours.items()) if name in io]
