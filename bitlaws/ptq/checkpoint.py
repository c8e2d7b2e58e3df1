"""`load_quantized`: quantized checkpoints of our models (demo members and ported checkpoints).

The generic part (structure manifest, save, validated restore) is `bitlaws.quant.quantized_checkpoint`; this
thin integration says how the float model is built. A checkpoint's ``bitlaws.json`` holds a *model record*::

    "model": {"kind": "var",                    # a model kind of `bitlaws.port.convert.KINDS` (var, dit, ...)
              "ctor": {...},                    # its constructor arguments (JSON)
              "source": {"type": "demo", "member": "var-d4"}
                     or {"type": "ported", "directory": "/abs/port/dir", "file": ..., "sha256": ...}}

Loading builds ``KINDS[kind].build(ctor)`` abstractly, applies the manifest and restores the state; the source
is informational (the float weights are not read). Demo members and ported models share the constructors:
a demo VAR is a `VAR` with ``var_family.var_kwargs``, a demo DiT a `DiT` with its ``model`` metadata.

Packed weights of any `PackedArray` subclass (GPTVQ's `VQArray` included) are stored without registration.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping, Optional, Union

from flax import nnx

from bitlaws.quant import quantized_checkpoint as qc
from bitlaws.quant.spec import QuantRule, rules_from_json, rules_to_json

PathLike = Union[str, pathlib.Path]
LAYER_ERRORS_FILE = "layer_errors.json"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def demo_model_record(member) -> dict[str, Any]:
    """The model record of a demo member (`bitlaws.demo.family.DemoMember`) of the ``var`` or ``dit`` family."""
    metadata = member.metadata
    if member.family == "var":
        from bitlaws.demo import var_family  # pylint: disable=g-import-not-at-top

        ctor = var_family.var_kwargs(metadata["ctor"], metadata["tokenizer_ctor"])
    elif member.family == "dit":
        ctor = dict(metadata["model"])
    else:
        raise ValueError(f"demo member {member.name!r}: family {member.family!r} has no model record (var, dit)")
    return {"kind": member.family, "ctor": _plain(ctor), "source": {"type": "demo", "member": member.name}}


def ported_model_record(directory: PathLike) -> dict[str, Any]:
    """The model record of a checkpoint written by ``bitlaws port`` (its kind and constructor)."""
    from bitlaws import checkpoint  # pylint: disable=g-import-not-at-top

    directory = pathlib.Path(directory).resolve()
    metadata = checkpoint.load_metadata(directory)
    kind = metadata.get("kind")
    _check_kind(kind, directory / checkpoint.METADATA_FILE)
    source = {"type": "ported", "directory": str(directory)}
    source.update({k: v for k, v in dict(metadata.get("source") or {}).items() if k in ("file", "sha256", "key")})
    return {"kind": kind, "ctor": _plain(metadata.get("ctor", {})), "source": source}


def _check_kind(kind, where) -> None:
    from bitlaws.port.convert import KINDS  # pylint: disable=g-import-not-at-top

    if kind not in KINDS:
        raise ValueError(f"{where}: unknown model kind {kind!r}; known: {sorted(KINDS)}")


def build_float_model(record: Mapping[str, Any]) -> nnx.Module:
    """The (freshly initialised) float model a model record describes; call it under `nnx.eval_shape`."""
    from bitlaws.port.convert import KINDS  # pylint: disable=g-import-not-at-top

    _check_kind(record.get("kind"), "model record")
    return KINDS[record["kind"]].build(dict(record.get("ctor", {})))


@dataclasses.dataclass(frozen=True)
class QuantizedCheckpoint:
    """A loaded quantized checkpoint.

    Attributes:
        model: The quantized model, equal (state leaves and graph definition) to the one that was saved.
        metadata: ``bitlaws.json``: ``model`` (record), ``rules``, ``method``, ``manifest``, ``formats``,
            ``summary``, ``format_version``, ``bitlaws_version`` (see `bitlaws.ptq.run` for the job's fields).
        directory: Where it was loaded from.
    """

    model: nnx.Module
    metadata: dict[str, Any]
    directory: pathlib.Path

    @property
    def rules(self) -> list[QuantRule]:
        """The `QuantRule`s the model was quantized with."""
        return rules_from_json(self.metadata.get("rules", []), self.metadata.get("formats", {}))

    @property
    def layer_errors(self) -> Optional[dict[str, Any]]:
        """``layer_errors.json`` (None when the checkpoint has none)."""
        path = self.directory / LAYER_ERRORS_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def demo_member(self):
        """The float demo member the model was made from (for ``member.sample(self.model, ...)``), or None."""
        source = self.metadata["model"].get("source", {})
        if source.get("type") != "demo":
            return None
        from bitlaws.demo import dit_family, family, var_family  # noqa: F401  pylint: disable=g-import-not-at-top

        return family.load_member(source["member"])


def load_quantized(directory: PathLike) -> QuantizedCheckpoint:
    """Rebuilds the quantized model of a checkpoint written by ``bitlaws ptq`` (or `save`).

    Nothing is quantized again: the float model is built abstractly from the model record, the manifest gives it
    the quantized structure and the stored arrays are restored into it. Sampling from ``.model`` equals sampling
    from the in-memory quantized model bit for bit.

    Raises:
        CheckpointError (a ValueError): missing or corrupt files, a newer format version, an unknown model kind,
            or a stored tree that does not match the model (naming the file and the keys).
    """
    directory = pathlib.Path(directory).resolve()

    def build(metadata: Mapping[str, Any]) -> nnx.Module:
        record = metadata.get("model")
        if not isinstance(record, Mapping):
            raise qc.CheckpointError(f"{directory / qc.METADATA_FILE} has no model record ('model')")
        try:
            return build_float_model(record)
        except (TypeError, ValueError) as e:
            raise qc.CheckpointError(f"{directory / qc.METADATA_FILE}: cannot build its model: {e}") from e

    model, metadata = qc.load_quantized_model(directory, build)
    return QuantizedCheckpoint(model, metadata, directory)


def save(model: nnx.Module, directory: PathLike, record: Mapping[str, Any], *, rules=(), reference=None,
         metadata: Optional[Mapping[str, Any]] = None, layer_errors: Optional[Mapping[str, Any]] = None,
         force: bool = False) -> pathlib.Path:
    """Writes a quantized checkpoint that `load_quantized` reads.

    Args:
        model: The quantized model.
        directory: Output folder (new, empty, or an earlier quantized checkpoint with `force`).
        record: Its model record (`demo_model_record`, `ported_model_record`).
        rules: The rules used (stored as JSON under ``rules``).
        reference: The float model (the manifest lists the parameters the method rewrote).
        metadata: Further JSON fields (``method``, ``summary`` ...).
        layer_errors: Written to ``layer_errors.json`` when given.
        force: Replace an earlier quantized checkpoint.
    """
    _check_kind(record.get("kind"), "model record")
    fields = {**dict(metadata or {}), "model": _plain(record), "rules": rules_to_json(rules)}
    extra = {} if layer_errors is None else {LAYER_ERRORS_FILE: layer_errors}
    return qc.save_quantized(model, directory, fields, reference=reference, rules=rules, extra_files=extra,
                             force=force)
