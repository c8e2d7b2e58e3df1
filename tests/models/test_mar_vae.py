"""MAR's KL VAE: fixture parity, where the encoder attention goes, released size, port errors."""

from __future__ import annotations

import pathlib

import jax
import pytest
from flax import nnx

from bitlaws.configlib import load_config
from bitlaws.models.mar import param_count
from bitlaws.models.mar_vae import MarAutoencoderKL, down_attention
from bitlaws.port.checks import mar_vae as mar_vae_check
from bitlaws.port.mapping import PortError
from bitlaws.port.tables.mar_vae import port_mar_vae
from bitlaws.port.verify import load_manifest

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def entry() -> dict:
    return load_manifest(FIXTURES)["fixtures"]["mar_vae"]


@pytest.fixture(scope="module")
def state_dict(entry) -> dict:
    return mar_vae_check.load_weights(FIXTURES, entry)


def test_fixture_check_passes_every_comparison(entry):
    results = mar_vae_check.check(FIXTURES, {"fixtures": {"mar_vae": entry}})
    assert {"enc_moments", "enc_mean", "enc_logvar", "enc_std", "post_sample", "decoded",
            "rec_mean"} <= {r.name for r in results}
    failed = [r.line() for r in results if not r.passed()]
    assert not failed, "\n".join(failed)


def test_encoder_attention_only_at_the_listed_resolution():
    assert down_attention(5, 256, (16,)) == (False, False, False, False, True)
    assert down_attention(4, 128, (16,)) == (False, False, False, True)
    assert down_attention(4, 256, ()) == (False,) * 4
    model = nnx.eval_shape(lambda: MarAutoencoderKL(rngs=nnx.Rngs(0)))
    with_attention = [i for i, block in enumerate(model.encoder.down_blocks) if block.attentions is not None]
    assert with_attention == [4] and len(model.encoder.down_blocks[4].attentions) == 2
    assert all(block is not None for block in model.decoder.mid_block.resnets)


def test_kl16_size_matches_config():
    config = load_config("configs/models/mar_vae_kl16.py")
    model = nnx.eval_shape(lambda: MarAutoencoderKL(**config.model, rngs=nnx.Rngs(0)))
    assert param_count(model) == config.num_params
    assert model.downsample_factor == config.downsample_factor == 16
    assert model.latent_channels == 16


def test_missing_attention_key_is_named(state_dict, entry):
    key = next(k for k in state_dict if ".attn.0.q.weight" in k and k.startswith("encoder.down."))
    broken = {k: v for k, v in state_dict.items() if k != key}
    with pytest.raises(PortError, match="missing") as error:
        port_mar_vae(broken, **mar_vae_check.ctor_from_manifest(entry))
    level = key.split(".")[2]
    assert f"encoder.down_blocks.{level}.attentions.0.to_q.kernel" in error.value.missing


@pytest.mark.parametrize("change, name", [
    (dict(use_variational=False), "use_variational"), (dict(ch=48), "ch"), (dict(ch_mult=()), "ch_mult")])
def test_bad_arguments_are_named(change, name):
    with pytest.raises(ValueError, match=name):
        nnx.eval_shape(lambda: MarAutoencoderKL(**change, rngs=nnx.Rngs(0)))
