"""OmniQuant as a registered method (``omniquant``): the block-wise integration of `omniquant_core`.

Procedure (Shao et al., 2024, eq. 1 and 9-11):

1. **Units.** Every matched layer belongs to the nearest enclosing module whose dotted path fully matches
   ``block_pattern`` (default ``blocks\\.\\d+``: VAR's ``AdaLNSelfAttn``, DiT's ``DiTBlock``); each such block is
   a unit. The matched layers outside every block (VAR ``word_embed`` / ``head`` / ``head_nm.ada_lin``, DiT
   ``final_layer.*``) form one more unit when ``outside_blocks="train"``: each layer's LWC is trained against
   its own float output on its float inputs (one program for all of them: the loss is the sum of the layers'
   MSEs, so each layer's logits get exactly their own gradient); ``outside_blocks="rtn"`` rounds them to
   nearest.
2. **Capture.** One float forward over ``problem.data`` records every unit's call arguments on the host
   (`bitlaws.quant.capture`, which works through the data's `nnx.jit`-compiled forward); each module's calls
   are stacked along the batch axis. All units' inputs are held once, on the host; a unit's arrays go to the
   device when it is trained and are dropped after it.
3. **Train, block by block, in block order.** The target is the float unit's output on the float inputs
   (the primary output: the first element of a tuple, e.g. ``x`` of VAR's ``(x, kv)``). As in OmniQuant, the
   quantized block sees the output of the already *quantized* previous block (exactly as the quantized model
   computes it: LET folded, packed weights) when the blocks form a chain - block i+1's first argument equals
   float block i's output, checked on the captured data; its other arguments (conditioning, masks) are the
   float model's. Otherwise (``sequential=False``, no chain), it sees the float inputs. ``apply_fn`` runs the
   unit's own module code (`nnx.merge` of its graph with the kernels replaced by ``lwc_fake_quant(s * W)``
   and the activation quantizers in ``fake`` mode); no attention is re-implemented.
   `omniquant_core.train_block` trains the LWC logits (and LET parameters) with AdamW.
4. **Result.** Weights are `omniquant_core.lwc_quantize` of the final (LET-scaled, folded) kernels; without
   LET the packed model computes exactly what was trained. ``info[block path]`` (and ``info[layer path]``
   for the layers outside blocks, with ``unit="outside_blocks"``) records ``loss_first`` / ``loss_last``
   (minibatch MSEs of the first and last step), ``steps``, ``samples``, ``seconds``, and for blocks ``mse``
   (the deployed block's output MSE over all samples) and ``chained``; LET layers get ``folded`` /
   ``shifted`` / ``fold_into`` as with ``smoothquant``.

LET (eq. 5-7). Each layer whose rule quantizes activations (``let=None``) reads ``(x - delta) / s`` and
runs ``s * W`` with bias ``b + delta W``; ``s`` is trained as ``log s`` from SmoothQuant's
``max|X|^alpha / max|W|^(1 - alpha)``, ``delta`` from 0. Training runs the transform explicitly (an
`InputScale` ``s`` on the layer, the shift and bias correction around its call). Afterwards
`bitlaws.ptq.folds` folds both into the op producing the input where there is one (the adaLN scale / shift
columns, the v columns of qkv for ``proj``; ``fold=True``) and keeps an `InputScale` elsewhere. A shift is
trained only where it can be folded (`folds.shiftable_layers`: not fc2 after GELU, not VAR's ``mat_qkv`` with
L2-normalised keys). Folding divides whole output columns of the predecessor (itself a quantized layer), which
per-channel / per-group weight quantization and LWC absorb: the packed model computes what was trained up to
the float16 rounding of the folded columns' scales. The attention ``Q K^T`` transformation of the paper is
not used (our seam does not quantize attention matmuls).

Hyper-parameters (``DEFAULTS``; errors name the parameter):

=================  ============================================================================================
``epochs``         passes over the captured samples per unit (4; the paper runs 20 on 128 x 2048 tokens)
``steps``          optimiser steps per unit, overriding ``epochs`` (None)
``batch_size``     samples per step (4)
``lr_lwc``         AdamW learning rate of the clipping logits (0.1; the paper uses 1e-2 for 20 epochs)
``lr_let``         ... of LET's ``log s`` and shift (5e-3)
``lwc``            learn the weight clipping (True); False: RTN weights (fake-quantized while LET trains)
``let``            learn the equivalent transformation: True, False, or None = on for layers whose rule
                   quantizes activations (weight-activation settings), off for weight-only ones
``lwc_init``       initial logit of gamma and beta (4.0: sigmoid(4) = 0.982 as in the paper; ``inf``
                   starts at the full min-max range, i.e. RTN with the ``minmax`` calibrator)
``let_alpha``      SmoothQuant migration strength of the LET initialisation (0.5)
``let_shift``      also learn LET's shift on layers where it folds (True)
``fold``           fold LET into preceding ops (True); False keeps an `InputScale` everywhere, without shifts
``weight_decay``   AdamW weight decay (0.0 as in the paper)
``block_pattern``  regex of block module paths (``blocks\\.\\d+``)
``outside_blocks`` ``train`` or ``rtn`` for matched layers outside blocks
``sequential``     feed each chained block the quantized previous block's output (True) or the float one
=================  ============================================================================================
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.ptq import folds, omniquant_core, smoothquant_core
from bitlaws.quant import capture, qarray, seam, transform
from bitlaws.quant.layers import ActQParamsVar, InputScale, QLinear
from bitlaws.quant.methods import MethodProblem, MethodResult, Target, register_method
from bitlaws.quant.spec import QuantSpec

DEFAULTS = {
    "epochs": 4, "steps": None, "batch_size": 4, "lr_lwc": 1e-1, "lr_let": 5e-3, "lwc": True, "let": None,
    "lwc_init": omniquant_core.LWC_INIT, "let_alpha": 0.5, "let_shift": True, "fold": True, "weight_decay": 0.0,
    "block_pattern": r"blocks\.\d+", "outside_blocks": "train", "sequential": True,
}
OUTSIDE_BLOCKS = ("train", "rtn")
EVAL_CHUNK = 256  # samples per compiled evaluation call
CHAIN_RTOL = 1e-4  # relative max-abs tolerance of the chain check (two compilations of the same float math)


@dataclasses.dataclass(frozen=True)
class OmniQuantConfig:
    """The validated hyper-parameters (see the module docstring)."""

    epochs: float
    steps: Optional[int]
    batch_size: int
    lr_lwc: float
    lr_let: float
    lwc: bool
    let: Optional[bool]
    lwc_init: float
    let_alpha: float
    let_shift: bool
    fold: bool
    weight_decay: float
    block_pattern: str
    outside_blocks: str
    sequential: bool

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "OmniQuantConfig":
        """Checks `params` (the method's resolved hyper-parameters). Raises ValueError naming the bad one."""
        p = {**DEFAULTS, **params}

        def bad(name, want):
            return ValueError(f"omniquant: hyper-parameter {name} must be {want}, got {p[name]!r}")

        def number(name, positive=True):
            value = p[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value <= 0 if positive else value < 0):
                raise bad(name, "a positive number" if positive else "a non-negative number")
            return float(value)

        def flag(name, allow_none=False):
            if p[name] is None and allow_none:
                return None
            if not isinstance(p[name], (bool, np.bool_)):
                raise bad(name, "True, False or None" if allow_none else "True or False")
            return bool(p[name])

        steps = p["steps"]
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise bad("steps", "None or a non-negative integer")
        batch_size = p["batch_size"]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise bad("batch_size", "a positive integer")
        lwc_init = p["lwc_init"]
        if isinstance(lwc_init, bool) or not isinstance(lwc_init, (int, float)) or math.isnan(lwc_init):
            raise bad("lwc_init", "a number (inf: no initial clipping)")
        alpha = number("let_alpha", positive=False)
        if alpha > 1:
            raise bad("let_alpha", "in [0, 1]")
        pattern = p["block_pattern"]
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise bad("block_pattern", f"a regular expression ({e})") from None
        if p["outside_blocks"] not in OUTSIDE_BLOCKS:
            raise bad("outside_blocks", f"one of {OUTSIDE_BLOCKS}")
        return cls(epochs=number("epochs"), steps=steps, batch_size=batch_size, lr_lwc=number("lr_lwc"),
                   lr_let=number("lr_let"), lwc=flag("lwc"), let=flag("let", allow_none=True),
                   lwc_init=float(lwc_init), let_alpha=alpha, let_shift=flag("let_shift"), fold=flag("fold"),
                   weight_decay=number("weight_decay", positive=False), block_pattern=pattern,
                   outside_blocks=p["outside_blocks"], sequential=flag("sequential"))


# ------------------------------------------------------------------------------------------------ units


@dataclasses.dataclass(frozen=True)
class _LayerCfg:
    """How one layer of a unit is trained (hashable: part of the apply function's cache key).

    Attributes:
        rel: Path relative to the unit's module (``attn.mat_qkv``; ``"0"`` for the first layer of a group).
        weight: Weight spec, or None.
        act: Activation spec, or None.
        let: Whether the layer learns a LET scale.
        shift: ... and a LET shift.
    """

    rel: str
    weight: Optional[QuantSpec]
    act: Optional[QuantSpec]
    let: bool
    shift: bool


@dataclasses.dataclass
class _Unit:
    """What is trained at once: one block, or the group of matched layers outside blocks.

    Attributes:
        name: The block's path, or ``outside_blocks``.
        members: The modules called on captured inputs: ``(block path,)``, or the group's layers.
        targets: The unit's matched layers.
    """

    name: str
    members: tuple[str, ...]
    targets: list[Target]

    @property
    def is_block(self) -> bool:
        return self.members == (self.name,)

    def module(self, model: nnx.Module) -> nnx.Module:
        """The unit's module: the block, or an `nnx.List` of the group's layers (sharing the model's arrays)."""
        if self.is_block:
            return capture.get_module(model, self.name)
        return nnx.List([capture.get_module(model, path) for path in self.members])

    def member_rels(self) -> tuple[str, ...]:
        return ("",) if self.is_block else tuple(str(i) for i in range(len(self.members)))

    def rel(self, target: Target) -> str:
        if self.is_block:
            return target.path[len(self.name) + 1:]
        return str(self.members.index(target.path))


OUTSIDE = "outside_blocks"


def _split_targets(problem: MethodProblem, cfg: OmniQuantConfig) -> tuple[list[_Unit], list[Target]]:
    """The block units (natural order) and the matched layers outside every block."""
    regex = re.compile(cfg.block_pattern)
    blocks: dict[str, _Unit] = {}
    outside: list[Target] = []
    for target in problem.targets:
        if target.rule.weight is None and target.rule.act is None:
            continue
        parts = target.path.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                      if regex.fullmatch(".".join(parts[:i]))), None)
        if owner is None:
            outside.append(target)
        else:
            blocks.setdefault(owner, _Unit(owner, (owner,), [])).targets.append(target)
    return [blocks[p] for p in capture.natural_sorted(blocks)], outside


