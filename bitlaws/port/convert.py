"""Convert official PyTorch checkpoints into orbax checkpoints of our NNX models, and load them back.

``bitlaws port KIND --ckpt PATH --out DIR [--config CONFIG] [--key KEY]`` calls `convert`; `load_ported`
rebuilds the model from the constructor arguments stored next to the weights. Kinds:

=========== ======================================== ============================================
kind        official file                             constructor from
=========== ======================================== ============================================
``var``     ``var_d16.pth`` … ``var_d30.pth``        ``configs/models/var_d*.py`` (``config.var``)
``vqvae``   ``vae_ch160v4096z32.pth``                the same configs (``config.vqvae``)
``dit``     ``DiT-XL-2-256x256.pt``                  ``configs/models/dit_*.py`` (``config.model``)
``vae``     sd-vae-ft-ema ``diffusion_pytorch_model`` ``configs/models/sd_vae_ft_ema.py`` (default)
``inception`` ``pt_inception-2015-12-05-6726825d.pth`` none
=========== ======================================== ============================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any, Callable, Mapping, Optional, Union

import ml_collections
from flax import nnx

from bitlaws import checkpoint, configlib
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
        port: ``(state_dict, ctor) -> model``.
        build: ``ctor -> model`` (evaluated abstractly when loading).
        default_config: Config used when the user gives none (None: a config is required).
    """

    ctor_from_config: Callable[[Optional[ml_collections.ConfigDict]], dict]
    port: Callable[[Mapping, dict], nnx.Module]
    build: Callable[[dict], nnx.Module]
    default_config: Optional[str] = None


def _var_ctor(config):
    from bitlaws.models.var import var_ctor_kwargs  # pylint: disable=g-import-not-at-top

    return _plain(var_ctor_kwargs(model_ctor(config.var), model_ctor(config.vqvae)))


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


KINDS: dict[str, Kind] = {
    "var": Kind(_var_ctor, _port_var, _build_var),
    "vqvae": Kind(lambda c: model_ctor(c.vqvae), _port_vqvae, _build_vqvae),
    "dit": Kind(lambda c: model_ctor(c.model), _port_dit, _build_dit),
    "vae": Kind(lambda c: model_ctor(c.model), _port_vae, _build_vae, str(REPO_CONFIGS / "sd_vae_ft_ema.py")),
    "inception": Kind(lambda c: {}, _port_inception, _build_inception, ""),
}


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(kind: str, ckpt: Union[str, pathlib.Path], out: Union[str, pathlib.Path],
            config: Optional[str] = None, key: Optional[str] = None) -> pathlib.Path:
    """Reads an official checkpoint (torch-free), ports it and writes an orbax checkpoint to `out`.

    Args:
        kind: ``var``, ``vqvae``, ``dit``, ``vae`` or ``inception``.
        ckpt: The official weight file (``.pth/.pt/.bin``, ``.safetensors`` or ``.npz``).
        out: Output directory (created; an existing checkpoint there is replaced).
        config: ``file.py[:arg]`` giving the constructor (required for var/vqvae/dit).
        key: Sub-dict of a nested checkpoint (e.g. ``ema`` or ``model``).

    Returns:
        The output directory.

    Raises:
        ValueError: unknown kind or missing config; `PortError` when the checkpoint does not fit.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(KINDS)}")
    spec = KINDS[kind]
    config_spec = config if config is not None else spec.default_config
    if config_spec is None:
        raise ValueError(f"porting {kind!r} needs --config (e.g. {REPO_CONFIGS.name}/"
                         f"{'var_d16.py' if kind in ('var', 'vqvae') else 'dit_xl2.py'}) for the model size")
    ctor = spec.ctor_from_config(configlib.load_config(config_spec) if config_spec else None)
    path = pathlib.Path(ckpt)
    model = spec.port(read_state_dict(path, key=key), ctor)
    metadata = dict(kind=kind, ctor=ctor, source=dict(file=path.name, sha256=_sha256(path), key=key),
                    config=config_spec or None)
    return checkpoint.save_model(model, out, metadata)


def load_ported(directory: Union[str, pathlib.Path]) -> nnx.Module:
    """Loads a checkpoint written by `convert` (the constructor comes from its metadata)."""
    metadata = checkpoint.load_metadata(directory)
    kind = metadata.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{directory}: metadata names unknown model kind {kind!r}")
    ctor = metadata.get("ctor", {})
    return checkpoint.load_model(lambda: KINDS[kind].build(ctor), directory)
