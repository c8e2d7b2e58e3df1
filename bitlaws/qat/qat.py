"""QAT with distillation as methods of the one registry: ``qat:mse``, ``qat:js``, ``qat:fkl``, ``qat:rkl``,
``qat:topkld``.

The float model teaches its quantized self (the paper's section 4):

* **student** — the model with the rules' layers in ``fake`` mode (`bitlaws.quant.transform.materialize`):
  weights (and activations where the rule quantizes them) are quantize-dequantized at every call with a
  straight-through gradient, so the float weights under the quantizer learn. With ``lsq=True`` the weight
  step sizes are learned too (OmniQuant's LWC parametrization of the clipping range, `omniquant_core`: the
  scale follows ``sigmoid(gamma) max|W|`` per output channel / group; rounding straight-through, the range
  with its true gradient), and so are the scales of *static* activation specs (LSQ: the calibrated per-tensor
  scale, trained as its log; dynamic per-token activation scales have nothing to learn);
* **teacher** — the same float weights, frozen (passed to the compiled step as arguments, never constants);
* **data** — ``problem.data`` (`CalibrationData`): its ``forward(model, batch)`` returns what is distilled
  (VAR: teacher-forced logits ``[B, L, V]`` on token maps of the teacher's own samples; DiT: the full network
  output ``[B, H, W, 2C]``, mean and variance channels, at the inputs the data holds — for QAT the demo uses
  real digits noised by ``q_sample`` at timesteps uniform over the 1000 training steps, because the paper gives
  no DiT recipe). All batches form one pool; each step draws ``batch_size`` rows from seeded per-epoch
  permutations (a pure function of the step, so runs resume exactly);
* **loss** — `bitlaws.qat.losses` on ``(student output, teacher output)``; outputs with more than three axes
  are flattened to ``[B, positions, channels]`` (DiT: ``[B, H*W, 2C]``);
* **training** — `bitlaws.train.train`: one jit-compiled optax step (AdamW, warmup + cosine, clipping),
  optionally sharded over a mesh and checkpointed (``out_dir``).

The result is a `MethodResult` like any PTQ method's: the trained kernels, the quantized weights (RTN of the
trained kernels on the rule's spec, or the learned ranges with ``lsq``), and the other trained parameters
(biases, norms, embeddings, unquantized layers with ``train="all"``) as rewrites; `apply_method` materializes
it as ``fake``, ``baked`` or ``packed``.

Hyper-parameters (``DEFAULTS``; errors name the parameter):

=================  ==========================================================================================
``steps``          optimiser steps (200)
``batch_size``     rows per step (16)
``lr``             peak AdamW learning rate (1e-4), linear warmup over ``warmup_steps`` (10), cosine decay to
                   ``final_lr_fraction`` (0.1) of the peak
``weight_decay``   AdamW weight decay (0.0)
``grad_clip``      global-norm gradient clipping (1.0; 0 = off)
``k``              TopKLD's K (``qat:topkld`` only): teacher top-K tokens per position. None: the paper's best K
                   as a share of VAR's vocabulary, ``round(600 / 4096 * V)``. Set it to the sampling top-k.
``form``           TopKLD's form (``qat:topkld`` only): ``divergence`` (default: eq. 7 plus the generalised-KL mass
                   terms, minimal at the teacher) or ``paper`` (eq. 7 literally; see `bitlaws.qat.losses`)
``temperature``    softmax temperature of the KL-type losses (1.0)
``train``          ``all`` (every `nnx.Param` of the model, as the paper fine-tunes the model) or ``quantized``
                   (only the kernels of the rules' layers)
``lsq``            learn the step sizes (False): weights through LWC logits, static activation specs through
                   the log of their calibrated per-tensor scale (LSQ's gradient, `bitlaws.quant.seam`)
``lr_lsq``         learning rate of the step-size logits (1e-3)
``lsq_init``       initial logit of the clipping factor (4.0: sigmoid(4) = 0.982)
``mesh_data``      devices on the data axis (-1: all) — see `bitlaws.train.TrainConfig`
``mesh_params``    devices on the parameter (FSDP) axis (1)
``out_dir``        checkpoint folder of the training state (None: no checkpoints); a rerun resumes from it
``log_every``      steps between logged metrics (10)
``teacher_cache``  ``auto`` (default), True or False: run the frozen teacher once over the data pool before
                   training and feed its outputs (and TopKLD's top-K masks) to the step as data, instead of
                   a teacher forward in every step. ``auto`` caches when they take at most 1 GiB. Cached, the
                   step selects the loss by a traced index, so every loss of a model and setting compiles to
                   one program (a sweep's persistent compilation cache then compiles it once)
``remat``          recompute each transformer block in the backward pass (False; models with a
                   ``remat_blocks`` attribute, e.g. VAR): the step's memory drops to about one block's
                   activations, at the price of a second forward pass through the blocks (VAR-d16 at batch 8
                   on XLA:CPU: 25.7 GB of step temporaries without, 3.4 GB with it)
=================  ==========================================================================================

``info["qat"]`` of the result records the loss at the first and last logged steps, steps, wall time and
steps/s.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bitlaws.ptq import omniquant_core
from bitlaws.qat import losses
from bitlaws.quant import methods, seam, transform
from bitlaws.quant.methods import MethodProblem, MethodResult
from bitlaws.quant.layers import ActQParamsVar
from bitlaws.quant.seam import ActQParams, LayerQuant
from bitlaws import train as trainlib
from bitlaws.checkpoint import dotted_path

LOSS_NAMES = ("mse", "js", "fkl", "rkl", "topkld")
METHOD_PREFIX = "qat:"
PAPER_K_SHARE = 600 / 4096  # the paper's best TopKLD K (sampling top-k 600-900) over VAR's vocabulary
TRAINABLE = ("all", "quantized")

DEFAULTS: dict[str, Any] = {
    "steps": 200, "batch_size": 16, "lr": 1e-4, "warmup_steps": 10, "final_lr_fraction": 0.1,
    "weight_decay": 0.0, "grad_clip": 1.0, "temperature": 1.0, "train": "all", "lsq": False, "lr_lsq": 1e-3,
    "lsq_init": 4.0, "mesh_data": -1, "mesh_params": 1, "out_dir": None, "log_every": 10, "teacher_cache": "auto",
    "remat": False,
}
TEACHER_CACHE_AUTO_BYTES = 1 << 30  # "auto" caches the teacher when its outputs (+ top-K masks) fit in 1 GiB


@dataclasses.dataclass(frozen=True)
class QatConfig:
    """Validated hyper-parameters of one QAT run (see the module docstring)."""

    loss: str
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    final_lr_fraction: float
    weight_decay: float
    grad_clip: float
    temperature: float
    train: str
    lsq: bool
    lr_lsq: float
    lsq_init: float
    mesh_data: int
    mesh_params: int
    out_dir: Optional[str]
    log_every: int
    teacher_cache: Any = "auto"
    remat: bool = False
    k: Optional[int] = None
    form: str = "divergence"

    @classmethod
    def from_params(cls, loss: str, params: Mapping[str, Any]) -> "QatConfig":
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"qat:{loss}: hyper-parameter {name}={params[name]!r} must be {want}")

        def integer(name: str, low: int) -> int:
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise bad(name, f"an integer >= {low}")
            return int(value)

        def number(name: str, low: float, strict: bool) -> float:
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) \
                    or (value <= low if strict else value < low):
                raise bad(name, f"a finite number {'>' if strict else '>='} {low}")
            return float(value)

        if params["train"] not in TRAINABLE:
            raise bad("train", f"one of {TRAINABLE}")
        if not isinstance(params["lsq"], bool):
            raise bad("lsq", "True or False")
        if not (isinstance(params["teacher_cache"], bool) or params["teacher_cache"] == "auto"):
            raise bad("teacher_cache", "'auto', True or False")
        if not isinstance(params["remat"], bool):
            raise bad("remat", "True or False")
        k = params.get("k")
        if k is not None:
            k = integer("k", 0)
        form = params.get("form", "divergence")
        if form not in losses.TOPKLD_FORMS:
            raise bad("form", f"one of {losses.TOPKLD_FORMS}")
        mesh_data = params["mesh_data"]
        if isinstance(mesh_data, bool) or not isinstance(mesh_data, int) or (mesh_data < 1 and mesh_data != -1):
            raise bad("mesh_data", "-1 (all devices) or an integer >= 1")
        out_dir = params["out_dir"]
        if out_dir is not None and not isinstance(out_dir, str):
            raise bad("out_dir", "None or a folder path")
        if not isinstance(params["lsq_init"], (int, float)) or not math.isfinite(params["lsq_init"]):
            raise bad("lsq_init", "a finite number")
        return cls(loss=loss, steps=integer("steps", 1), batch_size=integer("batch_size", 1),
                   lr=number("lr", 0.0, True), warmup_steps=integer("warmup_steps", 0),
                   final_lr_fraction=number("final_lr_fraction", 0.0, False),
                   weight_decay=number("weight_decay", 0.0, False), grad_clip=number("grad_clip", 0.0, False),
                   temperature=number("temperature", 0.0, True), train=params["train"], lsq=params["lsq"],
                   lr_lsq=number("lr_lsq", 0.0, True), lsq_init=float(params["lsq_init"]), mesh_data=mesh_data,
                   mesh_params=integer("mesh_params", 1), out_dir=out_dir, log_every=integer("log_every", 1),
                   teacher_cache=params["teacher_cache"], remat=params["remat"], k=k, form=form)

    def train_config(self, seed: int) -> "trainlib.TrainConfig":
        return trainlib.TrainConfig(
            steps=self.steps, learning_rate=self.lr, warmup_steps=self.warmup_steps,
            final_lr_fraction=self.final_lr_fraction, weight_decay=self.weight_decay,
            grad_clip=self.grad_clip or None, log_every=self.log_every, seed=seed, mesh_data=self.mesh_data,
            mesh_params=self.mesh_params, checkpoint_every=max(1, self.steps // 4) if self.out_dir else 0)


# ------------------------------------------------------------------------------------------------ pieces


def distillation_loss(cfg: QatConfig, vocab: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``loss(student_out, teacher_out) -> scalar`` for `cfg.loss` (outputs flattened to ``[B, T, C]``)."""
    fn = losses.get_loss(cfg.loss)
    kwargs: dict[str, Any] = {} if cfg.loss == "mse" else {"temperature": cfg.temperature}
    if cfg.loss == "topkld":
        k = resolved_k(cfg, vocab)
        if k > vocab:
            raise ValueError(f"qat:topkld: k={k} exceeds the vocabulary V={vocab}")
        kwargs.update(k=k, form=cfg.form)
    return lambda student, teacher: fn(student, teacher, **kwargs)