def _layer(module: nnx.Module, rel: str) -> nnx.Module:
    return capture.get_module(module, rel) if rel else module


def _layer_cfgs(unit: _Unit, unit_module: nnx.Module, cfg: OmniQuantConfig,
                shiftable: set[str]) -> tuple[_LayerCfg, ...]:
    out = []
    for target in unit.targets:
        rel = unit.rel(target)
        layer = _layer(unit_module, rel)
        wanted = target.rule.act is not None if cfg.let is None else cfg.let
        let = wanted and isinstance(layer, QLinear) and layer.input_scale is None  # plain linears only
        shift = let and cfg.let_shift and cfg.fold and target.path in shiftable
        out.append(_LayerCfg(rel, target.rule.weight, target.rule.act, let, shift))
    return tuple(out)


def _prepare(unit_module: nnx.Module, layers: tuple[_LayerCfg, ...],
             stats: Mapping[str, Any]) -> nnx.Module:
    """A clone of the unit whose layers fake-quantize activations (float weights) and hold LET placeholders."""
    module = nnx.clone(unit_module)
    for layer_cfg in layers:
        layer = _layer(module, layer_cfg.rel)
        act = layer_cfg.act
        layer.quant = seam.FP if act is None else seam.LayerQuant(mode="fake", act=act)
        if act is not None and act.static:
            layer.act_qparams = ActQParamsVar(seam.static_act_params(stats[layer_cfg.rel], act))
        if layer_cfg.let:
            layer.input_scale = InputScale(jnp.ones((layer.in_features,), jnp.float32))
    return module


