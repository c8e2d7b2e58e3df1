"""MAR's KL-16 VAE (LTH14/mar ``models/vae.py``: ``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))``).

LDM KL autoencoder with ch 128 (widths 128, 128, 256, 256, 512), 2 resnets per encoder level, encoder attention at
the 16x16 level (``attn_resolutions=(16,)`` with nominal resolution 256), 16 latent channels, 16x downsampling:
66,456,019 parameters (ours). Built by `bitlaws.models.mar_vae.MarAutoencoderKL`; the released ``kl16.ckpt``
is ``{"model": sd}`` (``bitlaws port mar_vae --ckpt kl16.ckpt``; the kind's default key is ``model``).
MAR scales latents by 0.2325.
"""

from __future__ import annotations

import ml_collections


def get_config(arg=None) -> ml_collections.ConfigDict:
    """The KL-16 config (`arg` is unused)."""
    del arg
    config = ml_collections.ConfigDict()
    config.name = "mar_vae_kl16"
    config.model = ml_collections.ConfigDict(dict(
        embed_dim=16, ch_mult=(1, 1, 2, 2, 4), ch=128, num_res_blocks=2, attn_resolutions=(16,), resolution=256,
        in_channels=3, out_ch=3, use_variational=True))
    config.checkpoint = ml_collections.ConfigDict(dict(
        official_name="pretrained_models/vae/kl16.ckpt", key="model", port_table="bitlaws.port.tables.mar_vae"))
    config.num_params = 66_456_019
    config.downsample_factor = 16
    config.scaling_factor = 0.2325
    return config
