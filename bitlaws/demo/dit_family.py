"""The demo DiT family: pixel-space DiTs (`bitlaws.models.dit.DiT`) trained on the 16x16 digits.

Members ``dit-d2`` ... ``dit-d5`` are DiTs on ``[B, 16, 16, 3]`` images in [-1, 1] with ``depth`` blocks,
hidden size ``16 * (depth + 1)``, ``depth + 1`` heads, learned-range sigma and 10 classes plus the null class
for classifier-free guidance. Patches are 4x4 (16 tokens), not upstream's 2x2: the digits are 8x8 images
upsampled, so a 4x4 patch covers what a 2x2 patch covers at their native resolution, and 4x fewer tokens make
training and the sweep's sampling affordable on 2 CPU cores. The hidden size must then be at least the
4*4*3 = 48 values of a patch, otherwise the eps prediction cannot carry the noise through the tokens. Their checkpoints (EMA weights, float32) ship in
``bitlaws/demo/checkpoints/dit-d*/`` and are reproduced by `train_from_config` (``configs/demo/dit.py``).

The network predicts x0, not eps (upstream's ``predict_xstart=True`` option of ``create_diffusion``; the
sampler supports both). With 16 tokens of 48 - 96 channels an eps-predicting DiT cannot copy the noise
accurately enough at high t, where the x0 derived from eps amplifies eps errors ~150x: such models trained
to a low loss yet sampled pure noise. x0 is low dimensional (smooth digits) and its errors are never amplified.
Guidance is unchanged by this: at fixed x_t, eps is affine in x0, so guiding the x0 channels equals guiding eps.

Training objective (upstream ``GaussianDiffusion.training_losses`` with ``learn_sigma`` and the plain MSE loss
type): ``loss = mean((x0 - x0_hat)^2) + vb``, where ``vb`` is the variational bound term of step ``t`` in
bits per dimension, computed with the model's mean prediction frozen (stop-gradient), so that it trains only
the variance interpolation channels: ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t > 0`` and the
discretized-Gaussian decoder NLL for ``t = 0``. With all 1000 steps in training no rescaling of ``vb`` applies.

Importing this module registers the ``dit`` family with `bitlaws.demo.family.register_family`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bitlaws.checkpoint import load_metadata, load_model
from bitlaws.demo import digits_training
from bitlaws.demo.family import calibration_digits, register_family, spread_labels
from bitlaws.models.dit import DiT
from bitlaws.sample import draws
from bitlaws.sample import diffusion_losses
from bitlaws.sample.diffusion import GaussianDiffusion, create_diffusion
from bitlaws.sample.diffusion_losses import diffusion_loss_terms, q_sample
from bitlaws.train import STATE_DIR

FAMILY = "dit"
CHECKPOINT_ROOT = pathlib.Path(__file__).resolve().parent / "checkpoints"
TRAIN_STATE_DIR = STATE_DIR
MODEL_DIR = digits_training.MODEL_DIR
SUMMARY_FILE = digits_training.SUMMARY_FILE
VAL_TIMESTEPS = (0, 50, 250, 500, 750)  # fixed timesteps of the validation loss
PREDICT_XSTART = True  # the demo DiTs predict x0 (see the module docstring)

QUANT_PATTERN = (r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2)|adaLN_modulation)"
                 r"|final_layer\.(linear|adaLN_modulation)")
"""Module paths quantized in the sweep: every linear of the DiT blocks (qkv, proj, fc1, fc2, adaLN_modulation)
and the final layer (adaLN_modulation, linear). Left in float: the patch-embed conv ``x_embedder.proj`` (the
input layer that sees raw pixels, 0.5 - 2 % of the parameters here; keeping the first layer in float is
the usual PTQ practice for DiTs) and the timestep/label embedders (tables and the small conditioning MLP, also embeddings)."""


# ----------------------------------------------------------------------------- model construction


def make_model(model_kwargs: dict[str, Any], seed: int = 0) -> DiT:
    """A DiT with the upstream initialisation (``DiT.initialize_weights``), drawn with numpy.

    Linear kernels and the patch-embed kernel (as a flattened ``[out, in*kh*kw]`` matrix) are Xavier uniform
    and biases zero; the label table and the timestep MLP are ``N(0, 0.02)``; every adaLN modulation and the
    final linear are zero (adaLN-Zero: each block starts as the identity and the output as zero).

    Args:
        model_kwargs: `DiT` constructor arguments (without ``rngs``).
        seed: numpy seed.

    Returns:
        The concrete model (float32).
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT(**model_kwargs, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(part) for part in path)
        shape = tuple(var.get_value().shape)
        var.set_value(jnp.asarray(_initial_value(name, shape, rng)))
    return nnx.merge(graphdef, state)


