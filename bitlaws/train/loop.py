"""The one training loop of bitlaws: `train` (pure pytrees) and `train_module` (an NNX module).

One jit-compiled step ``(params, opt_state, ema, frozen, batch, step) -> (params, opt_state, ema, metrics)``
with donated state runs on a ``(data, params)`` device mesh (`bitlaws.train.sharding`): the batch split over
``data``, large arrays of the state and of ``frozen`` optionally split over ``params`` (FSDP-style). The PRNG key of step ``s``
is ``fold_in(key(config.seed), s)`` and ``get_batch(s)`` must be a deterministic function of ``s``; with both,
a run resumed from its train state (`bitlaws.train.state_io`, ``OUT/train_state``) is bitwise the run that was
never interrupted, even after a SIGKILL. ``OUT/metrics.jsonl`` holds one line per logged step and is cut back
to the restored step on resume, so it always matches the state.

Multi-host: run the same program on every host, one process per host, each with the same config and the
same deterministic `get_batch` (every process computes the global batch and places its own shards). Set
``distributed=True`` (``jax.distributed.initialize()`` then reads the coordinator address, process count and
id from the environment or the cluster, e.g. SLURM / Cloud TPU), or call `initialize_distributed` yourself
before any other JAX call if the program builds its parameters with JAX first. Only process 0 writes
``metrics.jsonl`` and shows the progress bar; the orbax train state is written jointly by all processes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from bitlaws.train import sharding
from bitlaws.train.optimizer import make_optimizer, make_schedule
from bitlaws.train.state_io import TrainStateStore

METRICS_FILE = "metrics.jsonl"
RECENT = 50  # TrainResult.metrics averages this many logged steps
PathLike = Union[str, pathlib.Path]
LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, logging, checkpointing and mesh settings of `train` (validated at construction).

    Attributes:
        steps: Total optimizer steps (>= 1).
        learning_rate: Peak learning rate (>= 0).
        warmup_steps: Linear warm-up steps from 0 (>= 0).
        final_lr_fraction: The cosine decays to this fraction of the peak (in [0, 1]).
        weight_decay: AdamW's decoupled weight decay (>= 0).
        b1, b2: Adam's moment decays (in [0, 1)).
        grad_clip: Global-norm gradient clipping threshold (> 0), or None for none.
        ema_decay: Keep an EMA of the parameters with decay ``min(ema_decay, (1 + s) / (10 + s))`` at step
            ``s`` (in [0, 1)), or None for no EMA.
        checkpoint_every: Save the train state every N steps (>= 0; 0: only at the end of a session); needs
            ``out_dir``.
        log_every: Log metrics (``metrics.jsonl``, progress bar, history) every N steps and at the last step.
        seed: PRNG seed; the key of step ``s`` is ``fold_in(key(seed), s)``.
        mesh_data: Devices on the ``data`` axis (-1: all devices / mesh_params).
        mesh_params: Devices on the ``params`` (FSDP) axis (>= 1).
        fsdp_min_size: Arrays with fewer elements stay replicated (>= 0).
        distributed: Call ``jax.distributed.initialize()`` first (multi-host; see the module docstring).
        min_warmup_steps: Warm up over at least this many steps (>= 0); the VAR demo trainers use 1.
    """

    steps: int
    learning_rate: float
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: Optional[float] = 1.0
    ema_decay: Optional[float] = None
    checkpoint_every: int = 0
    log_every: int = 1
    seed: int = 0
    mesh_data: int = -1
    mesh_params: int = 1
    fsdp_min_size: int = 2**18
    distributed: bool = False
    min_warmup_steps: int = 0

    def __post_init__(self):
        for name, low in (("steps", 1), ("warmup_steps", 0), ("checkpoint_every", 0), ("log_every", 1),
                          ("seed", None), ("mesh_data", -1), ("mesh_params", 1), ("fsdp_min_size", 0),
                          ("min_warmup_steps", 0)):
            self._set(name, _integer(name, getattr(self, name), low))
        if self.mesh_data == 0:
            raise ValueError("TrainConfig.mesh_data must be -1 (all devices) or >= 1, got 0")
        for name, low, high, high_open in (("learning_rate", 0.0, math.inf, False),
                                           ("final_lr_fraction", 0.0, 1.0, False),
                                           ("weight_decay", 0.0, math.inf, False), ("b1", 0.0, 1.0, True),
                                           ("b2", 0.0, 1.0, True)):
            self._set(name, _real(name, getattr(self, name), low, high, high_open))
        if self.grad_clip is not None:
            self._set("grad_clip", _real("grad_clip", self.grad_clip, 0.0, math.inf, False))
            if self.grad_clip == 0.0:
                raise ValueError("TrainConfig.grad_clip must be > 0 or None (no clipping), got 0")
        if self.ema_decay is not None:
            self._set("ema_decay", _real("ema_decay", self.ema_decay, 0.0, 1.0, True))
        if not isinstance(self.distributed, (bool, np.bool_)):
            raise ValueError(f"TrainConfig.distributed must be a bool, got {self.distributed!r}")
        self._set("distributed", bool(self.distributed))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @classmethod
    def from_config(cls, config: Any, ignore: Sequence[str] = ()) -> "TrainConfig":
        """A `TrainConfig` from an ``ml_collections.ConfigDict`` or mapping of its fields.

        Args:
            config: The fields (``steps`` and ``learning_rate`` required).
            ignore: Keys of `config` that are not `TrainConfig` fields but expected (``batch_size`` ...).

        Raises:
            ValueError: unknown keys (named), a missing required field, an invalid value.
        """
        values = dict(config.items()) if hasattr(config, "items") else dict(config)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields - set(ignore))
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}; fields: {sorted(fields)}"
                             + (f"; ignored: {sorted(ignore)}" if ignore else ""))
        missing = sorted(name for name in ("steps", "learning_rate") if name not in values)
        if missing:
            raise ValueError(f"TrainConfig: missing required field(s) {missing}")
        return cls(**{name: value for name, value in values.items() if name in fields})


