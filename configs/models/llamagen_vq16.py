"""LlamaGen's released VQ-16 image tokenizer (``vq_ds16_c2i.pt``, FoundationVision/LlamaGen).

Upstream ``VQ_16()`` = ``VQModel(ModelArgs(encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4]))`` with
the ``ModelArgs`` defaults: codebook 16384 x 8, L2-normalised, ``z_channels`` 256, and the encoder/decoder
default ``ch`` 128 (``tokenizer/tokenizer_image/vq_model.py`` at commit ``ce98ec41``). Downsampling 16x:
256px images give 16x16 tokens, 384px 24x24.

Parameters: 71,883,403 in our port (the README's "72M"; the same tensors as upstream, with the attention's
q/k/v 1x1 convs fused into one ``qkv`` kernel). The checkpoint is ``{"model": state_dict}``:
``bitlaws port llamagen_vq --ckpt vq_ds16_c2i.pt --out DIR`` (this config is the default; the kind reads the
``model`` sub-dict by default).
"""

from __future__ import annotations

import ml_collections

HF_REPO = "FoundationVision/LlamaGen"
CHECKPOINT = "vq_ds16_c2i.pt"
RELEASED_PARAMS = 72e6
EXACT_PARAMS = 71_883_403


def vq_config() -> ml_collections.ConfigDict:
    """`bitlaws.models.llamagen_vq.LlamaGenVQ` constructor arguments of the released VQ-16."""
    return ml_collections.ConfigDict(dict(
        codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
        commit_loss_beta=0.25, entropy_loss_ratio=0.0, encoder_ch_mult=(1, 1, 2, 2, 4),
        decoder_ch_mult=(1, 1, 2, 2, 4), z_channels=256, dropout_p=0.0, ch=128, num_res_blocks=2))


def get_config(arg=None) -> ml_collections.ConfigDict:
    """The VQ-16 config (`arg` is unused): ``vq`` (constructor), ``downsample``, ``checkpoint``, ``released_params``."""
    del arg
    config = ml_collections.ConfigDict()
    config.name = "llamagen_vq16"
    config.vq = vq_config()
    config.downsample = 16
    config.checkpoint = ml_collections.ConfigDict(dict(hf_repo=HF_REPO, file=CHECKPOINT, key="model"))
    config.released_params = RELEASED_PARAMS
    config.exact_params = EXACT_PARAMS
    return config
