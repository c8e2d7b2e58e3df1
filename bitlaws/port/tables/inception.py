"""Port table for the FID Inception-v3 weights (`bitlaws.eval.inception.FIDInceptionV3`).

Source names are torchvision `Inception3` names, as in pytorch-fid's release asset
``pt_inception-2015-12-05-6726825d.pth`` (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``,
..., ``fc.weight``, ``fc.bias``). The names inside ``pytorch_fid.inception.InceptionV3.state_dict()``
(``blocks.0.0.conv.weight``, ``blocks.2.0.branch1x1.bn.weight``, ...) are accepted as well; that wrapper has no
``fc``, so a model ported from it is built with ``include_fc=False`` (pool3 features only).

Nothing is ever downloaded: `load_fid_inception` reads a local copy of the weight file.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping, Optional, Union

import numpy as np
from flax import nnx

from bitlaws.eval.inception import FIDInceptionV3, block_names
from bitlaws.port.mapping import KeyMap, conv, identity, linear, port_state_dict

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE)
ENV_VAR = "BITLAWS_FID_INCEPTION"
DEFAULT_PATH = pathlib.Path("~/.cache/bitlaws") / WEIGHTS_FILE

# (source suffix, destination suffix, transform) of one BasicConv2d.
_BASIC_CONV = (
    ("conv.weight", "conv.kernel", conv),
    ("bn.weight", "bn.scale", identity),
    ("bn.bias", "bn.bias", identity),
    ("bn.running_mean", "bn.mean", identity),
    ("bn.running_var", "bn.var", identity),
)


def _basic_conv_rows(src_prefix: str, dst_prefix: str) -> list[KeyMap]:
    return [KeyMap(f"{src_prefix}.{s}", f"{dst_prefix}.{d}", t) for s, d, t in _BASIC_CONV]


def _wrapper_rows() -> list[KeyMap]:
    """pytorch-fid wrapper names: ``blocks.{k}.{j}`` is the j-th torchvision module of block k."""
    rows: list[KeyMap] = []
    for block, names in enumerate(block_names()):
        for position, name in enumerate(names):
            prefix = f"blocks.{block}.{position}"
            if name.startswith("Conv2d"):
                rows += _basic_conv_rows(prefix, name)
            else:
                rows += _basic_conv_rows(prefix + ".{branch}", name + ".{branch}")
    return rows


TABLE: list[KeyMap] = [
    *_basic_conv_rows("{layer}", "{layer}"),  # Conv2d_1a_3x3 ... Conv2d_4a_3x3
    *_basic_conv_rows("{block}.{branch}", "{block}.{branch}"),  # Mixed_*.branch*
    KeyMap("fc.weight", "fc.kernel", linear),
    KeyMap("fc.bias", "fc.bias"),
    *_wrapper_rows(),
]

IGNORE: tuple[str, ...] = (
    r".*num_batches_tracked",
    r"AuxLogits\..*",  # torchvision's auxiliary classifier (training only), absent from the FID file
)


def port_inception(state_dict: Mapping[str, np.ndarray]) -> FIDInceptionV3:
    """Builds `FIDInceptionV3` from an Inception3 (or pytorch-fid wrapper) state dict.

    Args:
        state_dict: ``{name: array}`` with torchvision names (``Conv2d_1a_3x3.conv.weight``, ..., ``fc.*``)
            or pytorch-fid wrapper names (``blocks.0.0.conv.weight``, ...; no ``fc``).

    Returns:
        The ported model; built without ``fc`` when the state dict has no ``fc.weight``.

    Raises:
        PortError: listing every missing, unexpected or misshapen key.
    """
    include_fc = "fc.weight" in state_dict
    return port_state_dict(state_dict, TABLE, lambda: FIDInceptionV3(nnx.Rngs(0), include_fc=include_fc),
                           ignore=IGNORE, model_name="FIDInceptionV3")


def default_weights_path() -> pathlib.Path:
    """``$BITLAWS_FID_INCEPTION`` if set, else ``~/.cache/bitlaws/pt_inception-2015-12-05-6726825d.pth``."""
    env = os.environ.get(ENV_VAR)
    return pathlib.Path(env).expanduser() if env else DEFAULT_PATH.expanduser()


def load_fid_inception(path: Optional[Union[str, os.PathLike]] = None) -> FIDInceptionV3:
    """Loads the published FID Inception weights from a local file (never downloads).

    Args:
        path: The weight file; default `default_weights_path()`.

    Returns:
        `FIDInceptionV3` with the FID weights (including ``fc``).

    Raises:
        FileNotFoundError: the file is missing; the message names the file to download and where to put it.
    """
    from bitlaws.port import read_state_dict  # pylint: disable=g-import-not-at-top

    weights = pathlib.Path(path).expanduser() if path is not None else default_weights_path()
    if not weights.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {weights}. Download {WEIGHTS_FILE} (a release asset of the "
            f"mseitzer/pytorch-fid GitHub releases, v0.1.0 / tag fid_weights: {WEIGHTS_URL}) and either put it at "
            f"{DEFAULT_PATH} or set the environment variable {ENV_VAR} to its path "
            f"(or pass path=...). bitlaws never downloads it.")
    return port_inception(read_state_dict(weights))
