"""What an analysis runs on: a generator network with its sampling protocol, seen as a sequence of steps.

A `Subject` is a shipped demo member (``var-d4``, ``dit-d4``; `demo_subject`) or a ported release checkpoint
(`ported_var` / `ported_dit`, folders written by ``bitlaws port``, sampled with the paper's protocol from the
model config; `ported_llamagen` / `ported_mar` are sampling-only subjects for the released-model study, without
step-by-step trajectories). It knows how to sample step by step (`Subject.trajectory`), where noise goes
(`Subject.noise`), which layers are fc1 / qkv / fc2 of a block (`Subject.layer_path`), and how to quantize its
network with the library's rules and methods (`quantized`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from bitlaws.analysis import trajectory as traj
from bitlaws.quant import calibrate_on, transform
from bitlaws.quant.methods import CalibrationData
from bitlaws.sweep import settings

FAMILIES = ("var", "dit")
LAYER_KINDS = ("fc1", "qkv", "fc2")
_LAYERS = {
    "var": {"fc1": "blocks.{}.ffn.fc1", "qkv": "blocks.{}.attn.mat_qkv", "fc2": "blocks.{}.ffn.fc2"},
    "dit": {"fc1": "blocks.{}.mlp.fc1", "qkv": "blocks.{}.attn.qkv", "fc2": "blocks.{}.mlp.fc2"},
}


@dataclasses.dataclass
class Subject:
    """A generator and its sampling protocol.

    Attributes:
        name: ``var-d4``, ``dit-d4`` or the ported folder's name.
        family: ``var`` or ``dit``.
        model: The network that gets quantized (float).
        quant_pattern: Module-path regex of the layers the paper quantizes.
        num_classes: Conditioning classes.
        run: ``run(model, labels, key, perturb, on_step) -> Trajectory``.
        step_names: One label per step (``"1x1"`` ... for VAR scales, ``"t=999"`` ... for DiT).
        rows: Per step, how many token rows of a block's input are real (VAR pads scales) or None (all).
        noise_fn: ``noise_fn(snr_db, steps, key) -> Perturbation`` (`trajectory.logits_noise` / `output_noise`).
        calibration: ``() -> CalibrationData`` for methods that need data, or None (data-free methods only).
        source: One line saying where the model came from.
        protocol: The sampling settings, for records.
        decoder: The network that turns the generator's output into images (VAR's tokenizer, DiT's VAE), for
            callers that build their own sampling loop (`bitlaws.sweep.released_sampling`); None if not given.
    """

    name: str
    family: str
    model: nnx.Module
    quant_pattern: str
    num_classes: int
    run: Callable[..., traj.Trajectory]
    step_names: tuple[str, ...]
    rows: tuple[Optional[int], ...]
    noise_fn: Callable[[float, Optional[Sequence[int]], jax.Array], traj.Perturbation]
    calibration: Optional[Callable[[], CalibrationData]]
    source: str
    protocol: dict[str, Any]
    decoder: Optional[nnx.Module] = None

    @property
    def num_steps(self) -> int:
        return len(self.step_names)

    @property
    def step_kind(self) -> str:
        return "scale" if self.family == "var" else "timestep"

    @property
    def feature_name(self) -> str:
        return "guided logits" if self.family == "var" else "model output (mean prediction)"

    @property
    def representation_name(self) -> str:
        return "f_hat (token map reconstruction)" if self.family == "var" else "x_{t-1}"

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def trajectory(self, labels: np.ndarray, key: jax.Array, *, model: Optional[nnx.Module] = None,
                   perturb: Optional[traj.Perturbation] = None,
                   on_step: Optional[traj.StepHook] = None) -> traj.Trajectory:
        """Samples `labels` with `model` (default: the float network) step by step."""
        return self.run(self.model if model is None else model, labels, key, perturb, on_step)

    def noise(self, snr_db: float, steps: Optional[Sequence[int]], key: jax.Array) -> traj.Perturbation:
        """Noise at `snr_db` on the network's output at `steps` (None: every step)."""
        return self.noise_fn(snr_db, steps, key)

    def layer_path(self, kind: str, block: int) -> str:
        """Dotted path of the `kind` layer (``fc1``, ``qkv``, ``fc2``) of block `block`."""
        if kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {kind!r}; valid: {LAYER_KINDS}")
        return _LAYERS[self.family][kind].format(int(block))

    def labels(self, n: int) -> np.ndarray:
        """``[n]`` int32 labels cycling through the classes (0, 1, ..., 0, 1, ...)."""
        if n < 1:
            raise ValueError(f"the number of samples must be >= 1, got {n}")
        return (np.arange(n) % self.num_classes).astype(np.int32)


