"""DiT port: fixture parity, classifier-free guidance layout, pos_embed, label dropout and port errors."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.models.common import random_model
from bitlaws.models.dit import DiT, pos_embed_2d, timestep_embedding
from bitlaws.port.checks import dit as dit_check
from bitlaws.port.mapping import PortError
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.dit import port_dit

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


def random_dit(seed: int = 0, **ctor) -> DiT:
    """A DiT with numpy-drawn weights (eager random init compiles one kernel per shape: slow on CPU)."""
    return random_model(lambda: DiT(**ctor, rngs=nnx.Rngs(0)), seed)


@nnx.jit(static_argnames=("train",))
def _forward(model: DiT, x, t, y, train=False, dropout_key=None, force_drop_ids=None):
    return model(x, t, y, train=train, dropout_key=dropout_key, force_drop_ids=force_drop_ids)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


@pytest.fixture(scope="module")
def ctor(manifest) -> dict:
    return {k: v for k, v in manifest["fixtures"]["dit"]["ctor"].items() if k != "cls"}


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return read_safetensors(FIXTURES / "dit_weights.safetensors")


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return read_safetensors(FIXTURES / "dit_io.safetensors")


def test_fixture_check_passes_every_comparison(manifest):
    results = dit_check.check(FIXTURES, manifest)
    names = {r.name for r in results}
    expected = {"fwd.out", "cfg.out", "sched.betas_f64", "sched.alphas_cumprod_f64",
                "sched.posterior_log_variance_clipped_f64", "sched.timestep_map", "ddim_cfg.final",
                "ddim_cfg.final_full", "ddim_cfg.steps_sample", "ddim_cfg.steps_pred_xstart", "ddim_plain.final"}
    assert expected <= names
    failed = [r.line() for r in results if not r.passed()]
    assert not failed, "\n".join(failed)
    schedule = [r for r in results if r.name.startswith("sched.")]
    assert all(r.max_abs_err == 0 for r in schedule)  # float64 schedule reproduced exactly


def test_forward_with_cfg_guides_only_first_three_channels(state_dict, ctor, io):
    model = port_dit(state_dict, **ctor)
    x = jnp.asarray(np.moveaxis(io["cfg.x"], 1, -1))
    out = np.asarray(nnx.jit(lambda m, *args: m.forward_with_cfg(*args))(
        model, x, jnp.asarray(io["cfg.t"]), jnp.asarray(io["cfg.y"]), 4.0))
    half = out.shape[0] // 2
    np.testing.assert_array_equal(out[:half, ..., :3], out[half:, ..., :3])
    assert np.abs(out[:half, ..., 3:] - out[half:, ..., 3:]).max() > 1e-3


def test_recomputed_pos_embed_equals_checkpoint(state_dict, ctor):
    grid = ctor["input_size"] // ctor["patch_size"]
    table = pos_embed_2d(ctor["hidden_size"], grid)
    assert table.dtype == np.float32
    np.testing.assert_array_equal(table, state_dict["pos_embed"])


def test_pos_embed_is_not_model_state(ctor):
    _, state = nnx.split(nnx.eval_shape(lambda: DiT(**ctor, rngs=nnx.Rngs(0))))
    paths = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(state)]
    assert "x_embedder.proj.kernel" in paths
    assert not any("pos_embed" in path for path in paths)


def test_timestep_embedding_is_cos_then_sin():
    emb = np.asarray(timestep_embedding(jnp.array([0, 7]), 256))
    assert emb.shape == (2, 256)
    np.testing.assert_array_equal(emb[0], np.r_[np.ones(128), np.zeros(128)])  # t=0: cos=1, sin=0
    np.testing.assert_allclose(emb[1, 0], np.cos(7.0), rtol=1e-6)  # first frequency is 1
    np.testing.assert_allclose(emb[1, 128], np.sin(7.0), rtol=1e-5)


def test_regenerated_weights_match_stored(manifest, state_dict):
    spec = dict(manifest["fixtures"]["dit"], weights="NOT STORED")
    regenerated = dit_check.load_weights(FIXTURES, spec)
    assert set(regenerated) == set(state_dict) - {"pos_embed"}
    for key, value in regenerated.items():
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)


def test_port_error_names_missing_and_unexpected_keys(state_dict, ctor):
    broken = {k: v for k, v in state_dict.items() if k != "blocks.1.mlp.fc2.weight"}
    broken["blocks.1.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(PortError) as err:
        port_dit(broken, **ctor)
    assert err.value.missing == ["blocks.1.mlp.fc2.kernel"]
    assert "blocks.1.mlp.extra.weight" in err.value.unexpected
    assert "blocks.1.mlp.fc2.kernel" in str(err.value)


def test_port_error_names_misshapen_key(state_dict, ctor):
    with pytest.raises(PortError) as err:
        port_dit(state_dict, **dict(ctor, num_classes=ctor["num_classes"] + 1))
    assert any(m.startswith("y_embedder.embedding_table") for m in err.value.misshapen)


def test_label_dropout_only_in_training_with_a_key():
    model = random_dit(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3,
                       class_dropout_prob=1.0)
    assert model.y_embedder.embedding_table.shape == (4, 16)  # null row added
    x, t, y = jnp.ones((2, 4, 4, 4)), jnp.array([5, 5]), jnp.array([0, 1])
    null = _forward(model, x, t, jnp.array([3, 3]))
    plain = _forward(model, x, t, y)
    assert np.abs(np.asarray(plain - null)).max() > 1e-4
    np.testing.assert_array_equal(_forward(model, x, t, y, train=True), plain)  # no key: no dropout
    np.testing.assert_allclose(_forward(model, x, t, y, train=True, dropout_key=jax.random.key(0)), null,
                               atol=1e-6)
    forced = _forward(model, x, t, y, force_drop_ids=jnp.array([1, 0]))
    np.testing.assert_allclose(forced[0], null[0], atol=1e-6)
    np.testing.assert_allclose(forced[1], plain[1], atol=1e-6)


def test_output_shape_without_learned_sigma():
    model = nnx.eval_shape(lambda: DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=1,
                                       num_heads=2, num_classes=3, learn_sigma=False, rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(lambda m: m(jnp.zeros((1, 8, 8, 3)), jnp.array([1]), jnp.array([0])), model)
    assert out.shape == (1, 8, 8, 3)
    assert model.final_layer.linear.kernel.shape == (16, 4 * 4 * 3)
