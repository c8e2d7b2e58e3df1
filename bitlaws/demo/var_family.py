"""The demo VAR family: a tiny multi-scale VQ tokenizer and VAR transformers trained on the 16x16 digits.

Everything is built from the same Flax code as the ported ImageNet models (`bitlaws.models.vqvae.VQVAE`,
`bitlaws.models.var.VAR`, `bitlaws.sample.var_sampler`). This module holds

* the tokenizer's differentiable training forward (multi-scale residual quantization with the
  straight-through estimator, codebook + commitment losses) and its evaluation,
* VAR teacher forcing (targets: the tokenizer's tokens; inputs: ``idx_bl_to_var_input``),
* the training set-up on `bitlaws.train.train_module` (AdamW, one jit-compiled step, orbax train state in
  ``OUT/train_state`` every ``checkpoint_every`` steps, ``OUT/metrics.jsonl``; the final model via
  `bitlaws.checkpoint.save_model`),
* `train_from_config` (the ``bitlaws train`` entry point for ``family = "vqvae"`` and ``"var"``),
* the ``var`` demo family (`register_family` at import): members ``var-d2``, ``var-d3`` ... loaded from the
  checkpoints shipped in ``bitlaws/demo/checkpoints``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from bitlaws import checkpoint
from bitlaws.demo.data import DigitsData, load_digits
from bitlaws.demo.family import calibration_digits, register_family, spread_labels
from bitlaws.demo.members import (CHECKPOINT_ROOT, batched, depth_members, load_cached, member_metadata, plain,
                                  reconstruction_metrics, sampled_calibration_batches, step_rng,
                                  token_calibration_protocol, train_command, train_summary)
from bitlaws.models.var import VAR
from bitlaws.models.vqvae import VQVAE, area_resize, bicubic_resize
from bitlaws.sample.var_sampler import autoregressive_infer_cfg
from bitlaws.train import STATE_DIR, TrainConfig, train_module

FAMILY = "var"
TOKENIZER_NAME = "vqvae"
TRAIN_STATE_DIR = STATE_DIR
QUANT_PATTERN = (r"word_embed|blocks\.\d+\.(attn\.(mat_qkv|proj)|ffn\.fc[12]|ada_lin)"
                 r"|head_nm\.ada_lin|head")
"""Every linear layer of the VAR transformer (the tokenizer stays in float, as in the paper)."""

PathLike = Union[str, pathlib.Path]
Batch = tuple[np.ndarray, ...]


# ----------------------------------------------------------------------------------------------
# Model construction.
# ----------------------------------------------------------------------------------------------

def _vqvae_kwargs(ctor: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = dict(ctor)
    for key in ("ch_mult", "v_patch_nums"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(int(v) for v in kwargs[key])
    return kwargs


def build_tokenizer(ctor: Mapping[str, Any], seed: int = 0) -> VQVAE:
    """A freshly initialised `VQVAE` from its constructor arguments."""
    return VQVAE(**_vqvae_kwargs(ctor), rngs=nnx.Rngs(seed))


def var_kwargs(ctor: Mapping[str, Any], tokenizer_ctor: Mapping[str, Any]) -> dict[str, Any]:
    """`VAR` keyword arguments: the transformer's config plus the tokenizer's vocabulary and width."""
    kwargs = dict(ctor)
    kwargs["patch_nums"] = tuple(int(p) for p in kwargs["patch_nums"])
    if kwargs["patch_nums"] != tuple(int(p) for p in tokenizer_ctor["v_patch_nums"]):
        raise ValueError(f"VAR patch_nums {kwargs['patch_nums']} != tokenizer v_patch_nums "
                         f"{tuple(tokenizer_ctor['v_patch_nums'])}")
    kwargs["vocab_size"] = int(tokenizer_ctor["vocab_size"])
    kwargs["Cvae"] = int(tokenizer_ctor["z_channels"])
    return kwargs


def build_var(ctor: Mapping[str, Any], tokenizer_ctor: Mapping[str, Any], seed: int = 0) -> VAR:
    """A freshly initialised `VAR` for the given tokenizer."""
    return VAR(**var_kwargs(ctor, tokenizer_ctor), rngs=nnx.Rngs(seed))


def num_params(model: nnx.Module) -> int:
    """Number of parameters (all `nnx.Param` leaves)."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))))


