"""The Stable Diffusion VAE fine-tuned with EMA weights (``stabilityai/sd-vae-ft-ema``), as used by DiT.

Only describes the model; nothing is downloaded. Build it with
``port_kl_vae(read_state_dict(path), **config.model)`` where ``path`` is a local copy of
``config.checkpoint.filename`` from ``config.checkpoint.repo_id``.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The diffusers ``AutoencoderKL`` config of sd-vae-ft-ema (83,653,863 parameters)."""
    config = ml_collections.ConfigDict()
    config.name = "sd_vae_ft_ema"
    config.model = ml_collections.ConfigDict(dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.18215,
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(
        repo_id="stabilityai/sd-vae-ft-ema",
        filename="diffusion_pytorch_model.safetensors",
        key_convention="diffusers",
    ))
    config.num_params = 83_653_863
    config.downsample_factor = 8
    return config
