"""Parity check of the ``mar`` fixture: MAR's transformer, diffusion head, sampling diffusion and token loop.

Everything is read from the manifest and the io file (constructor, labels, seeds, cfg, temperature, num_iter,
schedules), so another configuration of the same fixture checks the same way. Random draws that numpy can
replay (``np.random.shuffle`` orders, scipy's truncnorm mask rate) are recomputed and compared; torch draws are
taken from the fixture (``*.init_noise``, ``*.step_noise``, ``*.noise``, ``train.t``, ``train.label_drop_rand``).
Groups: ``sched.*`` (schedules), ``mae.*`` (encoder/decoder), ``net.*`` (the MLP), ``diff.*`` (head sampling),
``pstep.*`` (single steps), ``loss.*`` / ``train.*`` (training losses), ``gen*.*`` (the sampling loop with the
mar_vae fixture's decoder for the images).
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.models.dit import timestep_embedding
from bitlaws.models import mar_losses
from bitlaws.models.mar import MAR
from bitlaws.port.checks import mar_vae as mar_vae_check
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.mar import port_mar
from bitlaws.port.tables.mar_vae import port_mar_vae
from bitlaws.port.verify import Comparison, compare
from bitlaws.sample import mar_sampler
from bitlaws.sample.diffusion import GaussianDiffusion

FIXTURE = "mar"
_SCHEDULE_ATTRIBUTES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                        "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "timestep_map")


def _cmp(name: str, ours, ref) -> Comparison:
    return compare(FIXTURE, name, np.asarray(ours), ref)


def _scalar(io: dict, name: str, default: Any = None) -> Any:
    return float(np.asarray(io[name]).reshape(-1)[0]) if name in io else default


def numpy_orders(random_state: np.random.RandomState, batch: int, seq_len: int) -> np.ndarray:
    """Upstream ``sample_orders``: one ``np.random.shuffle``d ``arange(L)`` per row, ``[B, L]`` int64."""
    orders = []
    for _ in range(batch):
        order = np.arange(seq_len)
        random_state.shuffle(order)
        orders.append(order)
    return np.array(orders, dtype=np.int64)


def mask_from_orders(orders: np.ndarray, num_masked: int) -> np.ndarray:
    """Upstream ``random_masking`` / ``mask_by_order``: 1 at ``orders[:, :num_masked]``, ``[B, L]`` float32."""
    mask = np.zeros(orders.shape, np.float32)
    np.put_along_axis(mask, orders[:, :num_masked], 1.0, axis=1)
    return mask


@nnx.jit(static_argnames=("num_masked",))
def _mae(model: MAR, x, mask, labels, num_masked: int) -> dict[str, jax.Array]:
    batch = x.shape[0]
    cond, uncond = model.class_embedding(labels), model.uncond_embedding(batch)
    enc = model.forward_mae_encoder(x, mask, cond, num_masked=num_masked)
    enc_uncond = model.forward_mae_encoder(x, mask, uncond, num_masked=num_masked)
    ones = jnp.ones_like(mask)
    enc_all = model.forward_mae_encoder(jnp.zeros_like(x), ones, cond, num_masked=model.seq_len)
    return {"mae.enc_out": enc, "mae.z": model.forward_mae_decoder(enc, mask),
            "mae.enc_out_uncond": enc_uncond, "mae.z_uncond": model.forward_mae_decoder(enc_uncond, mask),
            "mae.z_allmasked": model.forward_mae_decoder(enc_all, ones)}


def _check_mae(model: MAR, io: dict, spec: dict) -> list[Comparison]:
    x_img = np.transpose(io["mae.x_img"], (0, 2, 3, 1))  # NCHW -> NHWC
    x = model.patchify(jnp.asarray(x_img))
    batch = x.shape[0]
    orders = numpy_orders(np.random.RandomState(spec["seeds"]["mae_orders_np"]), batch, model.seq_len)
    num_masked = int(round(float(io["mae.mask"][0].sum())))
    mask = mask_from_orders(orders, num_masked)
    results = [_cmp("mae.x", x, io["mae.x"]), _cmp("mae.orders", orders, io["mae.orders"]),
               _cmp("mae.mask", mask, io["mae.mask"])]
    ours = _mae(model, x, jnp.asarray(mask), jnp.asarray(io["labels"]), num_masked)
    return results + [_cmp(name, value, io[name]) for name, value in ours.items() if name in io]


@nnx.jit
def _net(model: MAR, x, t, c, cfg_x, c_uncond, cfg_scale) -> dict[str, jax.Array]:
    both = jnp.concatenate([t, t])
    return {"net.out": model.diffloss(x, t, c), "net.t_freq": timestep_embedding(t, 256),
            "net.cfg_out": model.diffloss.forward_with_cfg(cfg_x, both, jnp.concatenate([c, c_uncond]), cfg_scale)}


def _check_net(model: MAR, io: dict) -> list[Comparison]:
    ours = _net(model, *(jnp.asarray(io[f"net.{n}"]) for n in ("x", "t", "c", "cfg_x", "c_uncond")),
                jnp.float32(_scalar(io, "net.cfg_scale")))
    return [_cmp(name, value, io[name]) for name, value in ours.items()]


def _check_schedules(io: dict, gen: GaussianDiffusion, train: GaussianDiffusion, num_iter: int
                     ) -> list[Comparison]:
    results = []
    for prefix, diffusion in (("sched.gen.", gen), ("sched.train.", train)):
        for attribute in _SCHEDULE_ATTRIBUTES:
            for name in (f"{prefix}{attribute}_f64", f"{prefix}{attribute}"):
                if name in io:
                    results.append(_cmp(name, getattr(diffusion, attribute), io[name]))
    if "sched.mask_ratio_f64" in io:
        results.append(_cmp("sched.mask_ratio_f64", mar_sampler.mask_ratios(num_iter), io["sched.mask_ratio_f64"]))
    return results


def _head_fn(diffusion: GaussianDiffusion, guided: bool) -> Callable:
    @nnx.jit
    def run(model: MAR, z, noise, step_noise, temperature, cfg_scale):
        return mar_sampler.sample_head(model.diffloss, diffusion, z, noise, temperature=temperature,
                                       cfg_scale=cfg_scale if guided else None, step_noise=step_noise,
                                       return_steps=True)

    return run


def _check_head(model: MAR, io: dict, diffusion: GaussianDiffusion) -> list[Comparison]:
    """``diff.*``: `DiffLoss.sample` without and with guidance, replaying the recorded noise."""
    temperature = jnp.float32(_scalar(io, "diff.temperature", 1.0))
    results = []
    for mode, guided in (("plain", False), ("cfg", True)):
        prefix = f"diff.{mode}."
        z = io["diff.z"] if not guided else np.concatenate([io["diff.z"], io["diff.z_uncond"]])
        final, steps = _head_fn(diffusion, guided)(
            model, jnp.asarray(z), jnp.asarray(io[prefix + "init_noise"]), jnp.asarray(io[prefix + "step_noise"]),
            temperature, jnp.float32(_scalar(io, "diff.cfg_scale", 1.0)))
        rows = z.shape[0]
        index = np.repeat(np.arange(diffusion.num_timesteps - 1, -1, -1)[:, None], rows, axis=1)
        ours = {"out": final, "x_in": steps["x_in"], "x_out": steps["x_out"], "pred_xstart": steps["pred_xstart"],
                "t": index}
        results += [_cmp(prefix + name, value, io[prefix + name]) for name, value in ours.items()
                    if prefix + name in io]
    return results


def _pstep_fn(diffusion: GaussianDiffusion) -> Callable:
    @nnx.jit
    def run(model: MAR, x, c, index, noise, temperature):
        t = jnp.full((x.shape[0],), index, jnp.int32)
        out = diffusion.p_mean_variance(model.diffloss, x, t, clip_denoised=False, model_kwargs=dict(c=c))
        sample = diffusion.p_sample(model.diffloss, x, t, noise, clip_denoised=False, model_kwargs=dict(c=c),
                                    temperature=temperature)["sample"]
        model_out = model.diffloss(x, jnp.asarray(diffusion.timestep_map)[t], c)
        return dict(out, sample=sample, model_out=model_out)

    return run


def _check_pstep(model: MAR, io: dict, diffusion: GaussianDiffusion) -> list[Comparison]:
    """``pstep.*``: p_mean_variance and p_sample at every respaced index from one x_t."""
    run = _pstep_fn(diffusion)
    x, c = jnp.asarray(io["pstep.x"]), jnp.asarray(io["pstep.c"])
    temperature = jnp.float32(_scalar(io, "pstep.temperature", 1.0))
    indices = np.asarray(io["pstep.t"])
    per_step = [run(model, x, c, jnp.int32(i), jnp.asarray(io["pstep.noise"][n]), temperature)
                for n, i in enumerate(indices)]
    results = []
    for name in ("mean", "variance", "log_variance", "pred_xstart", "sample", "model_out"):
        if f"pstep.{name}" in io:
            results.append(_cmp(f"pstep.{name}", np.stack([np.asarray(s[name]) for s in per_step]),
                                io[f"pstep.{name}"]))
    return results


def _check_loss(model: MAR, io: dict, diffusion: GaussianDiffusion) -> list[Comparison]:
    """``loss.*``: the training losses at given timesteps (t = 0 included: the decoder-NLL branch of vb)."""
    run = nnx.jit(lambda m, x_start, t, c, noise: mar_losses.head_loss_terms(m.diffloss, diffusion, x_start, t, c,
                                                                             noise))
    terms = run(model, *(jnp.asarray(io[f"loss.{n}"]) for n in ("x_start", "t", "c", "noise")))
    mask = jnp.asarray(io["loss.mask"])
    terms["masked_mean"] = (jnp.sum(terms["loss"] * mask) / jnp.sum(mask)).reshape(1)
    return [_cmp(f"loss.{name}", value, io[f"loss.{name}"]) for name, value in terms.items() if f"loss.{name}" in io]


def _train_fn(diffusion: GaussianDiffusion) -> Callable:
    @nnx.jit
    def run(model: MAR, x_img, labels, mask, drop_rand, t, noise):
        tokens = model.patchify(x_img)  # [B, L, C]
        cond = model.drop_labels(model.class_embedding(labels), drop_rand)
        terms = mar_losses.masked_loss_terms(model, diffusion, tokens, mask, cond, t, noise)
        rows = tokens.shape[0] * tokens.shape[1]
        return {"train.target": terms["target"][:rows], "train.z": terms["z"][:rows], "train.mse": terms["mse"],
                "train.vb": terms["vb"], "train.loss_per_row": terms["loss"],
                "train.loss": terms["masked_loss"].reshape(1)}

    return run


def _check_train(model: MAR, io: dict, diffusion: GaussianDiffusion) -> list[Comparison]:
    """``train.*``: MAR.forward in training mode, replaying orders (numpy), mask rate (scipy) and torch draws."""
    x_img = jnp.asarray(np.transpose(io["mae.x_img"], (0, 2, 3, 1)))
    batch, seq_len = x_img.shape[0], model.seq_len
    random_state = np.random.RandomState(int(np.asarray(io["train.np_seed"]).reshape(-1)[0]))
    orders = numpy_orders(random_state, batch, seq_len)
    results = [_cmp("train.orders", orders, io["train.orders"])]
    try:
        from scipy import stats  # pylint: disable=g-import-not-at-top
    except ImportError:  # the mask count is then read from the fixture's mask
        num_masked = int(round(float(io["train.mask"][0].sum())))
    else:
        generator = stats.truncnorm((model.mask_ratio_min - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
        mask_rate = generator.rvs(1, random_state=random_state)
        results.append(_cmp("train.mask_rate_f64", mask_rate, io["train.mask_rate_f64"]))
        num_masked = int(np.ceil(seq_len * mask_rate[0]))
    mask = mask_from_orders(orders, num_masked)
    results.append(_cmp("train.mask", mask, io["train.mask"]))
    ours = _train_fn(diffusion)(model, x_img, jnp.asarray(io["labels"]), jnp.asarray(mask),
                                jnp.asarray(io["train.label_drop_rand"]), jnp.asarray(io["train.t"]),
                                jnp.asarray(io["train.noise"]))
    return results + [_cmp(name, value, io[name]) for name, value in ours.items() if name in io]


def _recorded_draws(io: dict, prefix: str, num_iter: int, groups: int, batch: int, n_max: int):
    init = [mar_sampler.pad_rows(io[f"{prefix}.step{k}.init_noise"], 1, batch, n_max) for k in range(num_iter)]
    steps = [mar_sampler.pad_rows(io[f"{prefix}.step{k}.step_noise"], groups, batch, n_max) for k in range(num_iter)]
    channels = init[0].shape[-1]
    return np.stack(init).reshape(num_iter, batch, n_max, channels), np.stack(steps)


@nnx.jit
def _decode(vae, tokens):
    return mar_sampler.decode_tokens(vae, tokens)


def _check_generation(model: MAR, vae, io: dict, spec: dict, prefix: str) -> list[Comparison]:
    """``gen*.*``: sample_tokens replaying the recorded orders and head noise, then VAE decoding."""
    kwargs = dict(spec.get("sample_tokens_kwargs", {}).get(prefix, {}))
    cfg = float(kwargs.get("cfg", _scalar(io, f"{prefix}.cfg", 1.0)))
    temperature = float(kwargs.get("temperature", _scalar(io, f"{prefix}.temperature", 1.0)))
    num_iter = int(kwargs.get("num_iter", sum(1 for k in io if k.startswith(f"{prefix}.step") and
                                              k.endswith(".mask_len"))))
    labels = np.asarray(io["labels"])
    batch, groups = labels.shape[0], 1 if cfg == 1.0 else 2
    seed = spec["seeds"].get("sample_tokens_np_and_torch", spec.get("gen_seed", 0))
    orders = numpy_orders(np.random.RandomState(seed), batch, model.seq_len)
    counts = mar_sampler.predicted_counts(model.seq_len, num_iter)
    n_max = int(counts.max())
    init_noise, step_noise = _recorded_draws(io, prefix, num_iter, groups, batch, n_max)
    tokens, records = mar_sampler.sample_tokens(
        model, labels, num_iter=num_iter, cfg=cfg, cfg_schedule=kwargs.get("cfg_schedule", "linear"),
        temperature=temperature, orders=jnp.asarray(orders), init_noise=init_noise, step_noise=step_noise,
        return_steps=True)
    results = [_cmp(f"{prefix}.orders", orders, io[f"{prefix}.orders"]),
               _cmp(f"{prefix}.cfg", np.float32([cfg]), io[f"{prefix}.cfg"]),
               _cmp(f"{prefix}.temperature", np.float32([temperature]), io[f"{prefix}.temperature"])]
    for k, count in enumerate(int(c) for c in counts):
        step = f"{prefix}.step{k}."
        ours = {"mask_in": records["mask_in"][k], "mask_to_pred": np.asarray(records["mask_to_pred"][k], np.int64),
                "mask_len": records["mask_len"][k:k + 1], "cfg_iter": records["cfg_iter"][k:k + 1],
                "tokens_after": records["tokens_after"][k],
                "sampled": np.asarray(records["sampled"][k])[:, :count].reshape(batch * count, -1),
                "z": mar_sampler.unpad_rows(records["z"][k], groups, batch, n_max, count),
                "x_out": mar_sampler.unpad_rows(records["x_out"][k], groups, batch, n_max, count)}
        results += [_cmp(step + name, value, io[step + name]) for name, value in ours.items() if step + name in io]
    results.append(_cmp(f"{prefix}.tokens", np.transpose(np.asarray(tokens), (0, 3, 1, 2)), io[f"{prefix}.tokens"]))
    if vae is not None and f"{prefix}.img" in io:
        image = _decode(vae, tokens)
        results.append(_cmp(f"{prefix}.img", np.transpose(np.asarray(image), (0, 3, 1, 2)), io[f"{prefix}.img"]))
    return results


def _vae(folder: pathlib.Path, manifest: dict):
    """The mar_vae fixture's VAE (decodes ``gen*.img``), or None if the manifest has no such fixture."""
    entry = manifest["fixtures"].get("mar_vae")
    if entry is None:
        return None
    return port_mar_vae(mar_vae_check.load_weights(folder, entry), **mar_vae_check.ctor_from_manifest(entry))


