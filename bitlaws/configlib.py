"""Config files: python files with ``get_config(arg=None) -> ml_collections.ConfigDict`` (big_vision style).

On the command line a config is named ``path/to/file.py`` or ``path/to/file.py:ARG``; ARG is passed to
``get_config`` as a string (configs parse it, e.g. ``depth=4,quick``, with `parse_arg`). Individual fields
are overridden with ``--set key.sub=value`` (the value is parsed with the type of the existing field).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import pathlib
import types
from typing import Optional, Sequence, Union

import ml_collections


def load_module(path: Union[str, pathlib.Path]) -> types.ModuleType:
    """Imports a python file by path (config folders are not packages).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not valid python (the message names the file and the line).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    name = "bitlaws_config_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"config file {str(path)!r} has a syntax error at line {e.lineno}: {e.msg}") from e
    return module


def load_sibling(config_file: str, name: str) -> types.ModuleType:
    """Imports ``name`` (a file next to `config_file`), for configs that share a family module."""
    return load_module(pathlib.Path(config_file).with_name(name))


class ConfigArgError(ValueError):
    """A config's ``get_config`` argument names a key the config does not accept."""


def parse_arg(arg: Optional[str], allowed: Optional[Sequence[str]] = None) -> dict[str, object]:
    """Parses ``"depth=4,quick"`` into ``{"depth": 4, "quick": True}`` (values as python literals or strings).

    Args:
        arg: The text after ``file.py:`` (None or empty: no arguments).
        allowed: The keys the config accepts; None accepts any key.

    Raises:
        ConfigArgError: a key not in `allowed` (the message names it and lists the allowed keys).
    """
    out: dict[str, object] = {}
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            out[key.strip()] = True
            continue
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    unknown = [key for key in out if allowed is not None and key not in allowed]
    if unknown:
        raise ConfigArgError(f"unknown argument(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(allowed) if allowed else 'none'}")
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies ``key.sub=value`` overrides in place, keeping each field's type. Returns `config`."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} must look like key.sub=value")
        parent, _, leaf = key.strip().rpartition(".")
        node = config
        for part in filter(None, parent.split(".")):
            if part not in node:
                raise ValueError(f"override {override!r}: config has no field {part!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"override {override!r}: config has no field {key!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and not isinstance(value, type(old)):
            raise ValueError(f"override {override!r}: expected {type(old).__name__}, got {type(value).__name__}")
        node[leaf] = value
    return config


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``file.py[:arg]`` and applies overrides.

    Raises:
        FileNotFoundError: no such config file.
        ValueError: a syntax error in the file, no ``get_config``, an argument the config does not accept
            (`ConfigArgError`, prefixed with `spec`) or a bad override.
    """
    path, sep, arg = spec.partition(":")
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config()")
    try:
        config = module.get_config(arg) if sep else module.get_config()
    except ConfigArgError as e:
        raise ConfigArgError(f"config {spec!r}: {e}") from e
    return apply_overrides(config, overrides)
