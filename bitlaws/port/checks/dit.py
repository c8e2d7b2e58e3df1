"""Parity check of the DiT fixture: forward, classifier-free guidance, respaced schedule and DDIM sampling."""

from __future__ import annotations

import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.models.dit import DiT
from bitlaws.port.reader import read_state_dict
from bitlaws.port.recipe import regenerate
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.dit import port_dit
from bitlaws.port.verify import Comparison, compare
from bitlaws.sample.diffusion import GaussianDiffusion, create_diffusion

FIXTURE = "dit"
_DIFFUSION_ARGS = ("timestep_respacing", "noise_schedule", "sigma_small", "predict_xstart", "learn_sigma",
                   "diffusion_steps")


@nnx.jit
def _forward(model: DiT, x, t, y):
    return model(x, t, y)


@nnx.jit
def _forward_with_cfg(model: DiT, x, t, y, cfg_scale):
    return model.forward_with_cfg(x, t, y, cfg_scale)


def _nhwc(x: np.ndarray) -> jnp.ndarray:
    """``[..., C, H, W]`` -> ``[..., H, W, C]``."""
    return jnp.asarray(np.moveaxis(np.asarray(x), -3, -1))


def _nchw(x) -> np.ndarray:
    """``[..., H, W, C]`` -> ``[..., C, H, W]``."""
    return np.moveaxis(np.asarray(x), -1, -3)


def load_weights(folder: pathlib.Path, spec: dict) -> dict[str, np.ndarray]:
    """The fixture's state dict: the stored weights file, else regenerated from the recipe manifest."""
    stored = folder / str(spec.get("weights", ""))
    if spec.get("weights") and stored.is_file():
        return read_state_dict(stored)
    return regenerate(folder / f"{FIXTURE}_weights_manifest.json")


def build_diffusion(spec: dict) -> GaussianDiffusion:
    """`create_diffusion` with the manifest's arguments (upstream defaults for the rest)."""
    args = spec.get("create_diffusion", {})
    kwargs = {k: args[k] for k in _DIFFUSION_ARGS if k in args and k != "timestep_respacing"}
    return create_diffusion(args.get("timestep_respacing"), **kwargs)


def check(folder: pathlib.Path, manifest: dict) -> list[Comparison]:
    """Runs the upstream calls of the DiT fixture and compares every stored output."""
    folder = pathlib.Path(folder)
    spec = manifest["fixtures"][FIXTURE]
    ctor: dict[str, Any] = {k: v for k, v in spec["ctor"].items() if k != "cls"}
    io = read_safetensors(folder / spec.get("file_io", f"{FIXTURE}_io.safetensors"))
    state_dict = load_weights(folder, spec)
    model: DiT = port_dit(state_dict, **ctor)
    results: list[Comparison] = []
    if "pos_embed" in state_dict:
        results.append(compare(FIXTURE, "pos_embed (recomputed)", model.pos_embed(), state_dict["pos_embed"]))

    out = _forward(model, _nhwc(io["fwd.x"]), jnp.asarray(io["fwd.t"]), jnp.asarray(io["fwd.y"]))
    results.append(compare(FIXTURE, "fwd.out", _nchw(out), io["fwd.out"]))
    cfg_scale = float(np.asarray(io["cfg.scale"]).reshape(-1)[0])
    out = _forward_with_cfg(model, _nhwc(io["cfg.x"]), jnp.asarray(io["cfg.t"]), jnp.asarray(io["cfg.y"]),
                            jnp.float32(cfg_scale))
    results.append(compare(FIXTURE, "cfg.out", _nchw(out), io["cfg.out"]))

    diffusion = build_diffusion(spec)
    for name in sorted(k for k in io if k.startswith("sched.")):
        attribute = name[len("sched."):].removesuffix("_f64")
        results.append(compare(FIXTURE, name, getattr(diffusion, attribute), io[name]))

    z = _nhwc(io["ddim_cfg.z"])
    z2 = jnp.concatenate([z, z], axis=0)
    final_full, steps = diffusion.ddim_sample_loop(
        model.forward_with_cfg, z2.shape, z2, clip_denoised=False, eta=0.0, return_steps=True,
        model_kwargs=dict(y=jnp.asarray(io["ddim_cfg.y_full"]), cfg_scale=jnp.float32(cfg_scale)))
    results += [
        compare(FIXTURE, "ddim_cfg.final", _nchw(final_full[: z.shape[0]]), io["ddim_cfg.final"]),
        compare(FIXTURE, "ddim_cfg.final_full", _nchw(final_full), io["ddim_cfg.final_full"]),
        compare(FIXTURE, "ddim_cfg.steps_sample", _nchw(steps["sample"]), io["ddim_cfg.steps_sample"]),
        compare(FIXTURE, "ddim_cfg.steps_pred_xstart", _nchw(steps["pred_xstart"]),
                io["ddim_cfg.steps_pred_xstart"]),
    ]

    z = _nhwc(io["ddim_plain.z"])
    final = diffusion.ddim_sample_loop(model, z.shape, z, clip_denoised=True, eta=0.0,
                                       model_kwargs=dict(y=jnp.asarray(io["ddim_plain.y"])))
    results.append(compare(FIXTURE, "ddim_plain.final", _nchw(final), io["ddim_plain.final"]))
    return results
