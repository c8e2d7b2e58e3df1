"""The demo MAR family: pixel-space MARs (`bitlaws.models.mar.MAR`) trained on the 16x16 digits.

Members ``mar-d1`` ... are MARs over the ``[B, 16, 16, 3]`` digits in [-1, 1] themselves (no VAE:
``vae_stride=1``, ``vae_embed_dim=3``): 4x4 patches give 16 tokens of 48 values (as the demo DiTs' patches).
Encoder and decoder have ``depth`` blocks each, 4 buffer rows, 10 classes plus ``fake_latent`` for
classifier-free guidance, and a small diffusion MLP (``configs/demo/mar.py`` lists the sizes). Their checkpoints
(EMA weights, float32) ship in ``bitlaws/demo/checkpoints/mar-d*/`` and are reproduced by `train_from_config`.

Training is upstream's objective (`bitlaws.models.mar_losses`): random orders, masking rate from the truncated
normal on ``[0.7, 1]``, label dropout 0.1, the head's learned-sigma eps loss (mse + vb, cosine schedule, 1000
steps) on the masked tokens; ``diffusion_batch_mul`` is 1, not upstream's 4 (here the transformer is cheap and
the head rows are the cost). Sampling is upstream's loop (`bitlaws.sample.mar_sampler.sample_tokens`: random
orders, cosine mask schedule, linear CFG, temperature) with the settings stored in each checkpoint's
``bitlaws.json``, plus two pixel-space options of the sampler: the head's x0 is clipped to [-1, 1] at every step
and its variance values are clipped to [-1, 1]. The second one is essential: in the 1000-step training schedule
beta and the posterior variance nearly coincide at small t, so training leaves the variance values there
unconstrained; the respaced sampler extrapolates them (variances ~1e4 were seen at t = 20) and without the clip
the members sampled noise. The tokens are the image, clipped to [-1, 1].

Importing this module registers the ``mar`` family with `bitlaws.demo.family.register_family`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bitlaws.checkpoint import load_metadata, load_model
from bitlaws.demo import digits_training
from bitlaws.demo.family import calibration_digits, register_family, spread_labels
from bitlaws.models import mar_losses
from bitlaws.models.mar import MAR, param_count
from bitlaws.sample import mar_sampler
from bitlaws.sample.diffusion_losses import q_sample

FAMILY = "mar"
CHECKPOINT_ROOT = pathlib.Path(__file__).resolve().parent / "checkpoints"
VAL_SEEDS = (0, 1, 2, 3)  # fixed draws (masks, timesteps, noise) of the validation loss
DEFAULT_SAMPLING = {"num_iter": 8, "num_sampling_steps": "25", "cfg": 2.0, "cfg_schedule": "linear",
                    "temperature": 1.0, "clip_denoised": True, "clamp_variance": True}
PREDICT_XSTART = False  # the demo heads predict eps, as upstream (metadata "diffusion.predict_xstart")

QUANT_PATTERN = (r"z_proj|decoder_embed"
                 r"|(encoder|decoder)_blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
                 r"|diffloss\.(time_embed\.(mlp_in|mlp_out)|cond_embed|input_proj"
                 r"|res_blocks\.\d+\.(mlp_in|mlp_out|adaLN_modulation)|final_layer\.(linear|adaLN_modulation))")
"""Module paths quantized in the sweep: every linear layer of MAR, the diffusion head included (the generator
the paper quantizes): the token projection ``z_proj``, every block's ``attn.qkv``, ``attn.proj``, ``mlp.fc1``,
``mlp.fc2`` (encoder and decoder), ``decoder_embed``, and in the head ``time_embed.mlp_in``/``mlp_out``,
``cond_embed``, ``input_proj``, every residual block's ``mlp_in``, ``mlp_out``, ``adaLN_modulation`` and the
final layer's ``linear``/``adaLN_modulation``. Not linears, left in float: the class table, ``fake_latent``,
``mask_token``, the learned position embeddings and the LayerNorms."""


# ----------------------------------------------------------------------------- model construction


def make_model(model_kwargs: dict[str, Any], seed: int = 0) -> MAR:
    """A MAR with upstream's initialisation (``MAR.initialize_weights`` + ``SimpleMLPAdaLN.initialize_weights``).

    Linear kernels Xavier uniform, biases zero, LayerNorms (1, 0); the class table, ``fake_latent``,
    ``mask_token``, the position embeddings and the head's timestep MLP ``N(0, 0.02)``; every adaLN modulation of
    the head and its final linear zero (each residual block starts as the identity, the output as zero).

    Args:
        model_kwargs: `MAR` constructor arguments (without ``rngs``).
        seed: numpy seed.

    Returns:
        The concrete model (float32).
    """
    graphdef, state = nnx.split(abstract_model(model_kwargs))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(part) for part in path)
        var.set_value(jnp.asarray(_initial_value(name, tuple(var.get_value().shape), rng)))
    return nnx.merge(graphdef, state)


def _initial_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The upstream initial value of the parameter at dotted path `name` (float32, `shape`)."""
    if name.endswith(".scale"):  # LayerNorm
        return np.ones(shape, np.float32)
    if (name.endswith(".bias") or "adaLN_modulation" in name or name.startswith("diffloss.final_layer.linear")):
        return np.zeros(shape, np.float32)
    if not name.endswith(".kernel") or name.startswith("diffloss.time_embed."):
        return rng.normal(0.0, 0.02, shape).astype(np.float32)
    limit = math.sqrt(6.0 / (shape[0] + shape[1]))  # Xavier uniform, kernels [in, out]
    return rng.uniform(-limit, limit, shape).astype(np.float32)