def _primary(out: Any) -> jax.Array:
    """The output a unit is trained on: its first leaf-most element (``x`` of VAR's ``(x, (k, v))``)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _shifted_call(layer: nnx.Module, delta: jax.Array, correction: jax.Array, x: jax.Array) -> jax.Array:
    """``layer(x - delta) + delta W``: the LET shift around a layer (its bias correction added to the output)."""
    return layer(x - delta.astype(x.dtype)) + correction.astype(x.dtype)


def _set_child(parent: nnx.Module, name: str, value: Any) -> None:
    if name.isdigit() and not hasattr(parent, name):
        parent[int(name)] = value
    else:
        setattr(parent, name, value)


@functools.lru_cache(maxsize=128)
def _apply_fn(graphdef: Any, members: tuple[tuple[str, capture.CallSignature], ...],
              layers: tuple[_LayerCfg, ...], lwc: bool):
    """``apply(float_params, qparams, x) -> (y per member)``: the unit's own code with quantized kernels.

    ``x`` and ``float_params["shared"]`` hold one entry per member (`capture.CallBatch` leaves). One function
    object per (graph, call structures, layer settings), so `omniquant_core.train_block` compiles once for
    all blocks of the same structure.
    """
    member_rels = {rel for rel, _ in members}

    def apply(float_params, qparams, x):
        module = nnx.merge(graphdef, float_params["state"], copy=True)  # a fresh copy: free to modify
        calls = {}
        for layer_cfg in layers:
            layer = _layer(module, layer_cfg.rel)
            w = layer.kernel[...].astype(jnp.float32)
            if layer_cfg.let:
                let = qparams["let"][layer_cfg.rel]
                s = jnp.exp(let["log_s"])
                w = smoothquant_core.smooth(w, s)
                layer.input_scale.set_value(s)
                if layer_cfg.shift:
                    shifted = functools.partial(_shifted_call, layer, let["delta"],
                                                folds.shift_correction(w, s, let["delta"]))
                    if layer_cfg.rel in member_rels:
                        calls[layer_cfg.rel] = shifted
                    else:
                        *parent, name = layer_cfg.rel.split(".")
                        _set_child(_layer(module, ".".join(parent)), name, shifted)
            if layer_cfg.weight is not None:
                if lwc:
                    w = omniquant_core.lwc_fake_quant(w, *qparams["lwc"][layer_cfg.rel], layer_cfg.weight)
                else:
                    w = qarray.fake_quant(w, layer_cfg.weight)
            layer.kernel.set_value(w.astype(layer.kernel.dtype))
        outs = []
        for (rel, signature), xs, shared in zip(members, x, float_params["shared"]):
            args, kwargs = signature.rebuild(xs, shared)
            outs.append(_primary(calls.get(rel, _layer(module, rel))(*args, **kwargs)).astype(jnp.float32))
        return tuple(outs)

    return apply


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _run(apply_fn, float_params, qparams, x):
    return apply_fn(float_params, qparams, x)


def _committed(tree: Any) -> Any:
    """`tree` on the default device, committed: compiled programs see one input placement (no recompiles)."""
    return jax.device_put(tree, jax.devices()[0])


def _outputs(apply_fn, float_params, qparams, inputs) -> tuple[jax.Array, ...]:
    """``apply_fn`` on all ``n`` samples, in chunks of `EVAL_CHUNK`: per member ``[n, ...]`` float32."""
    n = int(jax.tree.leaves(inputs)[0].shape[0])
    chunks = [_run(apply_fn, float_params, qparams, jax.tree.map(lambda a, i=i: a[i:i + EVAL_CHUNK], inputs))
              for i in range(0, n, EVAL_CHUNK)]
    return chunks[0] if len(chunks) == 1 else tuple(jnp.concatenate(c, axis=0) for c in zip(*chunks))


def _mse(y: jax.Array, target: jax.Array) -> float:
    return float(jnp.mean(jnp.square(y - target)))


def _chained(prev_target: Optional[jax.Array], batch: capture.CallBatch) -> bool:
    """Whether the unit's first argument is the previous block's float output (same shape and values)."""
    if prev_target is None or not batch.batched or batch.signature.kinds[0] != capture.BATCHED:
        return False
    x = batch.batched[0]
    if x.shape != prev_target.shape:
        return False
    err = float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - prev_target)))
    return err <= CHAIN_RTOL * (float(jnp.max(jnp.abs(prev_target))) + 1e-12)


# ------------------------------------------------------------------------------------------------ method


def _init_qparams(unit_module: nnx.Module, unit: _Unit, layers: tuple[_LayerCfg, ...],
                  cfg: OmniQuantConfig) -> dict[str, dict[str, Any]]:
    """``{"lwc": {rel: (gamma, beta)}, "let": {rel: {"log_s", "delta"}}}`` (empty groups left out)."""
    lwc, let = {}, {}
    for layer_cfg, target in zip(layers, unit.targets):
        kernel = _layer(unit_module, layer_cfg.rel).kernel[...]
        if layer_cfg.let:
            absmax = None if target.stats is None else target.stats.absmax
            s = (jnp.ones((kernel.shape[-2],), jnp.float32) if absmax is None
                 else smoothquant_core.smoothing_scales(absmax, kernel, cfg.let_alpha))
            let[layer_cfg.rel] = {"log_s": jnp.log(s)}
            if layer_cfg.shift:
                let[layer_cfg.rel]["delta"] = jnp.zeros_like(s)
        if layer_cfg.weight is not None and cfg.lwc:
            lwc[layer_cfg.rel] = omniquant_core.lwc_init(kernel, layer_cfg.weight, cfg.lwc_init)
    return {name: group for name, group in (("lwc", lwc), ("let", let)) if group}


def _steps(cfg: OmniQuantConfig, n: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * n / min(cfg.batch_size, n)))


@functools.partial(jax.jit, static_argnames=("specs",))
def _pack(kernels: Mapping[str, jax.Array], logits: Mapping[str, tuple[jax.Array, jax.Array]],
          specs: tuple[tuple[str, QuantSpec], ...]) -> dict[str, qarray.QArray]:
    """Packs a unit's kernels (LWC where `logits` has the layer, else RTN): one program per unit structure."""
    return {key: omniquant_core.lwc_quantize(kernels[key], *logits[key], spec) if key in logits
            else qarray.quantize(kernels[key], spec) for key, spec in specs}


