"""Convert official PyTorch checkpoints into orbax checkpoints of our NNX models, and load them back.

``bitlaws port KIND --ckpt PATH --out DIR [--config CONFIG] [--key KEY] [--force]`` calls `convert`;
`load_ported` rebuilds the model from the constructor arguments stored next to the weights. Kinds:

=========== ======================================== ============================================
kind        official file                             constructor from
=========== ======================================== ============================================
``var``     ``var_d16.pth`` … ``var_d30.pth``        ``configs/models/var_d*.py`` (``config.var``)
``vqvae``   ``vae_ch160v4096z32.pth``                the same configs (``config.vqvae``)
``dit``     ``DiT-XL-2-256x256.pt``                  ``configs/models/dit_*.py`` (``config.model``)
``vae``     sd-vae-ft-ema ``diffusion_pytorch_model`` ``configs/models/sd_vae_ft_ema.py`` (default)
``inception`` ``pt_inception-2015-12-05-6726825d.pth`` none
``llamagen`` ``c2i_B_256.pt`` … ``c2i_3B_384.pt``        ``configs/models/llamagen_gpt.py:VARIANT`` (``config.gpt``)
``llamagen_vq`` ``vq_ds16_c2i.pt``                      ``configs/models/llamagen_vq16.py`` (default)
``mar``     MAR ``checkpoint-last.pth`` (``model_ema``) ``configs/models/mar.py:VARIANT`` (``config.model``)
``mar_vae`` MAR ``kl16.ckpt`` (``model``)                ``configs/models/mar_vae_kl16.py`` (default)
=========== ======================================== ============================================

The output folder must be new, empty, or (with ``force``) hold an earlier port, which is replaced; any other
non-empty folder is refused. Everything that can be checked without the weights (the output folder, the
config and its sections, the checkpoint path) is checked before the checkpoint is read.

The weights are streamed: the checkpoint is opened lazily (torch archives: each tensor stays in the file
until it is written), the kind's port function checks the whole port against ``nnx.eval_shape`` of the model
(every missing, unexpected or misshapen key named) while recording its `PortPlan` instead of loading
weights, and `bitlaws.checkpoint.save_deferred_state` then reads, transforms and writes the leaves a batch
at a time. Peak memory stays near one batch plus the process's own, not the model's size
(``benchmarks/port_memory.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import pathlib
from typing import Any, Callable, Mapping, Optional, Union

import ml_collections
from flax import nnx

from bitlaws import checkpoint, configlib
from bitlaws.port import mapping
from bitlaws.port.reader import read_state_dict

REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "models"


def _plain(value: Any) -> Any:
    """ConfigDict / tuples -> JSON-friendly dicts and lists."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def model_ctor(config_section: Any) -> dict[str, Any]:
    """Constructor kwargs from a config section: plain values, without the informational ``cls`` entry."""
    return {k: v for k, v in _plain(config_section).items() if k != "cls"}


