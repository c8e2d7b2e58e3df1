"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with a per-channel scale.

For a linear layer ``Y = X W`` (kernel ``W [in, out]``) and any positive per-input-channel vector ``s [in]``,

    Y = (X diag(s)^-1) (diag(s) W) = (X / s) @ (s[:, None] * W)

holds exactly in exact arithmetic (in float32 up to rounding of the two products). SmoothQuant picks

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)                                   (paper eq. 4)

where ``X_j`` is input channel j of the activations (over all tokens of the calibration set) and ``W_j`` is
row j of our ``[in, out]`` kernel (the weights that multiply input channel j). ``alpha`` sets how much of the
activations' dynamic range moves into the weights (0.5 balances the two; larger for harder activations).
Outlier channels (large ``max|X_j|``) get a large ``s_j``, so ``X / s`` is flatter and quantizes per token
with a much smaller error, while ``s W`` grows only in the rows that multiplied those channels.

Contract with the integration (where the fold goes). This module only computes ``s`` and rescales arrays;
the caller must make the layer's *input* arrive already divided by ``s``, with no extra op at run time:

* the op producing the input is affine per channel (LayerNorm / RMSNorm scale and bias, an adaLN
  modulation column, a previous linear's output columns): divide its per-output-channel scale and bias by
  ``s`` (`fold_into_preceding`);
* otherwise the layer keeps an explicit ``InputScale`` (``x / s`` before the seam).

Then the kernel is replaced by `smooth` ``(w, s)`` and quantized as usual. When several layers read the same
input (q, k, v; the adaLN-modulated branches) they must share one ``s``: pass all their kernels to
`smoothing_scales`, which takes the per-row maximum over all of them.

Everything here is a pure function on arrays.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

DEFAULT_FLOOR = 1e-5
DEFAULT_CEIL = 1e5


def weight_row_absmax(w: Union[jax.Array, Sequence[jax.Array]]) -> jax.Array:
    """``max|W_j|`` per input channel j of one kernel or of several kernels sharing the input.

    Args:
        w: A kernel ``[..., in, out]`` (input channels on axis -2; leading axes, e.g. a conv's spatial
            axes, are reduced too), or a sequence of such kernels with the same ``in``.

    Returns:
        ``[in]`` float32.
    """
    kernels = [w] if isinstance(w, jax.Array) or hasattr(w, "shape") else list(w)
    if not kernels:
        raise ValueError("weight_row_absmax: got an empty sequence of kernels")
    kernels = [jnp.asarray(k) for k in kernels]
    for i, k in enumerate(kernels):
        if k.ndim < 2:
            raise ValueError(f"kernel {i} must be [..., in, out] (ndim >= 2), got shape {tuple(k.shape)}")
    n_in = {int(k.shape[-2]) for k in kernels}
    if len(n_in) != 1:
        raise ValueError(f"kernels sharing an input must have the same input channels, got {sorted(n_in)}")
    return _row_absmax(kernels)


@jax.jit
def _row_absmax(kernels):  # list of [..., in, out] -> [in]
    rows = []
    for k in kernels:
        k = jnp.moveaxis(k.astype(jnp.float32), -2, 0)  # [in, ..., out]
        rows.append(jnp.max(jnp.abs(k).reshape(k.shape[0], -1), axis=1))
    return jnp.max(jnp.stack(rows), axis=0)


def smoothing_scales(act_absmax: jax.Array, w: Union[jax.Array, Sequence[jax.Array]], alpha: float = 0.5, *,
                     floor: float = DEFAULT_FLOOR, ceil: float = DEFAULT_CEIL) -> jax.Array:
    """Per-input-channel smoothing factors ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    Computed in the log domain (``exp(alpha log a - (1 - alpha) log w)``), so it is finite for every finite
    input, and guarded:

    * a dead channel (``max|X_j| == 0``, or non-finite) or a zero / non-finite weight row gets ``s_j = 1``
      (nothing to migrate; dividing by 1 leaves it untouched);
    * the result is clamped to ``[floor, ceil]``.

    Args:
        act_absmax: ``[in]`` per-input-channel ``max|x|`` over the calibration set (`ActStats.absmax`).
        w: The kernel ``[..., in, out]`` reading those activations, or a sequence of kernels sharing them.
        alpha: Migration strength in ``[0, 1]``.
        floor: Smallest allowed factor (> 0).
        ceil: Largest allowed factor (>= floor).

    Returns:
        ``s [in]`` float32, strictly positive and finite.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"smoothing_scales: alpha must be in [0, 1], got {alpha}")
    if not 0.0 < float(floor) <= float(ceil):
        raise ValueError(f"smoothing_scales: need 0 < floor <= ceil, got floor={floor}, ceil={ceil}")
    a = jnp.asarray(act_absmax, jnp.float32)
    if a.ndim != 1:
        raise ValueError(f"act_absmax must be [in], got shape {tuple(a.shape)}")
    wmax = weight_row_absmax(w)  # [in]
    if wmax.shape != a.shape:
        raise ValueError(f"act_absmax has {a.shape[0]} channels but the kernel has {wmax.shape[0]} input rows")
    return _scales(a, wmax, jnp.float32(alpha), jnp.float32(floor), jnp.float32(ceil))


@jax.jit
def _scales(a, wmax, alpha, floor, ceil):  # [in], [in], scalars -> [in]
    live = (a > 0) & jnp.isfinite(a) & (wmax > 0) & jnp.isfinite(wmax)
    log_a = jnp.log(jnp.where(live, a, 1.0))
    log_w = jnp.log(jnp.where(live, wmax, 1.0))
    log_s = alpha * log_a - (1.0 - alpha) * log_w  # [in]
    log_s = jnp.clip(log_s, jnp.log(floor), jnp.log(ceil))
    s = jnp.clip(jnp.exp(log_s), floor, ceil)  # exp of the clipped log can land one ulp outside
    return jnp.where(live, s, 1.0)


def smooth(w: jax.Array, s: jax.Array) -> jax.Array:
    """The smoothed kernel ``diag(s) W``: row j (input channel j) times ``s_j``. ``[..., in, out]``, w's dtype."""
    w = jnp.asarray(w)
    return (w.astype(jnp.float32) * s[:, None]).astype(w.dtype)


def unsmooth_input(x: jax.Array, s: jax.Array) -> jax.Array:
    """Activations ``[..., in]`` divided by ``s`` per channel (what the folded preceding op produces)."""
    x = jnp.asarray(x)
    return (x.astype(jnp.float32) / s).astype(x.dtype)


def fold_into_preceding(scale: Optional[jax.Array], bias: Optional[jax.Array],
                        s: jax.Array) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
    """Folds ``1/s`` into a preceding per-channel affine op ``y = scale * u + bias`` (LayerNorm, adaLN column).

    Args:
        scale: ``[in]`` multiplicative parameter of the preceding op (or None when it has none).
        bias: ``[in]`` additive parameter (or None).
        s: ``[in]`` smoothing factors.

    Returns:
        ``(scale / s, bias / s)`` (None stays None), so the op outputs ``y / s``.
    """
    def div(a):
        if a is None:
            return None
        a = jnp.asarray(a)
        return (a.astype(jnp.float32) / s).astype(a.dtype)

    return div(scale), div(bias)
