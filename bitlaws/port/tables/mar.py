"""Port table: official MAR (LTH14/mar ``models/mar.py`` + ``models/diffloss.py``) -> `bitlaws.models.mar.MAR`.

Checkpoints (``util/misc.py save_model``) nest the state dict as ``{"model": sd, "model_ema": sd, ...}``; the
demo and ``main_mar.py --evaluate`` sample with the EMA weights, so `DEFAULT_KEY` is ``"model_ema"``. The
learned position tables, ``fake_latent`` and ``mask_token`` keep their upstream shapes; the diffusion head's
``diffloss.net.*`` lands in ``diffloss.*`` (``nn.Sequential`` indices renamed: ``mlp.0/2`` -> ``mlp_in/out``,
``adaLN_modulation.1`` -> ``adaLN_modulation``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from bitlaws.models.mar import MAR
from bitlaws.port.mapping import KeyMap, linear, port_state_dict

DEFAULT_KEY = "model_ema"
"""Sub-dict of MAR checkpoints that sampling uses (the EMA weights)."""

_LINEARS = (
    ("z_proj", "z_proj"),
    ("decoder_embed", "decoder_embed"),
    ("{part}_blocks.{i}.attn.qkv", "{part}_blocks.{i}.attn.qkv"),
    ("{part}_blocks.{i}.attn.proj", "{part}_blocks.{i}.attn.proj"),
    ("{part}_blocks.{i}.mlp.fc1", "{part}_blocks.{i}.mlp.fc1"),
    ("{part}_blocks.{i}.mlp.fc2", "{part}_blocks.{i}.mlp.fc2"),
    ("diffloss.net.time_embed.mlp.0", "diffloss.time_embed.mlp_in"),
    ("diffloss.net.time_embed.mlp.2", "diffloss.time_embed.mlp_out"),
    ("diffloss.net.cond_embed", "diffloss.cond_embed"),
    ("diffloss.net.input_proj", "diffloss.input_proj"),
    ("diffloss.net.res_blocks.{i}.mlp.0", "diffloss.res_blocks.{i}.mlp_in"),
    ("diffloss.net.res_blocks.{i}.mlp.2", "diffloss.res_blocks.{i}.mlp_out"),
    ("diffloss.net.res_blocks.{i}.adaLN_modulation.1", "diffloss.res_blocks.{i}.adaLN_modulation"),
    ("diffloss.net.final_layer.linear", "diffloss.final_layer.linear"),
    ("diffloss.net.final_layer.adaLN_modulation.1", "diffloss.final_layer.adaLN_modulation"),
)

_NORMS = (
    ("z_proj_ln", "z_proj_ln"),
    ("{part}_blocks.{i}.norm1", "{part}_blocks.{i}.norm1"),
    ("{part}_blocks.{i}.norm2", "{part}_blocks.{i}.norm2"),
    ("{part}_norm", "{part}_norm"),
    ("diffloss.net.res_blocks.{i}.in_ln", "diffloss.res_blocks.{i}.in_ln"),
)

_TABLES = ("fake_latent", "mask_token", "encoder_pos_embed_learned", "decoder_pos_embed_learned",
           "diffusion_pos_embed_learned")

TABLE: list[KeyMap] = (
    [KeyMap(name, name) for name in _TABLES]
    + [KeyMap("class_emb.weight", "class_emb.embedding")]
    + [row for src, dst in _LINEARS
       for row in (KeyMap(f"{src}.weight", f"{dst}.kernel", linear), KeyMap(f"{src}.bias", f"{dst}.bias"))]
    + [row for src, dst in _NORMS
       for row in (KeyMap(f"{src}.weight", f"{dst}.scale"), KeyMap(f"{src}.bias", f"{dst}.bias"))]
)

_EPS = re.compile(r"eps\s*=\s*([0-9.eE+-]+)")


def mar_ctor(ctor: Mapping[str, Any]) -> dict[str, Any]:
    """Upstream `MAR` kwargs -> ours: drops ``cls``; a ``norm_layer`` description (``partial(nn.LayerNorm,
    eps=1e-6)``) becomes ``norm_eps``."""
    out = {k: v for k, v in ctor.items() if k not in ("cls", "norm_layer")}
    if "norm_layer" in ctor:
        match = _EPS.search(str(ctor["norm_layer"]))
        out.setdefault("norm_eps", float(match.group(1)) if match else 1e-5)  # nn.LayerNorm's own default
    return out


def port_mar(state_dict: Mapping[str, np.ndarray], **ctor: Any) -> MAR:
    """Builds a `MAR` (with its diffusion head) from an official state dict.

    Args:
        state_dict: ``{upstream key: array}`` (PyTorch layouts), already taken out of ``{"model_ema": ...}``.
        **ctor: `MAR` constructor arguments (upstream names; see `mar_ctor`).

    Returns:
        The ported model.

    Raises:
        PortError: naming every missing, unexpected or misshapen key.
    """
    kwargs = mar_ctor(ctor)
    return port_state_dict(state_dict, TABLE, lambda: MAR(**kwargs, rngs=nnx.Rngs(0)), model_name="MAR")


# ----------------------------------------------------------------------------- `bitlaws port mar` hooks


def port_kind(state_dict: Mapping[str, Any], ctor: dict) -> MAR:
    """`bitlaws.port.convert.Kind.port`: `port_mar` with the stored constructor."""
    return port_mar(state_dict, **ctor)


def build(ctor: dict) -> MAR:
    """`bitlaws.port.convert.Kind.build`: the model from its stored constructor."""
    return MAR(**mar_ctor(ctor), rngs=nnx.Rngs(0))


def model_class() -> type:
    return MAR
