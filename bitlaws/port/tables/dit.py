"""Port table: official DiT (`models.py`, facebookresearch/DiT) state dict -> `bitlaws.models.dit.DiT`.

The fixed ``pos_embed`` buffer is not ported: our model recomputes the identical 2-D sin-cos table.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from bitlaws.models.dit import DiT
from bitlaws.port.mapping import KeyMap, conv, linear, port_state_dict

_LINEARS = (
    ("t_embedder.mlp.0", "t_embedder.mlp_in"),
    ("t_embedder.mlp.2", "t_embedder.mlp_out"),
    ("blocks.{i}.attn.qkv", "blocks.{i}.attn.qkv"),
    ("blocks.{i}.attn.proj", "blocks.{i}.attn.proj"),
    ("blocks.{i}.mlp.fc1", "blocks.{i}.mlp.fc1"),
    ("blocks.{i}.mlp.fc2", "blocks.{i}.mlp.fc2"),
    ("blocks.{i}.adaLN_modulation.1", "blocks.{i}.adaLN_modulation"),
    ("final_layer.linear", "final_layer.linear"),
    ("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation"),
)

TABLE: list[KeyMap] = [
    KeyMap("x_embedder.proj.weight", "x_embedder.proj.kernel", conv),
    KeyMap("x_embedder.proj.bias", "x_embedder.proj.bias"),
    KeyMap("y_embedder.embedding_table.weight", "y_embedder.embedding_table"),
] + [
    row
    for src, dst in _LINEARS
    for row in (KeyMap(f"{src}.weight", f"{dst}.kernel", linear), KeyMap(f"{src}.bias", f"{dst}.bias"))
]

IGNORE: tuple[str, ...] = (r"pos_embed",)
"""Source keys dropped by the port (recomputed by the model)."""


def port_dit(state_dict: Mapping[str, np.ndarray], **ctor: Any) -> DiT:
    """Builds a `DiT` from an official state dict.

    Args:
        state_dict: ``{upstream key: array}`` (PyTorch layouts).
        **ctor: `DiT` constructor arguments (upstream names; ``cls`` is ignored).

    Returns:
        The ported model.

    Raises:
        PortError: naming every missing, unexpected or misshapen key.
    """
    ctor = {k: v for k, v in ctor.items() if k != "cls"}
    return port_state_dict(state_dict, TABLE, lambda: DiT(**ctor, rngs=nnx.Rngs(0)), ignore=IGNORE,
                           model_name="DiT")