def _initial_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The upstream initial value of the parameter at dotted path `name` (float32, `shape`)."""
    zero = np.zeros(shape, np.float32)
    if "adaLN_modulation" in name or name.startswith("final_layer.linear") or name.endswith(".bias"):
        return zero
    if name.startswith("y_embedder.") or name.startswith("t_embedder."):
        return rng.normal(0.0, 0.02, shape).astype(np.float32)
    fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]  # [in, out] and HWIO [kh, kw, in, out]
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape).astype(np.float32)


def count_params(model: nnx.Module) -> int:
    """Number of parameters (`nnx.Param` elements)."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))))


# ----------------------------------------------------------------------------- training loss

# The pure loss helpers moved to `bitlaws.sample.diffusion_losses` (shared with MAR's diffusion head); `q_sample`
# and `diffusion_loss_terms` are imported above and these stay importable from here too.
normal_kl = diffusion_losses.normal_kl
discretized_gaussian_log_likelihood = diffusion_losses.discretized_gaussian_log_likelihood


@functools.lru_cache(maxsize=4)
def training_diffusion(predict_xstart: bool = PREDICT_XSTART) -> GaussianDiffusion:
    """The full (1000 steps, unrespaced) linear-schedule learned-sigma diffusion used in training."""
    return create_diffusion(None, predict_xstart=predict_xstart)


