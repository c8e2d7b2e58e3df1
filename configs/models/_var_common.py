"""Shared settings of the released VAR models (FoundationVision/VAR, ImageNet 256x256).

`var_config(depth)` is used by ``var_d16.py`` ... ``var_d30.py``. Width, heads and drop path follow the
release's ``build_vae_var``: ``embed_dim = 64 * depth``, ``num_heads = depth``,
``drop_path_rate = 0.1 * depth / 24``. The tokenizer is ``vae_ch160v4096z32``. Checkpoint files come
from the HuggingFace repository ``FoundationVision/var``; the code never downloads them.
"""

from __future__ import annotations

import ml_collections

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
HF_REPO = "FoundationVision/var"
VAE_CHECKPOINT = "vae_ch160v4096z32.pth"
PAPER_PARAMS = {16: 310e6, 20: 600e6, 24: 1.0e9, 30: 2.0e9}
"""Transformer parameter counts reported in the VAR paper (Table 1)."""


def vqvae_config() -> ml_collections.ConfigDict:
    """``models.vqvae.VQVAE`` constructor arguments of the released tokenizer."""
    return ml_collections.ConfigDict(dict(
        vocab_size=4096, z_channels=32, ch=160, dropout=0.0, beta=0.25, using_znorm=False,
        quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0,
        v_patch_nums=PATCH_NUMS, test_mode=True))


def transformer_config(depth: int) -> ml_collections.ConfigDict:
    """``models.var.VAR`` constructor arguments (without the tokenizer) of the released depth-`depth` model."""
    return ml_collections.ConfigDict(dict(
        num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth, mlp_ratio=4.0,
        drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6,
        shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=PATCH_NUMS,
        flash_if_available=True, fused_if_available=True))


def sampling_config() -> ml_collections.ConfigDict:
    """The FID/IS evaluation protocol of the release (50k samples, 50 per class)."""
    return ml_collections.ConfigDict(dict(
        cfg=1.5, top_k=900, top_p=0.96, more_smooth=False, num_samples=50_000, samples_per_class=50,
        image_res=256,
        # Which kernels run attention (`bitlaws.models.attention`): "xla" (written out, the parity-checked
        # default), "dot_product_attention" (JAX's fused path where the backend has one) or "cudnn".
        attention="xla",
        # Operand dtype of the transformer's matmuls (`bitlaws.quant.transform.set_compute_dtype`): "bfloat16"
        # on GPUs/TPUs (float32 accumulation), "float32" for parity.
        compute_dtype="float32"))


def var_config(depth: int) -> ml_collections.ConfigDict:
    """The full config of one released VAR model.

    Fields: ``name``, ``vqvae`` and ``var`` (constructor arguments), ``sampling`` (protocol),
    ``checkpoint`` (HuggingFace repo and file names), ``paper_params`` (reported transformer size).
    """
    config = ml_collections.ConfigDict()
    config.name = f"var_d{depth}"
    config.vqvae = vqvae_config()
    config.var = transformer_config(depth)
    config.sampling = sampling_config()
    config.checkpoint = ml_collections.ConfigDict(dict(
        hf_repo=HF_REPO, var_file=f"var_d{depth}.pth", vae_file=VAE_CHECKPOINT))
    config.paper_params = PAPER_PARAMS[depth]
    return config
