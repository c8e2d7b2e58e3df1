"""Released VAR-d20 (ImageNet 256x256): transformer, tokenizer, sampling protocol, checkpoint names."""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

DEPTH = 20


def _common():
    """Loads the sibling `_var_common.py` by path (config files are loaded by path, not as a package)."""
    path = pathlib.Path(__file__).with_name("_var_common.py")
    spec = importlib.util.spec_from_file_location("bitlaws_configs_var_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None) -> ml_collections.ConfigDict:
    """The VAR-d20 config (`arg` is unused)."""
    del arg
    return _common().var_config(DEPTH)
