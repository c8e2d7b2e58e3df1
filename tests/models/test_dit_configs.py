"""DiT family configs: constructor sizes, pinned sampling protocol and parameter counts (via nnx.eval_shape)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from flax import nnx

from bitlaws.configlib import load_config
from bitlaws.models.dit import DiT

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "models"
UPSTREAM_XL2_PARAMS = 675_129_632  # official DiT-XL/2 count, including the fixed pos_embed buffer


def _config(name: str):
    return load_config(str(CONFIGS / f"{name}.py"))


def _param_count(model_config) -> int:
    ctor = {k: v for k, v in model_config.to_dict().items() if k != "cls"}
    abstract = nnx.eval_shape(lambda: DiT(**ctor, rngs=nnx.Rngs(0)))
    _, params = nnx.split(abstract, nnx.Param)
    return sum(int(np.prod(var.get_value().shape)) for _, var in nnx.to_flat_state(params))


def test_xl2_parameter_count_matches_upstream():
    config = _config("dit_xl2")
    count = _param_count(config.model)
    # Our count excludes pos_embed (recomputed, not a parameter): 256 tokens x 1152 channels.
    pos_embed = (config.model.input_size // config.model.patch_size) ** 2 * config.model.hidden_size
    assert count + pos_embed == UPSTREAM_XL2_PARAMS
    assert abs(count - 675e6) / 675e6 < 0.005


@pytest.mark.parametrize("name, millions", [("dit_s2", 33), ("dit_b2", 130), ("dit_l2", 458)])
def test_smaller_variant_parameter_counts(name, millions):
    count = _param_count(_config(name).model)
    assert abs(count / 1e6 - millions) / millions < 0.01


@pytest.mark.parametrize("size, width, depth, heads", [("s", 384, 12, 6), ("b", 768, 12, 12),
                                                       ("l", 1024, 24, 16), ("xl", 1152, 28, 16)])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_variant_files_give_the_family_sizes(size, width, depth, heads, patch):
    config = _config(f"dit_{size}{patch}")
    assert config.name == f"DiT-{size.upper()}/{patch}"
    model = config.model
    assert (model.hidden_size, model.depth, model.num_heads, model.patch_size) == (width, depth, heads, patch)
    assert (model.input_size, model.in_channels, model.num_classes, model.learn_sigma) == (32, 4, 1000, True)


def test_sampling_protocol_is_pinned():
    config = _config("dit_xl2")
    assert config.sampling.timestep_respacing == "250" and config.sampling.sampler == "ddpm"
    assert config.sampling.cfg_scale == 1.5
    assert config.sampling.num_fid_samples == 50_000
    assert config.vae.name == "stabilityai/sd-vae-ft-ema" and config.vae.scaling_factor == 0.18215
    assert config.checkpoint.official_name == "DiT-XL-2-256x256.pt"
    assert _config("dit_b4").checkpoint.official_name == ""


def test_family_config_accepts_paper_names_and_rejects_unknown():
    assert load_config(f"{CONFIGS}/dit.py:DiT-L/4").model.hidden_size == 1024
    with pytest.raises(ValueError, match="xxl2"):
        load_config(f"{CONFIGS}/dit.py:xxl2")