def clamp_blocks(blocks: Sequence[int], depth: int) -> list[int]:
    """Block indices clamped to ``[0, depth - 1]`` (negative: from the end), deduplicated, in the given order."""
    out = []
    for block in blocks:
        block = int(block)
        index = block + depth if block < 0 else block
        index = min(max(index, 0), depth - 1)
        if index not in out:
            out.append(index)
    return out


# --------------------------------------------------------------------------------------------- builders


def _var_subject(name: str, var: nnx.Module, vae: Any, *, cfg: float, top_k: int, top_p: float,
                 more_smooth: bool, quant_pattern: str, calibration, source: str,
                 decoder: Optional[nnx.Module] = None) -> Subject:
    def run(model, labels, key, perturb, on_step):
        return traj.var_trajectory(model, vae, labels, key, cfg=cfg, top_k=top_k, top_p=top_p,
                                   more_smooth=more_smooth, perturb=perturb, on_step=on_step)

    patch_nums = tuple(int(p) for p in var.patch_nums)
    return Subject(name=name, family="var", model=var, quant_pattern=quant_pattern, num_classes=int(var.num_classes),
                   run=run, step_names=tuple(f"{p}x{p}" for p in patch_nums), rows=tuple(p * p for p in patch_nums),
                   noise_fn=traj.logits_noise, calibration=calibration, source=source,
                   protocol=dict(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth), decoder=decoder)


def _dit_subject(name: str, model: nnx.Module, protocol: traj.DiffusionProtocol, *, quant_pattern: str,
                 calibration, source: str, record: dict, decoder: Optional[nnx.Module] = None) -> Subject:
    def run(net, labels, key, perturb, on_step):
        return traj.dit_trajectory(net, labels, key, protocol, perturb=perturb, on_step=on_step)

    channels = int(model.in_channels)

    def noise_fn(snr_db, steps, key):
        return traj.output_noise(snr_db, steps, key, channels)

    timesteps = protocol.diffusion.timestep_map[::-1]
    return Subject(name=name, family="dit", model=model, quant_pattern=quant_pattern,
                   num_classes=int(model.num_classes), run=run, step_names=tuple(f"t={int(t)}" for t in timesteps),
                   rows=(None,) * len(timesteps), noise_fn=noise_fn, calibration=calibration, source=source,
                   protocol=record, decoder=decoder)


def demo_subject(name: str, respacing: Optional[str] = None) -> Subject:
    """A shipped demo member (``var-d4``, ``dit-d3`` ...) with the sampling settings it was shipped with.

    Args:
        name: The member.
        respacing: DiT only: another DDIM respacing than the shipped one (``"ddim5"``: fewer steps).
    """
    from bitlaws.demo import dit_family, family, var_family  # pylint: disable=g-import-not-at-top

    member = family.load_member(name)
    if respacing is not None and member.family != "dit":
        raise ValueError(f"respacing applies to DiT members only, not {name}")

    def calibration() -> CalibrationData:
        return family.calibration_data(member)

    source = f"shipped demo member {name}"
    if member.family == "var":
        return _var_subject(name, member.model, member.tokenizer, cfg=member.cfg, top_k=member.top_k,
                            top_p=member.top_p, more_smooth=False, quant_pattern=var_family.QUANT_PATTERN,
                            calibration=calibration, source=source)
    respacing = member.respacing if respacing is None else str(respacing)
    protocol = traj.DiffusionProtocol(dit_family.sampling_diffusion(respacing), "ddim", member.cfg_scale,
                                      clip_denoised=True)
    return _dit_subject(name, member.model, protocol, quant_pattern=dit_family.QUANT_PATTERN,
                        calibration=calibration, source=source,
                        record=dict(sampler="ddim", respacing=respacing, cfg_scale=member.cfg_scale,
                                    clip_denoised=True))