GROUPS = ("sched", "mae", "net", "diff", "pstep", "loss", "train", "gen")
"""Array groups `check` compares (``gen`` covers ``gen.*`` and ``gen_nocfg.*``, the slowest to compile)."""


def check(folder: pathlib.Path, manifest: dict, *, groups: tuple[str, ...] = GROUPS) -> list[Comparison]:
    """Ports the fixture weights, replays every recorded call and compares every array we can reproduce.

    Args:
        folder: Fixture folder.
        manifest: Its ``manifest.json``.
        groups: Which array groups to compare (`GROUPS`; default all).

    Raises:
        ValueError: an unknown group.
    """
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"groups: unknown {unknown} (choose from {GROUPS})")
    folder = pathlib.Path(folder)
    spec = manifest["fixtures"][FIXTURE]
    io = read_safetensors(folder / spec.get("file_io", f"{FIXTURE}_io.safetensors"))
    model = port_mar(mar_vae_check.load_weights(folder, spec), **spec["ctor"]["kwargs"])
    gen_diffusion = mar_sampler.head_diffusion(model.num_sampling_steps)
    train_diffusion = mar_losses.training_diffusion()
    num_iter = spec.get("sample_tokens_kwargs", {}).get("gen", {}).get("num_iter", len(io.get("sched.mask_ratio_f64",
                                                                                             [])))
    runs = {"sched": lambda: _check_schedules(io, gen_diffusion, train_diffusion, num_iter),
            "mae": lambda: _check_mae(model, io, spec), "net": lambda: _check_net(model, io),
            "diff": lambda: _check_head(model, io, gen_diffusion),
            "pstep": lambda: _check_pstep(model, io, gen_diffusion),
            "loss": lambda: _check_loss(model, io, train_diffusion),
            "train": lambda: _check_train(model, io, train_diffusion)}
    results = [comparison for group in GROUPS if group in groups and group in runs for comparison in runs[group]()]
    if "gen" in groups:
        vae = _vae(folder, manifest)
        for prefix in (p for p in ("gen", "gen_nocfg") if f"{p}.tokens" in io):
            results += _check_generation(model, vae, io, spec, prefix)
    return results
