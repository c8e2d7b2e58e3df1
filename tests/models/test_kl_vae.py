"""Tests of the SD VAE port: fixture parity, both checkpoint key conventions, errors, parameter count."""

from __future__ import annotations

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.models.kl_vae import AutoencoderKL, DiagonalGaussian
from bitlaws.port.checks import sdvae
from bitlaws.port.mapping import PortError, to_state_dict
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.kl_vae import (DIFFUSERS_TABLE, ORIGINAL_SD_TABLE, detect_convention,
                                        port_kl_vae)
from bitlaws.port.verify import load_manifest
from bitlaws.configlib import load_config

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
SD_VAE_PARAMS = 83_653_863


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest(FIXTURES)


@pytest.fixture(scope="module")
def config(manifest) -> dict:
    return sdvae.load_config(FIXTURES, manifest["fixtures"]["sdvae"])


@pytest.fixture(scope="module")
def diffusers_sd(manifest) -> dict[str, np.ndarray]:
    return sdvae.load_weights(FIXTURES, manifest["fixtures"]["sdvae"])


@pytest.fixture(scope="module")
def io(manifest) -> dict[str, np.ndarray]:
    return read_safetensors(FIXTURES / manifest["fixtures"]["sdvae"]["file_io"])


@pytest.fixture(scope="module")
def ported(diffusers_sd, config) -> AutoencoderKL:
    return port_kl_vae(diffusers_sd, **config)


@pytest.fixture(scope="module")
def ported_outputs(ported, io) -> dict[str, np.ndarray]:
    return sdvae.run_fixture_calls(ported, io)


def diffusers_to_original_sd(state_dict: dict[str, np.ndarray], levels: int) -> dict[str, np.ndarray]:
    """The inverse port: diffusers key names -> CompVis/ldm names, attention weights as 1x1 convs."""
    def up_index(match: re.Match) -> str:
        return f"decoder.up.{levels - 1 - int(match.group(1))}."

    renames = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.", up_index),
        (r"^(decoder\.up\.\d+\.)resnets\.(\d+)\.", r"\1block.\2."),
        (r"^(decoder\.up\.\d+\.)upsamplers\.0\.", r"\1upsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_q\.", ".mid.attn_1.q."),
        (r"\.mid_block\.attentions\.0\.to_k\.", ".mid.attn_1.k."),
        (r"\.mid_block\.attentions\.0\.to_v\.", ".mid.attn_1.v."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.conv_norm_out\.", ".norm_out."),
    ]
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if ".attn_1." in key and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (out, in) -> 1x1 conv (out, in, 1, 1)
        out[key] = value
    return out


def analytic_param_count(cfg: dict) -> int:
    """Counts diffusers AutoencoderKL parameters from the config, independently of the model code."""
    def conv(k: int, cin: int, cout: int) -> int:
        return k * k * cin * cout + cout

    def norm(c: int) -> int:
        return 2 * c

    def resnet(cin: int, cout: int) -> int:
        shortcut = conv(1, cin, cout) if cin != cout else 0
        return norm(cin) + conv(3, cin, cout) + norm(cout) + conv(3, cout, cout) + shortcut

    def mid(c: int) -> int:
        return 2 * resnet(c, c) + norm(c) + 4 * (c * c + c)

    chans, per_level, z = list(cfg["block_out_channels"]), cfg["layers_per_block"], cfg["latent_channels"]
    total = conv(3, cfg["in_channels"], chans[0])
    previous = chans[0]
    for level, c in enumerate(chans):
        total += sum(resnet(previous if j == 0 else c, c) for j in range(per_level))
        total += conv(3, c, c) if level < len(chans) - 1 else 0
        previous = c
    total += mid(chans[-1]) + norm(chans[-1]) + conv(3, chans[-1], 2 * z)
    total += conv(3, z, chans[-1]) + mid(chans[-1])
    previous = chans[-1]
    for level, c in enumerate(reversed(chans)):
        total += sum(resnet(previous if j == 0 else c, c) for j in range(per_level + 1))
        total += conv(3, c, c) if level < len(chans) - 1 else 0
        previous = c
    total += norm(chans[0]) + conv(3, chans[0], cfg["out_channels"])
    return total + conv(1, 2 * z, 2 * z) + conv(1, z, z)


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def load_sd_vae_config():
    return load_config(str(REPO / "configs/models/sd_vae_ft_ema.py"))


