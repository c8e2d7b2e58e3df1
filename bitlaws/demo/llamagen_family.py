"""The demo LlamaGen family: a tiny LlamaGen VQ tokenizer and LlamaGen GPTs trained on the 16x16 digits.

Built from the same Flax code as the ported ImageNet models (`bitlaws.models.llamagen_vq.LlamaGenVQ`,
`bitlaws.models.llamagen.LlamaGen`, `bitlaws.sample.llamagen_sampler.generate`). This module holds

* the tokenizer's training loss (LlamaGen's VQ loss without GAN / perceptual terms: L2 reconstruction, codebook
  and commitment losses on the L2-normalised codes, straight-through gradients) and its evaluation,
* GPT teacher forcing (targets: the tokenizer's 64 raster-order tokens; class dropout for CFG),
* `train_from_config`, the ``bitlaws train`` entry point for ``family = "llamagen_vq"`` and ``"llamagen"`` (the
  loop is `bitlaws.train.train_module`; the set-up helpers are `bitlaws.demo.var_family`'s, the checkpoint
  and calibration helpers `bitlaws.demo.members`'),
* the ``llamagen`` demo family (`register_family` at import): members ``llamagen-d1`` ... ``llamagen-d4`` loaded
  from ``bitlaws/demo/checkpoints``, and `abstract_member` / `QUANT_PATTERN` for the sweep's pre-check.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from bitlaws import checkpoint
from bitlaws.demo.data import IMAGE_SIZE, DigitsData, load_digits
from bitlaws.demo.family import calibration_digits, register_family, spread_labels
from bitlaws.demo.members import (CHECKPOINT_ROOT, PathLike, batched, depth_members, load_cached, member_metadata,
                                  plain, reconstruction_metrics, sampled_calibration_batches, step_rng,
                                  token_calibration_protocol, train_command, train_summary)
from bitlaws.demo.var_family import num_params, reseed_dead_codes, train_config
from bitlaws.models.llamagen import LlamaGen
from bitlaws.models.llamagen_vq import LlamaGenVQ, vq_ctor_kwargs
from bitlaws.models.var import l2_normalize
from bitlaws.sample.llamagen_sampler import generate
from bitlaws.train import train_module

FAMILY = "llamagen"
TOKENIZER_FAMILY = "llamagen_vq"
TOKENIZER_NAME = "llamagen-vq"
QUANT_PATTERN = r"layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.w[123])|output"
"""Every linear layer of the GPT (the tokenizer stays in float, as in the paper); the token and class
embeddings are table look-ups, not matmuls, and stay float too."""

Batch = tuple[np.ndarray, ...]


# ----------------------------------------------------------------------------------------------
# Model construction.
# ----------------------------------------------------------------------------------------------

def build_tokenizer(ctor: Mapping[str, Any], seed: int = 0) -> LlamaGenVQ:
    """A freshly initialised `LlamaGenVQ` from its constructor arguments."""
    return LlamaGenVQ(**vq_ctor_kwargs(dict(ctor)), rngs=nnx.Rngs(seed))


def gpt_kwargs(ctor: Mapping[str, Any], tokenizer_ctor: Mapping[str, Any]) -> dict[str, Any]:
    """`LlamaGen` keyword arguments: the GPT's config plus the tokenizer's vocabulary and token-map size."""
    kwargs = dict(ctor)
    tokenizer = vq_ctor_kwargs(dict(tokenizer_ctor))
    grid = IMAGE_SIZE // 2 ** (len(tokenizer["encoder_ch_mult"]) - 1)
    kwargs["vocab_size"] = int(tokenizer["codebook_size"])
    kwargs["block_size"] = grid * grid
    return kwargs


def build_gpt(ctor: Mapping[str, Any], tokenizer_ctor: Mapping[str, Any], seed: int = 0) -> LlamaGen:
    """A freshly initialised `LlamaGen` GPT for the given tokenizer."""
    return LlamaGen(**gpt_kwargs(ctor, tokenizer_ctor), rngs=nnx.Rngs(seed))


# ----------------------------------------------------------------------------------------------
# Tokenizer: training loss, tokenization, evaluation.
# ----------------------------------------------------------------------------------------------

def tokenizer_loss(vq: LlamaGenVQ, images: jax.Array, *, beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LlamaGen's VQ loss of a batch, without the GAN and perceptual terms.

    ``mse(recon, images) + mean((e - sg(z))^2) + beta * mean((sg(e) - z)^2)`` with ``z`` the (L2-normalised)
    features and ``e`` their nearest (normalised) codes; the decoder sees the straight-through ``z + sg(e - z)``.

    Args:
        vq: The tokenizer.
        images: ``[B, H, W, 3]`` float32 in [-1, 1].
        beta: Commitment weight.

    Returns:
        ``(loss, {"loss", "l2", "codebook", "commit"})`` scalars.
    """
    f = vq.encode_features(images)  # [B, h, w, E]
    quant, idx = vq.quantize(f)  # straight-through [B, h, w, E], [B, h*w]
    z = l2_normalize(f) if vq.quantize.l2_norm else f
    code = vq.quantize.get_codebook_entry(idx, f.shape)  # [B, h, w, E], differentiable in the codebook
    codebook_term = jnp.mean(jnp.square(code - jax.lax.stop_gradient(z)))
    commit_term = jnp.mean(jnp.square(jax.lax.stop_gradient(code) - z))
    l2 = jnp.mean(jnp.square(vq.decode(quant) - images))
    loss = l2 + codebook_term + beta * commit_term
    return loss, {"loss": loss, "l2": l2, "codebook": codebook_term, "commit": commit_term}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _tokens(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` -> raster-order tokens ``[B, h*w]`` int32."""
    return nnx.merge(graphdef, state).encode(images)[1]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode_tokens(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    """Tokens ``[B, g*g]`` -> images ``[B, 2g, 2g, 3]`` clipped to [-1, 1]."""
    vq = nnx.merge(graphdef, state)
    grid = math.isqrt(tokens.shape[1])
    images = vq.decode_code(tokens, (tokens.shape[0], grid, grid, vq.codebook_embed_dim))
    return jnp.clip(images, -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _quantizer_inputs(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (normalised) vectors the quantizer sees ``[N_vec, E]`` and the codes they pick ``[N_vec]``."""
    vq = nnx.merge(graphdef, state)
    f = vq.encode_features(images)
    z = l2_normalize(f) if vq.quantize.l2_norm else f
    return z.reshape(-1, f.shape[-1]), vq.quantize(f)[1].reshape(-1)


def tokenize(vq: LlamaGenVQ, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``[N, H, W, 3]`` float32 in [-1, 1] -> raster-order tokens ``[N, h*w]`` int32 (inference path)."""
    graphdef, state = nnx.split(vq)
    return np.concatenate(batched(lambda x: _tokens(graphdef, state, x), images, batch_size))


def decode_tokens(vq: LlamaGenVQ, tokens: jax.Array) -> np.ndarray:
    """Tokens ``[B, h*w]`` -> images ``[B, H, W, 3]`` float32 clipped to [-1, 1]."""
    graphdef, state = nnx.split(vq)
    return np.asarray(_decode_tokens(graphdef, state, jnp.asarray(tokens, jnp.int32)), np.float32)


def reconstruct(vq: LlamaGenVQ, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Tokenize-then-decode: ``[N, H, W, 3]`` in [-1, 1] -> ``[N, H, W, 3]`` in [-1, 1]."""
    tokens = tokenize(vq, images, batch_size)
    return np.concatenate([decode_tokens(vq, tokens[start:start + batch_size])
                           for start in range(0, len(tokens), batch_size)])


def evaluate_tokenizer(vq: LlamaGenVQ, data: DigitsData) -> dict[str, float]:
    """Reconstruction errors and codebook usage on `data`: ``mse``, ``l1``, ``codes_used``, ``perplexity``."""
    return reconstruction_metrics(reconstruct(vq, data.images), data.images, tokenize(vq, data.images),
                                  vq.quantize.codebook_size)


# ----------------------------------------------------------------------------------------------
# GPT teacher forcing.
# ----------------------------------------------------------------------------------------------

def gpt_loss(model: LlamaGen, tokens: jax.Array, labels: jax.Array,
             key: Optional[jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Teacher-forced cross-entropy over the image tokens.

    Args:
        model: The GPT.
        tokens: ``[B, L]`` int32 raster-order tokens.
        labels: ``[B]`` int32 classes.
        key: PRNG key (class dropout to the null class, for CFG) or None (evaluation).

    Returns:
        ``(loss, {"loss", "acc"})``.
    """
    if key is not None:
        labels = model.cls_embedding.drop_labels(labels, key)
    logits = model(tokens, labels)  # [B, L, V]
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))
    acc = jnp.mean((jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32))
    return loss, {"loss": loss, "acc": acc}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_losses(graphdef: nnx.GraphDef, state: nnx.State, labelled: jax.Array) -> jax.Array:
    """``[B, 1 + L]`` (label, tokens) -> per-image mean cross-entropy ``[B]``."""
    tokens = labelled[:, 1:]
    logits = nnx.merge(graphdef, state)(tokens, labelled[:, 0])  # [B, L, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean(axis=1)


def teacher_forced_loss(model: LlamaGen, vq: LlamaGenVQ, data: DigitsData, batch_size: int = 128) -> float:
    """Mean per-token cross-entropy (nats) of `model` on `data`'s tokens, conditional labels, no dropout."""
    labelled = np.concatenate([data.labels[:, None].astype(np.int32), tokenize(vq, data.images)], axis=1)
    graphdef, state = nnx.split(model)
    losses = batched(lambda x: _token_losses(graphdef, state, x), labelled, batch_size)
    return float(np.mean(np.concatenate(losses)))


# ----------------------------------------------------------------------------------------------
# Training entry points (the loop is `bitlaws.train`).
# ----------------------------------------------------------------------------------------------

TOKENIZER_TRAIN_KEYS = ("batch_size", "beta", "dead_code_every")
"""Keys of the tokenizer config's ``train`` block that are not `TrainConfig` fields."""


def _tokenizer_train_loss(model: LlamaGenVQ, batch: Batch, key: jax.Array, *,
                          beta: float) -> tuple[jax.Array, dict]:
    del key  # deterministic
    return tokenizer_loss(model, batch[0], beta=beta)


def train_tokenizer(config: ml_collections.ConfigDict, out_dir: PathLike, *, stop_after: Optional[int] = None,
                    progress: bool = True) -> dict[str, Any]:
    """Trains the demo LlamaGen tokenizer and saves it (`save_model`) to `out_dir`; returns the summary.

    Before step 0 the whole codebook is seeded from (normalised) encoder features of 512 training images, and
    every ``dead_code_every`` steps the codes none of them picks are re-seeded (`reseed_dead_codes`).
    """
    train = config.train
    ctor = plain(config.model)
    vq = build_tokenizer(ctor, train.seed)
    graphdef, _, rest = nnx.split(vq, nnx.Param, ...)
    images = load_digits("train").images
    probe = images[step_rng(train.seed, -1).choice(len(images), min(512, len(images)), replace=False)]

    def get_batch(step: int) -> Batch:
        return (images[step_rng(train.seed, step).choice(len(images), train.batch_size, replace=False)],)

    def between_steps(params: nnx.State, step: int) -> nnx.State:
        if step and not (train.dead_code_every and step % train.dead_code_every == 0):
            return params
        model = nnx.merge(graphdef, params, rest)
        reseed_dead_codes(model, probe, step_rng(train.seed, step), all_codes=step == 0,
                          quantizer_inputs=_quantizer_inputs)
        return nnx.state(model, nnx.Param)

    loss_fn = functools.partial(_tokenizer_train_loss, beta=train.beta)
    result = train_module(vq, loss_fn, get_batch, train_config(train, TOKENIZER_TRAIN_KEYS), out_dir=out_dir,
                          desc=config.name, between_steps=between_steps, stop_after=stop_after, progress=progress)
    summary = {"name": config.name, "family": TOKENIZER_FAMILY, "params": num_params(vq),
               "command": train_command(config), "train": train_summary(result), "finished": result.step >= train.steps}
    if not summary["finished"]:
        return summary
    summary["val"] = evaluate_tokenizer(vq, load_digits("val"))
    checkpoint.save_model(vq, out_dir, {"family": TOKENIZER_FAMILY, "ctor": ctor, "summary": summary,
                                        "config": plain(config)})
    return summary


def _gpt_train_loss(model: LlamaGen, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    labels, tokens = batch
    return gpt_loss(model, tokens, labels, key)


def train_gpt(config: ml_collections.ConfigDict, out_dir: PathLike, *, stop_after: Optional[int] = None,
              progress: bool = True) -> dict[str, Any]:
    """Trains one LlamaGen GPT on the tokens of the (trained) tokenizer and saves it to `out_dir`."""
    train = config.train
    tokenizer_dir = pathlib.Path(config.tokenizer_dir) if config.tokenizer_dir else CHECKPOINT_ROOT / TOKENIZER_NAME
    vq = load_tokenizer(tokenizer_dir)
    tokenizer_ctor = checkpoint.load_metadata(tokenizer_dir)["ctor"]
    ctor = plain(config.model)
    model = build_gpt(ctor, tokenizer_ctor, train.seed)
    data = load_digits("train")
    tokens = tokenize(vq, data.images)

    def get_batch(step: int) -> Batch:
        rows = step_rng(train.seed, step).choice(len(data), train.batch_size, replace=False)
        return data.labels[rows], tokens[rows]

    result = train_module(model, _gpt_train_loss, get_batch, train_config(train), out_dir=out_dir,
                          desc=config.name, stop_after=stop_after, progress=progress)
    summary = {"name": config.name, "family": FAMILY, "params": num_params(model), "command": train_command(config),
               "train": train_summary(result), "finished": result.step >= train.steps}
    if not summary["finished"]:
        return summary
    summary["val"] = {"loss": teacher_forced_loss(model, vq, load_digits("val")),
                      "log_vocab": math.log(model.vocab_size)}
    checkpoint.save_model(model, out_dir, {
        "family": FAMILY, "ctor": ctor, "tokenizer_ctor": tokenizer_ctor, "sample": plain(config.sample),
        "summary": summary, "config": plain(config)})
    return summary


def train_from_config(config: ml_collections.ConfigDict, out_dir: Optional[PathLike] = None, *,
                      stop_after: Optional[int] = None, progress: bool = True) -> dict[str, Any]:
    """``bitlaws train`` for the demo LlamaGen tokenizer (``family = "llamagen_vq"``) and GPTs (``"llamagen"``).

    Resumes from ``out_dir/train_state`` when present; the final model and the validation metrics are written
    once the run reaches ``config.train.steps`` (as `bitlaws.demo.var_family.train_from_config`).

    Returns:
        The training summary (also stored in ``out_dir/bitlaws.json`` when finished).
    """
    out_dir = pathlib.Path(out_dir if out_dir is not None else config.out_dir)
    trainers = {TOKENIZER_FAMILY: train_tokenizer, FAMILY: train_gpt}
    if config.family not in trainers:
        raise ValueError(f"train_from_config handles families {sorted(trainers)}, got {config.family!r}")
    return trainers[config.family](config, out_dir, stop_after=stop_after, progress=progress)


# ----------------------------------------------------------------------------------------------
# The demo family.
# ----------------------------------------------------------------------------------------------

def load_tokenizer(directory: Optional[PathLike] = None) -> LlamaGenVQ:
    """The trained tokenizer (default: the shipped one), cached per directory; treat it as read-only."""
    return load_cached(build_tokenizer, directory if directory is not None else CHECKPOINT_ROOT / TOKENIZER_NAME)


@dataclasses.dataclass
class LlamaGenMember:
    """A trained demo LlamaGen GPT (implements `bitlaws.demo.family.DemoMember`).

    Attributes:
        name: ``llamagen-d<depth>``.
        family: ``"llamagen"``.
        model: The GPT (quantize this one).
        quant_pattern: `QUANT_PATTERN`.
        tokenizer: The float tokenizer used to decode samples.
        cfg_scale, temperature, top_k, top_p: Sampling settings (`generate`'s; cfg_scale <= 1: no guidance).
        metadata: The checkpoint's ``bitlaws.json``.
    """

    name: str
    family: str
    model: LlamaGen
    quant_pattern: str
    tokenizer: LlamaGenVQ
    cfg_scale: float
    temperature: float
    top_k: int
    top_p: float
    metadata: dict

    def _tokens(self, model: LlamaGen, labels: np.ndarray, key: jax.Array) -> jax.Array:
        return generate(model, labels, key, cfg_scale=self.cfg_scale, temperature=self.temperature,
                        top_k=self.top_k, top_p=self.top_p).tokens  # [B, L]

    def sample(self, model: nnx.Module, labels: np.ndarray, key: jax.Array) -> np.ndarray:
        """Class-conditional samples ``[B, 16, 16, 3]`` float32 in [-1, 1] drawn with `model`."""
        labels = np.asarray(labels, np.int32).reshape(-1)
        return decode_tokens(self.tokenizer, self._tokens(model, labels, key))

    def calibration_batches(self, num_batches: int, batch_size: int, seed: int,
                            source: str = "data") -> list[tuple[jax.Array, jax.Array]]:
        """``(labels [B], tokens [B, L])``, half of the labels the null class.

        ``source="data"``: tokens of real training digits. ``source="samples"`` (the paper's protocol): tokens the
        float model samples itself (the member's sampling settings) for labels spread evenly over the classes,
        drawn in one batch of ``num_batches * batch_size`` from a key derived from `seed`.
        """
        if source == "data":
            return [(jnp.asarray(labels), jnp.asarray(tokenize(self.tokenizer, images, batch_size=batch_size)))
                    for images, labels, _ in calibration_digits(num_batches, batch_size, seed,
                                                                self.model.null_class)]
        if source != "samples":
            raise ValueError(f"LlamaGen calibration source must be 'samples' or 'data', got {source!r}")
        n = num_batches * batch_size
        labels = spread_labels(n, self.model.num_classes, seed)
        tokens = self._tokens(self.model, labels, jax.random.key(seed))  # [n, L]
        return sampled_calibration_batches(labels, tokens, num_batches, seed, self.model.null_class)

    def calibration_protocol(self, source: str) -> str:
        return token_calibration_protocol(source, f"cfg {self.cfg_scale}, temperature {self.temperature}, top-k "
                                                  f"{self.top_k}, top-p {self.top_p}")

    def calibration_forward(self, model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Teacher-forced logits ``[B, L, V]`` (all tokens in one pass, as in training), `nnx.jit`-compiled."""
        return _teacher_forced_logits_jit(model, *batch)

    def calibration_apply(self, model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """`calibration_forward` un-jitted (for tracing inside a compiled step)."""
        return _teacher_forced_logits(model, *batch)


def _teacher_forced_logits(model: LlamaGen, labels: jax.Array, tokens: jax.Array) -> jax.Array:
    return model(tokens, labels)


_teacher_forced_logits_jit = nnx.jit(_teacher_forced_logits)


def member_names(root: PathLike = CHECKPOINT_ROOT) -> list[str]:
    """Shipped members, by depth: ``["llamagen-d1", "llamagen-d2", ...]``."""
    return depth_members(FAMILY, root)


def abstract_member(name: str, root: PathLike = CHECKPOINT_ROOT) -> nnx.Module:
    """The abstract GPT of member `name` (`nnx.eval_shape`, no weights read), for the sweep's rule checks."""
    metadata, tokenizer_ctor = member_metadata(name, root, TOKENIZER_NAME)
    return nnx.eval_shape(lambda: build_gpt(metadata["ctor"], tokenizer_ctor))


def load_member(name: str, root: PathLike = CHECKPOINT_ROOT) -> LlamaGenMember:
    """Loads a member (``llamagen-d4``) from `root` with the shipped tokenizer."""
    metadata, tokenizer_ctor = member_metadata(name, root, TOKENIZER_NAME)
    model = checkpoint.load_model(lambda: build_gpt(metadata["ctor"], tokenizer_ctor), pathlib.Path(root) / name)
    sample = metadata["sample"]
    return LlamaGenMember(name=name, family=FAMILY, model=model, quant_pattern=QUANT_PATTERN,
                          tokenizer=load_tokenizer(pathlib.Path(root) / TOKENIZER_NAME),
                          cfg_scale=float(sample["cfg_scale"]), temperature=float(sample["temperature"]),
                          top_k=int(sample["top_k"]), top_p=float(sample["top_p"]), metadata=metadata)


register_family(FAMILY, member_names, load_member)