# ----------------------------------------------------------------------------------------------
# Tokenizer: training forward, losses, evaluation.
# ----------------------------------------------------------------------------------------------

def residual_quantize(vae: VQVAE, f: jax.Array, beta: float) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """Differentiable multi-scale residual quantization (the training counterpart of ``f_to_idx_bl_or_fhat``).

    Each scale picks the nearest codes of the (area-downsampled) residual, upsamples them bicubically,
    refines them with its ``Phi`` conv and adds them to ``f_hat``. The per-scale loss is the codebook term
    ``|f_hat - sg(f)|^2`` plus ``beta * |sg(f_hat) - f|^2`` (commitment), averaged over the scales; the
    returned ``f_hat`` passes the decoder's gradient straight through to ``f``.

    Args:
        vae: The tokenizer.
        f: ``[B, H, W, C]`` float32 encoder features (``quant_conv`` applied).
        beta: Commitment weight.

    Returns:
        ``(f_hat_st [B, H, W, C], vq_loss scalar, per scale int32 [B, pn*pn] tokens)``.
    """
    quantizer = vae.quantize
    b, height, width, c = f.shape
    f_detached = jax.lax.stop_gradient(f)
    rest = f_detached
    f_hat = jnp.zeros_like(f)
    vq_loss = jnp.zeros((), jnp.float32)
    tokens = []
    for si, pn in enumerate(quantizer.v_patch_nums):
        last = si == quantizer.num_scales - 1
        z = rest if last else area_resize(rest, (pn, pn))  # [B, pn, pn, C]
        idx = quantizer.nearest_code(jax.lax.stop_gradient(z).reshape(-1, c)).reshape(b, pn * pn)
        h = quantizer.embed(idx).reshape(b, pn, pn, c)
        if not last:
            h = bicubic_resize(h, (height, width))  # [B, H, W, C]
        h = quantizer.phi(si, h)
        f_hat = f_hat + h
        rest = rest - h
        codebook_term = jnp.mean(jnp.square(f_hat - f_detached))
        commitment_term = jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f))
        vq_loss = vq_loss + codebook_term + beta * commitment_term
        tokens.append(idx)
    f_hat_st = f + jax.lax.stop_gradient(f_hat - f)  # straight-through
    return f_hat_st, vq_loss / quantizer.num_scales, tokens


