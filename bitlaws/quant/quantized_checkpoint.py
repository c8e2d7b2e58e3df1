"""Quantized checkpoints: save a quantized NNX model, rebuild it from its float model's constructor.

A quantized model differs from its float model in *structure*, not only in values: a packed layer holds a
`QWeight` (a `QArray`, or another packed type) instead of its float kernel, its static `LayerQuant` lives in
the graph definition, and methods add variables (`InputScale`, `ActQParamsVar`). `bitlaws.checkpoint.load_model`
restores values into a model built by a constructor and so cannot rebuild these. A quantized checkpoint
therefore stores a *structure manifest* next to the state: per changed layer, its `LayerQuant` and the static
layout of every variable the quantization added. Loading builds the float model abstractly
(`nnx.eval_shape`), applies the manifest to it with abstract arrays (nothing is quantized), checks the stored
tree against it (every missing / unexpected / misshapen key is named) and restores the arrays.

Directory layout (written to a temporary folder next to the target, then renamed into place)::

    DIR/state/          orbax StandardCheckpointer tree: ``nnx.to_pure_dict(nnx.state(model))`` with every
                        packed weight (and `ActQParams`) written as a dict of its arrays
                        (``{"values", "scale", "scale_exp"[, "zero_point"]}``)
    DIR/bitlaws.json    ``kind = "quantized"``, ``format_version``, ``bitlaws_version``, ``manifest``,
                        ``formats`` (definitions of the non-integer formats used), plus the caller's metadata
                        (`bitlaws.ptq.checkpoint` adds the model record, rules, method and calibration)
    DIR/<extra>.json    optional extra JSON files (the ``ptq`` job writes ``layer_errors.json``)

The manifest (``format_version`` 1)::

    {"layers": {"blocks.0.attn.proj": {
         "quant": {"mode": "packed", "weight": SPEC, "act": SPEC | null, "backend": "xla",
                   "record_hessian": false},
         "packed_weight": {"type": "QArray",
                           "static": {"spec": SPEC, "shape": [64, 64], "reduce_axes": [0], "dtype": "float32"},
                           "arrays": {"values": {"shape": [32, 64], "dtype": "uint8"},
                                      "scale": {"shape": [1, 64], "dtype": "float16"},
                                      "zero_point": null, "scale_exp": {"shape": [], "dtype": "int16"}}} | null,
         "input_scale": {"shape": [64], "dtype": "float32"} | null,
         "act_qparams": {"scale": {...}, "zero_point": {...} | null} | null}},
     "rewritten_params": ["blocks.0.ada_lin.kernel", ...]}

``SPEC`` is `bitlaws.quant.spec.spec_to_json` of a `QuantSpec` (its format by name; non-integer formats are
defined once in the top-level ``formats`` table, so a checkpoint with a user `LutFormat` loads where the format is
not registered).
Every `PackedArray` subclass (`QArray`, GPTVQ's `VQArray`, a user's own) is storable without registration; a
manifest entry becomes an abstract packed weight in one place, `abstract_packed_weight`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bitlaws.checkpoint import dotted_path
from bitlaws.quant import seam
from bitlaws.quant.layers import ActQParamsVar, InputScale, QuantizedLayer, QWeight
from bitlaws.quant.qarray import PackedArray
from bitlaws.quant.seam import ActQParams, LayerQuant
from bitlaws.quant.spec import (QuantRule, QuantSpec, formats_table, optional_spec_from_json, spec_from_json,
                                spec_to_json)
from bitlaws.quant.transform import quant_layers

FORMAT_VERSION = 1
KIND = "quantized"
METADATA_FILE = "bitlaws.json"
STATE_DIR = "state"
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A quantized checkpoint that cannot be read: missing or corrupt file, newer format, mismatching tree."""


# ------------------------------------------------------------------------------------------ JSON codecs
# Formats, specs and rules: `bitlaws.quant.spec`; here the layer and packed-weight records.
def layer_quant_to_json(quant: LayerQuant) -> dict[str, Any]:
    data = {"mode": quant.mode, "weight": None if quant.weight is None else spec_to_json(quant.weight),
            "act": None if quant.act is None else spec_to_json(quant.act), "backend": quant.backend,
            "record_hessian": quant.record_hessian}
    if quant.compute_dtype is not None:
        data["compute_dtype"] = quant.compute_dtype
    return data


