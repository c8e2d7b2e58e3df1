"""AWQ (Lin et al., 2024): activation-aware per-input-channel weight scaling, and the clipping search.

Step 1 (scale search, paper section 3.2). Weights that multiply large activations matter most. For a kernel
``W [in, out]`` and a per-input-channel factor ``s [in]``, the layer computes

    Q(W s) (X / s)      i.e.      X @ (Q(diag(s) W) / s[:, None])

(``1/s`` is folded into the op that produces X, as in SmoothQuant; see `smoothquant_core` for the contract).
AWQ searches ``s = s_X^alpha`` with ``s_X[j] = mean|X_j|`` over a grid ``alpha = i / n_grid``,
``i = 0 .. n_grid-1`` and keeps the alpha with the smallest output error

    err(alpha) = || X (Q(W s) / s) - X W ||_F^2 = tr(dW^T H dW),   dW = Q(W s)/s - W,   H = X^T X.

Both forms are supported: pass the calibration rows ``x [M, in]`` or the Hessian ``H [in, in]``
(`ActStats.hessian`, the sum of ``x x^T``); they give the same error up to float rounding. ``alpha = 0``
gives ``s = 1``: plain RTN, so the chosen error is never above RTN's (ties go to the smaller alpha).
``s`` is normalised by ``sqrt(max(s) min(s))`` (a global factor does not change the product, it only
centres the scales around 1). Q is the weight spec's RTN (`qarray.quantize_dequantize`), groups included.

Deviation from the reference recipe: ``s_X`` is floored at ``1e-5 * max(s_X)`` (relative, so the search is
invariant to the activations' overall magnitude) instead of an absolute ``1e-4``; an all-zero ``s_X`` gives
``s = 1``.

Step 2 (clipping search, `search_clip`). Per quantization group and output channel, a clip ratio
``r in {1, 1 - 1/n_grid, ...}`` (down to ``1 - max_shrink``) shrinks the group's range to
``[r min(W_g), r max(W_g)]`` (``r max|W_g|`` for symmetric formats); the weight is clamped to it and
quantized with the spec. The ratio minimising the group's share of the output error,
``dW_g^T H_gg dW_g`` (the group's partial sums, as in AWQ), is kept. Run it on the *scaled* kernel
``W s`` with the scaled Hessian ``H / (s s^T)`` (`scale_hessian`) when used after step 1.

Kernels may have leading axes (``[..., in, out]``, a conv's HWIO): ``s`` multiplies axis -2, the error uses
the reduction view ``[K, N]`` (K = prod of all axes but the last, row-major), so ``x``'s columns / ``H``'s
rows must follow that flattening (im2col rows of a conv).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from bitlaws.quant import methods, qarray
from bitlaws.quant.spec import QuantSpec

_HIGHEST = jax.lax.Precision.HIGHEST
REL_FLOOR = 1e-5


def _view(w: jax.Array) -> jax.Array:
    """``[..., in, out]`` -> ``[K, N]`` float32."""
    return w.astype(jnp.float32).reshape(-1, w.shape[-1])


def _check(w, hessian, x, what):
    if w.ndim < 2:
        raise ValueError(f"{what}: w must be a kernel [..., in, out], got shape {tuple(w.shape)}")
    if (hessian is None) == (x is None):
        raise ValueError(f"{what}: pass exactly one of hessian=[K, K] or x=[M, K] "
                         f"(got {'both' if hessian is not None else 'neither'})")
    k = math.prod(w.shape[:-1])
    if hessian is not None and tuple(hessian.shape) != (k, k):
        raise ValueError(f"{what}: hessian must be [{k}, {k}] for a kernel of shape {tuple(w.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if x is not None and (x.ndim != 2 or x.shape[1] != k):
        raise ValueError(f"{what}: x must be [M, {k}] for a kernel of shape {tuple(w.shape)}, got {tuple(x.shape)}")


def output_error(dw: jax.Array, *, hessian: Optional[jax.Array] = None, x: Optional[jax.Array] = None) -> jax.Array:
    """``||x dw||_F^2`` or ``tr(dw^T H dw)`` for a weight error ``dw [K, N]``. Returns ``[]`` float32."""
    if x is not None:
        out = jnp.dot(x.astype(jnp.float32), dw, precision=_HIGHEST)  # [M, N]
        return jnp.sum(jnp.square(out))
    return jnp.sum(dw * jnp.dot(hessian.astype(jnp.float32), dw, precision=_HIGHEST))


def scale_candidates(act_mean_abs: jax.Array, alpha: jax.Array) -> jax.Array:
    """``s = s_X^alpha`` normalised by ``sqrt(max(s) min(s))``. ``act_mean_abs [in]`` -> ``[in]`` float32."""
    m = jnp.asarray(act_mean_abs, jnp.float32)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    top = jnp.max(m)
    dead = top <= 0
    m = jnp.where(dead, 1.0, jnp.maximum(m, REL_FLOOR * top))
    s = jnp.power(m, alpha)
    return s / (jnp.sqrt(jnp.max(s)) * jnp.sqrt(jnp.min(s)))


@functools.partial(jax.jit, static_argnames=("spec",))
def scaled_fake_quant(w: jax.Array, s: jax.Array, spec: QuantSpec) -> jax.Array:
    """``Q(diag(s) W) / s``: what the layer effectively multiplies by. ``[..., in, out]`` float32."""
    w = jnp.asarray(w, jnp.float32)
    w_hat, _ = qarray.quantize_dequantize(w * s[:, None], spec)
    return w_hat / s[:, None]


@functools.partial(jax.jit, static_argnames=("spec", "n_grid"))
def _search_scales(w, act_mean_abs, hessian, x, column_mask, spec, n_grid):
    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid  # [A]
    w_view = _view(w)

    def error(alpha):
        s = scale_candidates(act_mean_abs, alpha)
        dw = _view(scaled_fake_quant(w, s, spec)) - w_view
        if column_mask is not None:  # padded columns add exact zeros to the error
            dw = jnp.where(column_mask[None, :], dw, 0.0)
        return output_error(dw, hessian=hessian, x=x)

    errors = jax.lax.map(error, alphas)  # [A]
    errors = jnp.where(jnp.isnan(errors), jnp.inf, errors)
    best = jnp.argmin(errors)  # first minimum: ties go to the smaller alpha (alpha = 0 is RTN)
    return scale_candidates(act_mean_abs, alphas[best]), alphas[best], errors


def search_scales(w: jax.Array, spec: QuantSpec, *, act_mean_abs: jax.Array, hessian: Optional[jax.Array] = None,
                  x: Optional[jax.Array] = None, n_grid: int = 20) -> tuple[jax.Array, jax.Array, jax.Array]:
    """AWQ's grid search for the per-input-channel scale (jit-compiled, deterministic).

    Args:
        w: Kernel ``[..., in, out]`` (float).
        spec: The weight `QuantSpec` (RTN with its calibrator; ``group`` granularity supported).
        act_mean_abs: ``[in]`` mean |x| per input channel (`ActStats.mean_abs`).
        hessian: ``[K, K]`` sum of ``x x^T`` over calibration rows (K = prod(w.shape[:-1])), or
        x: ``[M, K]`` calibration rows. Exactly one of the two.
        n_grid: Number of alphas, ``alpha = i / n_grid`` for ``i < n_grid`` (alpha = 0 is plain RTN).

    Returns:
        ``(s [in], best_alpha [], errors [n_grid])`` float32; replace the kernel by
        ``smoothquant_core.smooth(w, s)`` and fold ``1/s`` into the op producing the input
        (`scaled_fake_quant` simulates the result without the fold).
    """
    w = jnp.asarray(w)
    _check(w, hessian, x, "awq search_scales")
    act_mean_abs = jnp.asarray(act_mean_abs, jnp.float32)
    if act_mean_abs.shape != (w.shape[-2],):
        raise ValueError(f"awq search_scales: act_mean_abs must be [{w.shape[-2]}], got {tuple(act_mean_abs.shape)}")
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"awq search_scales: n_grid must be a positive integer, got {n_grid!r}")
    spec.check_axis(math.prod(w.shape[:-1]), f"a kernel of shape {tuple(w.shape)}")
    # One compiled program per input size: the output columns are padded as in `methods.rtn_kernel` (the
    # quantization of a column does not see the others) and masked out of the error.
    columns = w.shape[-1]
    padded = methods.padded_columns(w, spec)
    mask = None
    if padded != columns:
        w, mask = methods.repeat_last_column(w, padded), jnp.arange(padded) < columns
    return _search_scales(w, act_mean_abs, hessian, x, mask, spec, n_grid)


# ------------------------------------------------------------------------------------------------ clipping


def scale_hessian(hessian: jax.Array, s: jax.Array, repeat: int = 1) -> jax.Array:
    """The Hessian of the scaled input ``x / s``: ``H / (s s^T)``.

    `repeat` > 1 tiles ``s`` for a kernel with leading axes (``prod(w.shape[:-2])`` copies, row-major).
    """
    s_rows = jnp.tile(s.astype(jnp.float32), repeat)
    return hessian.astype(jnp.float32) / (s_rows[:, None] * s_rows[None, :])


def clip_ratios(n_grid: int, max_shrink: float) -> jax.Array:
    """``1 - i / n_grid`` for ``i < max(1, int(max_shrink * n_grid))`` (ratio 1 first). ``[R]`` float32."""
    count = max(1, int(max_shrink * n_grid))
    return 1.0 - jnp.arange(count, dtype=jnp.float32) / n_grid


def _group_range(grouped: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Per-(group, column) ``(lo, hi)`` ``[G, 1, N]`` (``[1, 1, 1]`` for ``tensor``); symmetric: ``-+max|W|``."""
    axes = (1, 2) if spec.granularity == "tensor" else (1,)
    if getattr(spec.format, "signed", True) is False:  # unsigned int: asymmetric range
        return jnp.min(grouped, axis=axes, keepdims=True), jnp.max(grouped, axis=axes, keepdims=True)
    amax = jnp.max(jnp.abs(grouped), axis=axes, keepdims=True)
    return -amax, amax