def resolved_k(cfg: QatConfig, vocab: int) -> int:
    """TopKLD's K for `cfg`: ``cfg.k``, or the paper's share of the vocabulary, ``round(600 / 4096 * V)``."""
    return cfg.k if cfg.k is not None else int(round(PAPER_K_SHARE * vocab))


def loss_branches(cfg: QatConfig, vocab: int) -> tuple[Callable[[jax.Array, jax.Array, jax.Array], jax.Array], ...]:
    """One ``(student [B, T, C], teacher [B, T, C], in_top [B, T, C] bool) -> loss`` per name of `LOSS_NAMES`.

    The branches of the cached-teacher step's `jax.lax.switch`: ``in_top`` (TopKLD's set) is data, so the
    tuple - and the compiled step - is the same whichever loss `cfg` names (as long as ``temperature``,
    ``form`` and the K-is-0-or-V cases agree).
    """
    temperature, k = cfg.temperature, resolved_k(cfg, vocab)

    def kl_type(fn):
        return lambda s, t, in_top: fn(s, t, temperature=temperature)

    if k == 0:
        top = kl_type(losses.forward_kl)
    elif k == vocab:
        top = kl_type(losses.reverse_kl)
    else:
        def top(s, t, in_top):
            return losses.topkld_masked(s, t, in_top, temperature=temperature, form=cfg.form)
    named = {"mse": lambda s, t, in_top: losses.mse(s, t), "js": kl_type(losses.js),
             "fkl": kl_type(losses.forward_kl), "rkl": kl_type(losses.reverse_kl), "topkld": top}
    return tuple(named[name] for name in LOSS_NAMES)


