"""Port table: upstream VAR ``VQVAE`` state dict -> `bitlaws.models.vqvae.VQVAE`.

Module paths mirror upstream (``encoder.down.{i}.block.{j}``, ``decoder.up.{i}.attn.{j}``, ...). Changes:
GroupNorm ``weight`` -> ``scale``; 3x3 convs OIHW -> HWIO; the 1x1 convs (``nin_shortcut``, attention
``qkv`` / ``proj_out``) become linear kernels; the Phi convs of every sharing mode
(``quant_resi.{i}``, ``quant_resi.qresi``, ``quant_resi.qresi_ls.{i}``) become ``quantize.quant_resi.{i}.conv``;
the codebook ``quantize.embedding.weight`` becomes ``quantize.embedding.embedding``. The training-only
buffer ``quantize.ema_vocab_hit_SV`` is dropped.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from bitlaws.models.vqvae import VQVAE
from bitlaws.port.mapping import KeyMap, conv, conv1x1_to_linear, port_state_dict


def _norm(prefix: str) -> list[KeyMap]:
    return [KeyMap(f"{prefix}.weight", f"{prefix}.scale"), KeyMap(f"{prefix}.bias", f"{prefix}.bias")]


def _conv(prefix: str, dst: str | None = None) -> list[KeyMap]:
    dst = dst or prefix
    return [KeyMap(f"{prefix}.weight", f"{dst}.kernel", conv), KeyMap(f"{prefix}.bias", f"{dst}.bias")]


def _conv1x1(prefix: str) -> list[KeyMap]:
    return [KeyMap(f"{prefix}.weight", f"{prefix}.kernel", conv1x1_to_linear),
            KeyMap(f"{prefix}.bias", f"{prefix}.bias")]


def _resnet(prefix: str) -> list[KeyMap]:
    return (_norm(f"{prefix}.norm1") + _conv(f"{prefix}.conv1") + _norm(f"{prefix}.norm2")
            + _conv(f"{prefix}.conv2") + _conv1x1(f"{prefix}.nin_shortcut"))


def _attn(prefix: str) -> list[KeyMap]:
    return _norm(f"{prefix}.norm") + _conv1x1(f"{prefix}.qkv") + _conv1x1(f"{prefix}.proj_out")


TABLE: list[KeyMap] = [
    *_conv("{part}.conv_in"),
    *_conv("{part}.conv_out"),
    *_norm("{part}.norm_out"),
    *_resnet("encoder.down.{i}.block.{j}"),
    *_attn("encoder.down.{i}.attn.{j}"),
    *_conv("encoder.down.{i}.downsample.conv"),
    *_resnet("decoder.up.{i}.block.{j}"),
    *_attn("decoder.up.{i}.attn.{j}"),
    *_conv("decoder.up.{i}.upsample.conv"),
    *_resnet("{part}.mid.block_{k}"),
    *_attn("{part}.mid.attn_1"),
    # Phi convs: fully shared (must precede the one-per-scale row, whose {i} would match "qresi"),
    # partially shared, one per scale.
    *_conv("quantize.quant_resi.qresi", "quantize.quant_resi.0.conv"),
    *_conv("quantize.quant_resi.qresi_ls.{i}", "quantize.quant_resi.{i}.conv"),
    *_conv("quantize.quant_resi.{i}", "quantize.quant_resi.{i}.conv"),
    KeyMap("quantize.embedding.weight", "quantize.embedding.embedding"),
    *_conv("quant_conv"),
    *_conv("post_quant_conv"),
]

IGNORE: tuple[str, ...] = (r"quantize\.ema_vocab_hit_SV",)


def port_vqvae(state_dict: Mapping[str, np.ndarray], **ctor: Any) -> VQVAE:
    """Builds our `VQVAE` from an upstream state dict.

    Args:
        state_dict: ``{upstream key: array}`` (e.g. ``vae_ch160v4096z32.pth`` read with
            `bitlaws.port.reader.read_state_dict`).
        **ctor: Upstream constructor arguments (``vocab_size``, ``z_channels``, ``ch``, ``v_patch_nums``...);
            a ``cls`` entry (as in fixture manifests) is ignored.

    Returns:
        The ported model.

    Raises:
        PortError: naming every missing, unexpected or misshapen key.
    """
    ctor = {k: v for k, v in ctor.items() if k != "cls"}
    if "v_patch_nums" in ctor:
        ctor["v_patch_nums"] = tuple(ctor["v_patch_nums"])
    return port_state_dict(state_dict, TABLE, lambda: VQVAE(**ctor, rngs=nnx.Rngs(0)),
                           ignore=IGNORE, model_name="VQVAE")
