"""The default optimizer of `bitlaws.train`: AdamW with linear warm-up and cosine decay, after clipping.

The schedule is ``optax.warmup_cosine_decay_schedule`` from 0 to ``learning_rate`` over
``max(warmup_steps, min_warmup_steps)`` steps, then a cosine to ``learning_rate * final_lr_fraction`` at step
``max(steps, warmup_steps + 1)``. The demo trainers it replaced differ only in ``min_warmup_steps``: the DiT
trainer warmed up over exactly ``warmup_steps`` steps (0 = the first update at the peak), the VAR/VQVAE trainer
over at least one (its first update has learning rate 0).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import optax

if TYPE_CHECKING:
    from bitlaws.train.loop import TrainConfig


def make_schedule(config: "TrainConfig") -> optax.Schedule:
    """The learning rate of update ``count`` (0-based) under `config`."""
    return _schedule(config.steps, config.learning_rate, config.warmup_steps, config.min_warmup_steps,
                     config.final_lr_fraction)


def make_optimizer(config: "TrainConfig") -> optax.GradientTransformation:
    """``chain(clip_by_global_norm(grad_clip), adamw(make_schedule(config), b1, b2, weight_decay))``.

    Without ``grad_clip`` the transformation is the AdamW alone. Equal settings return the same object, so a
    second `train` call in one process reuses the compiled step.
    """
    return _optimizer(config.steps, config.learning_rate, config.warmup_steps, config.min_warmup_steps,
                      config.final_lr_fraction, config.weight_decay, config.b1, config.b2, config.grad_clip)


@functools.lru_cache(maxsize=32)
def _schedule(steps: int, learning_rate: float, warmup_steps: int, min_warmup_steps: int,
              final_lr_fraction: float) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(warmup_steps, min_warmup_steps), max(steps, warmup_steps + 1),
        end_value=learning_rate * final_lr_fraction)


@functools.lru_cache(maxsize=32)
def _optimizer(steps: int, learning_rate: float, warmup_steps: int, min_warmup_steps: int, final_lr_fraction: float,
               weight_decay: float, b1: float, b2: float, grad_clip: Optional[float]) -> optax.GradientTransformation:
    schedule = _schedule(steps, learning_rate, warmup_steps, min_warmup_steps, final_lr_fraction)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    if grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