def use_teacher_cache(cfg: QatConfig, probe: jax.ShapeDtypeStruct, rows: int) -> bool:
    """Whether to cache the teacher: ``cfg.teacher_cache``, or for ``auto`` whether the pool's outputs and
    top-K masks (``rows x T x C`` of the output dtype plus one byte) fit in `TEACHER_CACHE_AUTO_BYTES`."""
    if cfg.teacher_cache != "auto":
        return bool(cfg.teacher_cache)
    per_row = math.prod(probe.shape[1:]) * (jnp.dtype(probe.dtype).itemsize + 1)
    return rows * per_row <= TEACHER_CACHE_AUTO_BYTES


def teacher_outputs(teacher_def: nnx.GraphDef, teacher_state: nnx.State, forward: Callable, pool: Any,
                    cfg: QatConfig, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """The frozen teacher's outputs on every pool row, ``[N, T, C]``, and TopKLD's top-K sets ``[N, T, C]`` bool
    (all False unless `cfg` is ``topkld`` with 0 < K < V), computed ``cfg.batch_size`` rows at a time."""
    k = resolved_k(cfg, vocab) if cfg.loss == "topkld" else 0
    masked = 0 < k < vocab

    @jax.jit
    def chunk(state, batch):
        out = as_positions(forward(nnx.merge(teacher_def, state), batch))
        return out, (losses.teacher_top_k(out, k) if masked else jnp.zeros(out.shape, bool))

    n = pool_rows(pool)
    outs, tops = [], []
    for start in range(0, n, cfg.batch_size):
        out, top = chunk(teacher_state, jax.tree.map(lambda x: x[start:start + cfg.batch_size], pool))
        outs.append(np.asarray(out))
        tops.append(np.asarray(top))
    return np.concatenate(outs), np.concatenate(tops)


def as_positions(out: jax.Array) -> jax.Array:
    """A model output as ``[B, T, C]``: ``[B, C]`` gets T = 1, ``[B, ..., C]`` flattens the middle axes."""
    out = jnp.asarray(out)
    if out.ndim == 2:
        return out[:, None, :]
    if out.ndim < 2:
        raise ValueError(f"QAT distils outputs with a batch and a channel axis; got shape {tuple(out.shape)}")
    return out.reshape(out.shape[0], -1, out.shape[-1])


def batch_pool(batches) -> Any:
    """The calibration batches concatenated along their leading (batch) axis, as numpy arrays."""
    if not batches:
        raise ValueError("QAT needs training data: problem.data holds no batches")
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=0), *batches)


