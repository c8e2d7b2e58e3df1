"""Port table: LlamaGen GPT state dict (``autoregressive/models/gpt.py``) -> `bitlaws.models.llamagen.LlamaGen`.

Module paths mirror upstream; Linear weights ``(out, in)`` become kernels ``(in, out)``, RMSNorm ``weight`` stays
``weight``, the embedding tables become ``tok_embeddings.embedding`` / ``cls_embedding.embedding_table``. Buffers
our model recomputes or allocates itself are dropped when present: ``freqs_cis`` (RoPE), the KV cache
``layers.*.attention.kv_cache.{k,v}_cache`` and ``causal_mask`` (a state dict taken after ``generate()``).

Checkpoints: training / DDP ``{"model": sd, ...}`` (``key="model"``), deepspeed ``{"module": sd}``
(``key="module"``) or the flat state dict (FSDP export): `bitlaws.port.reader.read_state_dict`'s ``key`` picks
the sub-dict (``bitlaws port llamagen --key model``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from bitlaws.models.llamagen import LlamaGen
from bitlaws.port.mapping import KeyMap, linear, port_state_dict

TABLE: list[KeyMap] = [
    KeyMap("cls_embedding.embedding_table.weight", "cls_embedding.embedding_table"),
    KeyMap("tok_embeddings.weight", "tok_embeddings.embedding"),
    KeyMap("layers.{i}.attention.wqkv.weight", "layers.{i}.attention.wqkv.kernel", linear),
    KeyMap("layers.{i}.attention.wo.weight", "layers.{i}.attention.wo.kernel", linear),
    KeyMap("layers.{i}.feed_forward.w1.weight", "layers.{i}.feed_forward.w1.kernel", linear),
    KeyMap("layers.{i}.feed_forward.w2.weight", "layers.{i}.feed_forward.w2.kernel", linear),
    KeyMap("layers.{i}.feed_forward.w3.weight", "layers.{i}.feed_forward.w3.kernel", linear),
    KeyMap("layers.{i}.attention_norm.weight", "layers.{i}.attention_norm.weight"),
    KeyMap("layers.{i}.ffn_norm.weight", "layers.{i}.ffn_norm.weight"),
    KeyMap("norm.weight", "norm.weight"),
    KeyMap("output.weight", "output.kernel", linear),
]

IGNORE: tuple[str, ...] = (
    r"freqs_cis",
    r"causal_mask",
    r"layers\.\d+\.attention\.kv_cache\.[kv]_cache",
)


def gpt_ctor_kwargs(ctor: Mapping[str, Any]) -> dict[str, Any]:
    """`LlamaGen` keyword arguments from our keywords or a fixture manifest's ``{"ModelArgs": {...}}`` nesting."""
    ctor = {k: v for k, v in ctor.items() if k not in ("cls", "build", "derived", "released_c2i")}
    return dict(ctor["ModelArgs"]) if "ModelArgs" in ctor else ctor


def port_llamagen(state_dict: Mapping[str, Any], **ctor: Any) -> LlamaGen:
    """Builds a `LlamaGen` GPT from an upstream state dict.

    Args:
        state_dict: ``{upstream key: array}`` (e.g. ``read_state_dict("c2i_B_256.pt", key="model")``).
        **ctor: `LlamaGen` keyword arguments (upstream ``ModelArgs`` fields, or ``ModelArgs={...}`` as in the
            fixture manifests). When ``vocab_size`` is absent it is read from ``output.weight`` ``[V, D]``.

    Returns:
        The ported model.

    Raises:
        PortError: naming every missing, unexpected or misshapen key.
    """
    kwargs = gpt_ctor_kwargs(ctor)
    if "vocab_size" not in kwargs and "output.weight" in state_dict:
        kwargs["vocab_size"] = int(np.shape(state_dict["output.weight"])[0])
    return port_state_dict(state_dict, TABLE, lambda: LlamaGen(**kwargs, rngs=nnx.Rngs(0)), ignore=IGNORE,
                           model_name="LlamaGen")


# ----------------------------------------------------------------------------- `bitlaws port llamagen`


def ctor_from_config(config) -> dict[str, Any]:
    """Constructor kwargs (JSON-friendly) from a config's ``gpt`` section (``configs/models/llamagen_gpt.py``).

    Raises:
        ValueError: no config (the model size must be chosen).
    """
    if config is None:
        raise ValueError("porting 'llamagen' needs --config configs/models/llamagen_gpt.py:VARIANT[,image_size=N] "
                         "(VARIANT b, l, xl, xxl or 3b) for the model size")
    return {k: v for k, v in config.gpt.to_dict().items() if k != "cls"}


def port_kind(state_dict: Mapping[str, Any], ctor: dict[str, Any]) -> LlamaGen:
    """`port_llamagen` with a stored constructor dict (the `bitlaws.port.convert` kind interface)."""
    return port_llamagen(state_dict, **ctor)


def build(ctor: dict[str, Any]) -> LlamaGen:
    """The model of a stored constructor dict (evaluated abstractly when loading a port)."""
    return LlamaGen(**gpt_ctor_kwargs(ctor), rngs=nnx.Rngs(0))


def model_class() -> type:
    return LlamaGen