def _integer(name: str, value: Any, low: Optional[int]) -> int:
    integral = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, (bool, np.bool_)) or not integral or (low is not None and value < low):
        bound = "an integer" if low is None else f"an integer >= {low}"
        raise ValueError(f"TrainConfig.{name} must be {bound}, got {value!r}")
    return int(value)


def _real(name: str, value: Any, low: float, high: float, high_open: bool) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if ok:
        value = float(value)
        ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        upper = "" if high == math.inf else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"TrainConfig.{name} must be a finite number >= {low}{upper}, got {value!r}")
    return value


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        params: The final trainable pytree (device arrays, placed as in training).
        ema: The final EMA of the parameters, or None.
        step: Steps completed (over all sessions).
        start_step: The step this session resumed from (0: fresh).
        wall_s: Wall time over all sessions (s). With `out_dir`, the value saved with the last train state (what a
            resumed run continues from; waiting for that write to finish is not counted).
        metrics: Mean of each metric over the last <= 50 logged steps of this session.
        history: Every logged step of this session: ``{"step", **metrics, "steps_per_s"}`` (and ``"lr"``
            with the default optimizer), as in ``metrics.jsonl``.
    """

    params: Any
    ema: Optional[Any]
    step: int
    start_step: int
    wall_s: float
    metrics: dict[str, float]
    history: list[dict]


def initialize_distributed(config: Optional[TrainConfig] = None) -> None:
    """``jax.distributed.initialize()`` once (when `config` is None or asks for it); call before other JAX calls."""
    if (config is None or config.distributed) and not jax.distributed.is_initialized():
        jax.distributed.initialize()


# ----------------------------------------------------------------------------------------------
# The compiled step.
# ----------------------------------------------------------------------------------------------

_STEP_CACHE: "collections.OrderedDict[Any, Callable]" = collections.OrderedDict()
_STEP_CACHE_SIZE = 16


def _hashable(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


def _compiled_step(loss_fn: LossFn, tx: optax.GradientTransformation, config: TrainConfig, in_shardings: tuple,
                   out_shardings: tuple) -> Callable:
    """The jitted train step, cached on everything that defines it (so repeated `train` calls reuse it)."""
    key = (loss_fn, tx, config.ema_decay, _hashable(in_shardings), _hashable(out_shardings))
    if key in _STEP_CACHE:
        _STEP_CACHE.move_to_end(key)
        return _STEP_CACHE[key]
    ema_decay = config.ema_decay

    # The seed's key is an argument, not a constant: runs that differ only in their seed compile one program
    # (and hit the persistent compilation cache of a sweep, see `bitlaws.sweep.runner`).
    def train_step(params, opt_state, ema, frozen, batch, step, seed_key):
        step_key = jax.random.fold_in(seed_key, step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch, step_key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema is not None:
            t = step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))  # short EMA early on
            ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        return params, opt_state, ema, {"loss": loss, **metrics}

    compiled = jax.jit(train_step, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=(0, 1, 2))
    _STEP_CACHE[key] = compiled
    while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
        _STEP_CACHE.popitem(last=False)
    return compiled


# ----------------------------------------------------------------------------------------------
# Logging: metrics.jsonl, progress bar, history.
# ----------------------------------------------------------------------------------------------

def _trim_metrics_file(path: pathlib.Path, last_step: int) -> None:
    """Keeps the complete lines of `path` with ``step <= last_step`` (atomic rewrite)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class _Log:
    """Logged steps: converted to floats one step late (so the host does not wait for the device)."""

    def __init__(self, path: Optional[pathlib.Path], bar: tqdm, schedule: Optional[optax.Schedule], step: int):
        self.file = open(path, "a") if path is not None else None  # pylint: disable=consider-using-with
        self.bar = bar
        self.schedule = schedule
        self.history: list[dict] = []
        self.pending: Optional[tuple[int, dict]] = None
        self.last_step, self.last_time = step, time.perf_counter()

    def record(self, step: int, metrics: dict) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        record = {"step": step, **{name: float(value) for name, value in metrics.items()}}
        now = time.perf_counter()
        record["steps_per_s"] = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        if self.schedule is not None:
            record["lr"] = float(self.schedule(step - 1))  # the rate of this step's update
        self.history.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", steps_per_s=f"{record['steps_per_s']:.2f}", refresh=False)

    def recent_means(self) -> dict[str, float]:
        recent = self.history[-RECENT:]
        names = [k for k in (recent[0] if recent else {}) if k not in ("step", "steps_per_s", "lr")]
        return {name: float(np.mean([r[name] for r in recent])) for name in names}

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------

