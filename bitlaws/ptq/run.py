"""The ``bitlaws ptq`` job: quantize one model with one method, write a quantized checkpoint and its errors.

``bitlaws ptq --config configs/ptq/demo.py:var-d4,W4A16,gptq --out DIR [--set k=v] [--force]`` calls
`run_ptq_from_config`. Config fields (`configs/ptq/demo.py` builds them from its variant string):

=======================  =================================================================================
field                    meaning
=======================  =================================================================================
``model.source``         a demo member (``var-d4``, ``dit-d3``) or a ``bitlaws port`` output folder
``setting``, ``format``  ``W<w>A<a>`` and format family (``int`` / ``fp``): the rules of
                         `bitlaws.sweep.settings.quant_rules` ...
``weight_group_size``    ... with per-channel (0) or grouped weight scales, ``weight_calibrator`` and
``module_path``          the layers to quantize ("": the model's default pattern, as in the paper)
``rules``                explicit `QuantRule`s (or their JSON, `rules_to_json`); replace the four above
``method``               a registered method (``rtn``, ``gptq``, ``smoothquant``, ``awq``, ...) and its
``method_params``        hyper-parameters (unknown names are an error)
``calibration``          ``source`` / ``num_batches`` / ``batch_size`` / ``seed`` of a demo member's data
                         (`bitlaws.demo.family.calibration_options`); ``data_fn``: ``"module:function"``,
                         ``fn(model, options) -> CalibrationData``, the data of ported models; ``when``:
                         ``needed`` (methods that need statistics, static activation specs) or ``always``
                         (also for RTN: ``layer_errors.json`` then has the output proxy)
``seed``, ``backend``    PRNG seed of the method, matmul backend of the packed layers
=======================  =================================================================================

Output: ``DIR`` is a quantized checkpoint (`bitlaws.ptq.checkpoint`, read with `bitlaws.load_quantized`) whose
``bitlaws.json`` adds ``method`` (name, resolved hyper-parameters, seed, backend, materialize), ``setting`` /
``format_family`` (when the rules came from them), ``calibration`` (the data's description or null),
``summary``, ``config`` and ``command``; ``layer_errors.json`` holds per quantized layer:

* ``weight_rel_error``: ``||W - W_hat||_F / ||W||_F``, W the float kernel the packed weight quantizes;
* ``output_proxy``: ``tr(dW^T H dW) / tr(W^T H W)`` with H the layer's calibration Hessian ``X^T X`` (the
  relative squared output error on the calibration data), or null when the job had no calibration data
  (``calibration.when=always`` computes it for RTN too);
* ``storage_bytes`` (packed), ``float_bytes`` (16-bit), ``params`` and ``bits_per_weight``.

For methods that move scales between layers (smoothing input scales, folds into other parameters) W is the
rewritten kernel and H is recorded in the rewritten model (`rewritten_reference`), so the errors measure
quantization alone, in the inputs the quantized layer really receives.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import pathlib
import statistics
import time
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bitlaws import configlib
from bitlaws.ptq import checkpoint as ptq_checkpoint
from bitlaws.quant import accounting, methods, quantized_checkpoint, transform
from bitlaws.quant import spec as spec_lib
from bitlaws.quant.seam import ActStats
from bitlaws.quant.spec import QuantRule

PathLike = Union[str, pathlib.Path]
CALIBRATION_WHEN = ("needed", "always")


@dataclasses.dataclass(frozen=True)
class Source:
    """The float model to quantize and what comes with it.

    Attributes:
        model: The float model.
        record: Its model record (`bitlaws.ptq.checkpoint`).
        name: For messages (member name or folder).
        default_pattern: Module-path regex of the layers quantized by default, or None.
        member: The demo member, or None for a ported model.
    """

    model: nnx.Module
    record: dict[str, Any]
    name: str
    default_pattern: Optional[str]
    member: Any = None


@dataclasses.dataclass(frozen=True)
class PtqResult:
    """What `run_ptq` wrote: the checkpoint folder, its summary and per-layer errors."""

    directory: pathlib.Path
    summary: dict[str, Any]
    layer_errors: dict[str, Any]


def _ported_pattern(kind: str) -> Optional[str]:
    """Default layers of a ported model: the demo families' patterns fit the same model classes."""
    if kind == "var":
        from bitlaws.demo.var_family import QUANT_PATTERN  # pylint: disable=g-import-not-at-top
    elif kind == "dit":
        from bitlaws.demo.dit_family import QUANT_PATTERN  # pylint: disable=g-import-not-at-top
    else:
        return None
    return QUANT_PATTERN


