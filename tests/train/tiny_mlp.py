"""A tiny MLP regression trained with `bitlaws.train`: the shared problem of the tests in ``tests/train`` and a
worker script for the tests that need a fresh process (SIGKILL, forced host devices).

    python tests/train/tiny_mlp.py run OUT [--steps N] [--checkpoint-every K] [--stop-after M] [--sleep S]
                                           [--die-in-save CALL]
    python tests/train/tiny_mlp.py shard OUT

``run`` trains into ``OUT`` (``train_state``, ``metrics.jsonl``) and writes ``OUT/final.npz`` (params and EMA
by tree path) and ``OUT/result.json`` (steps, start step); ``--sleep S`` waits S seconds before each step (so
that a test can kill it mid-run); ``--die-in-save CALL`` kills the process with SIGKILL inside the CALL-th
train-state save, after orbax wrote the data to its temporary folder and before the rename that commits it.
``shard`` runs `SHARD_RUNS` on the host devices (start it with ``--xla_force_host_platform_device_count=4``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitlaws.train import TrainConfig, TrainStateStore, train

IN, HIDDEN, OUT = 4, 32, 2
NUM_EXAMPLES = 256


def make_params(seed: int = 0) -> dict[str, np.ndarray]:
    """``w1 [4, 32]``, ``b1 [32]``, ``w2 [32, 2]`` float32 (numpy)."""
    rng = np.random.default_rng(seed)
    return {"w1": (rng.normal(size=(IN, HIDDEN)) * 0.5).astype(np.float32), "b1": np.zeros(HIDDEN, np.float32),
            "w2": (rng.normal(size=(HIDDEN, OUT)) * 0.3).astype(np.float32)}


def frozen_values() -> dict[str, np.ndarray]:
    """A frozen pytree the loss reads (scales the targets)."""
    return {"target_scale": np.asarray(1.5, np.float32)}


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(123)
    x = rng.normal(size=(NUM_EXAMPLES, IN)).astype(np.float32)
    y = np.stack([np.sin(x.sum(1)), np.cos(x[:, 0] - x[:, 1])], axis=1).astype(np.float32)
    return x, y


def loss_fn(params, frozen, batch, key):
    """MSE of the MLP on inputs with a little key-dependent noise; ``mae`` as a metric."""
    x, y = batch
    x = x + 0.01 * jax.random.normal(key, x.shape)
    pred = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]  # [B, OUT]
    err = pred - frozen["target_scale"] * y
    return jnp.mean(jnp.square(err)), {"mae": jnp.mean(jnp.abs(err))}


def batch_getter(batch_size: int = 16):
    x, y = data()

    def get_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.random.default_rng([7, step]).choice(NUM_EXAMPLES, batch_size, replace=False)
        return x[rows], y[rows]

    return get_batch


def config(**overrides) -> TrainConfig:
    """The tests' config: 20 steps, warm-up, cosine, clipping, weight decay, EMA."""
    fields = dict(steps=20, learning_rate=2e-2, warmup_steps=3, final_lr_fraction=0.1, weight_decay=1e-3,
                  ema_decay=0.9, log_every=1, seed=3)
    fields.update(overrides)
    return TrainConfig(**fields)


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
    """``{prefix + tree path: numpy array}``."""
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_state(out_dir, with_wall: bool = False) -> dict[str, np.ndarray]:
    """The latest train state in `out_dir` (params, opt_state, ema; and ``wall_s`` if `with_wall`) as flat numpy
    arrays."""
    like_params = jax.tree.map(jnp.asarray, make_params())
    cfg = config()
    from bitlaws.train import make_optimizer  # pylint: disable=g-import-not-at-top

    like = {"params": like_params, "opt_state": make_optimizer(cfg).init(like_params), "ema": like_params,
            "step": np.asarray(0, np.int64), "wall_s": np.asarray(0.0, np.float64)}
    with TrainStateStore(out_dir) as store:
        restored = store.restore(like)
    return flat({k: restored[k] for k in ("params", "opt_state", "ema") + (("wall_s",) if with_wall else ())}, "")


def _die_in_save(call: int) -> None:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    original = ocp.StandardCheckpointHandler.async_save
    calls = [0]

    async def dying(self, *args, **kwargs):
        futures = await original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == call:
            for future in futures or []:
                future.result()
            os.kill(os.getpid(), signal.SIGKILL)
        return futures

    ocp.StandardCheckpointHandler.async_save = dying


def specs(tree) -> dict[str, str]:
    """``{tree path: str(PartitionSpec)}`` of a tree of sharded arrays."""
    return {jax.tree_util.keystr(path): str(leaf.sharding.spec)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run(args) -> None:
    """One training run into ``args.out``: ``final.npz`` and ``result.json``."""
    if args.die_in_save:
        _die_in_save(args.die_in_save)
    cfg = config(steps=args.steps, checkpoint_every=args.checkpoint_every)
    hook = (lambda params, step: (time.sleep(args.sleep), params)[1]) if args.sleep else None
    result = train(loss_fn, make_params(), batch_getter(), cfg, frozen=frozen_values(), out_dir=args.out,
                   stop_after=args.stop_after, between_steps=hook, progress=False)
    out = pathlib.Path(args.out)
    np.savez(out / "final.npz", **flat(result.params, "params"), **flat(result.ema, "ema"))
    (out / "result.json").write_text(json.dumps({"step": result.step, "start_step": result.start_step}))


SHARD_RUNS = {"single": dict(mesh_data=1), "data4": dict(mesh_data=4),
              "fsdp": dict(mesh_data=2, mesh_params=2, fsdp_min_size=64)}


def shard(args) -> None:
    """`SHARD_RUNS` (no files but ``OUT/<run>.npz`` and ``OUT/shard.json``) and a batch that does not split."""
    out = pathlib.Path(args.out)
    report = {"devices": jax.device_count()}
    for name, mesh in SHARD_RUNS.items():
        seen = {}

        def hook(params, step, seen=seen):
            seen.update(specs(params))
            return params

        result = train(loss_fn, make_params(), batch_getter(), config(**mesh), frozen=frozen_values(),
                       between_steps=hook, progress=False)
        np.savez(out / f"{name}.npz", **flat(result.params, "params"), **flat(result.ema, "ema"))
        report[name] = {"params": specs(result.params), "ema": specs(result.ema), "in_step": seen,
                        "devices": sorted({d.id for leaf in jax.tree.leaves(result.params)
                                           for d in leaf.sharding.device_set})}
    try:
        train(loss_fn, make_params(), batch_getter(6), config(mesh_data=4), progress=False)
        report["batch_error"] = None
    except ValueError as e:
        report["batch_error"] = str(e)
    (out / "shard.json").write_text(json.dumps(report))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["run", "shard"])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--die-in-save", type=int)
    args = parser.parse_args(argv)
    {"run": run, "shard": shard}[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
