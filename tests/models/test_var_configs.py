"""Released VAR configs: constructor fields and the transformer sizes reported in the paper."""

from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from bitlaws.models.var import VAR
from bitlaws import configlib

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "models"
PAPER_PARAMS = {16: 310e6, 20: 600e6, 24: 1.0e9, 30: 2.0e9}
# Exact transformer sizes of our port (vocab 4096, Cvae 32); equal to upstream's: same tensors, same shapes.
EXACT_PARAMS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}


def load_config(depth: int):
    return configlib.load_config(str(CONFIG_DIR / f"var_d{depth}.py"))


@functools.lru_cache(maxsize=None)
def transformer_param_count(depth: int) -> int:
    config = load_config(depth)
    kwargs = dict(config.var)
    model = nnx.eval_shape(lambda: VAR(vocab_size=config.vqvae.vocab_size, Cvae=config.vqvae.z_channels,
                                       **kwargs, rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    return int(sum(np.prod(leaf.shape) for leaf in leaves))


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_param_count_matches_paper(depth):
    config = load_config(depth)
    count = transformer_param_count(depth)
    paper = PAPER_PARAMS[depth]
    rel = abs(count - paper) / paper
    assert rel <= 0.05, f"VAR-d{depth}: {count:,} parameters vs paper {paper:,.0f} ({rel:.1%} off)"
    assert count == EXACT_PARAMS[depth], f"VAR-d{depth}: {count:,} parameters, expected {EXACT_PARAMS[depth]:,}"
    assert config.paper_params == paper, f"VAR-d{depth}: config.paper_params={config.paper_params}"


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_release_fields(depth):
    config = load_config(depth)
    assert config.name == f"var_d{depth}"
    assert (config.var.depth, config.var.embed_dim, config.var.num_heads) == (depth, 64 * depth, depth)
    assert config.var.drop_path_rate == pytest.approx(0.1 * depth / 24)
    assert config.var.num_classes == 1000 and not config.var.shared_aln and config.var.attn_l2_norm
    assert tuple(config.var.patch_nums) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert tuple(config.vqvae.v_patch_nums) == tuple(config.var.patch_nums)
    assert (config.vqvae.vocab_size, config.vqvae.z_channels, config.vqvae.ch) == (4096, 32, 160)
    assert (config.vqvae.share_quant_resi, config.vqvae.quant_conv_ks, config.vqvae.test_mode) == (4, 3, True)
    sampling = config.sampling
    assert (sampling.cfg, sampling.top_k, sampling.top_p, sampling.more_smooth) == (1.5, 900, 0.96, False)
    assert sampling.num_samples == 50_000
    assert config.checkpoint.var_file == f"var_d{depth}.pth"
    assert config.checkpoint.vae_file == "vae_ch160v4096z32.pth"
    assert config.checkpoint.hf_repo == "FoundationVision/var"

