"""Inputs of the released study's ``smoke`` variant: the parity fixtures' tiny random-weight models, ported.

`smoke_inputs(cache)` makes (once) and returns what ``configs/sweeps/released.py:smoke`` points at:

* ``var`` / ``vqvae``: the VAR transformer of ``tests/fixtures/var_weights.pth`` and its tokenizer (weights
  regenerated from ``vqvae_weights_manifest.json`` with the fixture recipe), ported with `convert.convert`
  exactly as ``tests/analysis/test_ported.py`` ports them (10 classes, 4 scales, 64x64 images);
* ``dit`` / ``vae``: the DiT of ``dit_weights.pth`` (8x8x4 latents, 10 classes) and the SD-VAE-shaped
  ``sdvae_weights.safetensors`` (16x16 images);
* with ``ar=True`` (``released.py:smoke,ar``), in ``ported_ar``: ``llamagen`` / ``llamagen_vq``, the GPT of
  ``llamagen_gpt_weights.pth`` (10 classes, 4x4 tokens of a 64-code vocabulary) and its VQ (weights regenerated
  from ``llamagen_vq_weights_manifest.json``; 32x32 images), and ``mar`` / ``mar_vae``, the MAR of
  ``mar_weights.pth`` (EMA copy; 10 classes, 4x4 tokens of 4 channels) and its KL VAE (regenerated from
  ``mar_vae_weights_manifest.json``; 32x32 images), constructors from the manifest entries as
  ``tests/port/test_llamagen_port.py`` / ``test_mar_port.py`` port them;
* ``reference``: FID statistics (``mu``, ``sigma``, ``n``; `bitlaws.eval.fid.save_reference_stats`) of a tiny
  generated batch (`REFERENCE_IMAGES` smooth random uint8 images) under the random-weight FID Inception
  (`bitlaws.eval.fid.random_fid_inception`, seed `INCEPTION_SEED`): what the smoke cells are scored against.

Every item is written to a temporary name and renamed into place, so concurrent first runs (two local processes
of the multi-host test) never see a half-written port. The numbers mean nothing; the point is to run the whole
path of a released-model study on a CPU in a few minutes.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Callable, Union

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"
DEFAULT_CACHE = pathlib.Path("~/.cache/bitlaws/released_smoke")
REFERENCE_IMAGES = 16
REFERENCE_SIZE = 32
INCEPTION_SEED = 0
RANDOM_INCEPTION = "random"
"""The ``released.inception`` value that selects the random-weight FID Inception (smoke runs only)."""


def _fixture_config(path: pathlib.Path, sections: dict) -> str:
    """Writes a model config file (``get_config`` returning `sections`) for `convert.convert`; returns its path.

    The file stays next to the ports (their metadata names it); it is replaced atomically, since a concurrent
    first run writes the same text.
    """
    clean = {name: {k: v for k, v in ctor.items() if k not in ("cls", "vae_local")}
             for name, ctor in sections.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                   f"    return ml_collections.ConfigDict({clean!r})\n")
    os.replace(tmp, path)
    return str(path)


def _once(target: pathlib.Path, make: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Runs ``make(tmp)`` and renames ``tmp`` to `target` unless `target` exists (another process won: keep it)."""
    if target.exists():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    make(tmp)
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return target


def _port_all(root: pathlib.Path, configs: pathlib.Path) -> None:
    """Ports the four fixture models into ``root/<kind>`` with the model configs written to `configs`."""
    from bitlaws.port import convert  # pylint: disable=g-import-not-at-top
    from bitlaws.port.recipe import regenerate  # pylint: disable=g-import-not-at-top
    from bitlaws.port.safetensors_io import write_safetensors  # pylint: disable=g-import-not-at-top

    root.mkdir(parents=True)
    fixtures = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
    var_config = _fixture_config(configs / "var.py", {"var": fixtures["var"]["ctor"],
                                                      "vqvae": fixtures["vqvae"]["ctor"]})
    vqvae_file = root / "vqvae.safetensors"
    write_safetensors(vqvae_file, regenerate(FIXTURES / "vqvae_weights_manifest.json"))
    dit_config = _fixture_config(configs / "dit.py", {"model": fixtures["dit"]["ctor"]})
    vae_config = _fixture_config(configs / "vae.py",
                                 {"model": json.loads((FIXTURES / "sdvae_config.json").read_text())})
    for kind, ckpt, config in (("var", FIXTURES / "var_weights.pth", var_config), ("vqvae", vqvae_file, var_config),
                               ("dit", FIXTURES / "dit_weights.pth", dit_config),
                               ("vae", FIXTURES / "sdvae_weights.safetensors", vae_config)):
        convert.convert(kind, ckpt, root / kind, config=config)
    vqvae_file.unlink()