def load_source(source: str) -> Source:
    """A demo member by name (``var-d4``) or a ported checkpoint folder.

    Raises:
        ValueError: an unknown member (the message lists the shipped ones) or an unreadable port.
    """
    path = pathlib.Path(source)
    if path.is_dir():
        from bitlaws.port.convert import load_ported  # pylint: disable=g-import-not-at-top

        record = ptq_checkpoint.ported_model_record(path)
        return Source(load_ported(path), record, str(path), _ported_pattern(record["kind"]))
    from bitlaws.demo import dit_family, family, var_family  # noqa: F401  pylint: disable=g-import-not-at-top

    if source.split("-", 1)[0] not in family.families():
        raise ValueError(f"model.source {source!r} is neither a folder nor a demo member; demo members: "
                         f"{[n for f in family.families() for n in family.member_names(f)]}")
    member = family.load_member(source)
    return Source(member.model, ptq_checkpoint.demo_model_record(member), member.name, member.quant_pattern, member)


def build_rules(config: ml_collections.ConfigDict, default_pattern: Optional[str]) -> list[QuantRule]:
    """The config's explicit ``rules``, or `settings.quant_rules` of its setting and format family."""
    from bitlaws.sweep import settings  # pylint: disable=g-import-not-at-top

    explicit = config.get("rules") or ()
    if explicit:
        return [r if isinstance(r, QuantRule) else spec_lib.rules_from_json([r])[0] for r in explicit]
    pattern = config.get("module_path") or default_pattern
    if not pattern:
        raise ValueError("config.module_path is empty and the model has no default pattern; name the layers to "
                         "quantize (a regex over dotted module paths) or give config.rules")
    group = int(config.get("weight_group_size") or 0)
    rules = settings.quant_rules(config.setting, config.format, pattern, weight_group_size=group or None,
                                 weight_calibrator=config.get("weight_calibrator", "minmax"))
    if not rules:
        raise ValueError(f"setting {config.setting!r} quantizes nothing; a quantized checkpoint needs weights or "
                         f"activations below 16 bits")
    return rules


def _data_fn(name: str):
    module, sep, function = name.partition(":")
    if not sep:
        raise ValueError(f"calibration.data_fn {name!r} must look like 'module:function'")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"calibration.data_fn {name!r}: {e}") from e


def calibration_data(source: Source, calibration: Mapping[str, Any], why: str) -> methods.CalibrationData:
    """The calibration data of `source`: the demo member's, or ``calibration.data_fn``'s for ported models."""
    options = {k: v for k, v in dict(calibration).items() if k not in ("data_fn", "when")}
    if calibration.get("data_fn"):
        data = _data_fn(calibration["data_fn"])(source.model, options)
        if not isinstance(data, methods.CalibrationData):
            raise ValueError(f"calibration.data_fn {calibration['data_fn']!r} returned {type(data).__name__}, not "
                             f"a CalibrationData")
        return data
    if source.member is None:
        raise ValueError(f"{why} calibration data, and ported model {source.name} has none: set "
                         f"calibration.data_fn='module:function' (fn(model, options) -> CalibrationData), or use "
                         f"a method without calibration (rtn)")
    from bitlaws.demo import family  # pylint: disable=g-import-not-at-top

    return family.calibration_data(source.member, options)


def layer_errors(reference: nnx.Module, model: nnx.Module,
                 stats: Optional[Mapping[str, ActStats]] = None) -> dict[str, dict[str, Any]]:
    """Per packed layer of `model`: its errors against the float kernels of `reference`, and its storage.

    Args:
        reference: The float model the packed weights quantize: the float model, or for methods that rewrite
            (smoothing scales, folds) the rewritten float model (`rewritten_reference`).
        model: The quantized (packed) model.
        stats: `reference`'s calibration statistics with Hessians (``{layer path: ActStats}``), or None.

    Returns:
        ``{layer path: {"weight_rel_error", "output_proxy", "storage_bytes", "float_bytes", "params",
        "bits_per_weight"}}`` (see the module docstring).
    """
    floats = dict(transform.quant_layers(reference))
    out = {}
    for path, layer in transform.quant_layers(model):
        if layer.qkernel is None:
            continue
        packed = layer.qkernel.get_value()
        w = np.asarray(floats[path].kernel[...], np.float64)
        n = w.shape[-1]
        w_view = w.reshape(-1, n)  # [K, N]
        dw = w_view - np.asarray(packed.dequantize(jnp.float32), np.float64).reshape(-1, n)  # [K, N]
        entry = {"weight_rel_error": float(np.linalg.norm(dw) / max(np.linalg.norm(w_view), 1e-30)),
                 "output_proxy": None, "storage_bytes": int(packed.nbytes), "float_bytes": int(w.size * 2),
                 "params": int(w.size), "bits_per_weight": float(packed.nbytes * 8 / w.size)}
        hessian = None if stats is None or path not in stats else stats[path].hessian
        if hessian is not None and hessian.shape[0] == w_view.shape[0]:
            h = np.asarray(hessian, np.float64)  # [K, K]
            entry["output_proxy"] = float(np.sum(dw * (h @ dw)) / max(np.sum(w_view * (h @ w_view)), 1e-30))
        out[path] = entry
    return out