def test_fixture_check_passes(manifest):
    results = sdvae.check(FIXTURES, manifest)
    assert sorted(r.name for r in results) == sorted(sdvae.COMPARED)
    for r in results:
        assert r.passed(), r.line()
        assert r.rel_err < 2e-5, r.line()  # float32 noise level, well inside the 1e-4 bar


def test_full_diffusers_config_json_is_accepted(config):
    raw = json.loads((FIXTURES / "sdvae_config.json").read_text())
    assert config == raw
    assert {"shift_factor", "force_upcast", "use_quant_conv", "mid_block_add_attention"} <= set(config)


def test_original_sd_convention_gives_identical_outputs(diffusers_sd, config, ported, ported_outputs, io):
    levels = len(config["block_out_channels"])
    original = diffusers_to_original_sd(diffusers_sd, levels)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in original  # highest-res level widens 64 -> 32
    assert original["encoder.mid.attn_1.q.weight"].ndim == 4
    assert detect_convention(list(original)) == "original"
    checkpoint = {f"first_stage_model.{k}": v for k, v in original.items()}
    checkpoint["loss.logvar"] = np.zeros((), np.float32)  # ldm training-loss extras are dropped
    checkpoint["model_ema.decay"] = np.ones((), np.float32)
    model = port_kl_vae(checkpoint, **config)

    ours, reference = to_state_dict(model), to_state_dict(ported)
    assert ours.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
    outputs = sdvae.run_fixture_calls(model, io)
    for name in sdvae.COMPARED:
        np.testing.assert_array_equal(outputs[name], ported_outputs[name], err_msg=name)


def test_reversed_up_order_matters(diffusers_sd, config):
    """Reading ldm's `decoder.up` in diffusers order would mis-place levels: the port must reject it."""
    levels = len(config["block_out_channels"])
    original = diffusers_to_original_sd(diffusers_sd, levels)
    swapped = {re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", k): v
               for k, v in original.items()}
    with pytest.raises(PortError) as info:
        port_kl_vae(swapped, **config)
    assert info.value.misshapen or info.value.missing


def test_legacy_diffusers_attention_names(diffusers_sd, config, ported):
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in diffusers_sd.items():
        for new, old in legacy_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    ours, reference = to_state_dict(port_kl_vae(legacy, **config)), to_state_dict(ported)
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)


def test_port_error_names_missing_misshapen_and_unexpected(diffusers_sd, config):
    broken = dict(diffusers_sd)
    del broken["encoder.conv_in.bias"]
    broken["decoder.conv_out.weight"] = np.zeros((3, 16, 3, 3), np.float32)
    broken["encoder.mid_block.attentions.0.to_k.weight"] = np.zeros((64, 64, 3), np.float32)
    broken["encoder.bogus.weight"] = np.zeros((2,), np.float32)
    broken["loss.discriminator.main.0.weight"] = np.zeros((2,), np.float32)  # dropped, not reported
    with pytest.raises(PortError) as info:
        port_kl_vae(broken, **config)
    error = info.value
    assert error.missing == ["encoder.conv_in.bias"]
    assert {m.split(" ")[0] for m in error.misshapen} == {
        "decoder.conv_out.kernel", "encoder.mid_block.attention.to_k.kernel"}
    assert error.unexpected == ["encoder.bogus.weight"]
    message = str(error)
    for name in ("encoder.conv_in.bias", "decoder.conv_out.kernel", "(checkpoint (3, 3, 16, 3), model (3, 3, 32, 3))",
                 "encoder.bogus.weight"):
        assert name in message


def test_sd_vae_parameter_count():
    cfg = load_sd_vae_config()
    model_kwargs = cfg.model.to_dict()
    assert analytic_param_count(model_kwargs) == SD_VAE_PARAMS == cfg.num_params
    abstract = nnx.eval_shape(lambda: AutoencoderKL(**model_kwargs, rngs=nnx.Rngs(0)))
    assert param_count(abstract) == SD_VAE_PARAMS
    assert param_count(nnx.eval_shape(lambda: AutoencoderKL(rngs=nnx.Rngs(0)))) == SD_VAE_PARAMS  # defaults
    assert abstract.downsample_factor == cfg.downsample_factor
    assert len(to_state_dict(abstract)) == 248  # tensors in the diffusers state dict
    assert cfg.checkpoint.repo_id == "stabilityai/sd-vae-ft-ema"
    assert cfg.checkpoint.filename == "diffusion_pytorch_model.safetensors"


