"""Parity check of the VAR tokenizer against the ``vqvae`` fixture (see ``tests/fixtures/README.md``).

Builds `VQVAE` from ``manifest["fixtures"]["vqvae"]["ctor"]``, loads the stored weights or regenerates them
from ``vqvae_weights_manifest.json``, reruns upstream's calls on the stored ``img`` and compares every
output. The fixture is NCHW; our model is NHWC.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.port import recipe
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.vqvae import port_vqvae
from bitlaws.port.verify import Comparison, compare

FIXTURE = "vqvae"


def load_weights(folder: pathlib.Path, fixture: dict[str, Any]) -> dict[str, np.ndarray]:
    """The fixture's state dict: the stored weights file if there is one, else the recipe regeneration."""
    stored = folder / str(fixture.get("weights", ""))
    if stored.suffix == ".safetensors" and stored.is_file():
        return read_safetensors(stored)
    return recipe.regenerate(folder / f"{FIXTURE}_weights_manifest.json")


def _nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.moveaxis(np.asarray(x), -3, -1))


def _nchw(x: jax.Array) -> np.ndarray:
    return np.moveaxis(np.asarray(x), -1, -3)


@nnx.jit
def run_fixture_calls(model, img: jax.Array) -> dict[str, Any]:
    """Upstream's fixture calls on ``[B, H, W, 3]`` images, compiled as one program.

    ``img_to_idx_bl`` is evaluated as ``f_to_idx_bl_or_fhat(encode_features(img))`` and both
    ``idx_bl_to_img`` paths as ``fhat_to_img(idx_bl_to_fhat(...))`` in a single decoder pass, so the
    encoder and the decoder are each compiled once.
    """
    enc_f = model.encode_features(img)  # [B, h, w, C]
    idx_list = model.f_to_idx_bl_or_fhat(enc_f, to_fhat=False)
    f_hats = model.idx_bl_to_fhat(idx_list, same_shape=True) + model.idx_bl_to_fhat(idx_list, False)[-1:]
    batch = img.shape[0]
    images = model.fhat_to_img(jnp.concatenate(f_hats, axis=0))  # [(SN + 1) * B, H, W, 3]
    images = [images[i * batch:(i + 1) * batch] for i in range(len(f_hats))]
    return {
        "enc_f": enc_f,
        "fhat_per_scale": model.f_to_idx_bl_or_fhat(enc_f, to_fhat=True),
        "idx_list": idx_list,
        "img_rec_all": images[:-1],
        "img_rec_last_noshape": images[-1],
        "x_BLCv_wo_first_l": model.idx_bl_to_var_input(idx_list),
    }


def check(folder: pathlib.Path, manifest: dict) -> list[Comparison]:
    """Runs the tokenizer fixture calls and compares every stored output.

    Args:
        folder: Fixture folder.
        manifest: Its parsed ``manifest.json``.

    Returns:
        One `Comparison` per array (``enc_f``, ``fhat_per_scale``, ``idx_Bl.<k>``, ``idx_BL``,
        ``img_rec_all``, ``img_rec_last_noshape``, ``x_BLCv_wo_first_l``) present in the io file.
    """
    folder = pathlib.Path(folder)
    fixture = manifest["fixtures"][FIXTURE]
    model = port_vqvae(load_weights(folder, fixture), **fixture["ctor"])
    io = read_safetensors(folder / fixture["file_io"])
    img = _nhwc(io["img"])  # [B, R, R, 3]
    resolution = fixture.get("image_res")
    if resolution is not None and tuple(img.shape[1:3]) != (resolution, resolution):
        raise ValueError(f"vqvae fixture: img is {img.shape[1:3]}, manifest image_res is {resolution}")

    out = run_fixture_calls(model, img)
    idx_list = out["idx_list"]
    ours = {
        "enc_f": _nchw(out["enc_f"]),
        "fhat_per_scale": np.stack([_nchw(f) for f in out["fhat_per_scale"]]),
        "idx_BL": np.concatenate([np.asarray(i) for i in idx_list], axis=1),
        "img_rec_all": np.stack([_nchw(x) for x in out["img_rec_all"]]),
        "img_rec_last_noshape": _nchw(out["img_rec_last_noshape"]),
        "x_BLCv_wo_first_l": np.asarray(out["x_BLCv_wo_first_l"]),
    }
    ours.update({f"idx_Bl.{k}": np.asarray(i) for k, i in enumerate(idx_list)})
    results = [compare(FIXTURE, name, value, io[name]) for name, value in ours.items() if name in io]
    missing_scales = [name for name in io if name.startswith("idx_Bl.") and name not in ours]
    results += [Comparison(FIXTURE, name, True, float("inf"), 0.0, False) for name in missing_scales]
    return results
