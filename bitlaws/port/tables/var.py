"""Port table: upstream VAR transformer state dict (``models/var.py``) -> `bitlaws.models.var.VAR`.

The source holds only the transformer (upstream keeps the tokenizer outside ``state_dict()``). Buffers
our model recomputes are ignored: ``attn_bias_for_masking`` and ``lvl_1L`` (from ``patch_nums``) and
``blocks.*.attn.zero_k_bias`` (the key bias is always zero; we keep ``q_bias`` / ``v_bias`` separately
and insert the zeros at call time). A non-zero ``zero_k_bias`` is rejected.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from bitlaws.models.var import VAR, var_ctor_kwargs
from bitlaws.port.mapping import KeyMap, PortError, linear, port_state_dict


def _linear_rows(src: str, dst: str) -> list[KeyMap]:
    return [KeyMap(f"{src}.weight", f"{dst}.kernel", linear), KeyMap(f"{src}.bias", f"{dst}.bias")]


TABLE: list[KeyMap] = [
    KeyMap("pos_start", "pos_start"),
    KeyMap("pos_1LC", "pos_1LC"),
    KeyMap("class_emb.weight", "class_emb"),
    KeyMap("lvl_embed.weight", "lvl_embed"),
    *_linear_rows("word_embed", "word_embed"),
    *_linear_rows("shared_ada_lin.1", "shared_ada_lin"),
    KeyMap("blocks.{i}.ada_gss", "blocks.{i}.ada_gss"),
    *_linear_rows("blocks.{i}.ada_lin.1", "blocks.{i}.ada_lin"),
    KeyMap("blocks.{i}.attn.scale_mul_1H11", "blocks.{i}.attn.scale_mul_1H11"),
    KeyMap("blocks.{i}.attn.q_bias", "blocks.{i}.attn.q_bias"),
    KeyMap("blocks.{i}.attn.v_bias", "blocks.{i}.attn.v_bias"),
    KeyMap("blocks.{i}.attn.mat_qkv.weight", "blocks.{i}.attn.mat_qkv.kernel", linear),
    *_linear_rows("blocks.{i}.attn.proj", "blocks.{i}.attn.proj"),
    *_linear_rows("blocks.{i}.ffn.fc1", "blocks.{i}.ffn.fc1"),
    *_linear_rows("blocks.{i}.ffn.fc2", "blocks.{i}.ffn.fc2"),
    *_linear_rows("head_nm.ada_lin.1", "head_nm.ada_lin"),
    *_linear_rows("head", "head"),
]

IGNORE: tuple[str, ...] = (
    r"attn_bias_for_masking",
    r"lvl_1L",
    r"blocks\.\d+\.attn\.zero_k_bias",
)

_ZERO_K_BIAS = re.compile(r"blocks\.\d+\.attn\.zero_k_bias")


def port_var(state_dict: Mapping[str, np.ndarray], **ctor: Any) -> VAR:
    """Builds a `VAR` from an upstream state dict.

    Args:
        state_dict: ``{upstream key: array}`` (e.g. `bitlaws.port.reader.read_state_dict` of
            ``var_d16.pth``).
        **ctor: Upstream ``VAR`` constructor arguments (``cls`` / ``vae_local`` are dropped). When
            ``vocab_size`` / ``Cvae`` (and no ``vae``) are absent they are read from the shapes of
            ``head.weight`` ``[V, C]`` and ``word_embed.weight`` ``[C, Cvae]``.

    Returns:
        The ported model.

    Raises:
        PortError: naming every missing, unexpected or misshapen key, or a non-zero ``zero_k_bias``.
    """
    kwargs = var_ctor_kwargs(ctor)
    if kwargs.get("vae") is None:
        if "vocab_size" not in kwargs and "head.weight" in state_dict:
            kwargs["vocab_size"] = int(np.shape(state_dict["head.weight"])[0])
        if "Cvae" not in kwargs and "word_embed.weight" in state_dict:
            kwargs["Cvae"] = int(np.shape(state_dict["word_embed.weight"])[1])
    nonzero = [k for k, v in state_dict.items() if _ZERO_K_BIAS.fullmatch(k) and np.any(np.asarray(v) != 0)]
    if nonzero:
        raise PortError("VAR", [], [], [f"{k} (must be all zeros)" for k in nonzero])
    return port_state_dict(state_dict, TABLE, lambda: VAR(**kwargs, rngs=nnx.Rngs(0)), ignore=IGNORE,
                           model_name="VAR")