def _abstract(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct` per leaf of `tree` (arrays or structs), placed by `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), tree, shardings)


def train(loss_fn: LossFn, params: Any, get_batch: Callable[[int], Any], config: TrainConfig, *,
          frozen: Any = None, out_dir: Optional[PathLike] = None,
          between_steps: Optional[Callable[[Any, int], Any]] = None, stop_after: Optional[int] = None,
          progress: bool = True, desc: str = "train",
          optimizer: Optional[optax.GradientTransformation] = None) -> TrainResult:
    """Trains `params` to ``config.steps`` steps (resuming from ``out_dir/train_state`` when it exists).

    Args:
        loss_fn: ``loss_fn(params, frozen, batch, key) -> (scalar loss, {name: scalar})``, pure; differentiated
            with respect to `params` only. The loss is logged as ``loss`` (a ``loss`` metric overrides it).
        params: The trainable pytree (an ``nnx.State`` of ``nnx.Param``, a dict of arrays ...); not modified
            (the loop works on copies).
        get_batch: ``step -> pytree of numpy arrays`` with a leading batch axis, a deterministic function of
            the step (this makes resuming exact).
        config: The `TrainConfig`.
        frozen: A pytree passed to every step as an argument (not closed over, so large teachers are not
            baked into the compiled step), never differentiated nor updated; placed like the parameters.
        out_dir: Where ``train_state/`` and ``metrics.jsonl`` go; None: no files, no resume.
        between_steps: ``hook(params, step) -> params`` run outside jit before each step.
        stop_after: End this session after this many steps (the state is saved; a later call resumes), or
            None to run to ``config.steps``.
        progress: Show a tqdm progress bar (loss, steps/s).
        desc: The bar's label.
        optimizer: An optax transformation replacing `make_optimizer(config)` (then no ``lr`` is logged).

    Returns:
        The `TrainResult`.

    Raises:
        ValueError: a batch that does not split over the ``data`` axis, a mesh that does not fit the devices, a
            train state in `out_dir` of another structure.
    """
    began = time.perf_counter()
    initialize_distributed(config)
    if stop_after is not None and stop_after < 0:
        raise ValueError(f"stop_after must be >= 0 or None, got {stop_after}")
    mesh = sharding.make_mesh(config)
    replicated = sharding.replicated(mesh)
    tx = optimizer if optimizer is not None else make_optimizer(config)
    param_shardings = sharding.param_shardings(params, mesh, config.fsdp_min_size)
    abstract_params = _abstract(params, param_shardings)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = sharding.param_shardings(abstract_opt, mesh, config.fsdp_min_size)
    ema_shardings = param_shardings if config.ema_decay is not None else replicated
    frozen_shardings = sharding.param_shardings(frozen, mesh, config.fsdp_min_size)
    frozen = sharding.put(frozen, frozen_shardings, copy=False)
    writer = jax.process_index() == 0 and out_dir is not None
    store = TrainStateStore(out_dir) if out_dir is not None else None
    start_step, previous_wall = 0, 0.0
    saved_wall = None
    bar = log = None
    try:
        if store is not None and store.latest_step() is not None:  # resume, placed as a fresh start would be
            restored = store.restore({
                "params": abstract_params, "opt_state": _abstract(abstract_opt, opt_shardings),
                "ema": abstract_params if config.ema_decay is not None else None,
                "step": np.asarray(0, np.int64), "wall_s": np.asarray(0.0, np.float64)})
            params, opt_state, ema = restored["params"], restored["opt_state"], restored["ema"]
            start_step, previous_wall = int(restored["step"]), float(restored["wall_s"])
        else:
            params = sharding.put(params, param_shardings)
            opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
            ema = sharding.put(params, param_shardings) if config.ema_decay is not None else None
        metrics_path = pathlib.Path(out_dir) / METRICS_FILE if writer else None
        if metrics_path is not None:
            _trim_metrics_file(metrics_path, start_step)
        seed_key = jax.device_put(jax.random.key(config.seed), replicated)
        step_fn = _compiled_step(loss_fn, tx, config,
                                 in_shardings=(param_shardings, opt_shardings, ema_shardings, frozen_shardings,
                                               sharding.batch_sharding(mesh), replicated, replicated),
                                 out_shardings=(param_shardings, opt_shardings, ema_shardings, replicated))
        end_step = config.steps if stop_after is None else min(config.steps, start_step + stop_after)
        bar = tqdm(total=config.steps, initial=start_step, desc=desc, dynamic_ncols=True,
                   disable=not progress or jax.process_index() != 0)
        log = _Log(metrics_path, bar, make_schedule(config) if optimizer is None else None, start_step)
        step, saved_step = start_step, start_step

        def save() -> None:
            nonlocal saved_wall
            log.flush()  # metrics.jsonl never lags the state
            saved_wall = previous_wall + time.perf_counter() - began
            state = {"params": params, "opt_state": opt_state, "ema": ema, "step": np.asarray(step, np.int64),
                     "wall_s": np.asarray(saved_wall, np.float64)}
            store.save(step, state)

        while step < end_step:
            if between_steps is not None:
                params = sharding.put(between_steps(params, step), param_shardings, copy=False)
            batch = get_batch(step)
            sharding.check_batch(batch, mesh)
            batch = sharding.put(batch, sharding.batch_sharding(mesh), copy=False)
            params, opt_state, ema, metrics = step_fn(params, opt_state, ema, frozen, batch, np.int32(step), seed_key)
            step += 1
            log.flush()
            if step % config.log_every == 0 or step == config.steps:
                log.record(step, metrics)
            bar.update(1)
            if store is not None and ((config.checkpoint_every and step % config.checkpoint_every == 0)
                                      or step == end_step):
                save()
                saved_step = step
        log.flush()
        if store is not None and saved_step != step:  # stop_after=0 on a fresh run
            save()
        jax.block_until_ready((params, ema))
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if store is not None:
            store.close()
    wall_s = saved_wall if saved_wall is not None else previous_wall + time.perf_counter() - began
    return TrainResult(params=params, ema=ema, step=step, start_step=start_step, wall_s=wall_s,
                       metrics=log.recent_means(),
                       history=log.history)