def _port_ar(root: pathlib.Path, configs: pathlib.Path) -> None:
    """Ports the LlamaGen and MAR fixtures (GPT + VQ, MAR + KL VAE) into ``root/<kind>``."""
    from bitlaws.models.llamagen_vq import vq_ctor_kwargs  # pylint: disable=g-import-not-at-top
    from bitlaws.port import convert  # pylint: disable=g-import-not-at-top
    from bitlaws.port.checks.mar_vae import ctor_from_manifest  # pylint: disable=g-import-not-at-top
    from bitlaws.port.recipe import regenerate  # pylint: disable=g-import-not-at-top
    from bitlaws.port.safetensors_io import write_safetensors  # pylint: disable=g-import-not-at-top
    from bitlaws.port.tables.mar import mar_ctor  # pylint: disable=g-import-not-at-top

    root.mkdir(parents=True)
    fixtures = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
    vq_ctor = {k: list(v) if isinstance(v, tuple) else v
               for k, v in vq_ctor_kwargs(fixtures["llamagen_vq"]["ctor"]).items()}
    llamagen_config = _fixture_config(configs / "llamagen.py", {"gpt": fixtures["llamagen_gpt"]["ctor"]["ModelArgs"],
                                                                "vq": vq_ctor})
    mar_config = _fixture_config(configs / "mar.py", {"model": mar_ctor(fixtures["mar"]["ctor"]["kwargs"])})
    vae_config = _fixture_config(configs / "mar_vae.py", {"model": ctor_from_manifest(fixtures["mar_vae"])})
    regenerated = {}
    for kind, manifest in (("llamagen_vq", "llamagen_vq_weights_manifest.json"),
                           ("mar_vae", "mar_vae_weights_manifest.json")):
        regenerated[kind] = root / f"{kind}.safetensors"
        write_safetensors(regenerated[kind], regenerate(FIXTURES / manifest))
    for kind, ckpt, config in (("llamagen", FIXTURES / "llamagen_gpt_weights.pth", llamagen_config),
                               ("llamagen_vq", regenerated["llamagen_vq"], llamagen_config),
                               ("mar", FIXTURES / "mar_weights.pth", mar_config),
                               ("mar_vae", regenerated["mar_vae"], vae_config)):
        convert.convert(kind, ckpt, root / kind, config=config)
    for path in regenerated.values():
        path.unlink()


def reference_images(n: int = REFERENCE_IMAGES, size: int = REFERENCE_SIZE, seed: int = 0) -> np.ndarray:
    """``[n, size, size, 3]`` uint8 smooth random images (bilinearly upsampled 4x4 noise): the smoke reference."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 255.0, (n, 4, 4, 3))
    positions = np.linspace(0.0, 3.0, size)
    low = np.floor(positions).astype(int).clip(0, 2)
    frac = positions - low
    rows = coarse[:, low] * (1 - frac)[None, :, None, None] + coarse[:, low + 1] * frac[None, :, None, None]
    grid = rows[:, :, low] * (1 - frac)[None, None, :, None] + rows[:, :, low + 1] * frac[None, None, :, None]
    return np.round(grid).clip(0, 255).astype(np.uint8)


def _write_reference(path: pathlib.Path) -> None:
    from bitlaws.eval import fid  # pylint: disable=g-import-not-at-top

    run = fid.inception_stats(reference_images(), model=fid.random_fid_inception(INCEPTION_SEED), batch_size=8,
                              progress=False, with_logits=False)
    fid.save_reference_stats(path, run)


def smoke_inputs(cache: Union[str, os.PathLike, None] = None, *, classic: bool = True,
                 ar: bool = False) -> dict[str, str]:
    """Ports the fixture models and writes the smoke reference into `cache` when missing.

    Args:
        cache: Folder (default ``~/.cache/bitlaws/released_smoke``).
        classic: Port the VAR and DiT fixtures (``ported/``).
        ar: Port the LlamaGen and MAR fixtures (``ported_ar/``).

    Returns:
        ``{"var", "vqvae", "dit", "vae"}`` (`classic`), ``{"llamagen", "llamagen_vq", "mar", "mar_vae"}`` (`ar`):
        absolute paths of the ported folders; ``"reference"``: the reference statistics file.
    """
    root = pathlib.Path(cache if cache is not None else DEFAULT_CACHE).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    if classic:
        ported = _once(root / "ported", lambda tmp: _port_all(tmp, root / "configs"))
        paths.update({kind: str(ported / kind) for kind in ("var", "vqvae", "dit", "vae")})
    if ar:
        ported = _once(root / "ported_ar", lambda tmp: _port_ar(tmp, root / "configs_ar"))
        paths.update({kind: str(ported / kind) for kind in ("llamagen", "llamagen_vq", "mar", "mar_vae")})
    paths["reference"] = str(_once(root / "reference.npz", _write_reference))
    return paths