def pool_rows(pool: Any) -> int:
    sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(pool)}
    if len(sizes) != 1:
        raise ValueError(f"QAT data: the batch entries disagree on the batch size ({sorted(sizes)})")
    return sizes.pop()


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Rows of step `step`: consecutive slices of seeded per-epoch permutations of ``range(n)``."""
    per_epoch = n // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[offset * batch_size:(offset + 1) * batch_size]


def student_model(problem: MethodProblem, lsq: bool) -> nnx.Module:
    """The model with every target in ``fake`` mode (weights left in float for `lsq`: the step applies LWC)."""
    assignments = {t.path: t.rule for t in problem.targets}
    stats = {t.path: t.stats for t in problem.targets if t.stats is not None}
    student = transform.materialize_result(problem.model, assignments, MethodResult(), "fake", stats)
    if lsq:
        layers = dict(transform.quant_layers(student))
        for target in problem.targets:
            if target.rule.weight is not None:
                act = target.rule.act
                layers[target.path].quant = seam.FP if act is None else LayerQuant(mode="fake", act=act)
    return student


def use_remat(student: nnx.Module, loss: str) -> None:
    """Turns on block rematerialization in every sub-module that offers it (a ``remat_blocks`` attribute, e.g.
    `bitlaws.models.var.VAR`): the step then keeps one block's activations at a time, not all of them.

    Raises:
        ValueError: the model has no such module.
    """
    found = [module for _, module in nnx.iter_modules(student) if hasattr(module, "remat_blocks")]
    if not found:
        raise ValueError(f"qat:{loss}: remat=True, but no module of the model offers block rematerialization "
                         f"(a `remat_blocks` attribute, as bitlaws.models.var.VAR has)")
    for module in found:
        module.remat_blocks = True


def _trainable_filter(cfg: QatConfig, kernel_paths: set[str]):
    if cfg.train == "all":
        return nnx.Param
    return lambda path, value: isinstance(value, nnx.Param) and dotted_path(path) in kernel_paths


# ------------------------------------------------------------------------------------------------ method


def qat(problem: MethodProblem, loss: str) -> MethodResult:
    """Distils the float model into its fake-quantized self; see the module docstring."""
    cfg = QatConfig.from_params(loss, problem.params)
    if problem.data is None:
        raise ValueError(f"qat:{loss} needs training data (CalibrationData); pass data= to apply_method or run it "
                         f"in a sweep whose evaluator provides calibration data")
    pool = batch_pool(problem.data.batches)
    n = pool_rows(pool)
    if n < cfg.batch_size:
        raise ValueError(f"qat:{loss}: batch_size={cfg.batch_size} exceeds the {n} rows of the training data")
    forward = problem.data.traceable()  # traced inside the compiled step: no nnx.jit there
    weighted = [t for t in problem.targets if t.rule.weight is not None]
    kernel_paths = {f"{t.path}.kernel" for t in weighted}

    student = student_model(problem, cfg.lsq)
    if cfg.remat:
        use_remat(student, loss)
    graphdef, params, rest = nnx.split(student, _trainable_filter(cfg, kernel_paths), ...)
    # No copy here: `bitlaws.train.train` places (copies) the parameters before it donates them, so the teacher,
    # which shares these arrays, keeps them (a copy held here would cost one more model: 1.24 GB at VAR-d16).
    teacher_def, teacher_state = nnx.split(problem.model)
    # LWC logits (gamma, beta) per weighted target, in target order (a list: orbax-friendly keys).
    lwc = [omniquant_core.lwc_init(t.kernel, t.rule.weight, cfg.lsq_init) for t in weighted] if cfg.lsq else []
    # LSQ for static activation specs: log of each calibrated per-tensor scale (log: stays positive under Adam).
    static = [t for t in problem.targets if t.rule.act is not None and t.rule.act.static] if cfg.lsq else []
    student_layers = dict(transform.quant_layers(student))
    act_zero = [student_layers[t.path].act_qparams.get_value().zero_point for t in static]
    act_log = [jnp.log(student_layers[t.path].act_qparams.get_value().scale) for t in static]

    probe = jax.eval_shape(lambda state, batch: forward(nnx.merge(teacher_def, state), batch), teacher_state,
                           jax.tree.map(lambda x: x[:1], pool))
    vocab = int(probe.shape[-1])
    distil = distillation_loss(cfg, vocab)  # validates k against the vocabulary
    cached = use_teacher_cache(cfg, probe, n)

    def student_output(trainable, student_rest, data) -> jax.Array:
        """The student's output ``[B, T, C]`` with the trained weights, LWC ranges and activation scales."""
        model_params, lwc_logits, log_scales = trainable["model"], trainable["lwc"], trainable["act"]
        model = nnx.merge(graphdef, model_params, student_rest)
        layers = dict(transform.quant_layers(model)) if (lwc_logits or log_scales) else {}
        for target, (gamma, beta) in zip(weighted, lwc_logits):
            kernel = layers[target.path].kernel
            kernel.set_value(omniquant_core.lwc_fake_quant(kernel.get_value(), gamma, beta, target.rule.weight))
        for target, log_scale, zero in zip(static, log_scales, act_zero):
            layers[target.path].act_qparams = ActQParamsVar(ActQParams(jnp.exp(log_scale), zero))
        return as_positions(forward(model, data))

    def rows_of(tree: Any, rows: np.ndarray) -> Any:
        return jax.tree.map(lambda x: x[rows], tree)

    if cached:
        # The teacher runs once over the pool; the step gets its outputs (and TopKLD's top-K sets) as data and
        # picks the loss by a traced index, so the five losses share one program per model and setting.
        teacher_pool, top_pool = teacher_outputs(teacher_def, teacher_state, forward, pool, cfg, vocab)
        branches = loss_branches(cfg, vocab)

        def loss_fn(trainable, frozen, batch, key):
            del key
            student_rest, loss_index = frozen
            data, teacher_out, in_top = batch
            value = jax.lax.switch(loss_index, branches, student_output(trainable, student_rest, data),
                                   teacher_out, in_top)
            return value, {"loss": value}

        frozen = (rest, np.int32(LOSS_NAMES.index(cfg.loss)))

        def get_batch(step: int):
            rows = batch_indices(n, cfg.batch_size, step, problem.seed)
            return rows_of(pool, rows), teacher_pool[rows], top_pool[rows]
    else:
        def loss_fn(trainable, frozen, batch, key):
            del key
            teacher_params, student_rest = frozen
            teacher_out = jax.lax.stop_gradient(forward(nnx.merge(teacher_def, teacher_params), batch))
            value = distil(student_output(trainable, student_rest, batch), as_positions(teacher_out))
            return value, {"loss": value}

        frozen = (teacher_state, rest)

        def get_batch(step: int):
            return rows_of(pool, batch_indices(n, cfg.batch_size, step, problem.seed))

    config = cfg.train_config(problem.seed)
    optimizer = None
    if cfg.lsq:
        labels = {"model": jax.tree.map(lambda _: "model", params), "lwc": jax.tree.map(lambda _: "lsq", lwc),
                  "act": jax.tree.map(lambda _: "lsq", act_log)}
        optimizer = optax.multi_transform(
            {"model": trainlib.make_optimizer(config),
             "lsq": trainlib.make_optimizer(dataclasses.replace(config, learning_rate=cfg.lr_lsq))}, labels)
    began = time.perf_counter()
    result = trainlib.train(loss_fn, {"model": params, "lwc": lwc, "act": act_log}, get_batch, config,
                            frozen=frozen, out_dir=cfg.out_dir, optimizer=optimizer, progress=False,
                            desc=f"qat:{loss}")
    out = _result(problem, cfg, result.params["model"], result.params["lwc"], weighted, kernel_paths, result,
                  time.perf_counter() - began)
    out.info["qat"]["teacher_cache"] = cached
    out.act_params = {t.path: ActQParams(jnp.exp(log_scale), zero)
                      for t, log_scale, zero in zip(static, result.params["act"], act_zero)}
    return out