def _transforms(layers: tuple[_LayerCfg, ...], keys: list[str], kernels: Mapping[str, jax.Array],
                qparams: Mapping[str, Any]):
    """``({key: InputTransform}, {key: s * W})`` of a unit's LET layers under `keys` (relative or absolute)."""
    transforms, scaled = {}, {}
    for layer_cfg, key in zip(layers, keys):
        if layer_cfg.let:
            let = qparams["let"][layer_cfg.rel]
            s = jnp.exp(let["log_s"])
            transforms[key] = folds.InputTransform(s, let.get("delta"))
            scaled[key] = smoothquant_core.smooth(kernels[key], s)
    return transforms, scaled


def _finish(model: nnx.Module, trained, cfg: OmniQuantConfig, targets: Mapping[str, Target]) -> MethodResult:
    """Folds the LET transforms (or keeps `InputScale` s) of all units, then packs every weight.

    Args:
        model: The float model, or one block's module (paths then relative to it).
        trained: ``[(layers, keys, qparams)]`` per unit: its `_LayerCfg` s, their paths in `model`, the
            trained parameters.
        cfg: The configuration.
        targets: ``{path in model: Target}`` of every layer to pack (the untrained ones by RTN).
    """
    kernels = {key: t.kernel for key, t in targets.items()}
    transforms, scaled = {}, {}
    for layers, keys, qparams in trained:
        t, k = _transforms(layers, keys, kernels, qparams)
        transforms.update(t)
        scaled.update(k)
    fold = folds.fold_input_transforms(model, transforms, scaled, targets=list(targets), fold=cfg.fold)
    result = MethodResult(kernels=fold.kernels, params=fold.params, input_scales=fold.input_scales)
    for layers, keys, qparams in trained:  # packed under relative paths: one program for equal units
        weighted = [(c, key) for c, key in zip(layers, keys) if c.weight is not None]
        if weighted:
            packed = _pack(_committed({c.rel: fold.kernels.get(key, kernels[key]) for c, key in weighted}),
                           {c.rel: qparams["lwc"][c.rel] for c, _ in weighted if c.rel in qparams.get("lwc", {})},
                           tuple((c.rel, c.weight) for c, _ in weighted))
            result.weights.update({key: packed[c.rel] for c, key in weighted})
    for key, target in targets.items():  # not trained: round to nearest
        if target.rule.weight is not None and key not in result.weights:
            result.weights[key] = qarray.quantize(fold.kernels.get(key, target.kernel), target.rule.weight)
    for key, t in transforms.items():
        entry = result.info.setdefault(key, {})
        entry["folded"] = key in fold.folded
        entry["shifted"] = t.delta is not None
        if key in fold.folded:
            entry["fold_into"] = fold.folded[key]
    return result