def _tuples(ctor: Mapping[str, Any]) -> dict[str, Any]:
    """JSON lists back to tuples (constructors take tuples such as ``patch_nums``)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in ctor.items()}


@dataclasses.dataclass(frozen=True)
class Kind:
    """How to port and rebuild one model kind.

    Attributes:
        ctor_from_config: ``config -> constructor kwargs`` (JSON-friendly).
        port: ``(state_dict, ctor) -> model``, through `bitlaws.port.mapping.port_state_dict` (so that
            `convert` can record its plan).
        build: ``ctor -> model`` (evaluated abstractly when loading).
        default_config: Config used when the user gives none (None: a config is required).
        sections: Config sections `ctor_from_config` reads (``("var", "vqvae")``).
        model_class: ``() -> the model class`` whose constructor the ctor must fit (None: not checked).
        default_key: Sub-dict read from a nested checkpoint when no key is given (e.g. MAR's ``model_ema``); a
            checkpoint without it is read as if no key were given.
    """

    ctor_from_config: Callable[[Optional[ml_collections.ConfigDict]], dict]
    port: Callable[[Mapping, dict], nnx.Module]
    build: Callable[[dict], nnx.Module]
    default_config: Optional[str] = None
    sections: tuple[str, ...] = ()
    model_class: Optional[Callable[[], type]] = None
    default_key: Optional[str] = None


def _var_ctor(config):
    from bitlaws.models.var import var_ctor_kwargs  # pylint: disable=g-import-not-at-top

    return _plain(var_ctor_kwargs(model_ctor(config.var), model_ctor(config.vqvae)))


def _var_class():
    from bitlaws.models.var import VAR  # pylint: disable=g-import-not-at-top

    return VAR


def _vqvae_class():
    from bitlaws.models.vqvae import VQVAE  # pylint: disable=g-import-not-at-top

    return VQVAE


def _dit_class():
    from bitlaws.models.dit import DiT  # pylint: disable=g-import-not-at-top

    return DiT


def _vae_class():
    from bitlaws.models.kl_vae import AutoencoderKL  # pylint: disable=g-import-not-at-top

    return AutoencoderKL


def _port_var(sd, ctor):
    from bitlaws.port.tables.var import port_var  # pylint: disable=g-import-not-at-top

    return port_var(sd, **_tuples(ctor))


def _build_var(ctor):
    from bitlaws.models.var import VAR  # pylint: disable=g-import-not-at-top

    return VAR(**_tuples(ctor), rngs=nnx.Rngs(0))


def _port_vqvae(sd, ctor):
    from bitlaws.port.tables.vqvae import port_vqvae  # pylint: disable=g-import-not-at-top

    return port_vqvae(sd, **_tuples(ctor))


def _build_vqvae(ctor):
    from bitlaws.models.vqvae import VQVAE  # pylint: disable=g-import-not-at-top

    return VQVAE(**_tuples(ctor), rngs=nnx.Rngs(0))


def _port_dit(sd, ctor):
    from bitlaws.port.tables.dit import port_dit  # pylint: disable=g-import-not-at-top

    return port_dit(sd, **ctor)


def _build_dit(ctor):
    from bitlaws.models.dit import DiT  # pylint: disable=g-import-not-at-top

    return DiT(**ctor, rngs=nnx.Rngs(0))


def _port_vae(sd, ctor):
    from bitlaws.port.tables.kl_vae import port_kl_vae  # pylint: disable=g-import-not-at-top

    return port_kl_vae(sd, **_tuples(ctor))


def _build_vae(ctor):
    from bitlaws.models.kl_vae import AutoencoderKL  # pylint: disable=g-import-not-at-top

    return AutoencoderKL(**_tuples(ctor), rngs=nnx.Rngs(0))


def _port_inception(sd, ctor):
    del ctor
    from bitlaws.port.tables.inception import port_inception  # pylint: disable=g-import-not-at-top

    return port_inception(sd)


def _build_inception(ctor):
    del ctor
    from bitlaws.eval.inception import FIDInceptionV3  # pylint: disable=g-import-not-at-top

    return FIDInceptionV3(nnx.Rngs(0))


def _table(name: str, attr: str) -> Callable[..., Any]:
    """``bitlaws.port.tables.<name>.<attr>``, imported on first call (a kind's models load only when used)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"bitlaws.port.tables.{name}"), attr)(*args, **kwargs)

    return call


def _table_kind(name: str, ctor_fn: Callable[[ml_collections.ConfigDict], dict], config: Optional[str] = None,
                **kw) -> Kind:
    """A `Kind` whose port, build and model class come from ``bitlaws.port.tables.<name>`` (lazily)."""
    return Kind(ctor_fn, _table(name, "port_kind"), _table(name, "build"), config,
                model_class=_table(name, "model_class"), **kw)


KINDS: dict[str, Kind] = {
    "var": Kind(_var_ctor, _port_var, _build_var, sections=("var", "vqvae"), model_class=_var_class),
    "vqvae": Kind(lambda c: model_ctor(c.vqvae), _port_vqvae, _build_vqvae, sections=("vqvae",),
                  model_class=_vqvae_class),
    "dit": Kind(lambda c: model_ctor(c.model), _port_dit, _build_dit, sections=("model",), model_class=_dit_class),
    "vae": Kind(lambda c: model_ctor(c.model), _port_vae, _build_vae, str(REPO_CONFIGS / "sd_vae_ft_ema.py"),
                sections=("model",), model_class=_vae_class),
    "llamagen": _table_kind("llamagen", _table("llamagen", "ctor_from_config"), "", sections=("gpt",),
                            default_key="model"),
    "llamagen_vq": _table_kind("llamagen_vq", _table("llamagen_vq", "ctor_from_config"),
                               str(REPO_CONFIGS / "llamagen_vq16.py"), sections=("vq",), default_key="model"),
    "inception": Kind(lambda c: {}, _port_inception, _build_inception, ""),
    # default_key: the tables' DEFAULT_KEY (tests/port/test_convert.py checks they agree).
    "mar": _table_kind("mar", lambda c: model_ctor(c.model), sections=("model",), default_key="model_ema"),
    "mar_vae": _table_kind("mar_vae", lambda c: model_ctor(c.model), str(REPO_CONFIGS / "mar_vae_kl16.py"),
                           sections=("model",), default_key="model"),
}


def check_out_dir(out: Union[str, pathlib.Path], force: bool = False) -> None:
    """Refuses an output folder that `convert` must not write into.

    Args:
        out: The output folder.
        force: Allow replacing an earlier port (a folder with ``bitlaws.json`` naming a model kind).

    Raises:
        ValueError: `out` (or a parent) is a file; `out` holds a port and `force` is False; `out` is a
            non-empty folder that holds no port (refused even with `force`).
    """
    out = pathlib.Path(out)
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                what = "is an existing file" if parent == out else f"is inside {parent}, an existing file"
                raise ValueError(f"output folder {out} {what}, not a folder")
            break
    if not out.is_dir():
        return
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return
    kind = _ported_kind(out)
    if kind is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(f"output folder {out} is not empty and holds no port ({shown}); choose a new or empty "
                         f"folder (--force only replaces an earlier port)")
    if not force:
        raise ValueError(f"output folder {out} already holds a ported {kind!r} checkpoint; pass --force "
                         f"(force=True) to replace it")


def _ported_kind(directory: pathlib.Path) -> Optional[str]:
    """The model kind of the port in `directory`, or None if it holds none."""
    try:
        metadata = checkpoint.load_metadata(directory)
    except (FileNotFoundError, ValueError):  # no metadata, or not JSON
        return None
    kind = metadata.get("kind") if isinstance(metadata, dict) else None
    return kind if isinstance(kind, str) and kind in KINDS else None


def _ctor_for(kind: str, spec: Kind, config_spec: str) -> dict[str, Any]:
    """Loads `config_spec` and returns the constructor of `kind` from it, checked against the model class.

    Raises:
        ValueError: the config lacks a section `kind` needs, or its section does not fit the model's
            constructor (unknown or missing arguments are named).
    """
    config = configlib.load_config(config_spec) if config_spec else None
    if config is not None and spec.sections:
        missing = [name for name in spec.sections if name not in config]
        if missing:
            raise ValueError(f"config {config_spec!r} has no {', '.join(map(repr, missing))} section, which porting "
                             f"{kind!r} needs (its sections: {', '.join(sorted(config.keys()))}); is it a config "
                             f"of another model kind?")
    ctor = spec.ctor_from_config(config)
    if spec.model_class is not None:
        _check_ctor(kind, ctor, spec.model_class(), config_spec)
    return ctor


def _check_ctor(kind: str, ctor: Mapping[str, Any], cls: type, config_spec: str) -> None:
    params = inspect.signature(cls.__init__).parameters  # NNX modules hide their signature behind a metaclass
    named = {name for name, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in ("self", "rngs")}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [] if takes_any else sorted(set(ctor) - named)
    required = {name for name in named if params[name].default is inspect.Parameter.empty}
    missing = sorted(required - set(ctor))
    if unknown or missing:
        raise ValueError(f"config {config_spec!r} does not describe a {cls.__name__} (porting {kind!r}): "
                         f"unknown constructor argument(s) {unknown}, missing {missing}")


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(kind: str, ckpt: Union[str, pathlib.Path], out: Union[str, pathlib.Path],
            config: Optional[str] = None, key: Optional[str] = None, *, force: bool = False) -> pathlib.Path:
    """Reads an official checkpoint (torch-free), ports it and writes an orbax checkpoint to `out`.

    Args:
        kind: ``var``, ``vqvae``, ``dit``, ``vae`` or ``inception``.
        ckpt: The official weight file (``.pth/.pt/.bin``, ``.safetensors`` or ``.npz``).
        out: Output directory: new, empty, or holding an earlier port (replaced only with `force`).
        config: ``file.py[:arg]`` giving the constructor (required for var/vqvae/dit).
        key: Sub-dict of a nested checkpoint (e.g. ``ema`` or ``model``); default: the kind's ``default_key``.
        force: Replace an earlier port in `out` (a non-empty folder holding no port is always refused).

    Returns:
        The output directory.

    Raises:
        ValueError: unknown kind, missing or unfitting config, or an output folder `check_out_dir` refuses
            (all checked before the checkpoint is read); `PortError` when the checkpoint does not fit.
        FileNotFoundError: no checkpoint file at `ckpt`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(KINDS)}")
    spec = KINDS[kind]
    config_spec = config if config is not None else spec.default_config
    if config_spec is None:
        raise ValueError(f"porting {kind!r} needs --config (e.g. {REPO_CONFIGS.name}/"
                         f"{'var_d16.py' if kind in ('var', 'vqvae') else 'dit_xl2.py'}) for the model size")
    check_out_dir(out, force=force)
    ctor = _ctor_for(kind, spec, config_spec)
    path = pathlib.Path(ckpt)
    if not path.is_file():
        what = "is a folder, not a weight file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"checkpoint {str(path)!r} {what}")
    if key is None and spec.default_key is not None:
        try:
            state_dict, key = read_state_dict(path, key=spec.default_key, lazy=True), spec.default_key
        except (KeyError, ValueError):  # no such sub-dict: read it as given (flat, or name the keys to choose)
            state_dict = read_state_dict(path, lazy=True)
    else:
        state_dict = read_state_dict(path, key=key, lazy=True)
    plan = port_plan(kind, state_dict, ctor)
    metadata = dict(kind=kind, ctor=ctor, source=dict(file=path.name, sha256=_sha256(path), key=key),
                    config=config_spec or None)
    return checkpoint.save_deferred_state(plan.deferred_state(), out, metadata)


def port_plan(kind: str, state_dict: Mapping[str, Any], ctor: dict[str, Any]) -> mapping.PortPlan:
    """The checked `PortPlan` of porting `state_dict` as `kind` (no weight is read or converted).

    Raises:
        PortError: the state dict does not fit the model (every bad key named).
    """
    with mapping.recording_plans() as plans:
        KINDS[kind].port(state_dict, ctor)
    if len(plans) != 1:
        raise RuntimeError(f"porting {kind!r} made {len(plans)} port plans, expected one")
    return plans[0]


def load_ported(directory: Union[str, pathlib.Path]) -> nnx.Module:
    """Loads a checkpoint written by `convert` (the constructor comes from its metadata)."""
    metadata = checkpoint.load_metadata(directory)
    kind = metadata.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{directory}: metadata names unknown model kind {kind!r}")
    ctor = metadata.get("ctor", {})
    return checkpoint.load_model(lambda: KINDS[kind].build(ctor), directory)
