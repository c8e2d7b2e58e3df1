"""Parity check of LlamaGen's class-conditional GPT and its sampler against the ``llamagen_gpt`` fixture.

Builds `LlamaGen` from ``manifest["fixtures"]["llamagen_gpt"]["ctor"]``, loads the stored weights (or regenerates
them from the weight manifest) and compares, with every size and sampling setting read from the manifest and the
io file:

* teacher forcing: ``tf.logits``, ``tf.logits_null``, ``tf.guided`` (``tf.cfg_scale``), ``tf.loss``;
  ``rope.freqs_cis``;
* the greedy run (``top_k=1``, the manifest's other ``generate_kwargs``): ``greedy.tokens`` exactly and
  ``greedy.guided_logits``;
* the sampled run: the stored ``gen.tokens`` are fed through our KV-cache path and the per-step
  ``gen.cond_logits`` / ``gen.uncond_logits`` / ``gen.guided_logits`` / ``gen.probs`` compared; ``gen.tokens`` must
  come out exactly from our probabilities and the stored ``gen.exp_noise``;
* with the ``llamagen_vq`` fixture listed: ``greedy.img`` and ``gen.img`` decoded by our tokenizer (NCHW).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitlaws.models.llamagen import cross_entropy
from bitlaws.port.checks.var import load_weights
from bitlaws.port.checks.vqvae import _nchw
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.llamagen import port_llamagen
from bitlaws.port.verify import Comparison, compare

FIXTURE = "llamagen_gpt"
TOKENIZER_FIXTURE = "llamagen_vq"


def build_gpt(folder: pathlib.Path, manifest: dict, name: str):
    """The fixture `name`'s `LlamaGen` with its stored or regenerated weights."""
    fixture = manifest["fixtures"][name]
    return port_llamagen(load_weights(pathlib.Path(folder), fixture, name), **fixture["ctor"])


def load_fixture(folder: pathlib.Path, manifest: dict, name: str) -> tuple[dict, Any, dict, jax.Array]:
    """``(manifest entry, model, io arrays, labels [B] int32)`` of GPT fixture `name` (labels from the io file,
    else from the manifest)."""
    folder = pathlib.Path(folder)
    fixture = manifest["fixtures"][name]
    io = read_safetensors(folder / fixture["file_io"])
    labels = jnp.asarray(np.asarray(io["labels"] if "labels" in io else fixture["labels"]), jnp.int32)
    return fixture, build_gpt(folder, manifest, name), io, labels


def teacher_forcing(name: str, model, io: dict, labels: jax.Array) -> list[Comparison]:
    """``tf.logits`` / ``tf.logits_null`` (and ``tf.guided`` / ``tf.loss`` when stored) of fixture `name`."""
    tokens = jnp.asarray(io["tf.tokens"], jnp.int32)
    null = jnp.full_like(labels, model.null_class)
    forward = jax.jit(lambda t, y: model(t, y))
    logits, logits_null = np.asarray(forward(tokens, labels)), np.asarray(forward(tokens, null))
    ours: dict[str, Any] = {"tf.logits": logits, "tf.logits_null": logits_null,
                            "tf.loss": np.asarray(cross_entropy(jnp.asarray(logits), tokens)).reshape(1)}
    if "tf.cfg_scale" in io:
        cfg = np.float32(np.asarray(io["tf.cfg_scale"]).reshape(-1)[0])
        ours["tf.guided"] = logits_null + (logits - logits_null) * cfg
    if "tf.null_labels" in io:
        ours["tf.null_labels"] = np.asarray(null)
    return [compare(name, key, value, io[key]) for key, value in ours.items() if key in io]


def _decode_images(folder: pathlib.Path, manifest: dict, tokens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NCHW images of each token set ``[B, N]`` decoded by the tokenizer fixture's model (empty without it)."""
    if TOKENIZER_FIXTURE not in manifest["fixtures"]:
        return {}
    from bitlaws.port.checks.llamagen_vq import build_tokenizer  # pylint: disable=g-import-not-at-top

    vq = build_tokenizer(folder, manifest)
    decode = jax.jit(lambda idx, shape: vq.decode_code(idx, shape), static_argnums=1)
    grid = manifest["fixtures"][TOKENIZER_FIXTURE].get("token_grid")
    images = {}
    for name, idx in tokens.items():
        side = math.isqrt(idx.shape[1])
        h, w = (int(g) for g in grid) if grid and int(np.prod(grid)) == idx.shape[1] else (side, side)
        shape = (idx.shape[0], h, w, vq.codebook_embed_dim)
        images[name] = _nchw(decode(jnp.asarray(idx, jnp.int32), shape))
    return images


def check(folder: pathlib.Path, manifest: dict) -> list[Comparison]:
    """Runs the GPT fixture calls and compares the outputs.

    Args:
        folder: Fixture folder.
        manifest: Its parsed ``manifest.json``.

    Returns:
        One `Comparison` per compared array present in the io file.
    """
    from bitlaws.sample.llamagen_sampler import generate  # pylint: disable=g-import-not-at-top

    folder = pathlib.Path(folder)
    fixture, model, io, labels = load_fixture(folder, manifest, FIXTURE)
    results = teacher_forcing(FIXTURE, model, io, labels)
    if "rope.freqs_cis" in io:
        results.append(compare(FIXTURE, "rope.freqs_cis", model.freqs_cis(), io["rope.freqs_cis"]))

    settings = dict(fixture.get("generate_kwargs", {}))
    settings.pop("emb_masks", None)
    if "gen.top_k" in io:
        settings["top_k"] = int(np.asarray(io["gen.top_k"]).reshape(-1)[0])
    ours: dict[str, np.ndarray] = {}
    tokens_for_images: dict[str, np.ndarray] = {}
    if "greedy.tokens" in io:
        greedy = generate(model, labels, **{**settings, "top_k": 1, "sample_logits": False}, return_logits=True)
        ours.update({"greedy.tokens": np.asarray(greedy.tokens),
                     "greedy.guided_logits": np.asarray(greedy.guided_logits)})
        tokens_for_images["greedy.img"] = ours["greedy.tokens"]
    if "gen.tokens" in io:
        noise = io.get("gen.exp_noise")
        sampled = generate(model, labels, jax.random.key(int(fixture.get("gen_seed", 0) or 0)), **settings,
                           exp_noise=noise, forced_tokens=io["gen.tokens"], return_logits=True)
        ours.update({"gen.cond_logits": np.asarray(sampled.cond_logits),
                     "gen.guided_logits": np.asarray(sampled.guided_logits), "gen.probs": np.asarray(sampled.probs)})
        if sampled.uncond_logits is not None:
            ours["gen.uncond_logits"] = np.asarray(sampled.uncond_logits)
        if noise is not None:
            ours["gen.tokens"] = np.asarray(sampled.tokens)
            tokens_for_images["gen.img"] = ours["gen.tokens"]
    ours.update(_decode_images(folder, manifest, {k: v for k, v in tokens_for_images.items() if k in io}))
    return results + [compare(FIXTURE, key, value, io[key]) for key, value in ours.items() if key in io]
