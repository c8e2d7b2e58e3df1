"""Parity check of the VAR transformer and its sampler against the ``var`` fixture.

Builds `VAR` from ``manifest["fixtures"]["var"]["ctor"]`` (tokenizer sizes from the ``vqvae`` fixture's
constructor, or from the weight shapes), loads the stored weights or regenerates them from
``var_weights_manifest.json``, and compares:

* ``logits_tf``: teacher-forced logits on the tokenizer fixture's stored ``x_BLCv_wo_first_l``;
* for every ``infer_cfg<X>.*`` group in the io file (``X`` = the guidance with ``p`` for the decimal point,
  e.g. ``1p5``), when the tokenizer (`bitlaws.models.vqvae`) is available: greedy (``top_k=1``) sampling
  with that guidance — ``idx_BL`` exactly, ``guided_logits_BLV`` and ``img`` (NCHW, in [0, 1]).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bitlaws.port import recipe
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.var import port_var
from bitlaws.port.verify import Comparison, compare

FIXTURE = "var"
TOKENIZER_FIXTURE = "vqvae"
_INFER_GROUP = re.compile(r"infer_cfg([0-9p]+)\.")


def load_weights(folder: pathlib.Path, fixture: dict[str, Any], name: str) -> dict[str, np.ndarray]:
    """A fixture's state dict: the stored safetensors file if present, else the recipe regeneration."""
    stored = folder / str(fixture.get("weights", ""))
    if stored.suffix == ".safetensors" and stored.is_file():
        return read_safetensors(stored)
    return recipe.regenerate(folder / f"{name}_weights_manifest.json")


def tokenizer_available() -> bool:
    """Whether `bitlaws.models.vqvae` and its port table can be imported."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("bitlaws.models.vqvae", "bitlaws.port.tables.vqvae"))


def build_tokenizer(folder: pathlib.Path, manifest: dict) -> Optional[Any]:
    """The fixture's VQVAE (regenerated weights), or None without the tokenizer code or fixture."""
    fixture = manifest["fixtures"].get(TOKENIZER_FIXTURE)
    if fixture is None or not tokenizer_available():
        return None
    from bitlaws.port.tables.vqvae import port_vqvae  # pylint: disable=g-import-not-at-top
    return port_vqvae(load_weights(folder, fixture, TOKENIZER_FIXTURE), **fixture["ctor"])


def guidance_groups(names) -> dict[str, float]:
    """``{"infer_cfg1p5": 1.5, ...}`` from the io file's array names."""
    groups = {}
    for name in names:
        match = _INFER_GROUP.match(name)
        if match:
            groups[f"infer_cfg{match.group(1)}"] = float(match.group(1).replace("p", "."))
    return groups


def _var_ctor(manifest: dict) -> dict[str, Any]:
    ctor = dict(manifest["fixtures"][FIXTURE]["ctor"])
    vqvae = manifest["fixtures"].get(TOKENIZER_FIXTURE)
    if vqvae is not None:
        ctor.setdefault("vocab_size", int(vqvae["ctor"]["vocab_size"]))
        ctor.setdefault("Cvae", int(vqvae["ctor"]["z_channels"]))
    return ctor


def check(folder: pathlib.Path, manifest: dict) -> list[Comparison]:
    """Runs the transformer fixture calls and compares the outputs.

    Args:
        folder: Fixture folder.
        manifest: Its parsed ``manifest.json``.

    Returns:
        ``logits_tf`` and, when the tokenizer is available, ``infer_cfg<X>.{idx_BL, guided_logits_BLV, img}``
        for every guidance group in the io file.
    """
    from bitlaws.sample.var_sampler import autoregressive_infer_cfg  # pylint: disable=g-import-not-at-top

    folder = pathlib.Path(folder)
    fixture = manifest["fixtures"][FIXTURE]
    var = port_var(load_weights(folder, fixture, FIXTURE), **_var_ctor(manifest))
    io = read_safetensors(folder / fixture["file_io"])
    label_B = np.asarray(io["label_B"] if "label_B" in io else fixture["label_B"]).astype(np.int32)
    tokenizer_io = read_safetensors(folder / manifest["fixtures"][TOKENIZER_FIXTURE]["file_io"])
    x_BLCv = jnp.asarray(tokenizer_io["x_BLCv_wo_first_l"])

    logits = jax.jit(lambda labels, x: var(labels, x))(jnp.asarray(label_B), x_BLCv)
    results = [compare(FIXTURE, "logits_tf", logits, io["logits_tf"])]

    vae = build_tokenizer(folder, manifest)
    if vae is None:
        return results
    key = jax.random.key(int(fixture.get("g_seed", 0) or 0))
    for group, cfg in guidance_groups(io).items():
        out = autoregressive_infer_cfg(var, vae, B=len(label_B), label_B=label_B, key=key, cfg=cfg,
                                       top_k=1, top_p=0.0, more_smooth=False, return_logits=True)
        ours = {
            "idx_BL": np.concatenate([np.asarray(t) for t in out.tokens], axis=1),
            "guided_logits_BLV": np.concatenate([np.asarray(g) for g in out.guided_logits], axis=1),
            "img": np.moveaxis(np.asarray(out.images), -1, 1),
        }
        for name, value in ours.items():
            full = f"{group}.{name}"
            if full in io:
                results.append(compare(FIXTURE, full, value, io[full]))
    return results