@functools.partial(jax.jit, static_argnames=("spec",))
def clip_weights(w: jax.Array, ratio: jax.Array, spec: QuantSpec) -> jax.Array:
    """Clamps each (group, output column) of `w` to its range shrunk by `ratio`.

    Args:
        w: Kernel ``[..., in, out]``.
        ratio: ``[G, C]`` clip ratios (`search_clip`'s output; C = 1 for ``tensor``, else N), or a scalar.
        spec: The weight spec (defines the groups and whether the range is symmetric).

    Returns:
        The clamped kernel, same shape, float32; quantize it with `spec` to get AWQ's clipped weight.
    """
    w = jnp.asarray(w)
    view = _view(w)
    grouped = qarray.group_view(view, spec)  # [G, L, N]
    lo, hi = _group_range(grouped, spec)
    r = jnp.asarray(ratio, jnp.float32)
    if r.ndim == 2:
        r = r[:, None, :]  # [G, 1, C]
    clipped = jnp.clip(grouped, lo * r, hi * r)
    return clipped.reshape(w.shape)


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "max_shrink"))
def _search_clip(w, hessian, x, spec, n_grid, max_shrink):
    view = _view(w)  # [K, N]
    k, n = view.shape
    grouped = qarray.group_view(view, spec)  # [G, L, N]
    g, l, _ = grouped.shape
    if hessian is None:
        xg = x.astype(jnp.float32).reshape(x.shape[0], g, l)  # [M, G, L]
        blocks = jnp.einsum("mgi,mgj->gij", xg, xg, precision=_HIGHEST)  # [G, L, L]
    else:
        h = hessian.astype(jnp.float32).reshape(g, l, g, l)
        blocks = h[jnp.arange(g), :, jnp.arange(g), :]  # [G, L, L] diagonal blocks
    ratios = clip_ratios(n_grid, max_shrink)

    def error(r):
        w_hat, _ = qarray.quantize_dequantize(clip_weights(view, r, spec), spec)
        dw = (w_hat - view).reshape(g, l, n)
        err = jnp.einsum("gin,gij,gjn->gn", dw, blocks, dw, precision=_HIGHEST)  # [G, N]
        if spec.granularity == "tensor":
            err = jnp.sum(err, keepdims=True)  # one range for the whole tensor
        return err

    errors = jax.lax.map(error, ratios)  # [R, G, C]
    errors = jnp.where(jnp.isnan(errors), jnp.inf, errors)
    best = jnp.argmin(errors, axis=0)  # [G, C]; ties -> the larger ratio (no clipping first)
    return ratios[best], jnp.min(errors, axis=0)


