"""LlamaGen sampler: greedy = argmax chain, the recorded sampled run from its noise, top-k / top-p, CFG interval."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.models.common import random_model
from bitlaws.models.llamagen import LlamaGen
from bitlaws.port.checks.llamagen_gpt import FIXTURE, build_gpt
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.sample.llamagen_sampler import generate, mask_top_p, sampling_probs

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
TINY = dict(dim=32, n_layer=2, n_head=4, vocab_size=24, num_classes=5, block_size=9, multiple_of=16)


@pytest.fixture(scope="module")
def tiny() -> LlamaGen:
    return random_model(lambda: LlamaGen(**TINY, rngs=nnx.Rngs(0)), 3)


def _hf_top_p_reference(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Upstream's ``top_k_top_p_filtering`` top-p branch, literally (sort, cumsum, shift right, scatter)."""
    out = logits.copy()
    for row in range(logits.shape[0]):
        order = np.argsort(-logits[row], kind="stable")
        sorted_logits = logits[row, order]
        probs = np.exp(sorted_logits - sorted_logits.max())
        cumulative = np.cumsum(probs / probs.sum())
        remove = cumulative > top_p
        remove[1:] = remove[:-1].copy()
        remove[0] = False
        out[row, order[remove]] = -np.inf
    return out


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95])
def test_top_p_matches_upstream_rule(top_p):
    logits = np.random.default_rng(0).normal(size=(16, 50)).astype(np.float32) * 2
    ours = np.asarray(mask_top_p(jnp.asarray(logits), top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(_hf_top_p_reference(logits, top_p)))
    assert np.isfinite(ours).sum(-1).min() >= 1
    np.testing.assert_array_equal(np.asarray(mask_top_p(jnp.asarray(logits), 1.0)), logits)


def test_top_k_keeps_ties_and_zeroes_the_rest():
    logits = jnp.asarray([[3.0, 1.0, 2.0, 2.0, -1.0]])
    probs = np.asarray(sampling_probs(logits, top_k=2))  # k-th largest is 2.0, tied: three survivors
    assert (probs[0] > 0).tolist() == [True, False, True, True, False]
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
    hot = np.asarray(sampling_probs(logits, temperature=0.5, top_k=1))
    np.testing.assert_array_equal(hot, [[1.0, 0.0, 0.0, 0.0, 0.0]])
    cold = np.asarray(sampling_probs(logits, temperature=2.0))
    np.testing.assert_allclose(cold, np.asarray(jax.nn.softmax(logits / 2.0)), rtol=1e-6)


def test_greedy_is_the_argmax_chain_of_the_guided_logits(tiny):
    labels = jnp.asarray([0, 3, 4])
    out = generate(tiny, labels, cfg_scale=3.0, sample_logits=False, return_logits=True)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (3, 9) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(out.guided_logits), -1))
    # The same chain from teacher forcing on the generated tokens: cond/null halves and the CFG formula.
    forward = jax.jit(lambda t, y: tiny(t, y))
    cond = np.asarray(forward(out.tokens, labels))
    uncond = np.asarray(forward(out.tokens, jnp.full_like(labels, 5)))
    np.testing.assert_allclose(np.asarray(out.cond_logits), cond, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.uncond_logits), uncond, atol=1e-5)
    np.testing.assert_array_equal(tokens, np.argmax(uncond + (cond - uncond) * 3.0, -1))


def test_sampling_with_keys_noise_and_cfg_interval(tiny):
    labels = jnp.asarray([1, 2])
    kwargs = dict(cfg_scale=2.0, top_k=4, return_logits=True)
    first = generate(tiny, labels, jax.random.key(7), **kwargs)
    again = generate(tiny, labels, jax.random.key(7), **kwargs)
    other = generate(tiny, labels, jax.random.key(8), **kwargs)
    np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(again.tokens))
    assert not np.array_equal(np.asarray(first.tokens), np.asarray(other.tokens))
    probs = np.asarray(first.probs)
    assert ((probs > 0).sum(-1) >= 4).all()  # top-k survivors (ties kept)
    chosen = np.take_along_axis(probs, np.asarray(first.tokens)[..., None], -1)
    assert (chosen > 0).all()  # never a masked token
    noise = np.random.default_rng(0).exponential(size=(2, 9, 24)).astype(np.float32)
    interval = generate(tiny, labels, exp_noise=noise, cfg_interval=2, **kwargs)
    np.testing.assert_array_equal(np.asarray(interval.tokens), np.argmax(np.asarray(interval.probs) / noise, -1))
    guided, cond = np.asarray(interval.guided_logits), np.asarray(interval.cond_logits)
    assert np.abs(guided[:, :4] - cond[:, :4]).max() > 1e-3  # prefill + decode steps 0..2 guided
    np.testing.assert_array_equal(guided[:, 4:], cond[:, 4:])  # decode steps > 2: conditional only


def test_bad_arguments_are_named(tiny):
    labels = jnp.asarray([1, 2])
    with pytest.raises(ValueError, match="exp_noise must have shape"):
        generate(tiny, labels, exp_noise=np.ones((2, 9, 23), np.float32))
    with pytest.raises(ValueError, match="top_p=0.0"):
        generate(tiny, labels, jax.random.key(0), top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens=10"):
        generate(tiny, labels, jax.random.key(0), max_new_tokens=10)
    with pytest.raises(ValueError, match="key is required"):
        generate(tiny, labels)


def test_fixture_sampled_run_is_reproduced_from_its_noise():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    fixture = manifest["fixtures"][FIXTURE]
    io = read_safetensors(FIXTURES / fixture["file_io"])
    model = build_gpt(FIXTURES, manifest, FIXTURE)
    settings = {**fixture["generate_kwargs"], "top_k": int(io["gen.top_k"][0])}
    settings.pop("emb_masks")
    out = generate(model, io["labels"], exp_noise=io["gen.exp_noise"], **settings)  # our own tokens fed back
    np.testing.assert_array_equal(np.asarray(out.tokens), io["gen.tokens"])