@functools.lru_cache(maxsize=32)
def _module_loss(graphdef: nnx.GraphDef, loss_fn: Callable) -> LossFn:
    """``(params, rest, batch, key) -> loss_fn(merged model, batch, key)`` (one object per pair, for the step cache)."""

    def merged_loss(params, rest, batch, key):
        return loss_fn(nnx.merge(graphdef, params, rest), batch, key)

    return merged_loss


def train_module(model: nnx.Module, loss_fn: Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict]],
                 get_batch: Callable[[int], Any], config: TrainConfig, *, wrt: Any = nnx.Param,
                 **kwargs) -> TrainResult:
    """`train` for an NNX module: trains the `wrt` state of `model` and writes the result back into it.

    The module is split into (graphdef, the `wrt` state, the rest); the rest travels as `train`'s `frozen`
    (not updated: a loss that changes batch statistics or RNG counters loses those changes). A
    ``between_steps`` hook receives and returns the `wrt` state (``nnx.State``).

    Args:
        model: The module (its `wrt` variables are updated in place at the end).
        loss_fn: ``loss_fn(model, batch, key) -> (scalar loss, {name: scalar})``.
        get_batch: As in `train`.
        config: The `TrainConfig`.
        wrt: The filter of the trained variables.
        **kwargs: `train`'s keyword arguments but ``frozen``.

    Returns:
        `train`'s result (``params`` / ``ema``: ``nnx.State`` of the `wrt` variables).
    """
    graphdef, params, rest = nnx.split(model, wrt, ...)
    result = train(_module_loss(graphdef, loss_fn), params, get_batch, config, frozen=rest, **kwargs)
    nnx.update(model, result.params)
    return result


def metrics_lines(out_dir: PathLike) -> list[dict]:
    """The records of ``out_dir/metrics.jsonl`` (complete lines)."""
    path = pathlib.Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