def test_both_tables_cover_the_sd_vae():
    """Every parameter of the 4-level SD VAE is the target of some row of each table."""
    abstract = nnx.eval_shape(lambda: AutoencoderKL(rngs=nnx.Rngs(0)))
    targets = set(to_state_dict(abstract))
    for table in (DIFFUSERS_TABLE, ORIGINAL_SD_TABLE):
        patterns = [re.compile(re.sub(r"\\\{\w+\\\}", r"[^.]+", re.escape(row.dst))) for row in table]
        uncovered = [t for t in targets if not any(p.fullmatch(t) for p in patterns)]
        assert not uncovered


@pytest.mark.parametrize("config_change, expected_params", [
    ({"mid_block_add_attention": False}, -2 * (2 * 64 + 4 * (64 * 64 + 64))),
    ({"use_quant_conv": False, "use_post_quant_conv": False}, -(8 * 8 + 8) - (4 * 4 + 4)),
])
def test_optional_layers(config, config_change, expected_params):
    base = param_count(nnx.eval_shape(lambda: AutoencoderKL(**config, rngs=nnx.Rngs(0))))
    changed = param_count(nnx.eval_shape(lambda: AutoencoderKL(**{**config, **config_change}, rngs=nnx.Rngs(0))))
    assert changed - base == expected_params


@pytest.mark.parametrize("config_change, error", [
    ({"down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]}, NotImplementedError),
    ({"act_fn": "gelu"}, NotImplementedError),
    ({"block_out_channels": [32]}, ValueError),
    ({"norm_num_groups": 48}, ValueError),
    ({"spatial_norm_dim": 8}, TypeError),
])
def test_unsupported_config_raises(config, config_change, error):
    with pytest.raises(error):
        nnx.eval_shape(lambda: AutoencoderKL(**{**config, **config_change}, rngs=nnx.Rngs(0)))


@jax.jit
def _draw_posterior(moments: jax.Array, key: jax.Array):
    posterior = DiagonalGaussian.from_moments(moments)
    return posterior, posterior.sample(key), jax.random.normal(key, posterior.mean.shape)


def test_posterior_sample():
    moments = np.random.default_rng(1).standard_normal((2, 3, 3, 8)).astype(np.float32)
    posterior, draw, noise = _draw_posterior(moments, jax.random.key(0))
    np.testing.assert_array_equal(posterior.mean, moments[..., :4])
    np.testing.assert_allclose(posterior.std, np.exp(0.5 * moments[..., 4:]), rtol=1e-6)
    np.testing.assert_allclose(draw, posterior.mean + posterior.std * noise, rtol=1e-6, atol=1e-6)
    assert not np.allclose(draw, posterior.mean)


def test_reconstruction_shapes(ported):
    image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    assert nnx.eval_shape(lambda m, x: m(x), ported, image).shape == (1, 32, 32, 3)
    posterior = nnx.eval_shape(lambda m, x: m.encode(x), ported, image)
    assert posterior.mean.shape == posterior.std.shape == (1, 16, 16, 4)


def test_logvar_is_clamped():
    moments = jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 50.0)], axis=-1)
    posterior = DiagonalGaussian.from_moments(moments.at[..., 5].set(-40.0))
    assert float(posterior.logvar.max()) == 20.0
    assert float(posterior.logvar.min()) == -30.0
    np.testing.assert_allclose(posterior.std, np.exp(0.5 * np.asarray(posterior.logvar)), rtol=1e-6)


def test_weights_regenerate_when_not_stored(manifest, diffusers_sd):
    entry = {k: v for k, v in manifest["fixtures"]["sdvae"].items() if k != "weights"}
    regenerated = sdvae.load_weights(FIXTURES, entry)
    assert regenerated.keys() == diffusers_sd.keys()
    for key, value in diffusers_sd.items():
        np.testing.assert_array_equal(regenerated[key], value, err_msg=key)
