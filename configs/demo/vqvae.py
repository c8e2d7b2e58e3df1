"""The demo's multi-scale VQ tokenizer for the 16x16 digits (``bitlaws train --config configs/demo/vqvae.py``).

`bitlaws.models.vqvae.VQVAE` with two levels (``ch_mult=(1, 1)``, width 32: 16x16 images -> 8x8 latents), a 64-code
codebook of 8-dimensional codes and six scales ``(1, 2, 3, 4, 6, 8)`` (130 tokens per image). Trained with
L1 + L2 reconstruction, the codebook loss and the commitment loss (``beta``) through the residual
quantizer with straight-through gradients. Args: ``quick`` (a few steps, for tests), ``steps=N``.
"""

from __future__ import annotations

import ml_collections

from bitlaws.configlib import parse_arg

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


def model_config() -> ml_collections.ConfigDict:
    """``VQVAE`` constructor arguments of the demo tokenizer."""
    return ml_collections.ConfigDict(dict(
        vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, dropout=0.0, beta=0.25,
        using_znorm=False, quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0,
        v_patch_nums=PATCH_NUMS, test_mode=True))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, allowed=("steps", "quick"))
    quick = bool(args.get("quick", False))
    config = ml_collections.ConfigDict()
    config.family = "vqvae"
    config.name = "vqvae"
    config.out_dir = "bitlaws/demo/checkpoints/vqvae"
    config.command = "bitlaws train --config configs/demo/vqvae.py"
    config.model = model_config()
    config.train = ml_collections.ConfigDict(dict(
        steps=4 if quick else int(args.get("steps", 600)),
        batch_size=16 if quick else 64,
        learning_rate=2e-3,
        weight_decay=0.0,
        warmup_steps=1 if quick else 100,
        min_warmup_steps=1,  # the warm-up lasts at least one step (the first update has lr 0)
        final_lr_fraction=0.05,  # cosine decay to 5 % of the peak
        b2=0.95,  # AdamW (b1 0.9)
        grad_clip=1.0,  # global-norm clipping
        beta=0.25,  # commitment weight
        l1_weight=1.0,
        l2_weight=1.0,
        dead_code_every=0 if quick else 100,  # re-seed unused codes from encoder features every N steps
        checkpoint_every=2 if quick else 200,
        seed=0,
    ))
    return config
