"""DiT model family configs (ml_collections): `get_config("xl2")`, ``"s2"`` ... ``"l8"``.

Use as ``--config=configs/models/dit.py:xl2`` or through the per-variant files ``configs/models/dit_xl2.py``.
The sampling protocol is the paper's FID-50K setup: 250 DDPM steps, classifier-free guidance 1.5 on the first
3 latent channels, 50,000 samples, SD VAE ``stabilityai/sd-vae-ft-ema`` decoding ``latents / 0.18215``.
"""

from __future__ import annotations

import ml_collections

SIZES: dict[str, dict[str, int]] = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
VARIANTS = tuple(f"{size.lower()}{patch}" for size in SIZES for patch in PATCH_SIZES)
OFFICIAL_CHECKPOINTS = {"xl2": "DiT-XL-2-256x256.pt"}  # released weights at 256px; never downloaded here

IMAGE_SIZE = 256
VAE_DOWNSAMPLE = 8


def _parse(variant: str) -> tuple[str, int]:
    name = variant.lower().replace("dit-", "").replace("/", "").replace("-", "")
    if name not in VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return name[:-1].upper(), int(name[-1])


def get_config(variant: str = "xl2") -> ml_collections.ConfigDict:
    """The config of one DiT variant at 256x256.

    Args:
        variant: ``"xl2"``, ``"l4"``, ``"s8"`` ... (``"DiT-XL/2"`` is accepted too).

    Returns:
        ConfigDict with ``model`` (constructor of `bitlaws.models.dit.DiT`), ``sampling``, ``vae`` and
        ``checkpoint``.
    """
    size, patch = _parse(variant)
    config = ml_collections.ConfigDict()
    config.name = f"DiT-{size}/{patch}"
    config.image_size = IMAGE_SIZE

    config.model = ml_collections.ConfigDict(dict(
        cls="bitlaws.models.dit.DiT",
        input_size=IMAGE_SIZE // VAE_DOWNSAMPLE,
        patch_size=patch,
        in_channels=4,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        **SIZES[size],
    ))

    config.sampling = ml_collections.ConfigDict(dict(
        sampler="ddpm",
        timestep_respacing="250",
        num_sampling_steps=250,
        cfg_scale=1.5,
        clip_denoised=False,
        num_fid_samples=50_000,
        global_seed=0,
        attention="xla",  # or "dot_product_attention" / "cudnn" (`bitlaws.models.attention`)
        compute_dtype="float32",  # "bfloat16" on GPUs/TPUs (`bitlaws.quant.transform.set_compute_dtype`)
    ))

    config.vae = ml_collections.ConfigDict(dict(
        name="stabilityai/sd-vae-ft-ema",
        scaling_factor=0.18215,
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(
        official_name=OFFICIAL_CHECKPOINTS.get(f"{size.lower()}{patch}", ""),
        path="",  # local copy of the official checkpoint, if any
        port_table="bitlaws.port.tables.dit",
    ))
    return config