def _result(problem: MethodProblem, cfg: QatConfig, trained_model, trained_lwc, weighted, kernel_paths,
            result, seconds: float) -> MethodResult:
    out = MethodResult()
    flat = {dotted_path(path): jnp.asarray(value) for path, value in nnx.to_flat_state(trained_model)}
    for index, target in enumerate(weighted):
        kernel = flat[f"{target.path}.kernel"]
        out.kernels[target.path] = kernel
        if trained_lwc:
            gamma, beta = trained_lwc[index]
            out.weights[target.path] = omniquant_core.lwc_quantize(kernel, gamma, beta, target.rule.weight)
        else:
            out.weights[target.path] = methods.rtn(kernel, target.rule.weight)
    out.params = {path: value for path, value in flat.items() if path not in kernel_paths}
    history = result.history
    out.info["qat"] = {
        "loss": cfg.loss, "k": cfg.k, "form": cfg.form if cfg.loss == "topkld" else None, "steps": result.step,
        "start_step": result.start_step,
        "loss_first": history[0]["loss"] if history else None, "loss_last": history[-1]["loss"] if history else None,
        "loss_mean_last": result.metrics.get("loss"), "seconds": round(seconds, 2),
        "steps_per_s": round((result.step - result.start_step) / max(seconds, 1e-9), 3), "lsq": cfg.lsq,
        "train": cfg.train}
    return out


def _make(loss: str):
    def method(problem: MethodProblem) -> MethodResult:
        return qat(problem, loss)

    method.__qualname__ = method.__name__ = f"qat_{loss}"
    return method


for _loss in LOSS_NAMES:
    _defaults = dict(DEFAULTS, **({"k": None, "form": "divergence"} if _loss == "topkld" else {}))
    methods.register_method(METHOD_PREFIX + _loss, _make(_loss), kind="qat", needs_data=True, defaults=_defaults)
del _loss, _defaults