def _deployed(block: nnx.Module, unit: _Unit, layers: tuple[_LayerCfg, ...], qparams: Mapping[str, Any],
              cfg: OmniQuantConfig) -> nnx.Module:
    """The block as the quantized model runs it (LET folded inside the block, packed weights baked in float)."""
    targets = {c.rel: t for c, t in zip(layers, unit.targets)}
    result = _finish(block, [(layers, [c.rel for c in layers], qparams)], cfg, targets)
    stats = {c.rel: t.stats for c, t in zip(layers, unit.targets)}
    return transform.materialize_result(block, {c.rel: t.rule for c, t in zip(layers, unit.targets)}, result,
                                  "baked", stats, "xla")


def _train_unit(problem: MethodProblem, cfg: OmniQuantConfig, unit: _Unit, seed: int,
                batches: list[capture.CallBatch], shiftable: set[str],
                previous: Optional[tuple[jax.Array, jax.Array]]):
    """Trains one unit on its members' stacked calls.

    Returns:
        ``(layers, qparams, info, (float output, deployed output) of a block or None)``.
    """
    unit_module = unit.module(problem.model)
    layers = _layer_cfgs(unit, unit_module, cfg, shiftable)
    members = tuple(zip(unit.member_rels(), (b.signature for b in batches)))
    shared = _committed(tuple([jnp.asarray(a) for a in b.arrays] for b in batches))
    inputs = _committed(tuple([jnp.asarray(a) for a in b.batched] for b in batches))
    float_graph, float_state = nnx.split(unit_module)
    target = _outputs(_apply_fn(float_graph, members, (), cfg.lwc),
                      {"state": _committed(float_state), "shared": shared}, {}, inputs)
    chained = unit.is_block and previous is not None and cfg.sequential and _chained(previous[0], batches[0])
    if chained:
        inputs[0][0] = previous[1]  # the deployed previous block's output

    stats = {layer_cfg.rel: t.stats for layer_cfg, t in zip(layers, unit.targets)}
    graph, state = nnx.split(_prepare(unit_module, layers, stats))
    apply_fn = _apply_fn(graph, members, layers, cfg.lwc)
    float_params = _committed({"state": state, "shared": shared})
    qparams0 = _committed(_init_qparams(unit_module, unit, layers, cfg))
    n = batches[0].n
    steps = _steps(cfg, n) if qparams0 else 0
    rates = {"lwc": cfg.lr_lwc, "let": cfg.lr_let}
    qparams, losses = omniquant_core.train_block(
        apply_fn, float_params, qparams0, inputs, target, steps=steps,
        lr={name: rates[name] for name in qparams0} if qparams0 else cfg.lr_lwc, batch_size=cfg.batch_size,
        seed=seed, weight_decay=cfg.weight_decay)
    losses = np.asarray(losses)
    info = {"samples": n, "steps": steps, "let_layers": sum(c.let for c in layers)}
    if steps:
        info.update(loss_first=float(losses[0]), loss_last=float(losses[-1]))
    if not unit.is_block:
        return layers, qparams, info, None
    # The deployed block's output: the next block's input, and its error for the records.
    deployed_graph, deployed_state = nnx.split(_deployed(unit_module, unit, layers, qparams, cfg))
    (out,) = _outputs(_apply_fn(deployed_graph, members, (), cfg.lwc),
                      {"state": _committed(deployed_state), "shared": shared}, {}, inputs)
    info.update(chained=bool(chained), mse=_mse(out, target[0]))
    return layers, qparams, info, (target[0], out)


