"""Data-parallel sampling of ported VAR / DiT / LlamaGen / MAR models where sample ``i`` depends only on ``(seed, i)``.

Keys and labels: sample ``i`` draws with ``jax.random.fold_in(jax.random.key(seed), i)`` and conditions on
`sample_labels` of ``i``; the samplers run under ``jax.vmap`` over samples (one sampler call per sample, batched),
so a sample never sees its batch neighbours' randomness. Which batch, device or process computes it does not
change its draws.

Labels (``labels`` option): ``cyclic`` (default) gives sample ``i`` class ``i % num_classes``, so any prefix is
class-balanced and 50,000 samples hold 50 of each of the 1000 ImageNet classes, the official VAR protocol's
counts (its script samples 50 per class in class order: ``blocks`` with ``per_class=50`` reproduces that order;
the order matters only for the Inception Score's contiguous splits). The official DiT script (``sample_ddp.py``)
draws uniformly random classes instead; the study uses the balanced labels for both families, which removes the
label draw from the run-to-run noise of FID.

Devices: a batch of ``per_device_batch`` samples per device is sharded over a 1-D ``'data'`` mesh with
`jax.sharding.NamedSharding`; the model's state is replicated over the mesh, and the samplers' jitted programs
(`bitlaws.sample.var_sampler`, `bitlaws.sample.diffusion`) are partitioned along the batch by XLA. The per-device
batch is fixed (the last batch of a request is padded), so each device runs the same program on the same shapes
whatever the device count: on one machine the uint8 images are bit-identical with 1 or 4 devices (XLA:CPU's
convolutions round differently at other batch sizes, so changing ``per_device_batch`` may move a few pixels by
one level).

uint8 conversion follows the official scripts: VAR ``img.mul(255).astype(uint8)`` of the [0, 1] image
(truncation), DiT ``clamp(127.5 * x + 128, 0, 255).to(uint8)`` of the decoded [-1, 1] image; LlamaGen's
``sample_c2i_ddp.py`` the same as DiT after resizing the decoded image to ``image_size_eval`` with
``F.interpolate(mode='bicubic')`` (`bitlaws.models.vqvae.bicubic_resize`, PyTorch's a = -0.75 kernel, no
antialiasing; skipped when the sizes agree or ``image_size_eval`` is 0); MAR's ``engine_mar.evaluate``
``np.round(np.clip((x + 1) / 2 * 255, 0, 255))`` of the VAE's [-1, 1] output (rounding, not truncation).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bitlaws.eval.sharded import DATA_AXIS
from bitlaws.models.vqvae import bicubic_resize
from bitlaws.sample import draws, mar_sampler
from bitlaws.sample.diffusion import create_diffusion, decode_latents
from bitlaws.sample.llamagen_sampler import generate
from bitlaws.sample.var_sampler import autoregressive_infer_cfg
from bitlaws.xla_options import COMPILER_OPTIONS

LABEL_ORDERS = ("cyclic", "blocks")
FAMILIES = ("var", "dit", "llamagen", "mar")


def sample_labels(indices: Any, num_classes: int, order: str = "cyclic", per_class: int = 50) -> Any:
    """The class of each sample index (numpy or jax int array ``[n]`` -> the same kind, int32).

    Args:
        indices: Sample indices ``[n]``.
        num_classes: Conditioning classes.
        order: ``cyclic`` (``i % num_classes``) or ``blocks`` (``(i // per_class) % num_classes``: `per_class`
            consecutive samples per class, classes in order).
        per_class: Block length of ``blocks``.

    Raises:
        ValueError: an unknown order or a non-positive `per_class` / `num_classes`.
    """
    if order not in LABEL_ORDERS:
        raise ValueError(f"label order must be one of {LABEL_ORDERS}, got {order!r}")
    if int(num_classes) < 1 or int(per_class) < 1:
        raise ValueError(f"num_classes and per_class must be >= 1, got {num_classes} and {per_class}")
    blocks = indices if order == "cyclic" else indices // int(per_class)
    return (blocks % int(num_classes)).astype(np.int32)


def var_to_uint8(images: jax.Array) -> jax.Array:
    """``[..., 3]`` float in [0, 1] -> uint8 ``floor(255 x)`` (VAR's ``mul(255)`` then ``astype(uint8)``)."""
    return jnp.floor(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def dit_to_uint8(images: jax.Array) -> jax.Array:
    """``[..., 3]`` float in [-1, 1] -> uint8 ``floor(clip(127.5 x + 128, 0, 255))`` (DiT's ``sample_ddp.py``)."""
    return jnp.floor(jnp.clip(127.5 * images + 128.0, 0.0, 255.0)).astype(jnp.uint8)


def mar_to_uint8(images: jax.Array) -> jax.Array:
    """``[..., 3]`` float in [-1, 1] -> uint8 ``round(clip(255 (x + 1) / 2, 0, 255))`` (MAR's ``engine_mar.py``)."""
    return jnp.round(jnp.clip((images + 1.0) / 2.0 * 255.0, 0.0, 255.0)).astype(jnp.uint8)


@functools.lru_cache(maxsize=4)
def _diffusion(respacing: str):
    """One process per respacing, so its compiled sampling loops serve every cell."""
    return create_diffusion(respacing)


@functools.lru_cache(maxsize=8)
def _decoder_call(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """``jit((state, latents [B, h, w, C]) -> images [B, H, W, 3])`` of an SD-VAE graph (no scaling, no clamp)."""
    return jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z), compiler_options=COMPILER_OPTIONS)


@functools.partial(jax.jit, static_argnames=("num_classes", "order", "per_class"))
def keys_and_labels(seed: jax.Array, indices: jax.Array, *, num_classes: int, order: str,
                    per_class: int) -> tuple[jax.Array, jax.Array]:
    """``(keys [n] = fold_in(key(seed), i), labels [n] int32)`` of sample indices ``[n]`` (sharded like them)."""
    base = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
    return keys, sample_labels(indices, num_classes, order, per_class)


@functools.lru_cache(maxsize=8)
def _vq_decoder_call(graphdef: nnx.GraphDef, grid: int, size: int) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """``jit((state, tokens [B, grid*grid]) -> uint8 [B, H, W, 3])`` of a LlamaGen VQ: decode, resize, convert."""

    def decode(state: nnx.State, tokens: jax.Array) -> jax.Array:
        vq = nnx.merge(graphdef, state)
        images = vq.decode_code(tokens, (tokens.shape[0], grid, grid, vq.codebook_embed_dim))  # [B, H, W, 3]
        if size and size != images.shape[1]:
            images = bicubic_resize(images, (size, size))
        return dit_to_uint8(images)

    return jax.jit(decode, compiler_options=COMPILER_OPTIONS)


@functools.lru_cache(maxsize=8)
def _mar_decoder_call(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """``jit((state, tokens [B, h, w, C]) -> uint8 [B, H, W, 3])`` of MAR's KL VAE (``decode(tokens / 0.2325)``)."""
    return jax.jit(lambda state, tokens: mar_to_uint8(mar_sampler.decode_tokens(nnx.merge(graphdef, state), tokens)),
                   compiler_options=COMPILER_OPTIONS)


def _var_one(var: nnx.Module, vae: nnx.Module, protocol: Mapping[str, Any]) -> Callable:
    """``(key, label) -> uint8 [H, W, 3]``: one VAR sample (`autoregressive_infer_cfg` with B=1)."""

    def one(key: jax.Array, label: jax.Array) -> jax.Array:
        images = autoregressive_infer_cfg(var, vae, B=1, label_B=label[None], key=key, cfg=float(protocol["cfg"]),
                                          top_k=int(protocol["top_k"]), top_p=float(protocol["top_p"]),
                                          more_smooth=bool(protocol["more_smooth"]))  # [1, H, W, 3] in [0, 1]
        return var_to_uint8(images[0])

    return one


def _dit_one(dit: nnx.Module, vae: nnx.Module, protocol: Mapping[str, Any]) -> Callable:
    """``(key, label) -> uint8 [H, W, 3]``: one DiT sample as upstream's ``sample_ddp.py`` draws it.

    The initial latent is drawn from the first half of `key`, duplicated for the guided pair ``[label, null]``
    (`DiT.forward_with_cfg` uses the first half only); the sampling loop's step noise from the second half.
    """
    diffusion = _diffusion(str(protocol["timestep_respacing"]))
    sampler = str(protocol["sampler"])
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"DiT sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    vae_def, vae_state = nnx.split(vae)
    decode = _decoder_call(vae_def)
    side, channels = int(dit.input_size), int(dit.in_channels)
    cfg_scale = float(protocol["cfg_scale"])
    clip = bool(protocol["clip_denoised"])

    def one(key: jax.Array, label: jax.Array) -> jax.Array:
        noise_key, loop_key = jax.random.split(key)
        z = draws.normal(noise_key, (1, side, side, channels))  # [1, h, w, C]
        x = jnp.concatenate([z, z], axis=0)  # [2, h, w, C]
        y = jnp.stack([label, jnp.asarray(dit.num_classes, jnp.int32)])  # [2]: label, null class
        out = loop(dit.forward_with_cfg, x.shape, x, key=loop_key, clip_denoised=clip,
                   model_kwargs=dict(y=y, cfg_scale=jnp.float32(cfg_scale)))  # [2, h, w, C]
        images = decode_latents(lambda latents: decode(vae_state, latents), out[:1])  # [1, H, W, 3]
        return dit_to_uint8(images[0])

    return one


def _llamagen_one(gpt: nnx.Module, vq: nnx.Module, protocol: Mapping[str, Any]) -> Callable:
    """``(key, label) -> uint8 [H, W, 3]``: one LlamaGen sample (`generate` with B=1; its Exp(1) draws of token
    ``t`` from ``fold_in(key, t)``), decoded by the VQ and converted as ``sample_c2i_ddp.py`` does."""
    vq_def, vq_state = nnx.split(vq)
    decode = _vq_decoder_call(vq_def, math.isqrt(int(gpt.block_size)), int(protocol["image_size_eval"]))
    settings = dict(cfg_scale=float(protocol["cfg_scale"]), cfg_interval=int(protocol["cfg_interval"]),
                    temperature=float(protocol["temperature"]), top_k=int(protocol["top_k"]),
                    top_p=float(protocol["top_p"]))

    def one(key: jax.Array, label: jax.Array) -> jax.Array:
        tokens = generate(gpt, label[None], key, **settings).tokens  # [1, N]
        return decode(vq_state, tokens)[0]

    return one


def _mar_one(mar: nnx.Module, vae: nnx.Module, protocol: Mapping[str, Any]) -> Callable:
    """``(key, label) -> uint8 [H, W, 3]``: one MAR sample (`mar_sampler.sample_tokens` with B=1: its order from
    the first half of `key`, the head's noise from the second), decoded by the KL VAE."""
    vae_def, vae_state = nnx.split(vae)
    decode = _mar_decoder_call(vae_def)
    cfg_schedule = str(protocol["cfg_schedule"])
    if cfg_schedule not in mar_sampler.CFG_SCHEDULES:
        raise ValueError(f"MAR cfg_schedule must be one of {mar_sampler.CFG_SCHEDULES}, got {cfg_schedule!r}")
    settings = dict(num_iter=int(protocol["num_iter"]), num_sampling_steps=str(protocol["num_sampling_steps"]),
                    cfg=float(protocol["cfg"]), cfg_schedule=cfg_schedule, temperature=float(protocol["temperature"]))

    def one(key: jax.Array, label: jax.Array) -> jax.Array:
        tokens = mar_sampler.sample_tokens(mar, label[None], key=key, **settings)  # [1, h, w, C]
        return decode(vae_state, tokens)[0]

    return one


_SAMPLERS = {"var": _var_one, "dit": _dit_one, "llamagen": _llamagen_one, "mar": _mar_one}


class ShardedSampler:
    """Samples uint8 images of any sample indices, ``per_device_batch`` per device of `mesh`.

    Args:
        family: ``var``, ``dit``, ``llamagen`` or ``mar``.
        model: The generator (VAR transformer, DiT, LlamaGen GPT or MAR; quantized or float).
        decoder: VAR's tokenizer, DiT's VAE, LlamaGen's VQ or MAR's KL VAE.
        protocol: VAR ``cfg``, ``top_k``, ``top_p``, ``more_smooth``; DiT ``sampler``, ``timestep_respacing``,
            ``cfg_scale``, ``clip_denoised``; LlamaGen ``cfg_scale``, ``cfg_interval``, ``temperature``,
            ``top_k``, ``top_p``, ``image_size_eval``; MAR ``num_iter``, ``num_sampling_steps``, ``cfg``,
            ``cfg_schedule``, ``temperature``.
        mesh: Mesh with a ``'data'`` axis (this process's devices).
        per_device_batch: Samples per device per step.
        num_classes: Conditioning classes.
        label_order, per_class: See `sample_labels`.
    """

    def __init__(self, family: str, model: nnx.Module, decoder: nnx.Module, protocol: Mapping[str, Any], *,
                 mesh: Mesh, per_device_batch: int, num_classes: int, label_order: str = "cyclic",
                 per_class: int = 50):
        if family not in FAMILIES:
            raise ValueError(f"model family must be one of {FAMILIES}, got {family!r}")
        if isinstance(per_device_batch, bool) or int(per_device_batch) < 1:
            raise ValueError(f"per_device_batch must be a positive integer, got {per_device_batch!r}")
        sample_labels(np.zeros(1, np.int64), num_classes, label_order, per_class)  # validates the label options
        self.mesh = mesh
        self.batch = int(per_device_batch) * int(mesh.shape[DATA_AXIS])
        self._label_options = dict(num_classes=int(num_classes), order=label_order, per_class=int(per_class))
        self._data = NamedSharding(mesh, P(DATA_AXIS))
        graphdef, state = nnx.split((model, decoder))
        net, dec = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, P())))  # replicated weights
        self._one = _SAMPLERS[family](net, dec, protocol)

    def _step(self, seed: int, indices: np.ndarray) -> np.ndarray:
        """uint8 ``[batch, H, W, 3]`` of exactly `batch` indices."""
        placed = jax.device_put(indices.astype(np.int32), self._data)  # [G] sharded over 'data'
        keys, labels = keys_and_labels(jnp.uint32(seed), placed, **self._label_options)
        with warnings.catch_warnings():  # the KV cache VAR donates cannot be reused under vmap
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            images = jax.vmap(self._one)(keys, labels)  # [G, H, W, 3] uint8
        return np.asarray(images)

    def sample(self, seed: int, indices: np.ndarray, on_batch: Callable[[int], Any] = lambda n: None) -> np.ndarray:
        """uint8 ``[n, H, W, 3]`` images of sample `indices` ``[n]`` (in that order).

        Args:
            seed: The base seed (31 bits).
            indices: Non-negative sample indices.
            on_batch: Called with the number of real samples after each batch (progress bars).
        """
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= 2**31):
            raise ValueError(f"sample indices must lie in [0, 2**31), got {indices.min()}..{indices.max()}")
        parts = []
        for start in range(0, indices.size, self.batch):
            chunk = indices[start:start + self.batch]
            padded = np.concatenate([chunk, np.full(self.batch - chunk.size, chunk[-1], np.int64)])
            parts.append(self._step(seed, padded)[:chunk.size])
            on_batch(chunk.size)
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, 0, 0, 3), np.uint8)
