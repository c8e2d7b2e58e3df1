"""MAR's training loss: masking draws, the masked mean, parity with the upstream fixture (``loss.*`` / ``train.*``)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.models import mar_losses
from bitlaws.models.mar import MAR
from bitlaws.port.checks import mar as mar_check
from bitlaws.port.verify import load_manifest

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


def _tiny() -> MAR:
    return MAR(img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=3, encoder_embed_dim=16, encoder_depth=1,
               encoder_num_heads=1, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=1, class_num=4,
               buffer_size=2, diffloss_d=1, diffloss_w=16, diffusion_batch_mul=2, rngs=nnx.Rngs(0))


def test_random_mask_masks_the_same_count_per_row_within_the_rate_range():
    for seed in range(5):
        mask = np.asarray(mar_losses.random_mask(jax.random.key(seed), 6, 16, 0.7))
        counts = mask.sum(axis=1)
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert (counts == counts[0]).all() and np.ceil(16 * 0.7) <= counts[0] <= 16


@pytest.mark.slow  # ~20 s on the 2-core CPU (compiles the head's loss for a tiny model)
def test_masked_loss_counts_only_masked_rows():
    model, diffusion = _tiny(), mar_losses.training_diffusion()
    tokens = jax.random.normal(jax.random.key(0), (2, model.seq_len, model.token_embed_dim))
    mask = jnp.zeros((2, model.seq_len)).at[0, :3].set(1.0)
    rows = 2 * 2 * model.seq_len
    t = jax.random.randint(jax.random.key(1), (rows,), 0, 1000)
    noise = jax.random.normal(jax.random.key(2), (rows, model.token_embed_dim))
    terms = mar_losses.masked_loss_terms(model, diffusion, tokens, mask, model.class_embedding(jnp.array([0, 1])),
                                         t, noise)
    assert terms["target"].shape == (rows, model.token_embed_dim) and terms["loss"].shape == (rows,)
    picked = np.tile(np.asarray(mask).reshape(-1), 2) > 0
    assert float(terms["masked_loss"]) == pytest.approx(float(np.asarray(terms["loss"])[picked].mean()), rel=1e-5)


@pytest.mark.slow  # 12-42 s; moved out of the default suite to keep it under ~15 min
def test_training_loss_terms_are_finite_and_deterministic():
    model = _tiny()
    images = jax.random.uniform(jax.random.key(3), (4, 8, 8, 3), minval=-1, maxval=1)
    labels = jnp.array([0, 1, 2, 3])
    first = mar_losses.training_loss_terms(model, images, labels, jax.random.key(0))
    again = mar_losses.training_loss_terms(model, images, labels, jax.random.key(0))
    assert set(first) == {"loss", "mse", "vb", "mask_rate"}
    assert np.isfinite(float(first["loss"])) and 0.7 <= float(first["mask_rate"]) <= 1.0
    assert float(first["loss"]) == pytest.approx(float(first["mse"] + first["vb"]), rel=1e-5)
    assert float(first["loss"]) == float(again["loss"])


def test_upstream_training_losses_match_the_fixture():
    results = mar_check.check(FIXTURES, load_manifest(FIXTURES), groups=("loss", "train"))
    names = {r.name for r in results}
    assert {"loss.loss", "train.loss", "train.loss_per_row", "train.z"} <= names, names
    failed = [r.line() for r in results if not r.passed()]
    assert not failed, failed