def rewritten_reference(model: nnx.Module, run: transform.MethodRun) -> tuple[nnx.Module, bool]:
    """The float model the packed weights of a method run quantize, and whether the method rewrote anything.

    Methods that move scales between layers (input scales, folds into other parameters) or train the weights
    (QAT) quantize rewritten kernels in a rewritten model: the run's rewrites without quantization
    (`MethodRun.rewritten_float`; the method is not run again). Methods without rewrites: `model` itself.
    """
    result = run.result
    if not (result.kernels or result.params or result.input_scales):
        return model, False
    return run.rewritten_float(model), True


def _config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    record = config.to_dict()
    if record.get("rules"):
        record["rules"] = spec_lib.rules_to_json(
            [r if isinstance(r, QuantRule) else spec_lib.rules_from_json([r])[0] for r in record["rules"]])
    return json.loads(json.dumps(record, default=str))


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Field checks that need nothing loaded (run before any work)."""
    from bitlaws.sweep import settings  # pylint: disable=g-import-not-at-top  (registers the PTQ methods)

    for field in ("model", "method", "calibration"):
        if field not in config:
            raise ValueError(f"ptq config has no {field!r} field (see configs/ptq/demo.py)")
    when = config.calibration.get("when", "needed")
    if when not in CALIBRATION_WHEN:
        raise ValueError(f"calibration.when must be one of {CALIBRATION_WHEN}, got {when!r}")
    if not config.get("rules"):
        reason = settings.not_applicable_reason(config.setting, config.format)
        if reason is not None:
            raise ValueError(f"setting {config.setting!r} with format family {config.format!r}: {reason}")
    if int(config.get("weight_group_size") or 0) < 0:
        raise ValueError(f"weight_group_size must be >= 0 (0: per channel), got {config.weight_group_size}")


def run_ptq(config: ml_collections.ConfigDict, out: PathLike, *, force: bool = False,
            command: Optional[str] = None) -> PtqResult:
    """Quantizes ``config.model.source`` with ``config.method`` and writes a quantized checkpoint to `out`.

    Everything checkable without the model (output folder, config fields, method and hyper-parameters) is checked
    before the model is loaded; nothing is written unless the job succeeds, and then all at once.

    Raises:
        ValueError: a refused output folder, a bad config field, an unknown member or method, rules that do not
            fit the model, or a method that needs calibration data the model has none of.
    """
    start = time.perf_counter()
    quantized_checkpoint.check_output_dir(out, force)
    _check_config(config)
    method = methods.get_method(config.method)
    if method.kind == "float":
        raise ValueError(f"method {config.method!r} is the float baseline; it writes no quantized checkpoint")
    params = method.resolve_params(dict(config.get("method_params") or {}))
    source = load_source(str(config.model.source))
    rules = build_rules(config, source.default_pattern)
    transform.check_rules(source.model, rules)
    calibration = dict(config.calibration)
    static = any(r.act is not None and r.act.static for r in rules)
    need = (f"method {method.name!r} needs" if method.needs_data else
            "static activation specs need" if static else
            "calibration.when='always' asks for" if calibration.get("when") == "always" else None)
    data = None if need is None else calibration_data(source, calibration, need)
    calibrate = None if data is None else methods.cached_calibration(methods.calibrate_on(data))
    backend = config.get("backend", "xla")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", transform.UnusedRuleWarning)
        run = transform.run_method(source.model, rules, method.name, materialize="packed", params=params,
                                   calibrate=calibrate, data=data, seed=int(config.get("seed", 0)), backend=backend)
    qmodel = transform.materialize_result(source.model, run.assignments, run.result, "packed", run.stats, backend)
    unused = [str(w.message) for w in caught if issubclass(w.category, transform.UnusedRuleWarning)]
    reference, rewritten = rewritten_reference(source.model, run)
    stats = None if calibrate is None else calibrate(reference, rules, True)
    errors = layer_errors(reference, qmodel, stats)
    label = "explicit rules" if config.get("rules") else f"{config.setting} {config.format}" + (
        f" g{config.weight_group_size}" if int(config.get("weight_group_size") or 0) else "")
    summary = _summary(source, qmodel, rules, label, method.name, params, errors, data, unused)
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    metadata = {"method": {"name": method.name, "params": params, "seed": int(config.get("seed", 0)),
                           "backend": config.get("backend", "xla"), "materialize": "packed"},
                "calibration": None if data is None else dict(data.description),
                "summary": summary, "config": _config_record(config), "command": command,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if not config.get("rules"):
        metadata.update(setting=config.setting, format_family=config.format)
    what = "the method's rewritten float kernels" if rewritten else "the float kernels"
    errors_file = {"reference": f"{what} of {source.name}", "calibration": metadata["calibration"],
                   "layers": errors}
    directory = ptq_checkpoint.save(qmodel, out, source.record, rules=rules, reference=source.model,
                                    metadata=metadata, layer_errors=errors_file, force=force)
    return PtqResult(directory, summary, errors_file)


def _summary(source: Source, qmodel: nnx.Module, rules: Sequence[QuantRule], label: str, method: str,
             params: Mapping[str, Any], errors: Mapping[str, Mapping[str, Any]], data,
             unused: Sequence[str]) -> dict[str, Any]:
    floating = accounting.bit_accounting(source.model)
    quantized = accounting.bit_accounting(qmodel)
    weight_errors = {path: e["weight_rel_error"] for path, e in errors.items()}
    proxies = {path: e["output_proxy"] for path, e in errors.items() if e["output_proxy"] is not None}
    params_q = sum(e["params"] for e in errors.values())
    packed = sum(e["storage_bytes"] for e in errors.values())

    def spread(values: Mapping[str, float]) -> Optional[dict[str, Any]]:
        if not values:
            return None
        worst = max(values, key=values.get)
        return {"median": statistics.median(values.values()), "max": values[worst], "max_layer": worst}

    return {"model": source.name, "quantization": label, "method": method, "params": dict(params),
            "rules": [r.module_path for r in rules], "unused_rules": list(unused),
            "quantized_layers": len(errors), "seam_layers": len(transform.quant_layers(qmodel)),
            "quantized_params": params_q, "packed_bytes": packed, "packed_float_bytes": 2 * params_q,
            "effective_bits": packed * 8 / max(params_q, 1),
            "model_storage_bytes": quantized.storage_bytes, "float_storage_bytes": floating.storage_bytes,
            "mt_bits_per_param": quantized.mt_bits / max(quantized.total_params, 1),
            "weight_rel_error": spread(weight_errors), "output_proxy": spread(proxies),
            "calibration": None if data is None else dict(data.description)}


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n < 1e9 else f"{n / 1e9:.3f} GB"


def render_summary(result: PtqResult) -> str:
    """One screen: what was quantized, storage against float, errors, time."""
    s = result.summary
    params = ", ".join(f"{k}={v}" for k, v in s["params"].items()) or "defaults"
    lines = [f"bitlaws ptq: {s['model']}  {s['quantization']}  method {s['method']} ({params})",
             f"  rules:        {'; '.join(s['rules'])}"]
    if s["unused_rules"]:
        lines.append(f"  unused rules: {'; '.join(s['unused_rules'])}")
    calib = s["calibration"]
    lines.append("  calibration:  " + ("none" if calib is None else
                                       ", ".join(f"{k}={v}" for k, v in calib.items() if k != "protocol")))
    lines.append(f"  layers:       {s['quantized_layers']} of {s['seam_layers']} seam layers packed "
                 f"({s['quantized_params']:,} weights)")
    lines.append(f"  kernels:      {_mb(s['packed_float_bytes'])} at 16 bits -> {_mb(s['packed_bytes'])} packed "
                 f"({s['effective_bits']:.3f} bits/weight, scales included)")
    lines.append(f"  whole model:  {_mb(s['float_storage_bytes'])} -> {_mb(s['model_storage_bytes'])} "
                 f"(x{s['float_storage_bytes'] / max(s['model_storage_bytes'], 1):.2f}; MT "
                 f"{s['mt_bits_per_param']:.2f} bits/param)")
    for key, label in (("weight_rel_error", "weight error"), ("output_proxy", "output proxy")):
        spread = s[key]
        if spread is not None:
            lines.append(f"  {label + ':':<13} median {spread['median']:.4g}, max {spread['max']:.4g} "
                         f"({spread['max_layer']})")
    lines.append(f"  wrote {result.directory} (bitlaws.json, layer_errors.json, state/) in {s['wall_s']:.1f} s")
    return "\n".join(lines)


def run_ptq_from_config(config_spec: str, out: PathLike, overrides: Sequence[str] = (), *, force: bool = False,
                        command: Optional[str] = None) -> PtqResult:
    """Loads ``FILE.py[:ARG]`` (with ``--set`` overrides) and runs `run_ptq`; the output folder is checked first."""
    quantized_checkpoint.check_output_dir(out, force)
    config = configlib.load_config(config_spec, overrides)
    return run_ptq(config, out, force=force, command=command)

