"""Port table: upstream LlamaGen ``VQModel`` state dict -> `bitlaws.models.llamagen_vq.LlamaGenVQ`.

Renames (see the model's docstring for why): ``encoder.conv_blocks.{i}`` -> ``encoder.down.{i}`` with ``res`` ->
``block``; ``decoder.conv_blocks.{i}`` (lowest resolution first) -> ``decoder.up.{n-1-i}`` (highest first);
``mid.0/1/2`` -> ``mid.block_1/attn_1/block_2``; the attention 1x1 convs ``q``, ``k``, ``v`` -> one ``qkv`` linear
kernel (columns q | k | v); GroupNorm ``weight`` -> ``scale``; 3x3 convs OIHW -> HWIO, the 1x1 ``nin_shortcut``
-> linear kernels, ``quant_conv`` / ``post_quant_conv`` -> 1x1 HWIO; the codebook ``quantize.embedding.weight``
-> ``quantize.embedding.embedding`` (stored un-normalised, as upstream). The training-only buffer
``quantize.codebook_used`` is dropped.

Released checkpoints (``vq_ds16_c2i.pt``) are ``{"model": state_dict}``: read them with ``key="model"``
(``bitlaws port llamagen_vq --key model``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from bitlaws.models.llamagen_vq import LlamaGenVQ, vq_ctor_kwargs
from bitlaws.port.mapping import KeyMap, conv, conv1x1_to_linear, port_state_dict
from bitlaws.port.tables.vqvae import _conv, _norm, _resnet

IGNORE: tuple[str, ...] = (r"quantize\.codebook_used",)


def _qkv_kernel(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Three 1x1 conv weights ``(C, C, 1, 1)`` -> one linear kernel ``(C, 3C)`` (columns q | k | v)."""
    return np.concatenate([conv1x1_to_linear(w) for w in (q, k, v)], axis=1)


def _qkv_bias(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.concatenate([q, k, v], axis=0)


def _attn(src: str, dst: str) -> list[KeyMap]:
    parts = tuple(f"{src}.{name}" for name in ("q", "k", "v"))
    return [*_norm_to(f"{src}.norm", f"{dst}.norm"),
            KeyMap(tuple(f"{p}.weight" for p in parts), f"{dst}.qkv.kernel", _qkv_kernel),
            KeyMap(tuple(f"{p}.bias" for p in parts), f"{dst}.qkv.bias", _qkv_bias),
            KeyMap(f"{src}.proj_out.weight", f"{dst}.proj_out.kernel", conv1x1_to_linear),
            KeyMap(f"{src}.proj_out.bias", f"{dst}.proj_out.bias")]


def _norm_to(src: str, dst: str) -> list[KeyMap]:
    return [KeyMap(f"{src}.weight", f"{dst}.scale"), KeyMap(f"{src}.bias", f"{dst}.bias")]


def _resnet_to(src: str, dst: str) -> list[KeyMap]:
    """`_resnet` rows with the destination prefix renamed."""
    return [KeyMap(row.src, row.dst.replace(src, dst, 1), row.transform) for row in _resnet(src)]


def table(num_levels: int) -> list[KeyMap]:
    """The port table of a tokenizer whose decoder has `num_levels` resolution levels."""
    rows: list[KeyMap] = [
        *_conv("{part}.conv_in"),
        *_conv("{part}.conv_out"),
        *_norm("{part}.norm_out"),
        *_resnet_to("encoder.conv_blocks.{i}.res.{j}", "encoder.down.{i}.block.{j}"),
        *_attn("encoder.conv_blocks.{i}.attn.{j}", "encoder.down.{i}.attn.{j}"),
        *_conv("encoder.conv_blocks.{i}.downsample.conv", "encoder.down.{i}.downsample.conv"),
        *_resnet_to("{part}.mid.0", "{part}.mid.block_1"),
        *_attn("{part}.mid.1", "{part}.mid.attn_1"),
        *_resnet_to("{part}.mid.2", "{part}.mid.block_2"),
        KeyMap("quantize.embedding.weight", "quantize.embedding.embedding"),
        KeyMap("quant_conv.weight", "quant_conv.kernel", conv),
        KeyMap("quant_conv.bias", "quant_conv.bias"),
        KeyMap("post_quant_conv.weight", "post_quant_conv.kernel", conv),
        KeyMap("post_quant_conv.bias", "post_quant_conv.bias"),
    ]
    for i in range(num_levels):
        src, dst = f"decoder.conv_blocks.{i}", f"decoder.up.{num_levels - 1 - i}"
        rows += [*_resnet_to(f"{src}.res.{{j}}", f"{dst}.block.{{j}}"),
                 *_attn(f"{src}.attn.{{j}}", f"{dst}.attn.{{j}}"),
                 *_conv(f"{src}.upsample.conv", f"{dst}.upsample.conv")]
    return rows


def port_llamagen_vq(state_dict: Mapping[str, Any], **ctor: Any) -> LlamaGenVQ:
    """Builds a `LlamaGenVQ` from an upstream ``VQModel`` state dict.

    Args:
        state_dict: ``{upstream key: array}`` (e.g. ``read_state_dict("vq_ds16_c2i.pt", key="model")``).
        **ctor: `LlamaGenVQ` keyword arguments, or the upstream nesting a fixture manifest uses
            (``ModelArgs`` / ``encoder`` / ``decoder``; see `vq_ctor_kwargs`).

    Returns:
        The ported model.

    Raises:
        PortError: naming every missing, unexpected or misshapen key.
    """
    kwargs = vq_ctor_kwargs(ctor)
    levels = len(kwargs.get("decoder_ch_mult", (1, 1, 2, 2, 4)))
    return port_state_dict(state_dict, table(levels), lambda: LlamaGenVQ(**kwargs, rngs=nnx.Rngs(0)),
                           ignore=IGNORE, model_name="LlamaGenVQ")


# ----------------------------------------------------------------------------- `bitlaws port llamagen_vq`


def ctor_from_config(config) -> dict[str, Any]:
    """Constructor kwargs (JSON-friendly) from a config's ``vq`` section (``configs/models/llamagen_vq16.py``)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.vq.to_dict().items() if k != "cls"}


def port_kind(state_dict: Mapping[str, Any], ctor: dict[str, Any]) -> LlamaGenVQ:
    """`port_llamagen_vq` with a stored constructor dict (the `bitlaws.port.convert` kind interface)."""
    return port_llamagen_vq(state_dict, **ctor)


def build(ctor: dict[str, Any]) -> LlamaGenVQ:
    """The model of a stored constructor dict (evaluated abstractly when loading a port)."""
    return LlamaGenVQ(**vq_ctor_kwargs(ctor), rngs=nnx.Rngs(0))


def model_class() -> type:
    return LlamaGenVQ
