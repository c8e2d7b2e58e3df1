"""Parity check of LlamaGen's VQ tokenizer against the ``llamagen_vq`` fixture (``README_llamagen_mar.md``).

Builds `LlamaGenVQ` from ``manifest["fixtures"]["llamagen_vq"]["ctor"]``, regenerates the weights from
``llamagen_vq_weights_manifest.json`` (or reads stored ones), reruns upstream's calls on the stored ``img`` and
compares ``enc_h``, ``enc_z``, ``enc_z_l2n``, ``codebook_l2n``, ``quant``, ``idx`` / ``idx_flat`` (exactly),
``quant_code``, ``dec_code`` and ``rec``. The fixture is NCHW; our model is NHWC.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx

from bitlaws.models.var import l2_normalize
from bitlaws.port.checks.var import load_weights
from bitlaws.port.checks.vqvae import _nchw, _nhwc
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.llamagen_vq import port_llamagen_vq
from bitlaws.port.verify import Comparison, compare

FIXTURE = "llamagen_vq"


def build_tokenizer(folder: pathlib.Path, manifest: dict):
    """The fixture's `LlamaGenVQ` with its (regenerated) weights."""
    fixture = manifest["fixtures"][FIXTURE]
    return port_llamagen_vq(load_weights(pathlib.Path(folder), fixture, FIXTURE), **fixture["ctor"])


@nnx.jit
def run_fixture_calls(model, img: jax.Array) -> dict[str, Any]:
    """Upstream's fixture calls on ``[B, H, W, 3]`` images, as one program (``idx`` feeds ``decode_code``)."""
    enc_h = model.encoder(img)  # [B, h, w, z]
    enc_z = model.quant_conv(enc_h)  # [B, h, w, E]
    quant, idx = model.quantize(enc_z)
    shape = quant.shape
    quant_code = model.quantize.get_codebook_entry(idx, shape)
    return {
        "enc_h": enc_h, "enc_z": enc_z, "enc_z_l2n": l2_normalize(enc_z), "quant": quant, "idx": idx,
        "codebook_l2n": l2_normalize(model.quantize.embedding.embedding[...]), "quant_code": quant_code,
        "dec_code": model.decode_code(idx, shape), "rec": model.decode(quant),
    }


def check(folder: pathlib.Path, manifest: dict) -> list[Comparison]:
    """Runs the tokenizer fixture calls and compares every stored output present in the io file.

    Args:
        folder: Fixture folder.
        manifest: Its parsed ``manifest.json``.

    Returns:
        One `Comparison` per array.
    """
    folder = pathlib.Path(folder)
    fixture = manifest["fixtures"][FIXTURE]
    model = build_tokenizer(folder, manifest)
    io = read_safetensors(folder / fixture["file_io"])
    img = _nhwc(io["img"])  # [B, R, R, 3]
    resolution = fixture.get("image_res")
    if resolution is not None and tuple(img.shape[1:3]) != (resolution, resolution):
        raise ValueError(f"{FIXTURE} fixture: img is {tuple(img.shape[1:3])}, manifest image_res is {resolution}")
    out = {k: np.asarray(v) for k, v in run_fixture_calls(model, img).items()}
    ours = {name: _nchw(out[name]) for name in ("enc_h", "enc_z", "quant", "quant_code", "dec_code", "rec")}
    ours.update(enc_z_l2n=out["enc_z_l2n"], codebook_l2n=out["codebook_l2n"], idx=out["idx"],
                idx_flat=out["idx"].reshape(-1))
    return [compare(FIXTURE, name, value, io[name]) for name, value in ours.items() if name in io]
