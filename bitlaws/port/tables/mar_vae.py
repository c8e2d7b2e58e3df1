"""Port of MAR's KL-16 VAE (LTH14/mar ``models/vae.py``, LDM key names) -> `bitlaws.models.mar_vae.MarAutoencoderKL`.

The LDM names (``encoder.down.{i}.block.{j}``, ``encoder.down.{i}.attn.{j}``, ``decoder.up.{i}`` highest
resolution first, 1x1-conv attention projections) are those of the original-SD table of
`bitlaws.port.tables.kl_vae`, which maps them onto our diffusers-layout module names. Released checkpoints are
``{"model": sd}`` (``AutoencoderKL.init_from_ckpt`` reads ``torch.load(path)["model"]``): `DEFAULT_KEY`.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from bitlaws.models.mar_vae import MarAutoencoderKL
from bitlaws.port import mapping
from bitlaws.port.tables.kl_vae import NON_VAE_KEYS, original_sd_table

DEFAULT_KEY = "model"
"""Sub-dict of released KL-16 checkpoints holding the state dict."""


def _ctor(ctor: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs without ``cls``, JSON lists back to tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in ctor.items() if k != "cls"}


def port_mar_vae(state_dict: Mapping[str, Any], **ctor: Any) -> MarAutoencoderKL:
    """Builds a `MarAutoencoderKL` from an LDM-named state dict.

    Args:
        state_dict: ``{upstream key: array}`` (PyTorch layouts), already taken out of ``{"model": ...}``.
        **ctor: `MarAutoencoderKL` constructor arguments (upstream names; ``cls`` is ignored).

    Returns:
        The ported model.

    Raises:
        mapping.PortError: naming every missing, unexpected or misshapen key.
    """
    ctor = _ctor(ctor)
    levels = len(ctor.get("ch_mult", (1, 1, 2, 2, 4)))
    return mapping.port_state_dict(state_dict, original_sd_table(levels),
                                   lambda: MarAutoencoderKL(**ctor, rngs=nnx.Rngs(0)), ignore=NON_VAE_KEYS,
                                   model_name="MarAutoencoderKL (LDM key names)")


# ----------------------------------------------------------------------------- `bitlaws port mar_vae` hooks


def port_kind(state_dict: Mapping[str, Any], ctor: dict) -> MarAutoencoderKL:
    """`bitlaws.port.convert.Kind.port`: `port_mar_vae` with the stored constructor."""
    return port_mar_vae(state_dict, **ctor)


def build(ctor: dict) -> MarAutoencoderKL:
    """`bitlaws.port.convert.Kind.build`: the model from its stored constructor (JSON lists back to tuples)."""
    return MarAutoencoderKL(**_ctor(ctor), rngs=nnx.Rngs(0))


def model_class() -> type:
    return MarAutoencoderKL