def layer_quant_from_json(data: Mapping[str, Any], formats_table: Optional[Mapping[str, Any]] = None) -> LayerQuant:
    return LayerQuant(mode=data["mode"], weight=optional_spec_from_json(data.get("weight"), formats_table),
                      act=optional_spec_from_json(data.get("act"), formats_table), backend=data.get("backend", "xla"),
                      record_hessian=bool(data.get("record_hessian", False)),
                      compute_dtype=data.get("compute_dtype"))


def _array_to_json(a) -> Optional[dict[str, Any]]:
    return None if a is None else {"shape": [int(d) for d in np.shape(a)], "dtype": jnp.dtype(a.dtype).name}


def _abstract_array(data: Optional[Mapping[str, Any]]) -> Optional[jax.ShapeDtypeStruct]:
    return None if data is None else jax.ShapeDtypeStruct(tuple(data["shape"]), jnp.dtype(data["dtype"]))


# -------------------------------------------------------------------------------- packed weight types
def _tuples(value):
    """JSON lists back to (nested) tuples: static pytree metadata must be hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _lists(value):
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _static_to_json(value: Any) -> Any:
    """A static field of a packed weight as JSON: specs tagged, tuples as lists."""
    if isinstance(value, QuantSpec):
        return {"QuantSpec": spec_to_json(value)}
    return _lists(value)


def _static_from_json(value: Any, formats_table: Optional[Mapping[str, Any]]) -> Any:
    if isinstance(value, Mapping) and set(value) == {"QuantSpec"}:
        return spec_from_json(value["QuantSpec"], formats_table)
    return _tuples(value)


def _packed_fields(cls: type) -> tuple[list[str], list[str]]:
    """``(static fields, array fields)`` of a packed pytree dataclass."""
    fields = dataclasses.fields(cls)
    return ([f.name for f in fields if f.metadata.get("static")], [f.name for f in fields if not f.metadata.get("static")])


def _packed_classes() -> dict[str, type]:
    """Every `PackedArray` subclass defined so far, by name (no registration: subclassing is enough)."""
    found, todo = {}, [PackedArray]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.setdefault(sub.__name__, sub)
            todo.append(sub)
    return found


def describe_packed_weight(weight) -> dict[str, Any]:
    """The manifest entry of a packed weight: class, static layout, shape and dtype of every array.

    Any `PackedArray` subclass that is a frozen pytree dataclass (static layout fields marked
    ``metadata=dict(static=True)``) is storable; static fields must be JSON values, tuples or `QuantSpec`s.
    """
    cls = type(weight)
    if not isinstance(weight, PackedArray) or not dataclasses.is_dataclass(weight):
        raise TypeError(f"packed weight of type {cls.__name__} is not a PackedArray dataclass; checkpoints store "
                        f"PackedArray subclasses only")
    static_fields, array_fields = _packed_fields(cls)
    return {"type": cls.__name__, "module": cls.__module__,
            "static": {field: _static_to_json(getattr(weight, field)) for field in static_fields},
            "arrays": {field: _array_to_json(getattr(weight, field)) for field in array_fields}}


def abstract_packed_weight(entry: Mapping[str, Any], formats_table: Optional[Mapping[str, Any]] = None):
    """A packed weight with `jax.ShapeDtypeStruct` arrays, built from its manifest entry (nothing is computed).

    The class is found among the `PackedArray` subclasses defined so far; if it is not, the module the entry
    names is imported (it must define a `PackedArray` subclass of that name).

    Raises:
        ValueError: an unknown type, or static / array fields that do not match the class.
    """
    name, module = entry.get("type"), entry.get("module")
    classes = _packed_classes()
    if name not in classes and isinstance(module, str):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"packed weight type {name!r}: its module {module!r} cannot be imported ({e})") from e
        classes = _packed_classes()
    if name not in classes:
        raise ValueError(f"packed weight type {name!r} is not a PackedArray subclass known here (known: "
                         f"{sorted(classes)})")
    cls = classes[name]
    static_fields, array_fields = _packed_fields(cls)
    static, arrays = dict(entry.get("static", {})), dict(entry.get("arrays", {}))
    for what, given, wanted in (("static", static, static_fields), ("array", arrays, array_fields)):
        if sorted(given) != sorted(wanted):
            raise ValueError(f"{name} {what} fields {sorted(given)} do not match the class's {sorted(wanted)}")
    kwargs = {field: _abstract_array(arrays[field]) for field in array_fields}
    kwargs.update({field: _static_from_json(static[field], formats_table) for field in static_fields})
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------ manifest
def _layers(model: nnx.Module) -> dict[str, QuantizedLayer]:
    return dict(quant_layers(model))


def _is_changed(layer: QuantizedLayer) -> bool:
    return (layer.quant != seam.FP or layer.qkernel is not None or layer.input_scale is not None
            or layer.act_qparams is not None or layer.kernel is None)


def build_manifest(model: nnx.Module, reference: Optional[nnx.Module] = None) -> dict[str, Any]:
    """The structure manifest of a quantized `model` (see the module docstring).

    Args:
        model: The quantized model.
        reference: Its float model, to list the parameters a method rewrote (arrays the quantized model does not
            share with it); None records no list.

    Raises:
        ValueError: a layer still records calibration statistics (a ``calibrate``-mode model).
    """
    layers, entries = _layers(model), {}
    calibrating = [path for path, layer in layers.items() if layer.calib is not None]
    if calibrating:
        raise ValueError(f"layers {calibrating} hold calibration statistics: save the quantized model, not the "
                         f"calibrating one")
    for path, layer in layers.items():
        if not _is_changed(layer):
            continue
        act = None if layer.act_qparams is None else layer.act_qparams.get_value()
        entries[path] = {
            "quant": layer_quant_to_json(layer.quant),
            "packed_weight": None if layer.qkernel is None else describe_packed_weight(layer.qkernel.get_value()),
            "input_scale": None if layer.input_scale is None else _array_to_json(layer.input_scale.get_value()),
            "act_qparams": None if act is None else {"scale": _array_to_json(act.scale),
                                                     "zero_point": _array_to_json(act.zero_point)},
        }
    return {"layers": entries, "rewritten_params": None if reference is None else rewritten_params(reference, model)}


def rewritten_params(reference: nnx.Module, model: nnx.Module) -> list[str]:
    """Dotted paths of `reference`'s parameters that `model` holds with other arrays (a method rewrote them).

    Quantized models share every untouched array with their float model, so this compares identities; kernels
    replaced by packed weights are not listed.
    """
    ref = _flat(nnx.to_pure_dict(nnx.state(reference, nnx.Param)))
    new = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return sorted(path for path, leaf in new.items() if path in ref and ref[path] is not leaf)


def apply_manifest(model: nnx.Module, manifest: Mapping[str, Any],
                   formats_table: Optional[Mapping[str, Any]] = None) -> None:
    """Gives an abstract float `model` (`nnx.eval_shape`) the quantized structure `manifest` describes, in place.

    Raises:
        ValueError: one error naming every manifest layer the model lacks, and every packed weight whose shape
            differs from the model's kernel.
    """
    layers = _layers(model)
    entries = manifest.get("layers", {})
    missing = sorted(set(entries) - set(layers))
    if missing:
        raise ValueError(f"the model has no layer(s) {missing} that the manifest quantizes; is it the model the "
                         f"checkpoint was made from?")
    misshapen = []
    for path, entry in entries.items():
        layer = layers[path]
        layer.quant = layer_quant_from_json(entry["quant"], formats_table)
        if entry.get("packed_weight") is not None:
            weight = abstract_packed_weight(entry["packed_weight"], formats_table)
            if layer.kernel is not None and tuple(layer.kernel.shape) != tuple(weight.shape):
                misshapen.append(f"{path} (packed {tuple(weight.shape)}, model kernel {tuple(layer.kernel.shape)})")
            layer.qkernel = QWeight(weight)
            layer.kernel = None
        if entry.get("input_scale") is not None:
            layer.input_scale = InputScale(_abstract_array(entry["input_scale"]))
        act = entry.get("act_qparams")
        if act is not None:
            layer.act_qparams = ActQParamsVar(ActQParams(scale=_abstract_array(act["scale"]),
                                                         zero_point=_abstract_array(act.get("zero_point"))))
    if misshapen:
        raise ValueError(f"packed weights do not fit the model's kernels: {'; '.join(misshapen)}")


# ------------------------------------------------------------------------------------- state trees
def _flat(tree) -> dict[str, Any]:
    """``{dotted path: leaf}``; integer keys (NNX lists) and their stored string form compare equal."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {dotted_path(path): leaf for path, leaf in flat}