VAR_PROTOCOL = {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "more_smooth": False}
"""The release's FID protocol of VAR (``configs/models/_var_common.py``), used when a port's config has none."""
DIT_PROTOCOL = {"sampler": "ddpm", "timestep_respacing": "250", "cfg_scale": 1.5, "clip_denoised": False}
"""The paper's FID protocol of DiT (``configs/models/dit.py``), used when a port's config has none."""


def stored_sampling(directory: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The sampling protocol of a ported model: `defaults` updated from the ``sampling`` section of the model
    config its port was made with (the ``config`` of its ``bitlaws.json``; e.g. ``configs/models/var_d16.py``).

    Only the keys of `defaults` are read; a port without a stored config, a config file that is gone or a config
    without a ``sampling`` section leaves `defaults` as they are.
    """
    from bitlaws import checkpoint, configlib  # pylint: disable=g-import-not-at-top

    spec = checkpoint.load_metadata(directory).get("config")
    protocol = dict(defaults)
    if not spec or not pathlib.Path(str(spec).partition(":")[0]).is_file():
        return protocol
    section = configlib.load_config(str(spec)).get("sampling", None) or {}
    protocol.update({key: section[key] for key in defaults if key in section})
    return protocol


def _load_ported(directory: str, kinds: Sequence[str]) -> nnx.Module:
    from bitlaws import checkpoint  # pylint: disable=g-import-not-at-top
    from bitlaws.port.convert import load_ported  # pylint: disable=g-import-not-at-top

    kind = checkpoint.load_metadata(directory).get("kind")
    if kind not in kinds:
        raise ValueError(f"{directory} holds a ported {kind!r} checkpoint; expected one of {list(kinds)}")
    return load_ported(directory)


def ported_var(var_dir: str, vqvae_dir: str, sampling: Optional[dict] = None) -> Subject:
    """A ported VAR (``bitlaws port var``) with its ported tokenizer (``bitlaws port vqvae``).

    Args:
        var_dir, vqvae_dir: The two ``bitlaws port`` output folders.
        sampling: ``cfg``, ``top_k``, ``top_p``, ``more_smooth`` overriding the port's stored protocol
            (`stored_sampling`; the release's FID protocol `VAR_PROTOCOL` from ``configs/models/_var_common.py``:
            cfg 1.5, top-k 900, top-p 0.96, no smoothing).
    """
    from bitlaws.demo.var_family import QUANT_PATTERN  # pylint: disable=g-import-not-at-top

    sampling = {**stored_sampling(var_dir, VAR_PROTOCOL), **dict(sampling or {})}
    var = _load_ported(var_dir, ("var",))
    vae = _load_ported(vqvae_dir, ("vqvae",))
    return _var_subject(f"ported {var_dir}", var, vae, cfg=float(sampling["cfg"]), top_k=int(sampling["top_k"]),
                        top_p=float(sampling["top_p"]), more_smooth=bool(sampling["more_smooth"]),
                        quant_pattern=QUANT_PATTERN, calibration=None,
                        source=f"ported VAR {var_dir} with tokenizer {vqvae_dir}", decoder=vae)


def ported_dit(dit_dir: str, vae_dir: str, sampling: Optional[dict] = None) -> Subject:
    """A ported latent DiT (``bitlaws port dit``) with the ported SD VAE (``bitlaws port vae``).

    Args:
        dit_dir, vae_dir: The two ``bitlaws port`` output folders.
        sampling: ``sampler`` (``ddpm`` / ``ddim``), ``timestep_respacing``, ``cfg_scale``, ``clip_denoised``
            overriding the port's stored protocol (`stored_sampling`; the paper's protocol `DIT_PROTOCOL` from
            ``configs/models/dit.py``: 250 DDPM steps, cfg 1.5, no clipping).
    """
    from bitlaws.demo.dit_family import QUANT_PATTERN  # pylint: disable=g-import-not-at-top
    from bitlaws.sample.diffusion import create_diffusion  # pylint: disable=g-import-not-at-top

    sampling = {**stored_sampling(dit_dir, DIT_PROTOCOL), **dict(sampling or {})}
    model = _load_ported(dit_dir, ("dit",))
    vae = _load_ported(vae_dir, ("vae",))
    decode = nnx.jit(lambda v, z: v.decode(z))
    protocol = traj.DiffusionProtocol(create_diffusion(str(sampling["timestep_respacing"])), str(sampling["sampler"]),
                                      float(sampling["cfg_scale"]), bool(sampling["clip_denoised"]),
                                      decode=lambda z: decode(vae, z))
    return _dit_subject(f"ported {dit_dir}", model, protocol, quant_pattern=QUANT_PATTERN, calibration=None,
                        source=f"ported DiT {dit_dir} with VAE {vae_dir}", record=dict(sampling), decoder=vae)


LLAMAGEN_PROTOCOL = {"cfg_scale": 2.0, "cfg_interval": -1, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                     "image_size_eval": 0}
"""LlamaGen's ``sample_c2i_ddp.py`` defaults with GPT-B/L's cfg (``configs/models/llamagen_gpt.py`` stores each
variant's cfg and ``image_size_eval`` 256), used when a port's config has none; ``image_size_eval`` 0: no resize."""
MAR_PROTOCOL = {"num_iter": 256, "num_sampling_steps": "100", "cfg": 2.9, "cfg_schedule": "linear",
                "temperature": 1.0}
"""MAR's README evaluation command with MAR-B's cfg (``configs/models/mar.py`` stores each variant's), used when a
port's config has none."""


def _sampling_only(name: str, family: str, model: nnx.Module, decoder: nnx.Module, protocol: dict,
                   quant_pattern: str, source: str) -> Subject:
    """A `Subject` the released study samples (`bitlaws.sweep.released_sampling`); no trajectory analyses."""

    def unsupported(*args, **kwargs):
        del args, kwargs
        raise ValueError(f"step-by-step trajectories are implemented for VAR and DiT subjects, not {family}")

    return Subject(name=name, family=family, model=model, quant_pattern=quant_pattern,
                   num_classes=int(model.num_classes), run=unsupported, step_names=(), rows=(), noise_fn=unsupported,
                   calibration=None, source=source, protocol=dict(protocol), decoder=decoder)


def ported_llamagen(gpt_dir: str, vq_dir: str, sampling: Optional[dict] = None) -> Subject:
    """A ported LlamaGen GPT (``bitlaws port llamagen``) with its ported VQ tokenizer (``bitlaws port llamagen_vq``).

    Args:
        gpt_dir, vq_dir: The two ``bitlaws port`` output folders.
        sampling: ``cfg_scale``, ``cfg_interval``, ``temperature``, ``top_k``, ``top_p``, ``image_size_eval``
            overriding the port's stored protocol (`stored_sampling`; `LLAMAGEN_PROTOCOL` without one).
    """
    from bitlaws.demo.llamagen_family import QUANT_PATTERN  # pylint: disable=g-import-not-at-top

    sampling = {**stored_sampling(gpt_dir, LLAMAGEN_PROTOCOL), **dict(sampling or {})}
    return _sampling_only(f"ported {gpt_dir}", "llamagen", _load_ported(gpt_dir, ("llamagen",)),
                          _load_ported(vq_dir, ("llamagen_vq",)), sampling, QUANT_PATTERN,
                          f"ported LlamaGen {gpt_dir} with tokenizer {vq_dir}")


def ported_mar(mar_dir: str, vae_dir: str, sampling: Optional[dict] = None) -> Subject:
    """A ported MAR (``bitlaws port mar``, EMA weights) with its ported KL-16 VAE (``bitlaws port mar_vae``).

    Args:
        mar_dir, vae_dir: The two ``bitlaws port`` output folders.
        sampling: ``num_iter``, ``num_sampling_steps``, ``cfg``, ``cfg_schedule``, ``temperature`` overriding the
            port's stored protocol (`stored_sampling`; `MAR_PROTOCOL` without one).
    """
    from bitlaws.demo.mar_family import QUANT_PATTERN  # pylint: disable=g-import-not-at-top

    sampling = {**stored_sampling(mar_dir, MAR_PROTOCOL), **dict(sampling or {})}
    sampling["num_sampling_steps"] = str(sampling["num_sampling_steps"])
    return _sampling_only(f"ported {mar_dir}", "mar", _load_ported(mar_dir, ("mar",)),
                          _load_ported(vae_dir, ("mar_vae",)), sampling, QUANT_PATTERN,
                          f"ported MAR {mar_dir} with VAE {vae_dir}")


PROTOCOLS = {"var": VAR_PROTOCOL, "dit": DIT_PROTOCOL, "llamagen": LLAMAGEN_PROTOCOL, "mar": MAR_PROTOCOL}
"""The fallback protocol of each family; its keys are the knobs ``released.<family>_sampling`` may set."""
PORTED = {"var": ported_var, "dit": ported_dit, "llamagen": ported_llamagen, "mar": ported_mar}
"""The ported subject of each family of the released study, ``loader(generator_dir, decoder_dir, sampling)``."""


# --------------------------------------------------------------------------------------------- quantize


@dataclasses.dataclass(frozen=True)
class Precision:
    """A quantized variant: setting (``W4A8``), format family (``int`` / ``fp``) and method (``rtn`` ...)."""

    setting: str = "W4A8"
    format: str = "int"
    method: str = "rtn"

    @property
    def name(self) -> str:
        return f"{self.setting}-{self.format}-{self.method}"


def needs_calibration(method: str, rules: Sequence[Any]) -> bool:
    """Whether `method` under `rules` needs calibration data (its own need, or static activation scales)."""
    return settings.get_method(method).needs_data or any(r.act is not None and r.act.static for r in rules)


def quantized(subject: Subject, precision: Precision) -> nnx.Module:
    """`subject.model` quantized as `precision` on `subject.quant_pattern` (fake-quant values baked in float).

    Raises:
        ValueError: the setting/format has no cell (e.g. W3 with fp), unknown method, or a method that needs
            calibration data on a subject without any (ported models: use a data-free method such as RTN).
    """
    rules = settings.quant_rules(precision.setting, precision.format, subject.quant_pattern)
    if not rules:
        return subject.model
    data = calibrate = None
    if needs_calibration(precision.method, rules):
        if subject.calibration is None:
            raise ValueError(f"method {precision.method!r} needs calibration data, which {subject.name} has none of; "
                             f"use a data-free method (rtn)")
        data = subject.calibration()
        calibrate = calibrate_on(data)
    return transform.apply_method(subject.model, rules, precision.method, materialize="baked", calibrate=calibrate,
                                  data=data, warn_unused=False)


def finite_or_none(value: float) -> Optional[float]:
    """`value` for JSON: None for NaN and infinities."""
    return None if value is None or not math.isfinite(float(value)) else float(value)
