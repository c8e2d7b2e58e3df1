"""The demo's LlamaGen VQ tokenizer for the 16x16 digits (``bitlaws train --config configs/demo/llamagen_vq.py``).

`bitlaws.models.llamagen_vq.LlamaGenVQ` with two levels (``ch_mult=(1, 1)``, width 32: 16x16 images -> 8x8 codes,
64 tokens per image in raster order) and an L2-normalised codebook of 64 codes x 8 dimensions, as the released
VQ-16 (16384 x 8) but small. Trained with LlamaGen's VQ loss without the GAN and perceptual terms: L2
reconstruction + codebook loss + ``beta`` x commitment loss, straight-through gradients. Args: ``quick`` (a few
steps, for tests), ``steps=N``.
"""

from __future__ import annotations

import ml_collections

from bitlaws.configlib import load_sibling, parse_arg


def model_config() -> ml_collections.ConfigDict:
    """``LlamaGenVQ`` constructor arguments of the demo tokenizer."""
    return ml_collections.ConfigDict(dict(
        codebook_size=64, codebook_embed_dim=8, codebook_l2_norm=True, commit_loss_beta=0.25,
        entropy_loss_ratio=0.0, encoder_ch_mult=(1, 1), decoder_ch_mult=(1, 1), z_channels=32, ch=32,
        num_res_blocks=1))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, allowed=("steps", "quick"))
    quick = bool(args.get("quick", False))
    config = ml_collections.ConfigDict()
    config.family = "llamagen_vq"
    config.name = "llamagen-vq"
    config.out_dir = "bitlaws/demo/checkpoints/llamagen-vq"
    config.command = "bitlaws train --config configs/demo/llamagen_vq.py"
    config.model = model_config()
    # The demo VQ-VAE's recipe (AdamW, warm-up, cosine, clipping, commitment beta 0.25, dead-code re-seeding)
    # without its L1 / L2 weights: LlamaGen's reconstruction loss is the L2 alone.
    config.train = load_sibling(__file__, "vqvae.py").get_config(arg).train
    del config.train["l1_weight"], config.train["l2_weight"]
    if not quick:
        config.train.steps = int(args.get("steps", 500))
    return config