def model_loss_terms(model: DiT, images: jax.Array, labels: jax.Array, t: jax.Array, noise: jax.Array, *,
                     dropout_key: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """Noises `images` at `t` and evaluates the training loss terms of `model`.

    Args:
        model: The DiT (learned sigma).
        images: ``[B, H, W, C]`` float32 in [-1, 1].
        labels: ``[B]`` int32 classes.
        t: ``[B]`` int32 timesteps in [0, 1000).
        noise: ``[B, H, W, C]`` float32 standard normal.
        dropout_key: Enables label dropout (training) when given.

    Returns:
        `diffusion_loss_terms`' dict, each ``[B]`` float32.
    """
    diffusion = training_diffusion()
    x_t = q_sample(diffusion, images, t, noise)
    output = model(x_t, t, labels, train=dropout_key is not None, dropout_key=dropout_key)  # [B, H, W, 2C]
    return diffusion_loss_terms(diffusion, output, images, x_t, t, noise)


@nnx.jit
def _eval_terms(model: DiT, images: jax.Array, labels: jax.Array, t: jax.Array,
                noise: jax.Array) -> dict[str, jax.Array]:
    return {name: value.mean() for name, value in model_loss_terms(model, images, labels, t, noise).items()}


def evaluate_loss(model: DiT, images: np.ndarray, labels: np.ndarray, *,
                  timesteps: tuple[int, ...] = VAL_TIMESTEPS, seed: int = 0) -> dict[str, float]:
    """Mean loss terms over `images` at each of the fixed `timesteps` with seeded noise (no label dropout).

    Args:
        model: The DiT.
        images: ``[N, H, W, C]`` float32 in [-1, 1].
        labels: ``[N]`` int32.
        timesteps: Timesteps to average over (each applied to every image).
        seed: Noise seed.

    Returns:
        ``{"loss", "mse", "vb"}`` python floats.
    """
    images, labels = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
    noise = jax.random.normal(jax.random.key(seed), images.shape, jnp.float32)
    totals: dict[str, float] = {}
    for step in timesteps:
        t = jnp.full((images.shape[0],), step, jnp.int32)
        for name, value in _eval_terms(model, images, labels, t, noise).items():
            totals[name] = totals.get(name, 0.0) + float(value) / len(timesteps)
    return totals


# ----------------------------------------------------------------------------- sampling


@functools.lru_cache(maxsize=4)
def sampling_diffusion(respacing: str, predict_xstart: bool = PREDICT_XSTART) -> GaussianDiffusion:
    """The respaced learned-sigma diffusion for sampling (cached so its compiled loops are reused)."""
    return create_diffusion(respacing, predict_xstart=predict_xstart)


def sample_digits(model: DiT, labels: np.ndarray, key: jax.Array, *, cfg_scale: float,
                  respacing: str = "ddim25") -> np.ndarray:
    """Class-conditional DDIM (eta 0) samples with classifier-free guidance through `DiT.forward_with_cfg`.

    The batch is doubled (conditional labels, then the null class) as upstream's ``sample.py`` does; guidance
    applies to the first 3 output channels, which here are all the image channels. Predicted x0 is clipped
    to [-1, 1] at every step (pixel space).

    Args:
        model: A pixel-space DiT (maybe quantized).
        labels: ``[B]`` int classes.
        key: PRNG key; the samples are a deterministic function of it.
        cfg_scale: Guidance scale (1 = no guidance).
        respacing: Sampler respacing (``"ddim25"`` ...).

    Returns:
        ``[B, H, W, C]`` float32 in [-1, 1] (numpy).
    """
    out = _cfg_ddim(model, labels, key, cfg_scale, sampling_diffusion(respacing), return_steps=False)
    return np.clip(np.asarray(out[:len(labels)]), -1.0, 1.0)


def _cfg_ddim(model: DiT, labels: np.ndarray, key: jax.Array, cfg_scale: float, diffusion: GaussianDiffusion, *,
              return_steps: bool):
    """DDIM from noise drawn from `key`, the batch doubled for CFG (``labels`` then the null class, the same
    noise); returns the loop's ``[2B, ...]`` output (and steps) and the doubled noise and labels."""
    labels = jnp.asarray(labels, jnp.int32)
    batch = labels.shape[0]
    shape = (batch, model.input_size, model.input_size, model.in_channels)
    noise_key, loop_key = jax.random.split(key)
    noise = draws.normal(noise_key, shape, jnp.float32)
    doubled_noise = jnp.concatenate([noise, noise], axis=0)  # [2B, H, W, C]
    doubled_labels = jnp.concatenate([labels, jnp.full((batch,), model.num_classes, jnp.int32)])  # [2B]
    out = diffusion.ddim_sample_loop(
        model.forward_with_cfg, doubled_noise.shape, doubled_noise, key=loop_key, clip_denoised=True,
        model_kwargs={"y": doubled_labels, "cfg_scale": jnp.float32(cfg_scale)}, return_steps=return_steps)
    return (out, doubled_noise, doubled_labels) if return_steps else out


def sampling_trajectory(model: DiT, labels: np.ndarray, key: jax.Array, *, cfg_scale: float,
                        respacing: str = "ddim25") -> tuple[jax.Array, np.ndarray, np.ndarray]:
    """What the network sees while `sample_digits` runs: its input at every sampling step.

    Args:
        model, labels, key, cfg_scale, respacing: As for `sample_digits` (the same trajectories).

    Returns:
        ``(x_t [S, 2B, H, W, C] float32, t [S] int32 on the 1000-step scale, labels [2B] int32)`` for the S
        steps in sampling order; rows are the conditional batch then its null-class copy, as CFG runs them.
    """
    diffusion = sampling_diffusion(respacing)
    (_, steps), doubled_noise, doubled_labels = _cfg_ddim(model, labels, key, cfg_scale, diffusion,
                                                          return_steps=True)
    # The input of step i is x_T for i = 0, else the sample step i - 1 produced.
    x_t = jnp.concatenate([doubled_noise[None], steps["sample"][:-1]], axis=0)  # [S, 2B, H, W, C]
    t = diffusion.timestep_map[::-1].astype(np.int32)  # step i runs index S - 1 - i
    return x_t, t, np.asarray(doubled_labels)


# ----------------------------------------------------------------------------- family members


@dataclasses.dataclass
class DiTMember:
    """One trained demo DiT (satisfies `bitlaws.demo.family.DemoMember`)."""

    name: str
    model: DiT
    cfg_scale: float
    respacing: str
    metadata: dict[str, Any]
    family: str = FAMILY
    quant_pattern: str = QUANT_PATTERN

    def sample(self, model: nnx.Module, labels: np.ndarray, key: jax.Array) -> np.ndarray:
        """``[B, 16, 16, 3]`` float32 samples in [-1, 1] of `labels` drawn with `model` (maybe quantized)."""
        return sample_digits(model, labels, key, cfg_scale=self.cfg_scale, respacing=self.respacing)

    def calibration_batches(self, num_batches: int, batch_size: int, seed: int,
                            source: str = "data") -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        """``(x_t [B, 16, 16, 3], t [B], labels [B])`` batches (t on the 1000-step scale the network sees).

        ``source="samples"`` (the protocol of PTQ4DiT / Q-Diffusion): the inputs the network receives along the
        float model's own CFG sampling trajectories (the member's sampler and guidance) for ``batch_size``
        samples with labels spread evenly over the classes; every (timestep, conditional or null row) pair of
        the trajectories is a candidate and ``num_batches * batch_size`` of them are drawn without replacement.
        ``source="data"``: real digits noised at t uniform over the 1000 training steps, half of the labels the
        null class.
        """
        if source == "samples":
            return self._trajectory_batches(num_batches, batch_size, seed)
        if source != "data":
            raise ValueError(f"DiT calibration source must be 'samples' or 'data', got {source!r}")
        diffusion = training_diffusion()
        batches = []
        for images, labels, rng in calibration_digits(num_batches, batch_size, seed, self.model.num_classes):
            t = rng.integers(0, diffusion.num_timesteps, size=batch_size).astype(np.int32)
            noise = rng.standard_normal(images.shape).astype(np.float32)
            x_t = q_sample(diffusion, jnp.asarray(images), jnp.asarray(t), jnp.asarray(noise))
            batches.append((x_t, jnp.asarray(t), jnp.asarray(labels)))
        return batches

    def _trajectory_batches(self, num_batches: int, batch_size: int,
                            seed: int) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        labels = spread_labels(batch_size, self.model.num_classes, seed)
        x_t, t, doubled = sampling_trajectory(self.model, labels, jax.random.key(seed), cfg_scale=self.cfg_scale,
                                              respacing=self.respacing)  # [S, 2B, ...], [S], [2B]
        steps, rows = x_t.shape[0], x_t.shape[1]
        n = num_batches * batch_size
        rng = np.random.default_rng([seed, 2])
        picks = rng.choice(steps * rows, n, replace=n > steps * rows)
        step_index, row_index = picks // rows, picks % rows
        flat_x = np.asarray(x_t)[step_index, row_index]  # [n, H, W, C]
        flat_t, flat_y = np.asarray(t)[step_index], np.asarray(doubled)[row_index]
        return [(jnp.asarray(flat_x[i:i + batch_size]), jnp.asarray(flat_t[i:i + batch_size], jnp.int32),
                 jnp.asarray(flat_y[i:i + batch_size], jnp.int32)) for i in range(0, n, batch_size)]

    def calibration_protocol(self, source: str) -> str:
        if source == "samples":
            return (f"network inputs along the float model's own sampling trajectories ({self.respacing}, cfg "
                    f"{self.cfg_scale}; conditional and null-class rows), labels spread evenly over the classes, "
                    f"(timestep, row) pairs drawn uniformly")
        return ("real training digits noised at timesteps uniform over the 1000 training steps, half of the labels "
                "the null class")

    def calibration_forward(self, model: nnx.Module, batch: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        """The DiT's output ``[B, 16, 16, 6]`` on one calibration batch (`nnx.jit`-compiled)."""
        return _denoiser_output_jit(model, *batch)

    def calibration_apply(self, model: nnx.Module, batch: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        """`calibration_forward` un-jitted (for tracing inside a compiled step)."""
        return _denoiser_output(model, *batch)


def _denoiser_output(model: DiT, x_t: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
    return model(x_t, t, labels)


_denoiser_output_jit = nnx.jit(_denoiser_output)


def member_names() -> list[str]:
    """The shipped members (``dit-d2`` ...), smallest first."""
    names = [path.name for path in CHECKPOINT_ROOT.glob(f"{FAMILY}-d*") if (path / "bitlaws.json").exists()]
    return sorted(names, key=lambda name: int(name.split("-d", 1)[1]))


def load_from_dir(directory: Union[str, pathlib.Path], name: Optional[str] = None) -> DiTMember:
    """Loads a demo DiT checkpoint written by `train_from_config` (the ``model`` folder) or a shipped one."""
    metadata = load_metadata(directory)
    model_kwargs = dict(metadata["model"])
    model = load_model(lambda: DiT(**model_kwargs, rngs=nnx.Rngs(0)), directory)
    sampling = metadata.get("sampling", {})
    return DiTMember(name=name or metadata.get("name", pathlib.Path(directory).name), model=model,
                     cfg_scale=float(sampling.get("cfg_scale", 2.0)),
                     respacing=str(sampling.get("respacing", "ddim25")), metadata=metadata)


def load(name: str) -> DiTMember:
    """Loads the shipped member `name` (``"dit-d4"``)."""
    directory = CHECKPOINT_ROOT / name
    if not (directory / "bitlaws.json").exists():
        raise ValueError(f"no shipped demo DiT {name!r}; available: {member_names()}")
    return load_from_dir(directory, name)


register_family(FAMILY, member_names, load)


# ----------------------------------------------------------------------------- training

TRAIN_KEYS_NOT_IN_LOOP = digits_training.TRAIN_KEYS_NOT_IN_LOOP
_batch_indices = digits_training.batch_indices  # moved to `bitlaws.demo.digits_training` (shared with MAR)


def _train_loss(model: DiT, batch: tuple[jax.Array, jax.Array], key: jax.Array) -> tuple[jax.Array, dict]:
    """The batch's mean training loss: uniform timesteps, Gaussian noise and label dropout drawn from `key`."""
    images, labels = batch
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    t = jax.random.randint(t_key, (images.shape[0],), 0, training_diffusion().num_timesteps)  # [B]
    noise = jax.random.normal(noise_key, images.shape, jnp.float32)
    terms = model_loss_terms(model, images, labels, t, noise, dropout_key=dropout_key)
    return terms["loss"].mean(), {name: value.mean() for name, value in terms.items()}


def train_from_config(config: ml_collections.ConfigDict, out_dir: Union[str, pathlib.Path], *,
                      progress: bool = True, command: str = "") -> dict[str, Any]:
    """Trains (or resumes training of) one demo DiT with `bitlaws.train` and exports its EMA weights.

    Layout of `out_dir`: ``train_state/`` (orbax: params, EMA, optimizer state and step, written every
    ``config.train.checkpoint_every`` steps and at the end; an existing one is resumed from), ``metrics.jsonl``
    (the logged steps), ``model/`` (the EMA model via `bitlaws.checkpoint.save_model`, loadable with
    `load_from_dir`; this folder is what ships as ``bitlaws/demo/checkpoints/<name>/``) and ``summary.json``.

    Args:
        config: ``configs/demo/dit.py`` config.
        out_dir: Output folder.
        progress: Show a tqdm progress bar.
        command: The command line to record in the summary.

    Returns:
        The summary: name, params, steps, resumed_from, wall_s (this run), train losses (mean of the logged
        steps among the last 100 of this run), val losses of the EMA model at `VAL_TIMESTEPS`, and paths.
    """
    if config.family != FAMILY:
        raise ValueError(f"config family is {config.family!r}, expected {FAMILY!r}")
    model = make_model(config.model.to_dict(), seed=config.train.seed)
    return digits_training.train_digits_model(config, out_dir, model, _train_loss, evaluate_loss,
                                              summary_extra={"val_timesteps": list(VAL_TIMESTEPS)},
                                              progress=progress, command=command)


def train_from_config_path(config_spec: str, out_dir: Optional[Union[str, pathlib.Path]] = None, *,
                           overrides: tuple[str, ...] = (), progress: bool = True) -> dict[str, Any]:
    """`train_from_config` for ``"configs/demo/dit.py:depth=4"`` (`digits_training.train_from_config_path`)."""
    return digits_training.train_from_config_path(train_from_config, config_spec, out_dir, overrides=overrides,
                                                  progress=progress)