def omniquant(problem: MethodProblem) -> MethodResult:
    """OmniQuant on the problem's layers (see the module docstring)."""
    cfg = OmniQuantConfig.from_params(problem.params)
    if problem.data is None or not problem.data.batches:
        raise ValueError("omniquant trains on captured block inputs: pass calibration data (quantize_model(..., "
                         "data=CalibrationData(forward, batches)))")
    blocks, outside = _split_targets(problem, cfg)
    loose = outside if cfg.outside_blocks == "train" else []  # the others are rounded to nearest by `_finish`
    shiftable = folds.shiftable_layers(problem.model) if cfg.fold else set()
    calls = capture.capture_calls(problem.model, [u.name for u in blocks] + [t.path for t in loose], problem.data)
    stacked = {path: capture.stack_calls(c, path) for path, c in calls.items() if c}
    del calls
    groups: dict[int, list[Target]] = {}  # outside layers by sample count (one unit each; usually one)
    for target in loose:
        if target.path in stacked:
            groups.setdefault(stacked[target.path].n, []).append(target)
    units = [u for u in blocks if u.name in stacked] + [
        _Unit(OUTSIDE if len(groups) == 1 else f"{OUTSIDE}[{n}]", tuple(t.path for t in ts), ts)
        for n, ts in groups.items()]
    trained, infos, previous = [], {}, None
    for index, unit in enumerate(units):
        start = time.perf_counter()
        batches = [stacked.pop(path) for path in unit.members]  # dropped once the unit is trained
        layers, qparams, info, previous = _train_unit(problem, cfg, unit, problem.seed + index, batches, shiftable,
                                                      previous if unit.is_block else None)
        del batches
        trained.append((layers, [t.path for t in unit.targets], qparams))
        info["seconds"] = time.perf_counter() - start
        for key in (unit.members if not unit.is_block else (unit.name,)):
            infos[key] = {**info, "unit": unit.name}
    result = _finish(problem.model, trained, cfg, {t.path: t for t in problem.targets})
    for key, info in infos.items():
        result.info[key] = {**result.info.get(key, {}), **info}
    return result


register_method("omniquant", omniquant, needs_stats=True, defaults=DEFAULTS)
