"""OmniQuant (Shao et al., 2024): learnable weight clipping (LWC) and learnable equivalent transformation (LET).

Both are trained block by block: the quantized block's output on captured block inputs is matched to the
float block's output (MSE, AdamW), with the weights themselves frozen (paper eq. 1, 9-11).

LWC (eq. 2-3). Per quantization group and output channel (the spec's scale shape ``[G, C]``), two logits
``gamma``, ``beta`` shrink the weight range before it is quantized:

* unsigned (asymmetric) int: ``[sigmoid(beta) min(W), sigmoid(gamma) max(W)]``,
  ``h = (hi - lo) / (2^b - 1)``, ``z = round(-lo / h)`` (eq. 3);
* symmetric formats (signed int, fp, lookup tables, MX): ``sigmoid(gamma) max|W|`` (``beta`` is unused and
  gets a zero gradient), ``h = range / max|grid|``.

``W_hat = (clip(round(W / h) + z) - z) h``. The rounding uses a straight-through estimator (identity
gradient); the clip range and therefore the scale keep their true gradient, so ``gamma``/``beta`` learn.

Forward = packed. The forward pass uses exactly the scale and zero point `calibrate.range_to_params`
stores for the learned range (scales rounded up to their storage dtype, MX power-of-two exponents), so
``dequantize(lwc_quantize(...))`` equals `lwc_fake_quant` 's output. Their gradient is taken through the
float32 formulas above (``astype`` / ``nextafter`` / ``floor(log2)`` have none): the stored value enters as
``stop_gradient(stored) + (f32 - stop_gradient(f32))``, exact in the forward pass. For MX formats the
float32 scale ``range / max|grid|`` is a surrogate for the power of two.

LET (eq. 5-7). For a linear ``Y = X W + b`` with per-input-channel scale ``s`` and shift ``delta``:

    Y = ((X - delta) / s) (diag(s) W) + (b + delta W)

exactly in exact arithmetic. The transformed input is what gets (fake-)quantized per token; ``(X - delta) / s``
is folded into the preceding per-channel affine op (`fold_let_into_affine`, LayerNorm / adaLN), as in
SmoothQuant (see `smoothquant_core` for that contract). The attention ``Q K^T`` scaling of the paper is the
integration's business.

`train_block` is generic over the block: the integration writes ``apply_fn(float_params, qparams, x) -> y``
for its block (calling `fake_linear` / `lwc_fake_quant` / `let_transform` for each linear).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import optax

from bitlaws.quant import calibrate, formats, qarray
from bitlaws.quant.qarray import QArray
from bitlaws.quant.spec import QuantSpec

_HIGHEST = jax.lax.Precision.HIGHEST
_F32_TINY = 2.0**-126
LWC_INIT = 4.0  # sigmoid(4) ~ 0.982, the paper's initial clip


# ------------------------------------------------------------------------------------------------------ LWC


def _asymmetric(fmt: formats.QFormat) -> bool:
    return isinstance(fmt, formats.IntFormat) and not fmt.signed


def _grouped(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """Kernel ``[..., in, out]`` -> grouped view ``[G, L, N]`` float32 (reduce axes: all but the last)."""
    if w.ndim < 2:
        raise ValueError(f"omniquant: w must be a kernel [..., in, out], got shape {tuple(w.shape)}")
    view = w.astype(jnp.float32).reshape(-1, w.shape[-1])  # [K, N]
    return qarray.group_view(view, spec, f"a kernel of shape {tuple(w.shape)}")


def lwc_shape(w: jax.Array, spec: QuantSpec) -> tuple[int, int]:
    """Shape ``(G, C)`` of the LWC logits (= of the spec's scales) for kernel `w` ``[..., in, out]``."""
    k = math.prod(w.shape[:-1])
    spec.check_axis(k, f"a kernel of shape {tuple(w.shape)}")
    g = k // spec.group_size if spec.granularity == "group" else 1
    return g, 1 if spec.granularity == "tensor" else int(w.shape[-1])


def lwc_init(w: jax.Array, spec: QuantSpec, value: float = LWC_INIT) -> tuple[jax.Array, jax.Array]:
    """Initial ``(gamma, beta)``, each ``[G, C]`` float32 filled with `value`."""
    full = jnp.full(lwc_shape(w, spec), value, jnp.float32)
    return full, full


def lwc_range(w: jax.Array, gamma: jax.Array, beta: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """The learned clipping range ``(lo, hi)``, each ``[G, 1, C]`` float32 (differentiable)."""
    grouped = _grouped(jnp.asarray(w), spec)  # [G, L, N]
    shape = lwc_shape(w, spec)
    if gamma.shape != shape or beta.shape != shape:
        raise ValueError(f"omniquant: gamma/beta must be {shape} for this kernel and spec, got "
                         f"{tuple(gamma.shape)} / {tuple(beta.shape)}")
    axes = (1, 2) if spec.granularity == "tensor" else (1,)
    g = jax.nn.sigmoid(gamma.astype(jnp.float32))[:, None, :]  # [G, 1, C]
    if _asymmetric(spec.format):
        b = jax.nn.sigmoid(beta.astype(jnp.float32))[:, None, :]
        return b * jnp.min(grouped, axis=axes, keepdims=True), g * jnp.max(grouped, axis=axes, keepdims=True)
    amax = g * jnp.max(jnp.abs(grouped), axis=axes, keepdims=True)
    return -amax, amax


def _float_params(lo: jax.Array, hi: jax.Array, fmt: formats.QFormat) -> tuple[jax.Array, Optional[jax.Array]]:
    """Differentiable float32 scale and (unrounded) zero point for ``[lo, hi]`` (range_to_params' formulas)."""
    if _asymmetric(fmt):
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
        scale = jnp.maximum(hi / fmt.qmax - lo / fmt.qmax, _F32_TINY)
        return scale, jnp.clip(-lo / scale, 0, fmt.qmax)
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return jnp.maximum(amax / fmt.max_normal, _F32_TINY), None


def _forward_as(stored: jax.Array, surrogate: jax.Array) -> jax.Array:
    """Value `stored` (exactly), gradient of `surrogate`."""
    return jax.lax.stop_gradient(stored) + (surrogate - jax.lax.stop_gradient(surrogate))


def lwc_fake_quant(w: jax.Array, gamma: jax.Array, beta: jax.Array, spec: QuantSpec) -> jax.Array:
    """LWC quantize-dequantize of kernel `w`, differentiable with respect to `gamma`, `beta` and `w`.

    Gradients: straight-through on the rounding only; `w` also gets the gradient of the group min / max that
    set the range, and clipped entries get none through the clip (their value still moves with the scale).

    Args:
        w: Kernel ``[..., in, out]`` (reduce axes: all but the last, groups along the flattened K).
        gamma: ``[G, C]`` upper-bound logits (`lwc_init`).
        beta: ``[G, C]`` lower-bound logits (used by unsigned int formats only).
        spec: The weight spec; its ``calibrator`` is ignored (the range is learned).

    Returns:
        ``W_hat``, w's shape, float32; equal to ``dequantize(lwc_quantize(w, gamma, beta, spec))``.
    """
    w = jnp.asarray(w)
    fmt = spec.format
    grouped = _grouped(w, spec)  # [G, L, N]
    lo, hi = lwc_range(w, gamma, beta, spec)  # [G, 1, C]
    scale_f, zero_f = _float_params(lo, hi, fmt)
    scale_s, zero_s = calibrate.range_to_params(jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi), spec)
    scale = _forward_as(scale_s, scale_f)
    zero = None if zero_s is None else _forward_as(zero_s.astype(jnp.float32), zero_f)
    grid = fmt.grid()
    x = grouped / scale
    if zero is not None:
        x = x + zero
    x = jnp.clip(x, float(grid[0]), float(grid[-1]))  # true gradient: 0 outside, scale still learns there
    q = _forward_as(fmt.round(x), x)  # straight-through rounding
    deq = (q - zero) * scale if zero is not None else q * scale
    return deq.reshape(w.shape)


def lwc_quantize(w: jax.Array, gamma: jax.Array, beta: jax.Array, spec: QuantSpec) -> QArray:
    """Packs `w` with the learned clipping range: scales from `calibrate.range_to_params`, RTN onto the grid.

    Returns:
        A `QArray` of w's shape (reduce axes: all but the last).
    """
    w = jnp.asarray(w)
    grouped = _grouped(w, spec)
    lo, hi = lwc_range(w, gamma, beta, spec)
    scale, zero = calibrate.range_to_params(lo, hi, spec)  # [G, 1, C]
    q = calibrate.quantize_grouped(grouped, scale, zero, spec.format)  # [G, L, N]
    squeeze = lambda a: None if a is None else a.reshape(a.shape[0], a.shape[2])  # noqa: E731
    return qarray.from_grid(q.reshape(-1, w.shape[-1]), squeeze(scale), squeeze(zero), spec, shape=w.shape,
                            dtype=jnp.dtype(w.dtype).name)


# ------------------------------------------------------------------------------------------------------ LET


@jax.jit
def let_transform(w: jax.Array, b: Optional[jax.Array], s: jax.Array,
                  delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Transforms a linear's parameters for the input ``(X - delta) / s``.

    Args:
        w: Kernel ``[in, out]``.
        b: Bias ``[out]`` or None (zeros).
        s: ``[in]`` positive scales.
        delta: ``[in]`` shifts.

    Returns:
        ``(diag(s) W [in, out], b + delta W [out])`` float32.
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"let_transform: w must be [in, out], got shape {tuple(w.shape)}")
    b = jnp.zeros((w.shape[1],), jnp.float32) if b is None else jnp.asarray(b, jnp.float32)
    return w * s[:, None], b + jnp.dot(delta.astype(jnp.float32), w, precision=_HIGHEST)


@jax.jit
def let_input(x: jax.Array, s: jax.Array, delta: jax.Array) -> jax.Array:
    """The transformed activation ``(x - delta) / s``, ``[..., in]`` float32."""
    return (jnp.asarray(x, jnp.float32) - delta) / s


@jax.jit
def fold_let_into_affine(scale: jax.Array, bias: Optional[jax.Array], s: jax.Array,
                         delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Folds LET into a preceding per-channel affine ``y = scale * u + bias``: ``(scale / s, (bias - delta) / s)``."""
    bias = jnp.zeros_like(scale) if bias is None else bias
    return scale / s, (bias - delta) / s


@jax.jit
def _centre(act_min, act_max):  # [in], [in] -> (midpoint, half range)
    return (act_min + act_max) / 2, (act_max - act_min) / 2


def let_init(w: jax.Array, act_absmax: Optional[jax.Array] = None, *, act_min: Optional[jax.Array] = None,
             act_max: Optional[jax.Array] = None, alpha: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Initial ``(s, delta)`` ``[in]``: the SmoothQuant scale of the (shifted) activations.

    With per-channel ``act_min``/``act_max``, ``delta = (min + max) / 2`` centres each channel and
    ``s`` uses the half-range ``(max - min) / 2``; with only `act_absmax`, ``delta = 0``.
    """
    from bitlaws.ptq import smoothquant_core  # pylint: disable=g-import-not-at-top

    if act_min is not None and act_max is not None:
        delta, half_range = _centre(jnp.asarray(act_min, jnp.float32), jnp.asarray(act_max, jnp.float32))
        return smoothquant_core.smoothing_scales(half_range, w, alpha), delta
    if act_absmax is None:
        raise ValueError("let_init: pass act_absmax, or both act_min and act_max")
    s = smoothquant_core.smoothing_scales(act_absmax, w, alpha)
    return s, jnp.zeros_like(s)


def fake_linear(x: jax.Array, w: jax.Array, b: Optional[jax.Array], *, w_spec: Optional[QuantSpec],
                act_spec: Optional[QuantSpec] = None, lwc: Optional[tuple[jax.Array, jax.Array]] = None,
                let: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    """One OmniQuant linear for an ``apply_fn``: LET, per-token act fake quant, LWC weight fake quant.

    Args:
        x: ``[..., in]`` input (before LET).
        w: ``[in, out]`` float kernel.
        b: ``[out]`` bias or None.
        w_spec: Weight spec, or None for float weights.
        act_spec: Activation spec applied to the (transformed) input with ``reduce_axes=(-1,)``, or None.
        lwc: ``(gamma, beta)`` logits, or None for plain RTN (`qarray.fake_quant`).
        let: ``(s, delta)``, or None.

    Returns:
        ``[..., out]`` float32.
    """
    x = jnp.asarray(x, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    if let is not None:
        x = let_input(x, *let)
        w, b = let_transform(w, b, *let)
    if act_spec is not None:
        x = qarray.fake_quant(x, act_spec, reduce_axes=(-1,))
    if w_spec is not None:
        w = lwc_fake_quant(w, *lwc, w_spec) if lwc is not None else qarray.fake_quant(w, w_spec)
    y = jnp.dot(x, w, precision=_HIGHEST)
    return y if b is None else y + b


# ---------------------------------------------------------------------------------------------- training

ApplyFn = Callable[[Any, Any, Any], Any]


def _mse(y, target) -> jax.Array:
    leaves = zip(jax.tree.leaves(y), jax.tree.leaves(target))
    return sum(jnp.mean(jnp.square(a.astype(jnp.float32) - t.astype(jnp.float32))) for a, t in leaves)


def _optimizer(lr, weight_decay: float, qparams) -> optax.GradientTransformation:
    if not isinstance(lr, tuple):
        return optax.adamw(lr, weight_decay=weight_decay)
    rates = dict(lr)
    labels = {k: jax.tree.map(lambda _, k=k: k, v) for k, v in qparams.items()}
    return optax.multi_transform({k: optax.adamw(r, weight_decay=weight_decay) for k, r in rates.items()}, labels)


@functools.partial(jax.jit, static_argnames=("apply_fn", "lr", "weight_decay"))
def _train(apply_fn, lr, weight_decay, float_params, qparams, inputs, targets, batches):
    tx = _optimizer(lr, weight_decay, qparams)

    def step(carry, index):  # index [B]
        qp, state = carry
        take = lambda a: a[index]  # noqa: E731
        loss, grads = jax.value_and_grad(
            lambda p: _mse(apply_fn(float_params, p, jax.tree.map(take, inputs)), jax.tree.map(take, targets)))(qp)
        updates, state = tx.update(grads, state, qp)
        return (optax.apply_updates(qp, updates), state), loss

    (qparams, _), losses = jax.lax.scan(step, (qparams, tx.init(qparams)), batches)
    return qparams, losses


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> jax.Array:
    """``[steps, batch_size]`` int32 sample indices: consecutive epochs, each a fresh permutation of ``n``."""
    per_epoch = jax.random.split(jax.random.key(seed), max(1, math.ceil(steps * batch_size / n)))
    order = jax.vmap(lambda k: jax.random.permutation(k, n))(per_epoch).reshape(-1)
    return order[: steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


def train_block(apply_fn: ApplyFn, float_params: Any, qparams_init: Any, inputs: Any, targets: Any, *, steps: int,
                lr: Union[float, Mapping[str, float]], batch_size: int, seed: int = 0,
                weight_decay: float = 0.0) -> tuple[Any, jax.Array]:
    """Trains a block's quantization parameters to reproduce the float block's output (MSE, AdamW).

    The whole loop is one jitted `jax.lax.scan`; it is cached on (`apply_fn`, shapes, `lr`), so blocks of the
    same structure compile once when `apply_fn` is the same function object.

    Args:
        apply_fn: Pure ``(float_params, qparams, x) -> y``; ``x`` is a batch of `inputs` (same pytree, leading
            axis B) and ``y`` matches a batch of `targets`. Not differentiated with respect to float_params.
        float_params: Frozen pytree (the block's float weights).
        qparams_init: Trainable pytree (LWC logits, LET scales and shifts, ...).
        inputs: Pytree of arrays with a common leading axis ``n`` (captured block inputs).
        targets: Pytree of arrays ``[n, ...]`` (the float block's outputs).
        steps: Optimiser steps (0 returns `qparams_init`).
        lr: Learning rate, or ``{top-level key of qparams: rate}`` (qparams must then be a dict with exactly
            those keys), e.g. ``{"lwc": 1e-2, "let": 5e-3}``.
        batch_size: Samples per step (capped at ``n``); batches walk through seeded permutations.
        seed: Seed of the batch order.
        weight_decay: AdamW weight decay (0 as in the paper).

    Returns:
        ``(qparams, losses [steps])``; ``losses[i]`` is the minibatch MSE before update i.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"train_block: steps must be a non-negative integer, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"train_block: batch_size must be a positive integer, got {batch_size!r}")
    sizes = {int(a.shape[0]) for a in jax.tree.leaves(inputs) + jax.tree.leaves(targets)}
    if len(sizes) != 1:
        raise ValueError(f"train_block: inputs and targets must share the leading axis, got sizes {sorted(sizes)}")
    n = sizes.pop()
    if isinstance(lr, Mapping):
        if not isinstance(qparams_init, Mapping) or set(lr) != set(qparams_init):
            have = sorted(qparams_init) if isinstance(qparams_init, Mapping) else type(qparams_init).__name__
            raise ValueError(f"train_block: lr keys {sorted(lr)} must equal the top-level keys of qparams ({have})")
        lr = tuple(sorted((str(k), float(v)) for k, v in lr.items()))
    else:
        lr = float(lr)
    if steps == 0:
        return qparams_init, jnp.zeros((0,), jnp.float32)
    batches = batch_indices(n, min(batch_size, n), steps, seed)
    return _train(apply_fn, lr, float(weight_decay), float_params, qparams_init, inputs, targets, batches)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def block_mse(apply_fn: ApplyFn, float_params: Any, qparams: Any, inputs: Any, targets: Any) -> jax.Array:
    """MSE of ``apply_fn(float_params, qparams, inputs)`` against `targets` over all samples (one call). ``[]``.

    Jitted and cached on `apply_fn` (pass the same function object to reuse the compilation).
    """
    return _mse(apply_fn(float_params, qparams, inputs), targets)
