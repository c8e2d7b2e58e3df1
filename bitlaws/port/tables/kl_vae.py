"""Port tables for the SD VAE (`bitlaws.models.kl_vae.AutoencoderKL`): diffusers and original-SD names.

Two checkpoint conventions exist for the same network:

* diffusers (``AutoencoderKL.state_dict()``, e.g. ``stabilityai/sd-vae-ft-ema``):
  ``encoder.down_blocks.{i}.resnets.{j}.norm1.weight``, ``encoder.down_blocks.{i}.downsamplers.0.conv``,
  ``encoder.mid_block.attentions.0.to_q.weight`` (2-D Linear weights; diffusers < 0.14 files name them
  ``query`` / ``key`` / ``value`` / ``proj_attn``), ``encoder.conv_norm_out``,
  ``decoder.up_blocks.{i}`` (lowest resolution first), ``decoder.up_blocks.{i}.upsamplers.0.conv``.
* CompVis ldm / original Stable Diffusion (``first_stage_model.`` stripped):
  ``encoder.down.{i}.block.{j}.norm1.weight``, ``nin_shortcut``, ``encoder.down.{i}.downsample.conv``,
  ``encoder.mid.block_1`` / ``attn_1`` / ``block_2``, ``encoder.down.{i}.attn.{j}`` (LDM/MAR KL-16 only),
  attention ``norm`` / ``q`` / ``k`` / ``v`` / ``proj_out`` as 1x1 convs (4-D weights), ``encoder.norm_out``,
  and ``decoder.up.{i}`` stored highest resolution first, i.e. ``decoder.up.{i}`` is diffusers'
  ``up_blocks.{levels - 1 - i}``.

Because of that reversal the original-SD table depends on the number of resolution levels:
`original_sd_table(levels)`; `ORIGINAL_SD_TABLE` is the one for the 4-level SD VAE.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
from flax import nnx

from bitlaws.models.kl_vae import AutoencoderKL
from bitlaws.port import mapping
from bitlaws.port.mapping import KeyMap

_FIRST_STAGE_PREFIX = "first_stage_model."

# Source keys that are clearly not VAE weights: ldm training-loss modules (LPIPS, discriminator, logvar),
# EMA copies, and the other parts / schedule buffers of a full Stable Diffusion checkpoint.
NON_VAE_KEYS: tuple[str, ...] = (
    r"loss\..*",
    r"model_ema\..*",
    r"model\.diffusion_model\..*",
    r"cond_stage_model\..*",
    r"conditioner\..*",
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar)",
)


def _conv(w: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO; a tensor that is not 4-D passes unchanged so the shape check reports it."""
    return mapping.conv(w) if w.ndim == 4 else w


def _linear(w: np.ndarray) -> np.ndarray:
    """Linear ``(out, in)`` or 1x1 conv ``(out, in, 1, 1)`` -> kernel ``(in, out)``.

    Anything else passes unchanged so that the shape check reports it as misshapen.
    """
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        return mapping.conv1x1_to_linear(w)
    return mapping.linear(w) if w.ndim == 2 else w


def _norm(src: str, dst: str) -> list[KeyMap]:
    return [KeyMap(f"{src}.weight", f"{dst}.scale"), KeyMap(f"{src}.bias", f"{dst}.bias")]


def _conv_rows(src: str, dst: str) -> list[KeyMap]:
    return [KeyMap(f"{src}.weight", f"{dst}.kernel", _conv), KeyMap(f"{src}.bias", f"{dst}.bias")]


def _linear_rows(src: str, dst: str) -> list[KeyMap]:
    return [KeyMap(f"{src}.weight", f"{dst}.kernel", _linear), KeyMap(f"{src}.bias", f"{dst}.bias")]


def _resnet(src: str, dst: str, shortcut: str) -> list[KeyMap]:
    """Rows of one resnet; `shortcut` is the source name of the 1x1 projection."""
    return (_norm(f"{src}.norm1", f"{dst}.norm1") + _conv_rows(f"{src}.conv1", f"{dst}.conv1")
            + _norm(f"{src}.norm2", f"{dst}.norm2") + _conv_rows(f"{src}.conv2", f"{dst}.conv2")
            + _conv_rows(f"{src}.{shortcut}", f"{dst}.conv_shortcut"))


def _attention(src: str, dst: str, names: Mapping[str, str]) -> list[KeyMap]:
    """Rows of one attention block; `names` maps our q/k/v/out/norm names to the source's."""
    rows = _norm(f"{src}.{names['group_norm']}", f"{dst}.group_norm")
    for ours in ("to_q", "to_k", "to_v", "to_out"):
        rows += _linear_rows(f"{src}.{names[ours]}", f"{dst}.{ours}")
    return rows


_DIFFUSERS_ATTENTION = dict(group_norm="group_norm", to_q="to_q", to_k="to_k", to_v="to_v", to_out="to_out.0")
_LEGACY_DIFFUSERS_ATTENTION = dict(group_norm="group_norm", to_q="query", to_k="key", to_v="value",
                                   to_out="proj_attn")
_LDM_ATTENTION = dict(group_norm="norm", to_q="q", to_k="k", to_v="v", to_out="proj_out")