def abstract_model(model_kwargs: dict[str, Any]) -> MAR:
    """The MAR of `model_kwargs` built with `nnx.eval_shape` (shapes only, no weights)."""
    return nnx.eval_shape(lambda: MAR(**model_kwargs, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
    """Number of parameters (`nnx.Param` elements)."""
    return param_count(model)


# ----------------------------------------------------------------------------- sampling


def sample_digits(model: MAR, labels: np.ndarray, key: jax.Array, *, num_iter: int, num_sampling_steps: str,
                  cfg: float, cfg_schedule: str = "linear", temperature: float = 1.0, clip_denoised: bool = True,
                  clamp_variance: bool = True, predict_xstart: bool = PREDICT_XSTART) -> np.ndarray:
    """Class-conditional MAR samples (`mar_sampler.sample_tokens`); the tokens are the image.

    Args:
        model: A pixel-space MAR (maybe quantized).
        labels: ``[B]`` int classes.
        key: PRNG key; the samples are a deterministic function of it.
        num_iter: Autoregressive iterations.
        num_sampling_steps: Respacing of the head's cosine diffusion (``"50"``).
        cfg: Guidance scale (1: none), ramped over iterations by `cfg_schedule`.
        cfg_schedule: ``"linear"`` or ``"constant"``.
        temperature: Scales the head's per-step noise.
        clip_denoised: Clip the head's x0 prediction to [-1, 1] at every step.
        clamp_variance: Clip the head's variance values to [-1, 1] (`mar_sampler.sample_head`).
        predict_xstart: The head predicts x0 (the demo members) rather than eps (upstream).

    Returns:
        ``[B, 16, 16, 3]`` float32 in [-1, 1] (numpy).
    """
    images = mar_sampler.sample_tokens(model, jnp.asarray(labels, jnp.int32), num_iter=num_iter, cfg=cfg,
                                       cfg_schedule=cfg_schedule, temperature=temperature, key=key,
                                       diffusion=mar_sampler.head_diffusion(num_sampling_steps, predict_xstart),
                                       clip_denoised=clip_denoised, clamp_variance=clamp_variance)
    return np.clip(np.asarray(images, np.float32), -1.0, 1.0)


# ----------------------------------------------------------------------------- calibration


def _conditioning(model: MAR, labels: jax.Array) -> jax.Array:
    """Class embeddings ``[B, D]``; label ``num_classes`` stands for ``fake_latent`` (the CFG null class)."""
    null = (labels == model.num_classes)[:, None]
    cond = model.class_embedding(jnp.minimum(labels, model.num_classes - 1))
    return jnp.where(null, model.uncond_embedding(labels.shape[0]), cond)


def _network_output(model: MAR, tokens: jax.Array, mask: jax.Array, labels: jax.Array, head_x: jax.Array,
                    head_t: jax.Array, head_index: jax.Array) -> jax.Array:
    """The transformer on ``(tokens [B, L, C], mask [B, L], labels [B])``, then the head on ``head_x [N, C]`` at
    original timesteps ``head_t [N]`` conditioned on the z rows ``head_index [N]`` (into the ``B*L`` rows):
    ``[N, 2C]``."""
    z = model(tokens, mask, _conditioning(model, labels))  # [B, L, D]
    z_rows = z.reshape(-1, z.shape[-1])[head_index]  # [N, D]
    return model.diffloss(head_x, head_t, z_rows)


_network_output_jit = nnx.jit(_network_output)


def _data_batches(model: MAR, num_batches: int, batch_size: int, seed: int) -> list[tuple[jax.Array, ...]]:
    """Real digits as in training: upstream masking, half of the labels null; head rows at every position,
    noised at t uniform over the training steps."""
    diffusion = mar_losses.training_diffusion()
    batches = []
    for images, labels, rng in calibration_digits(num_batches, batch_size, seed, model.num_classes):
        tokens = model.patchify(jnp.asarray(images))  # [B, L, C]
        b, length, channels = tokens.shape
        mask = mar_losses.random_mask(jax.random.key(int(rng.integers(2**31))), b, length, model.mask_ratio_min)
        t = jnp.asarray(rng.integers(0, diffusion.num_timesteps, size=b * length), jnp.int32)
        noise = jnp.asarray(rng.standard_normal((b * length, channels)), jnp.float32)
        head_x = q_sample(diffusion, tokens.reshape(-1, channels), t, noise)
        batches.append((tokens, mask, jnp.asarray(labels, jnp.int32), head_x, t, jnp.arange(b * length)))
    return batches


def _trajectory_batches(model: MAR, sampling: dict[str, Any], predict_xstart: bool, num_batches: int,
                        batch_size: int, seed: int) -> list[tuple[jax.Array, ...]]:
    """Network inputs along the float model's own sampling of ``batch_size`` digits (labels spread evenly).

    Each calibration row is one (iteration k, conditional or null row g, sample b) of the loop: the tokens and
    mask the transformer saw then, and the head inputs of that iteration's predicted positions at one diffusion
    step s >= 1 (the noisy token the step received, its original timestep). Rows are drawn uniformly.
    """
    labels = spread_labels(batch_size, model.num_classes, seed)
    diffusion = mar_sampler.head_diffusion(sampling["num_sampling_steps"], predict_xstart)
    _, records = mar_sampler.sample_tokens(
        model, jnp.asarray(labels), key=jax.random.key(seed), return_steps=True, num_iter=sampling["num_iter"],
        cfg=sampling["cfg"], cfg_schedule=sampling["cfg_schedule"], temperature=sampling["temperature"],
        diffusion=diffusion, clip_denoised=sampling["clip_denoised"], clamp_variance=sampling["clamp_variance"])
    num_iter, steps = len(records["counts"]), diffusion.num_timesteps
    n_max, seq_len = int(np.max(records["counts"])), model.seq_len
    groups = 2 if sampling["cfg"] != 1.0 else 1
    tokens_after = np.asarray(records["tokens_after"])  # [K, B, L, C]
    mask_in, to_pred = np.asarray(records["mask_in"]), np.asarray(records["mask_to_pred"])  # [K, B, L]
    x_out = np.asarray(records["x_out"])  # [K, S, G*B*n_max, C]; uncond rows reuse the cond rows' x
    timesteps = np.asarray(diffusion.timestep_map)[::-1]  # scan step s runs index S - 1 - s
    rng = np.random.default_rng([seed, 2])
    batches = []
    for _ in range(num_batches):
        k = rng.integers(0, num_iter, batch_size)
        g = rng.integers(0, groups, batch_size)
        b = rng.integers(0, batch_size, batch_size)
        s = rng.integers(1, steps, batch_size) if steps > 1 else np.zeros(batch_size, np.int64)
        tokens = np.where((k > 0)[:, None, None], tokens_after[np.maximum(k - 1, 0), b], 0.0)
        positions = np.argsort(~to_pred[k, b].astype(bool), axis=1, kind="stable")[:, :n_max]  # [B, n_max]
        rows = b[:, None] * n_max + np.arange(n_max)[None, :]  # cond rows of the padded head layout
        head_x = x_out[k[:, None], np.maximum(s - 1, 0)[:, None], rows]  # [B, n_max, C]
        batches.append((jnp.asarray(tokens, jnp.float32), jnp.asarray(mask_in[k, b], jnp.float32),
                        jnp.asarray(np.where(g == 0, labels[b], model.num_classes), jnp.int32),
                        jnp.asarray(head_x.reshape(batch_size * n_max, -1), jnp.float32),
                        jnp.asarray(np.repeat(timesteps[s], n_max), jnp.int32),
                        jnp.asarray((np.arange(batch_size)[:, None] * seq_len + positions).reshape(-1), jnp.int32)))
    return batches


# ----------------------------------------------------------------------------- family members


@dataclasses.dataclass
class MARMember:
    """One trained demo MAR (satisfies `bitlaws.demo.family.DemoMember`)."""

    name: str
    model: MAR
    sampling: dict[str, Any]
    metadata: dict[str, Any]
    predict_xstart: bool = PREDICT_XSTART
    family: str = FAMILY
    quant_pattern: str = QUANT_PATTERN

    def sample(self, model: nnx.Module, labels: np.ndarray, key: jax.Array) -> np.ndarray:
        """``[B, 16, 16, 3]`` float32 samples in [-1, 1] of `labels` drawn with `model` (maybe quantized)."""
        return sample_digits(model, labels, key, predict_xstart=self.predict_xstart, **self.sampling)

    def calibration_batches(self, num_batches: int, batch_size: int, seed: int,
                            source: str = "data") -> list[tuple[jax.Array, ...]]:
        """``(tokens [B, L, C], mask [B, L], labels [B], head_x [N, C], head_t [N], head_index [N])`` batches.

        Labels equal to ``num_classes`` mean ``fake_latent``; ``head_t`` is on the 1000-step scale the head sees;
        ``head_index`` picks the z row (of the ``B*L``) that conditions each head row. ``source="samples"``:
        inputs along the float model's own sampling (`_trajectory_batches`, N = B * n_max); ``"data"``: real
        digits masked as in training, head rows at every position noised at uniform t (N = B * L).
        """
        if source == "samples":
            return _trajectory_batches(self.model, self.sampling, self.predict_xstart, num_batches, batch_size, seed)
        if source != "data":
            raise ValueError(f"MAR calibration source must be 'samples' or 'data', got {source!r}")
        return _data_batches(self.model, num_batches, batch_size, seed)

    def calibration_protocol(self, source: str) -> str:
        s = self.sampling
        if source == "samples":
            return (f"transformer and diffusion-head inputs along the float model's own sampling (num_iter "
                    f"{s['num_iter']}, {s['num_sampling_steps']} head steps, cfg {s['cfg']} {s['cfg_schedule']}; "
                    f"conditional and fake-latent rows), labels spread evenly over the classes, (iteration, row, "
                    f"head step) drawn uniformly")
        return ("real training digits masked as in training (random orders, truncated-normal rate), half of the "
                "labels the fake latent; head rows at every position noised at timesteps uniform over 1000 steps")

    def calibration_forward(self, model: nnx.Module, batch: tuple[jax.Array, ...]) -> jax.Array:
        """The head's output ``[N, 2C]`` on one calibration batch (`nnx.jit`-compiled)."""
        return _network_output_jit(model, *batch)

    def calibration_apply(self, model: nnx.Module, batch: tuple[jax.Array, ...]) -> jax.Array:
        """`calibration_forward` un-jitted (for tracing inside a compiled step)."""
        return _network_output(model, *batch)


def member_names() -> list[str]:
    """The shipped members (``mar-d1`` ...), smallest first."""
    names = [path.name for path in CHECKPOINT_ROOT.glob(f"{FAMILY}-d*") if (path / "bitlaws.json").exists()]
    return sorted(names, key=lambda name: int(name.split("-d", 1)[1]))


def _shipped_dir(name: str) -> pathlib.Path:
    directory = CHECKPOINT_ROOT / name
    if not (directory / "bitlaws.json").exists():
        raise ValueError(f"no shipped demo MAR {name!r}; available: {member_names()}")
    return directory


def abstract_member(name: str) -> MAR:
    """The shipped member `name`'s MAR built from its metadata with `nnx.eval_shape` (no weights read)."""
    return abstract_model(dict(load_metadata(_shipped_dir(name))["model"]))


def load_from_dir(directory: Union[str, pathlib.Path], name: Optional[str] = None) -> MARMember:
    """Loads a demo MAR checkpoint written by `train_from_config` (the ``model`` folder) or a shipped one."""
    metadata = load_metadata(directory)
    model_kwargs = dict(metadata["model"])
    model = load_model(lambda: MAR(**model_kwargs, rngs=nnx.Rngs(0)), directory)
    sampling = {**DEFAULT_SAMPLING, **metadata.get("sampling", {})}
    sampling = {"num_iter": int(sampling["num_iter"]), "num_sampling_steps": str(sampling["num_sampling_steps"]),
                "cfg": float(sampling["cfg"]), "cfg_schedule": str(sampling["cfg_schedule"]),
                "temperature": float(sampling["temperature"]), "clip_denoised": bool(sampling["clip_denoised"]),
                "clamp_variance": bool(sampling["clamp_variance"])}
    return MARMember(name=name or metadata.get("name", pathlib.Path(directory).name), model=model,
                     sampling=sampling, metadata=metadata,
                     predict_xstart=bool(metadata.get("diffusion", {}).get("predict_xstart", False)))


def load(name: str) -> MARMember:
    """Loads the shipped member `name` (``"mar-d2"``)."""
    return load_from_dir(_shipped_dir(name), name)


register_family(FAMILY, member_names, load)


# ----------------------------------------------------------------------------- training


@functools.lru_cache(maxsize=2)
def train_loss_fn(predict_xstart: bool = PREDICT_XSTART) -> Callable[..., tuple[jax.Array, dict]]:
    """``loss_fn(model, (images, labels), key) -> (loss, metrics)`` for `bitlaws.train.train_module` (cached: one
    function object per head parameterisation, so the trainer's compiled step is reused)."""
    diffusion = mar_losses.training_diffusion(predict_xstart)

    def loss_fn(model: MAR, batch: tuple[jax.Array, jax.Array], key: jax.Array) -> tuple[jax.Array, dict]:
        images, labels = batch
        terms = mar_losses.training_loss_terms(model, images, labels, key, diffusion=diffusion)
        return terms["loss"], terms

    return loss_fn


@functools.partial(nnx.jit, static_argnames=("predict_xstart",))
def _val_terms(model: MAR, images: jax.Array, labels: jax.Array, key: jax.Array,
               predict_xstart: bool) -> dict[str, jax.Array]:
    return mar_losses.training_loss_terms(model, images, labels, key, drop_labels=False,
                                          diffusion=mar_losses.training_diffusion(predict_xstart))


def evaluate_loss(model: MAR, images: np.ndarray, labels: np.ndarray, *, predict_xstart: bool = PREDICT_XSTART,
                  seeds: tuple[int, ...] = VAL_SEEDS) -> dict[str, float]:
    """The training loss on `images` without label dropout, averaged over the fixed draws of `seeds`.

    Returns:
        ``{"loss", "mse", "vb"}`` python floats (masked means).
    """
    images, labels = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
    totals = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
    for seed in seeds:
        terms = _val_terms(model, images, labels, jax.random.key(seed), predict_xstart)
        for name in totals:
            totals[name] += float(terms[name]) / len(seeds)
    return totals


def train_from_config(config: ml_collections.ConfigDict, out_dir: Union[str, pathlib.Path], *,
                      progress: bool = True, command: str = "") -> dict[str, Any]:
    """Trains (or resumes training of) one demo MAR with `bitlaws.train` and exports its EMA weights.

    Layout of `out_dir`: see `bitlaws.demo.digits_training` (``model/`` is what ships as
    ``bitlaws/demo/checkpoints/<name>/``).

    Args:
        config: ``configs/demo/mar.py`` config.
        out_dir: Output folder.
        progress: Show a tqdm progress bar.
        command: The command line to record in the summary.

    Returns:
        The summary: name, params, steps, resumed_from, wall_s (this run), train losses (mean of the logged
        steps among the last 100 of this run), val losses of the EMA model (`evaluate_loss`), and paths.
    """
    if config.family != FAMILY:
        raise ValueError(f"config family is {config.family!r}, expected {FAMILY!r}")
    predict_xstart = bool(config.diffusion.predict_xstart)
    model = make_model(config.model.to_dict(), seed=config.train.seed)
    return digits_training.train_digits_model(
        config, out_dir, model, train_loss_fn(predict_xstart),
        functools.partial(evaluate_loss, predict_xstart=predict_xstart),
        summary_extra={"val_seeds": list(VAL_SEEDS)}, metadata_extra={"diffusion": config.diffusion.to_dict()},
        progress=progress, command=command)


def train_from_config_path(config_spec: str, out_dir: Optional[Union[str, pathlib.Path]] = None, *,
                           overrides: tuple[str, ...] = (), progress: bool = True) -> dict[str, Any]:
    """`train_from_config` for ``"configs/demo/mar.py:depth=2"``."""
    return digits_training.train_from_config_path(train_from_config, config_spec, out_dir, overrides=overrides,
                                                  progress=progress)