def search_clip(w: jax.Array, spec: QuantSpec, hessian: Optional[jax.Array] = None, n_grid: int = 20,
                max_shrink: float = 0.5, *, x: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """AWQ's per-(group, output channel) clipping-ratio search (jit-compiled, deterministic).

    Args:
        w: Kernel ``[..., in, out]`` (the scaled kernel ``W s`` when run after `search_scales`).
        spec: The weight spec.
        hessian: ``[K, K]`` sum of ``x x^T`` (only its group-diagonal blocks are used), or
        x: ``[M, K]`` calibration rows. Exactly one of the two.
        n_grid: Ratio resolution: candidates ``1 - i / n_grid``.
        max_shrink: Smallest ratio tried is about ``1 - max_shrink``.

    Returns:
        ``(ratio [G, C], error [G, C])``: the best ratio per group and column and its error; ``G`` groups
        (1 unless ``group``), ``C`` = 1 for ``tensor`` granularity else the output channels. Ratio 1 (RTN) is
        a candidate, so no group gets worse. Apply with `clip_weights` and quantize with `spec`.
    """
    w = jnp.asarray(w)
    _check(w, hessian, x, "awq search_clip")
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"awq search_clip: n_grid must be a positive integer, got {n_grid!r}")
    if not 0.0 <= float(max_shrink) < 1.0:
        raise ValueError(f"awq search_clip: max_shrink must be in [0, 1), got {max_shrink}")
    spec.check_axis(math.prod(w.shape[:-1]), f"a kernel of shape {tuple(w.shape)}")
    return _search_clip(w, hessian, x, spec, n_grid, float(max_shrink))