def tokenizer_loss(vae: VQVAE, images: jax.Array, *, beta: float, l1_weight: float,
                   l2_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """VQ-VAE training loss of a batch.

    Args:
        vae: The tokenizer.
        images: ``[B, H, W, 3]`` float32 in [-1, 1].
        beta: Commitment weight.
        l1_weight, l2_weight: Reconstruction term weights.

    Returns:
        ``(loss, {"loss", "l1", "l2", "vq"})`` scalars.
    """
    f_hat, vq_loss, _ = residual_quantize(vae, vae.encode_features(images), beta)
    recon = vae.decoder(vae.post_quant_conv(f_hat))  # [B, H, W, 3], not clamped
    l1 = jnp.mean(jnp.abs(recon - images))
    l2 = jnp.mean(jnp.square(recon - images))
    loss = l1_weight * l1 + l2_weight * l2 + vq_loss
    return loss, {"loss": loss, "l1": l1, "l2": l2, "vq": vq_loss}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _tokens_and_inputs(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inference tokenization: ``[B, H, W, 3]`` -> (tokens ``[B, L]`` int32, VAR inputs ``[B, L - 1, Cvae]``)."""
    vae = nnx.merge(graphdef, state)
    idx_list = vae.img_to_idx_bl(images)
    return jnp.concatenate(idx_list, axis=1), vae.idx_bl_to_var_input(idx_list)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _reconstruct(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    vae = nnx.merge(graphdef, state)
    return vae.idx_bl_to_img(vae.img_to_idx_bl(images), last_one=True)


def tokenize(vae: VQVAE, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes images with the inference path.

    Args:
        vae: The tokenizer.
        images: ``[N, H, W, 3]`` float32 in [-1, 1].
        batch_size: Chunk size.

    Returns:
        ``(tokens [N, L] int32 (all scales concatenated), VAR inputs [N, L - 1, Cvae] float32)``.
    """
    graphdef, state = nnx.split(vae)
    parts = batched(lambda x: _tokens_and_inputs(graphdef, state, x), images, batch_size)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def split_scales(tokens: np.ndarray, patch_nums: Sequence[int]) -> list[np.ndarray]:
    """``[N, L]`` -> per scale ``[N, pn*pn]``."""
    ends = np.cumsum([pn * pn for pn in patch_nums])
    return np.split(tokens, ends[:-1], axis=1)


def reconstruct(vae: VQVAE, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Tokenize-then-decode: ``[N, H, W, 3]`` in [-1, 1] -> ``[N, H, W, 3]`` in [-1, 1]."""
    graphdef, state = nnx.split(vae)
    return np.concatenate(batched(lambda x: _reconstruct(graphdef, state, x), images, batch_size))


def evaluate_tokenizer(vae: VQVAE, data: DigitsData) -> dict[str, float]:
    """Reconstruction errors and codebook usage on `data`: ``mse``, ``l1``, ``codes_used``, ``perplexity``."""
    return reconstruction_metrics(reconstruct(vae, data.images), data.images, tokenize(vae, data.images)[0],
                                  vae.vocab_size)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _quantizer_inputs(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The vectors each scale quantizes ``[N_vec, C]`` and the codes they pick ``[N_vec]``."""
    vae = nnx.merge(graphdef, state)
    quantizer = vae.quantize
    f = vae.encode_features(images)  # [B, H, W, C]
    b, height, width, c = f.shape
    rest = f
    vectors, picks = [], []
    for si, pn in enumerate(quantizer.v_patch_nums):
        last = si == quantizer.num_scales - 1
        z = (rest if last else area_resize(rest, (pn, pn))).reshape(-1, c)  # [B*pn*pn, C]
        idx = quantizer.nearest_code(z)
        h = quantizer.embed(idx).reshape(b, pn, pn, c)
        if not last:
            h = bicubic_resize(h, (height, width))
        rest = rest - quantizer.phi(si, h)
        vectors.append(z)
        picks.append(idx)
    return jnp.concatenate(vectors), jnp.concatenate(picks)


def reseed_dead_codes(vae: nnx.Module, images: np.ndarray, rng: np.random.Generator, *, all_codes: bool = False,
                      quantizer_inputs: Optional[Callable[..., tuple[jax.Array, jax.Array]]] = None) -> int:
    """Replaces codes no vector of `images` picks by randomly chosen quantizer inputs (in place).

    Args:
        vae: The tokenizer (its codebook ``vae.quantize.embedding`` is modified).
        images: ``[N, H, W, 3]`` float32 probe images.
        rng: numpy generator choosing the replacement vectors.
        all_codes: Re-seed the whole codebook (data-dependent initialisation).
        quantizer_inputs: ``(graphdef, state, images) -> (vectors [N_vec, C], picked codes [N_vec])`` of the
            tokenizer's quantizer; default: the multi-scale `VQVAE`'s (every scale).

    Returns:
        The number of re-seeded codes.
    """
    quantizer_inputs = quantizer_inputs or _quantizer_inputs
    graphdef, state = nnx.split(vae)
    vectors, picks = (np.asarray(a) for a in quantizer_inputs(graphdef, state, jnp.asarray(images)))
    codebook = np.array(vae.quantize.embedding.embedding[...])  # [V, C]
    used = np.bincount(picks, minlength=codebook.shape[0]) > 0
    dead = np.arange(codebook.shape[0]) if all_codes else np.flatnonzero(~used)
    if dead.size == 0:
        return 0
    chosen = vectors[rng.choice(vectors.shape[0], dead.size, replace=dead.size > vectors.shape[0])]
    codebook[dead] = chosen
    vae.quantize.embedding.embedding[...] = jnp.asarray(codebook)
    return int(dead.size)


# ----------------------------------------------------------------------------------------------
# VAR teacher forcing.
# ----------------------------------------------------------------------------------------------

def var_loss(model: VAR, labels: jax.Array, inputs: jax.Array, targets: jax.Array,
             key: Optional[jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Teacher-forced cross-entropy over all tokens of all scales.

    Args:
        model: The transformer.
        labels: ``[B]`` int32 classes.
        inputs: ``[B, L - 1, Cvae]`` float32 (``idx_bl_to_var_input``).
        targets: ``[B, L]`` int32 tokens.
        key: PRNG key (label dropout for CFG) or None (evaluation).

    Returns:
        ``(loss, {"loss", "acc"})``.
    """
    logits = model(labels, inputs, key=key)  # [B, L, V]
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    acc = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    return loss, {"loss": loss, "acc": acc}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eval_var_batch(graphdef: nnx.GraphDef, state: nnx.State, labels: jax.Array, inputs: jax.Array,
                    targets: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    logits = model(labels, inputs)  # [B, L, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(axis=1)  # [B]


def teacher_forced_loss(model: VAR, vae: VQVAE, data: DigitsData, batch_size: int = 128) -> float:
    """Mean per-token cross-entropy (nats) of `model` on `data`'s tokens, conditional labels, no dropout."""
    tokens, inputs = tokenize(vae, data.images)
    graphdef, state = nnx.split(model)
    losses = []
    for start in range(0, len(data), batch_size):
        end = min(start + batch_size, len(data))
        pad = batch_size - (end - start)
        chunk = [np.pad(a[start:end], [(0, pad)] + [(0, 0)] * (a.ndim - 1))
                 for a in (data.labels, inputs, tokens)]
        losses.append(np.asarray(_eval_var_batch(graphdef, state, *map(jnp.asarray, chunk)))[:end - start])
    return float(np.mean(np.concatenate(losses)))


# ----------------------------------------------------------------------------------------------
# Training entry points (the loop is `bitlaws.train`).
# ----------------------------------------------------------------------------------------------

TOKENIZER_TRAIN_KEYS = ("batch_size", "beta", "l1_weight", "l2_weight", "dead_code_every")
"""Keys of the tokenizer config's ``train`` block that are not `TrainConfig` fields."""


def train_config(train: ml_collections.ConfigDict, ignore: Sequence[str] = ("batch_size",)) -> TrainConfig:
    """The loop settings of a ``configs/demo/{vqvae,var}.py`` ``train`` block.

    The demo recipe (in the configs): AdamW with b2 0.95, warm-up over ``max(warmup_steps, 1)`` steps, cosine
    decay to 5 % of the peak, global-norm clipping at 1.
    """
    return TrainConfig.from_config(train, ignore=ignore)


def _tokenizer_train_loss(model: VQVAE, batch: Batch, key: jax.Array, *, beta: float, l1_weight: float,
                          l2_weight: float) -> tuple[jax.Array, dict]:
    del key  # deterministic
    return tokenizer_loss(model, batch[0], beta=beta, l1_weight=l1_weight, l2_weight=l2_weight)


def train_tokenizer(config: ml_collections.ConfigDict, out_dir: PathLike, *, stop_after: Optional[int] = None,
                    progress: bool = True) -> dict[str, Any]:
    """Trains the demo tokenizer and saves it (`save_model`) to `out_dir`; returns the summary.

    Before step 0 the whole codebook is seeded from encoder features of 512 training images, and every
    ``dead_code_every`` steps the codes none of them picks are re-seeded (`reseed_dead_codes`).
    """
    train = config.train
    ctor = plain(config.model)
    vae = build_tokenizer(ctor, train.seed)
    graphdef, _, rest = nnx.split(vae, nnx.Param, ...)
    images = load_digits("train").images
    probe = images[step_rng(train.seed, -1).choice(len(images), min(512, len(images)), replace=False)]

    def get_batch(step: int) -> Batch:
        return (images[step_rng(train.seed, step).choice(len(images), train.batch_size, replace=False)],)

    def between_steps(params: nnx.State, step: int) -> nnx.State:
        if step and not (train.dead_code_every and step % train.dead_code_every == 0):
            return params
        model = nnx.merge(graphdef, params, rest)
        reseed_dead_codes(model, probe, step_rng(train.seed, step), all_codes=step == 0)
        return nnx.state(model, nnx.Param)

    loss_fn = functools.partial(_tokenizer_train_loss, beta=train.beta, l1_weight=train.l1_weight,
                                l2_weight=train.l2_weight)
    result = train_module(vae, loss_fn, get_batch, train_config(train, TOKENIZER_TRAIN_KEYS), out_dir=out_dir,
                          desc=config.name, between_steps=between_steps, stop_after=stop_after, progress=progress)
    summary = {"name": config.name, "family": "vqvae", "params": num_params(vae), "command": train_command(config),
               "train": train_summary(result), "finished": result.step >= train.steps}
    if not summary["finished"]:
        return summary
    summary["val"] = evaluate_tokenizer(vae, load_digits("val"))
    checkpoint.save_model(vae, out_dir, {"family": "vqvae", "ctor": ctor, "summary": summary,
                                         "config": plain(config)})
    return summary


def _resolve_tokenizer_dir(tokenizer_dir: str) -> pathlib.Path:
    return pathlib.Path(tokenizer_dir) if tokenizer_dir else CHECKPOINT_ROOT / TOKENIZER_NAME


def _var_train_loss(model: VAR, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    labels, inputs, targets = batch
    return var_loss(model, labels, inputs, targets, key)


def train_var(config: ml_collections.ConfigDict, out_dir: PathLike, *, stop_after: Optional[int] = None,
              progress: bool = True) -> dict[str, Any]:
    """Trains one VAR transformer on the tokens of the (trained) tokenizer and saves it to `out_dir`."""
    train = config.train
    tokenizer_dir = _resolve_tokenizer_dir(config.tokenizer_dir)
    vae = load_tokenizer(tokenizer_dir)
    tokenizer_ctor = checkpoint.load_metadata(tokenizer_dir)["ctor"]
    ctor = plain(config.model)
    model = build_var(ctor, tokenizer_ctor, train.seed)
    data = load_digits("train")
    tokens, inputs = tokenize(vae, data.images)

    def get_batch(step: int) -> Batch:
        rows = step_rng(train.seed, step).choice(len(data), train.batch_size, replace=False)
        return data.labels[rows], inputs[rows], tokens[rows]

    result = train_module(model, _var_train_loss, get_batch, train_config(train), out_dir=out_dir, desc=config.name,
                          stop_after=stop_after, progress=progress)
    summary = {"name": config.name, "family": FAMILY, "params": num_params(model), "command": train_command(config),
               "train": train_summary(result), "finished": result.step >= train.steps}
    if not summary["finished"]:
        return summary
    summary["val"] = {"loss": teacher_forced_loss(model, vae, load_digits("val")),
                      "log_vocab": math.log(model.vocab_size)}
    checkpoint.save_model(model, out_dir, {
        "family": FAMILY, "ctor": ctor, "tokenizer_ctor": tokenizer_ctor, "sample": plain(config.sample),
        "summary": summary, "config": plain(config)})
    return summary


def train_from_config(config: ml_collections.ConfigDict, out_dir: Optional[PathLike] = None, *,
                      stop_after: Optional[int] = None, progress: bool = True) -> dict[str, Any]:
    """``bitlaws train`` for the demo tokenizer (``family = "vqvae"``) and VAR (``family = "var"``).

    Resumes from ``out_dir/train_state`` when present; a finished run only re-evaluates and re-saves.
    The final model (`bitlaws.checkpoint.save_model`) and the validation metrics are written once the run
    reaches ``config.train.steps``.

    Args:
        config: A config of ``configs/demo/vqvae.py`` or ``configs/demo/var.py``.
        out_dir: Output directory (default ``config.out_dir``, relative to the working directory).
        stop_after: End this session after this many steps (resumable), or None.
        progress: Show a progress bar.

    Returns:
        The training summary (``finished``, ``train``: steps / wall time / mean metrics of the last 50
        steps, ``val`` when finished; also stored in ``out_dir/bitlaws.json``).
    """
    out_dir = pathlib.Path(out_dir if out_dir is not None else config.out_dir)
    trainers = {"vqvae": train_tokenizer, FAMILY: train_var}
    if config.family not in trainers:
        raise ValueError(f"train_from_config handles families {sorted(trainers)}, got {config.family!r}")
    return trainers[config.family](config, out_dir, stop_after=stop_after, progress=progress)


# ----------------------------------------------------------------------------------------------
# The demo family.
# ----------------------------------------------------------------------------------------------

def load_tokenizer(directory: Optional[PathLike] = None) -> VQVAE:
    """The trained tokenizer (default: the shipped one), cached per directory; treat it as read-only."""
    return load_cached(build_tokenizer, directory if directory is not None else CHECKPOINT_ROOT / TOKENIZER_NAME)


@dataclasses.dataclass
class VarMember:
    """A trained demo VAR (implements `bitlaws.demo.family.DemoMember`).

    Attributes:
        name: ``var-d<depth>``.
        family: ``"var"``.
        model: The transformer (quantize this one).
        quant_pattern: `QUANT_PATTERN`.
        tokenizer: The float tokenizer used for sampling.
        cfg, top_k, top_p: Sampling settings.
        metadata: The checkpoint's ``bitlaws.json``.
    """

    name: str
    family: str
    model: VAR
    quant_pattern: str
    tokenizer: VQVAE
    cfg: float
    top_k: int
    top_p: float
    metadata: dict

    def sample(self, model: nnx.Module, labels: np.ndarray, key: jax.Array) -> np.ndarray:
        """Class-conditional samples ``[B, 16, 16, 3]`` float32 in [-1, 1] drawn with `model`."""
        labels = np.asarray(labels, np.int32).reshape(-1)
        images = autoregressive_infer_cfg(model, self.tokenizer, B=labels.shape[0], label_B=labels, key=key,
                                          cfg=self.cfg, top_k=self.top_k, top_p=self.top_p)  # [B, H, W, 3] in [0, 1]
        return np.asarray(images, np.float32) * 2.0 - 1.0

    def calibration_batches(self, num_batches: int, batch_size: int, seed: int,
                            source: str = "data") -> list[tuple[jax.Array, jax.Array]]:
        """``(labels [B], teacher-forced inputs [B, L - 1, Cvae])``, half of the labels the null class.

        ``source="data"``: token maps of real training digits. ``source="samples"`` (the paper's protocol):
        token maps the float model samples itself (the member's cfg / top-k / top-p) for labels spread evenly
        over the classes, drawn in one batch of ``num_batches * batch_size`` from a key derived from `seed`.
        """
        if source == "data":
            batches = []
            for images, labels, _ in calibration_digits(num_batches, batch_size, seed, self.model.num_classes):
                _, inputs = tokenize(self.tokenizer, images, batch_size=batch_size)
                batches.append((jnp.asarray(labels), jnp.asarray(inputs)))
            return batches
        if source != "samples":
            raise ValueError(f"VAR calibration source must be 'samples' or 'data', got {source!r}")
        n = num_batches * batch_size
        labels = spread_labels(n, self.model.num_classes, seed)
        drawn = autoregressive_infer_cfg(self.model, self.tokenizer, B=n, label_B=labels,
                                         key=jax.random.key(seed), cfg=self.cfg, top_k=self.top_k, top_p=self.top_p,
                                         return_logits=True)
        inputs = self.tokenizer.idx_bl_to_var_input(drawn.tokens)  # [n, L - 1, Cvae]
        return sampled_calibration_batches(labels, inputs, num_batches, seed, self.model.num_classes)

    def calibration_protocol(self, source: str) -> str:
        return token_calibration_protocol(source, f"cfg {self.cfg}, top-k {self.top_k}, top-p {self.top_p}")

    def calibration_forward(self, model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Teacher-forced logits ``[B, L, V]`` (all scales in one pass, as in training), `nnx.jit`-compiled."""
        return _teacher_forced_logits_jit(model, *batch)

    def calibration_apply(self, model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """`calibration_forward` un-jitted (for tracing inside a compiled step)."""
        return _teacher_forced_logits(model, *batch)


def _teacher_forced_logits(model: VAR, labels: jax.Array, inputs: jax.Array) -> jax.Array:
    return model(labels, inputs)


_teacher_forced_logits_jit = nnx.jit(_teacher_forced_logits)


def member_names(root: PathLike = CHECKPOINT_ROOT) -> list[str]:
    """Shipped members, by depth: ``["var-d2", "var-d3", ...]``."""
    return depth_members(FAMILY, root)


def load_member(name: str, root: PathLike = CHECKPOINT_ROOT) -> VarMember:
    """Loads a member (``var-d4``) from `root` with the shipped tokenizer."""
    directory = pathlib.Path(root) / name
    metadata, tokenizer_ctor = member_metadata(name, root, TOKENIZER_NAME)
    tokenizer_dir = pathlib.Path(root) / TOKENIZER_NAME
    model = checkpoint.load_model(lambda: build_var(metadata["ctor"], tokenizer_ctor), directory)
    sample = metadata["sample"]
    return VarMember(name=name, family=FAMILY, model=model, quant_pattern=QUANT_PATTERN,
                     tokenizer=load_tokenizer(tokenizer_dir), cfg=float(sample["cfg"]), top_k=int(sample["top_k"]),
                     top_p=float(sample["top_p"]), metadata=metadata)


register_family(FAMILY, member_names, load_member)