def _to_plain(tree):
    """Nested dicts of arrays only: packed weights and `ActQParams` become dicts of their present arrays."""
    if isinstance(tree, Mapping):
        return {k: _to_plain(v) for k, v in tree.items()}
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return {f.name: _to_plain(getattr(tree, f.name)) for f in dataclasses.fields(tree)
                if not f.metadata.get("static") and getattr(tree, f.name) is not None}
    return tree


def _from_plain(abstract, plain):
    """Inverse of `_to_plain`, guided by the abstract tree's dataclasses."""
    if isinstance(abstract, Mapping):
        return {k: _from_plain(v, plain[k]) for k, v in abstract.items()}
    if dataclasses.is_dataclass(abstract) and not isinstance(abstract, type):
        return dataclasses.replace(abstract, **{name: _from_plain(getattr(abstract, name), value)
                                                for name, value in plain.items()})
    return plain


def _signature(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    return {path: (tuple(int(d) for d in leaf.shape), jnp.dtype(leaf.dtype).name) for path, leaf in _flat(tree).items()}


def _check_tree(directory: pathlib.Path, stored: dict, wanted: dict) -> None:
    if stored == wanted:
        return
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    misshapen = sorted(f"{k} (stored {stored[k][0]} {stored[k][1]}, model {wanted[k][0]} {wanted[k][1]})"
                       for k in set(stored) & set(wanted) if stored[k] != wanted[k])
    raise CheckpointError(f"{directory / STATE_DIR} does not match the model its manifest describes: missing "
                          f"{missing}, unexpected {unexpected}, misshapen {misshapen}")


# ------------------------------------------------------------------------------------- save / load
def is_quantized_checkpoint(directory: PathLike) -> bool:
    """Whether `directory` holds a quantized checkpoint (a ``bitlaws.json`` of kind ``quantized``, any version)."""
    try:
        metadata = json.loads((pathlib.Path(directory) / METADATA_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(metadata, dict) and metadata.get("kind") == KIND


def check_output_dir(directory: PathLike, force: bool = False) -> None:
    """Refuses an output folder `save_quantized` must not write.

    New or empty folders are fine; a folder holding a quantized checkpoint is replaced only with `force`; any
    other non-empty folder (or a file) is refused, even with `force`.

    Raises:
        ValueError: naming the folder and why.
    """
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"output folder {directory} is an existing file")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if not is_quantized_checkpoint(directory):
        shown = ", ".join(sorted(p.name for p in directory.iterdir())[:5])
        raise ValueError(f"output folder {directory} is not empty and holds no quantized checkpoint ({shown}); "
                         f"choose a new or empty folder (--force only replaces a quantized checkpoint)")
    if not force:
        raise ValueError(f"output folder {directory} already holds a quantized checkpoint; pass --force "
                         f"(force=True) to replace it")


def save_quantized(model: nnx.Module, directory: PathLike, metadata: Optional[Mapping[str, Any]] = None, *,
                   reference: Optional[nnx.Module] = None, rules: Sequence[QuantRule] = (),
                   extra_files: Optional[Mapping[str, Any]] = None, force: bool = False) -> pathlib.Path:
    """Writes a quantized checkpoint of `model` to `directory`, all at once (temporary folder, then a rename).

    Args:
        model: The quantized model (any materialization: packed, baked or fake).
        directory: The output folder (see `check_output_dir`).
        metadata: JSON-friendly fields added to ``bitlaws.json`` (the reserved keys ``kind``, ``format_version``,
            ``bitlaws_version``, ``manifest`` and ``formats`` are set here).
        reference: The float model, to record the rewritten parameters in the manifest.
        rules: The rules used (their formats enter the ``formats`` table; record them in `metadata` with
            `rules_to_json`).
        extra_files: ``{file name: JSON-friendly value}`` written next to ``bitlaws.json``.
        force: Replace a quantized checkpoint already in `directory`.

    Returns:
        The resolved directory.
    """
    from bitlaws import package_version  # pylint: disable=g-import-not-at-top

    directory = pathlib.Path(directory).resolve()
    check_output_dir(directory, force)
    manifest = build_manifest(model, reference)
    specs = [r.weight for r in rules] + [r.act for r in rules] + _model_specs(model)
    record = {**dict(metadata or {}), "kind": KIND, "format_version": FORMAT_VERSION,
              "bitlaws_version": package_version(), "manifest": manifest, "formats": formats_table(specs)}
    text = json.dumps(record, indent=2, sort_keys=True, default=_json_default)
    extras = {name: json.dumps(value, indent=2, sort_keys=True, default=_json_default)
              for name, value in (extra_files or {}).items()}
    state = _to_plain(nnx.to_pure_dict(nnx.state(model)))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(directory, "tmp")
    tmp.mkdir()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / STATE_DIR, state, force=True)
        for name, content in {**extras, METADATA_FILE: text}.items():
            (tmp / name).write_text(content)
        _move_into_place(tmp, directory, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _json_default(value: Any) -> Any:
    """numpy / jax scalars and arrays in metadata (hyper-parameters, errors) as plain numbers and lists."""
    if isinstance(value, np.generic) or hasattr(value, "tolist"):
        return np.asarray(value).tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON serialisable: {value!r}")


def _model_specs(model: nnx.Module) -> list[Optional[QuantSpec]]:
    """Every spec the model's layers and packed weights hold (for the ``formats`` table)."""
    specs = []
    for layer in _layers(model).values():
        specs += [layer.quant.weight, layer.quant.act]
        if layer.qkernel is not None:
            specs.append(getattr(layer.qkernel.get_value(), "spec", None))
    return specs


def _sibling(directory: pathlib.Path, what: str) -> pathlib.Path:
    """A fresh hidden name next to `directory` (same file system, so renames are atomic)."""
    return directory.parent / f".{directory.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _move_into_place(tmp: pathlib.Path, directory: pathlib.Path, force: bool) -> None:
    """Renames `tmp` to `directory`; an existing checkpoint there is moved aside first and removed after."""
    check_output_dir(directory, force)  # again: the folder may have changed while we computed
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    old = None
    if directory.exists():
        old = _sibling(directory, "old")
        directory.rename(old)
    tmp.rename(directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_metadata(directory: PathLike) -> dict[str, Any]:
    """``bitlaws.json`` of a quantized checkpoint, checked for kind and format version.

    Raises:
        CheckpointError: missing or unreadable file, not a quantized checkpoint, or a newer format version.
    """
    path = pathlib.Path(directory) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {directory} is not a quantized checkpoint")
    try:
        metadata = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt (not JSON: {e})") from e
    if not isinstance(metadata, dict) or metadata.get("kind") != KIND:
        kind = metadata.get("kind") if isinstance(metadata, dict) else None
        raise CheckpointError(f"{path} describes no quantized checkpoint (kind {kind!r}); for float checkpoints use "
                              f"bitlaws.checkpoint.load_model or bitlaws.port.convert.load_ported")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}, newer than this bitlaws reads "
                              f"({FORMAT_VERSION}); it was written by bitlaws {metadata.get('bitlaws_version')}: "
                              f"upgrade bitlaws")
    for key in ("manifest", "formats"):
        if not isinstance(metadata.get(key), dict):
            raise CheckpointError(f"{path} is corrupt: {key!r} is missing or not an object")
    return metadata


def load_quantized_model(directory: PathLike, build: Callable[[Mapping[str, Any]], nnx.Module]
                         ) -> tuple[nnx.Module, dict[str, Any]]:
    """Rebuilds the quantized model of a checkpoint written by `save_quantized`.

    Args:
        directory: The checkpoint folder.
        build: ``build(metadata) -> float model``; evaluated abstractly (`nnx.eval_shape`), so it costs nothing.

    Returns:
        ``(model, metadata)``: the model equals the saved one (the same state leaves and graph definition).

    Raises:
        CheckpointError: a missing or corrupt file, a newer format, a manifest that does not fit the model, or a
            stored tree that does not match (every missing, unexpected and misshapen key is named).
    """
    directory = pathlib.Path(directory).resolve()
    metadata = read_metadata(directory)
    abstract = nnx.eval_shape(lambda: build(metadata))
    try:
        apply_manifest(abstract, metadata["manifest"], metadata["formats"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{directory / METADATA_FILE}: manifest does not fit the model: {e}") from e
    graphdef, abstract_state = nnx.split(abstract)
    target_pure = nnx.to_pure_dict(abstract_state)
    target = _to_plain(target_pure)
    state_dir = directory / STATE_DIR
    if not state_dir.is_dir():
        raise CheckpointError(f"{state_dir} not found: the checkpoint has no state")
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            stored_meta = checkpointer.metadata(state_dir)
        except Exception as e:  # orbax raises assorted types for unreadable metadata
            raise CheckpointError(f"{state_dir} is corrupt (orbax cannot read its metadata: {e})") from e
        stored_tree = getattr(stored_meta, "item_metadata", stored_meta)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        _check_tree(directory, _signature(dict(stored_tree)), _signature(target))
        try:
            restored = checkpointer.restore(state_dir, target)
        except Exception as e:  # a truncated array file, ...
            raise CheckpointError(f"{state_dir} is corrupt (orbax cannot restore it: {type(e).__name__}: {e})") from e
    nnx.replace_by_pure_dict(abstract_state, _from_plain(target_pure, restored))
    return nnx.merge(graphdef, abstract_state), metadata