def _shared_rows() -> list[KeyMap]:
    """Rows whose names agree in both conventions."""
    rows = []
    for part in ("encoder", "decoder"):
        rows += _conv_rows(f"{part}.conv_in", f"{part}.conv_in") + _conv_rows(f"{part}.conv_out", f"{part}.conv_out")
    return rows + _conv_rows("quant_conv", "quant_conv") + _conv_rows("post_quant_conv", "post_quant_conv")


def _diffusers_table() -> list[KeyMap]:
    rows = _shared_rows()
    rows += _resnet("encoder.down_blocks.{i}.resnets.{j}", "encoder.down_blocks.{i}.resnets.{j}", "conv_shortcut")
    rows += _conv_rows("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder.down_blocks.{i}.downsample")
    rows += _resnet("decoder.up_blocks.{i}.resnets.{j}", "decoder.up_blocks.{i}.resnets.{j}", "conv_shortcut")
    rows += _conv_rows("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder.up_blocks.{i}.upsample")
    for part in ("encoder", "decoder"):
        rows += _resnet(f"{part}.mid_block.resnets.{{j}}", f"{part}.mid_block.resnets.{{j}}", "conv_shortcut")
        for names in (_DIFFUSERS_ATTENTION, _LEGACY_DIFFUSERS_ATTENTION):
            rows += _attention(f"{part}.mid_block.attentions.0", f"{part}.mid_block.attention", names)
        rows += _norm(f"{part}.conv_norm_out", f"{part}.conv_norm_out")
    return rows


def original_sd_table(levels: int) -> list[KeyMap]:
    """The CompVis/ldm (original SD) table for a VAE with `levels` resolution levels.

    Args:
        levels: ``len(block_out_channels)``; needed because ldm stores ``decoder.up`` highest
            resolution first while our model (like diffusers) runs ``up_blocks`` lowest resolution first.
    """
    rows = _shared_rows()
    rows += _resnet("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}", "nin_shortcut")
    rows += _conv_rows("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsample")
    rows += _attention("encoder.down.{i}.attn.{j}", "encoder.down_blocks.{i}.attentions.{j}", _LDM_ATTENTION)
    for ldm_index in range(levels):
        ours = levels - 1 - ldm_index
        rows += _resnet(f"decoder.up.{ldm_index}.block.{{j}}", f"decoder.up_blocks.{ours}.resnets.{{j}}",
                        "nin_shortcut")
        rows += _conv_rows(f"decoder.up.{ldm_index}.upsample.conv", f"decoder.up_blocks.{ours}.upsample")
    for part in ("encoder", "decoder"):
        for ldm_name, index in (("block_1", 0), ("block_2", 1)):
            rows += _resnet(f"{part}.mid.{ldm_name}", f"{part}.mid_block.resnets.{index}", "nin_shortcut")
        rows += _attention(f"{part}.mid.attn_1", f"{part}.mid_block.attention", _LDM_ATTENTION)
        rows += _norm(f"{part}.norm_out", f"{part}.conv_norm_out")
    return rows


DIFFUSERS_TABLE: list[KeyMap] = _diffusers_table()
"""diffusers ``AutoencoderKL`` names (current and pre-0.14 attention names)."""

ORIGINAL_SD_TABLE: list[KeyMap] = original_sd_table(4)
"""CompVis/ldm names for the 4-level SD VAE (``first_stage_model.`` stripped)."""

_DIFFUSERS_MARK = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.")
_LDM_MARK = re.compile(r"(encoder|decoder)\.(down|up|mid)\.")


def strip_first_stage_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops a ``first_stage_model.`` prefix (full SD checkpoints); other keys are kept as they are."""
    if not any(k.startswith(_FIRST_STAGE_PREFIX) for k in state_dict):
        return dict(state_dict)
    return {k[len(_FIRST_STAGE_PREFIX):] if k.startswith(_FIRST_STAGE_PREFIX) else k: v
            for k, v in state_dict.items()}


def detect_convention(keys: Sequence[str]) -> str:
    """``'diffusers'`` or ``'original'``, whichever naming most keys follow (diffusers on a tie)."""
    diffusers = sum(bool(_DIFFUSERS_MARK.match(k)) for k in keys)
    original = sum(bool(_LDM_MARK.match(k)) for k in keys)
    return "original" if original > diffusers else "diffusers"


def port_kl_vae(state_dict: Mapping[str, Any], **config: Any) -> AutoencoderKL:
    """Builds an `AutoencoderKL` from a diffusers or original-SD state dict.

    Args:
        state_dict: ``{key: array}`` in either convention, optionally with a ``first_stage_model.``
            prefix; training-loss / EMA / other-SD-part keys (`NON_VAE_KEYS`) are dropped.
        **config: `AutoencoderKL` constructor arguments (a diffusers ``config.json``); defaults are the
            SD VAE's.

    Returns:
        The ported model.

    Raises:
        mapping.PortError: naming every missing, unexpected or misshapen key.
    """
    source = strip_first_stage_prefix(state_dict)
    convention = detect_convention(list(source))
    levels = len(config.get("block_out_channels", (128, 256, 512, 512)))
    table = DIFFUSERS_TABLE if convention == "diffusers" else original_sd_table(levels)
    return mapping.port_state_dict(
        source, table, lambda: AutoencoderKL(**config, rngs=nnx.Rngs(0)), ignore=NON_VAE_KEYS,
        model_name=f"AutoencoderKL ({convention} key names)")
