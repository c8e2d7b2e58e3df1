"""GPTQ (Frantar et al., 2022): second-order weight quantization with error feedback, as a pure function.

Layout. A kernel ``w`` is ``[in, out]`` (more leading axes are flattened row-major into ``in``, the reduction
view of `bitlaws.quant.qarray`); the paper's weight is ``[out, in]``, so its *columns* are our *rows*. The
Hessian of the layer's squared output error is ``H = E[x x^T]`` over calibration inputs ``x`` ``[in]``; pass the
**mean** ``X^T X / n`` (any positive multiple gives the same result: the damping is relative and GPTQ is
invariant to scaling H). Rows are quantized one at a time; the rounding error of row j, divided by the
diagonal ``U_jj`` of the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), is fed back into every later row
k through ``U_jk`` (Algorithm 1 of the paper, with its lazy batch updates in blocks of `block_size` rows).

Preparation of H (in this order, as the paper's reference practice):

1. *dead inputs*: rows with ``H_ii == 0`` (an input that is always zero) get ``H_ii = 1`` and their weight row is
   zeroed before anything else (the row never contributes to the output, so zero is exact for it);
2. *act_order* (optional): rows are processed in order of descending ``H_ii`` (stable sort) and the result is
   permuted back;
3. *damping*: ``damp * mean(diag(H))`` is added to the diagonal.

Scales (groups x act_order). Scales are **static**: computed up front, by the spec's calibrator through
`calibrate.group_params`, on the original weights (dead rows zeroed), in one call for the whole tensor (float16
scale storage shares a per-tensor exponent, so they cannot be computed group by group). The scales used for
rounding are exactly the ones stored. With ``granularity="group"`` a group is always ``group_size``
consecutive rows of the *original* layout, whatever the processing order: with ``act_order=True`` row j of
the processing order is rounded with the scale of group ``perm[j] // group_size``, so the stored layout stays
the plain contiguous one (no ``g_idx`` indirection) and any kernel can read it. The paper's lazy groups (scale
of a group computed from the error-updated weights when its first row is reached) are not offered: they fit
the updated weights slightly better, but are incompatible with a shared scale exponent and, with act_order,
with contiguous groups.

Formats: everything goes through `calibrate.quantize_grouped` / `dequantize_grouped`, so every format of
`bitlaws.quant.formats` works (int with or without zero point, fp, MX with its E8M0 block scales, lookup
tables). Non-finite weights give NaN scales whose NaN the error feedback spreads to later rows; the
integration refuses such kernels beforehand.

Numerics: float32 throughout, matmuls at ``Precision.HIGHEST``; the inverse-Hessian factor is computed from one
Cholesky factorization of the row-reversed H and a triangular inverse (no explicit inverse of H).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from bitlaws.quant import calibrate, formats, methods, qarray
from bitlaws.quant.spec import QuantSpec

HIGHEST = jax.lax.Precision.HIGHEST


class GptqResult(NamedTuple):
    """What `gptq` returns, all in the original row order of the ``[K, N]`` view.

    Attributes:
        q: ``[K, N]`` float32 grid values (integer codes incl. zero point, or fp / table element values).
        scale: ``[G, C]`` float32 effective scales (``G = K / group_size`` or 1, ``C = N`` or 1 for tensor).
        zero: ``[G, C]`` uint8 zero points (unsigned int formats) or None.
        deq: ``[K, N]`` float32 dequantized weights.
        losses: ``[K]`` float32 OBS loss of each row, ``sum_n ((w - deq) / U_jj)^2``; with the damped Hessian
            ``H_d``, ``sum(losses) == trace((W - deq)^T H_d (W - deq))`` (the layer's mean squared output error
            under ``H_d``, summed over outputs).
    """

    q: jax.Array
    scale: jax.Array
    zero: Optional[jax.Array]
    deq: jax.Array
    losses: jax.Array


def kernel_view(w: jax.Array) -> jax.Array:
    """A kernel ``[..., in, out]`` -> its ``[K, N]`` reduction view (leading axes flattened row-major)."""
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"w must be a kernel with at least 2 axes ([in, out]), got shape {tuple(w.shape)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w must be a floating-point array, got dtype {w.dtype}")
    return w.reshape(-1, w.shape[-1]).astype(jnp.float32)


def check_hessian(hessian: jax.Array, k: int) -> jax.Array:
    """Validates a ``[K, K]`` Hessian for a view with K rows; returns it as float32."""
    hessian = jnp.asarray(hessian)
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] (the kernel's flattened input dim), got {tuple(hessian.shape)}")
    return hessian.astype(jnp.float32)


def prepare(w: jax.Array, hessian: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dead-input handling: ``H_ii == 0`` -> ``H_ii = 1`` and weight row i zeroed.

    Args:
        w: ``[K, N]`` float32 view.
        hessian: ``[K, K]`` float32.

    Returns:
        ``(w, hessian, dead)``: the fixed view and Hessian, and the ``[K]`` bool mask of dead rows.
    """
    diag = jnp.diagonal(hessian)
    dead = diag == 0
    hessian = hessian + jnp.diag(jnp.where(dead, 1.0, 0.0))
    return jnp.where(dead[:, None], 0.0, w), hessian, dead


def damped(hessian: jax.Array, damp: float) -> jax.Array:
    """``H + damp * mean(diag(H)) * I``."""
    k = hessian.shape[0]
    return hessian + damp * jnp.mean(jnp.diagonal(hessian)) * jnp.eye(k, dtype=hessian.dtype)


def inverse_cholesky_upper(hessian: jax.Array) -> jax.Array:
    """Upper-triangular U with ``H^-1 = U^T U`` and a positive diagonal (the paper's ``Cholesky(H^-1)^T``).

    With J the row reversal and ``J H J = L L^T``: ``H^-1 = (J L^-T J)(J L^-1 J)`` and ``J L^-1 J`` is upper
    triangular, so U is the flipped inverse of the Cholesky factor of the flipped H: one factorization and
    one triangular solve, no explicit inverse.

    Args:
        hessian: ``[K, K]`` symmetric positive definite float32.

    Returns:
        ``[K, K]`` float32 upper-triangular U (NaN if H is not numerically positive definite).
    """
    k = hessian.shape[0]
    lower = jnp.linalg.cholesky(hessian[::-1, ::-1])
    inv_lower = jax.scipy.linalg.solve_triangular(lower, jnp.eye(k, dtype=hessian.dtype), lower=True)
    return jnp.triu(inv_lower[::-1, ::-1])


def row_params(scale: jax.Array, zero: Optional[jax.Array], k: int, n: int) -> tuple[jax.Array, Optional[jax.Array]]:
    """Scales / zero points ``[G, 1, C]`` -> one per element of the view, ``[K, N]`` (group g covers rows g*K/G..)."""
    groups = scale.shape[0]
    expand = lambda a: jnp.broadcast_to(jnp.repeat(a[:, 0, :], k // groups, axis=0), (k, n))  # noqa: E731
    return expand(scale), (None if zero is None else expand(zero))


SUB_BLOCK = 16  # rows per inner lazy batch inside a block (a second level of the paper's lazy updates)


def _lazy_blocks(w, u, row_scale, row_zero, block: int, inner):
    """Processes rows `block` at a time with `inner`, then updates all later rows at once (lazy batch).

    Args:
        w: ``[R, N]`` float32 weights of a run of rows, R a multiple of `block`.
        u: ``[R, R]`` the upper inverse-Hessian factor restricted to these rows.
        row_scale, row_zero: ``[R, N]`` scale / zero point of each element (zero point: zeros if unused).
        block: Rows per batch.
        inner: ``(w, u, scale, zero)`` of one batch -> ``(q, deq, err, loss)`` (``[block, N]`` x 3, ``[block]``).

    Returns:
        ``(q, deq, err, loss)`` for all R rows, where ``err = (w - deq) / U_jj`` after feedback.
    """
    r, n = w.shape

    def step(b, carry):
        w, q, deq, err, loss = carry
        start = b * block
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, start, block, 0)  # noqa: E731
        u_rows = rows(u)  # [block, R]
        q1, deq1, err1, loss1 = inner(rows(w), jax.lax.dynamic_slice_in_dim(u_rows, start, block, 1),
                                      rows(row_scale), rows(row_zero))
        # W[k] -= sum_{j in batch} U_jk e_j: zero for rows before the batch (U is upper), harmless for the batch
        # itself (already quantized), the error feedback for every later row.
        w = w - jnp.matmul(u_rows.T, err1, precision=HIGHEST)
        put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v, start, 0)  # noqa: E731
        return w, put(q, q1), put(deq, deq1), put(err, err1), put(loss, loss1)

    zeros = jnp.zeros((r, n), jnp.float32)
    init = (w, zeros, zeros, zeros, jnp.zeros((r,), jnp.float32))
    return jax.lax.fori_loop(0, r // block, step, init)[1:]


def _blocked_gptq(w, u, row_scale, row_zero, fmt: formats.QFormat, block_size: int):
    """The lazy-batch GPTQ loop on a processing-ordered view.

    Two levels of lazy batches: blocks of `block_size` rows update the rest of the matrix, and inside a block
    sub-blocks of ``gcd(block_size, SUB_BLOCK)`` rows update the rest of the block (the per-row rank-1 updates
    then touch only a sub-block, which keeps the sequential part small). Mathematically this is Algorithm 1.

    Args:
        w: ``[Kp, N]`` float32 weights, Kp a multiple of `block_size`.
        u: ``[Kp, Kp]`` upper Cholesky factor of the (damped) inverse Hessian.
        row_scale: ``[Kp, N]`` float32 scale of each element.
        row_zero: ``[Kp, N]`` zero point of each element, or None.
        fmt: The element format.
        block_size: Rows per lazy batch.

    Returns:
        ``(q, deq, losses)``: ``[Kp, N]``, ``[Kp, N]``, ``[Kp]``.
    """
    has_zero = row_zero is not None
    if not has_zero:
        row_zero = jnp.zeros_like(w)  # placeholder, never read

    def rows(w1, u1, s1, z1):  # one row at a time within a sub-block
        def row_step(j, c):
            w1, q1, deq1, err1, loss1 = c
            wj = w1[j]  # [N]
            zj = z1[j] if has_zero else None
            qj = calibrate.quantize_grouped(wj, s1[j], zj, fmt)  # [N]
            dj = calibrate.dequantize_grouped(qj, s1[j], zj, fmt)  # [N]
            ej = (wj - dj) / u1[j, j]  # [N]
            w1 = w1 - u1[j][:, None] * ej[None, :]  # rows k > j get -U_jk e_j
            return (w1, q1.at[j].set(qj), deq1.at[j].set(dj), err1.at[j].set(ej),
                    loss1.at[j].set(jnp.sum(jnp.square(ej))))

        zeros = jnp.zeros_like(w1)
        init = (w1, zeros, zeros, zeros, jnp.zeros((w1.shape[0],), jnp.float32))
        return jax.lax.fori_loop(0, w1.shape[0], row_step, init)[1:]

    sub = math.gcd(block_size, SUB_BLOCK)
    block = lambda *a: _lazy_blocks(*a, sub, rows)  # noqa: E731
    q, deq, _, losses = _lazy_blocks(w, u, row_scale, row_zero, block_size, block)
    return q, deq, losses


@functools.partial(jax.jit, static_argnames=("spec", "block_size", "act_order"))
def _gptq_view(w, hessian, damp, spec: QuantSpec, block_size: int, act_order: bool):
    k, n = w.shape
    w, hessian, _ = prepare(w, hessian)
    # Static scales from the (dead-zeroed) original weights, one calibrate call for the whole tensor.
    scale, zero = calibrate.group_params(qarray.group_view(w, spec, "the GPTQ kernel"), spec)  # [G, 1, C]
    row_scale, row_zero = row_params(scale, zero, k, n)  # [K, N]
    w_p, h_p = w, hessian
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(hessian), stable=True)
        w_p, h_p, row_scale = w[perm], hessian[perm][:, perm], row_scale[perm]
        row_zero = None if row_zero is None else row_zero[perm]
    h_p = damped(h_p, damp)
    u = inverse_cholesky_upper(h_p)  # [K, K]
    # Pad to whole blocks with decoupled identity rows (their weights are 0 and quantize to exactly 0).
    bs = min(block_size, k)
    pad = -k % bs
    if pad:
        w_p = jnp.pad(w_p, ((0, pad), (0, 0)))
        u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.concatenate([jnp.zeros(k), jnp.ones(pad)]))
        row_scale = jnp.pad(row_scale, ((0, pad), (0, 0)), constant_values=1.0)
        row_zero = None if row_zero is None else jnp.pad(row_zero, ((0, pad), (0, 0)))
    q_p, deq_p, loss_p = _blocked_gptq(w_p, u, row_scale, row_zero, spec.format, bs)
    q, deq, losses = q_p[:k], deq_p[:k], loss_p[:k]
    if act_order:
        inv = jnp.argsort(perm)
        q, deq, losses = q[inv], deq[inv], losses[inv]
    squeeze = lambda a: None if a is None else a.reshape(a.shape[0], a.shape[2])  # noqa: E731
    return GptqResult(q=q, scale=squeeze(scale), zero=squeeze(zero), deq=deq, losses=losses)


def _check_args(spec: QuantSpec, block_size: int, damp: float) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if spec.granularity == "token":
        raise ValueError("spec.granularity 'token' applies to activations only; GPTQ quantizes weights")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp!r}")


def gptq(w: jax.Array, hessian: jax.Array, spec: QuantSpec, *, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False) -> GptqResult:
    """Runs GPTQ on a kernel and returns grid values, scales, the dequantized weights and per-row losses.

    Args:
        w: Kernel ``[in, out]`` (or ``[..., in, out]``, flattened to the ``[K, N]`` view), floating point.
        hessian: ``[K, K]`` mean of ``x x^T`` over calibration inputs (see the module docstring).
        spec: Weight `QuantSpec` (granularity tensor, channel or group).
        block_size: Rows per lazy batch update (the paper's B; any value, K need not be a multiple).
        damp: Relative damping: ``damp * mean(diag(H))`` is added to the diagonal.
        act_order: Process rows in order of descending ``H_ii`` (scales stay those of the original groups).

    Returns:
        A `GptqResult` in the original row order of the view.
    """
    _check_args(spec, block_size, damp)
    view = kernel_view(w)
    spec.check_axis(view.shape[0], f"a kernel of shape {tuple(jnp.shape(w))}")
    hessian = check_hessian(hessian, view.shape[0])
    return _gptq_view(view, hessian, jnp.float32(damp), spec, block_size, bool(act_order))


def quantize_weight(w: jax.Array, hessian: jax.Array, spec: QuantSpec, *, block_size: int = 128,
                    damp: float = 0.01, act_order: bool = False) -> qarray.QArray:
    """GPTQ-quantizes a kernel into a packed `QArray` (same layout as `qarray.quantize`, i.e. RTN's).

    Args:
        w: Kernel ``[in, out]`` (or ``[..., in, out]``), floating point.
        hessian: ``[K, K]`` mean of ``x x^T`` over calibration inputs, K = prod of all axes but the last.
        spec: Weight `QuantSpec`.
        block_size: Rows per lazy batch update.
        damp: Relative damping of the Hessian diagonal.
        act_order: Process rows in order of descending ``H_ii``.

    Returns:
        The `QArray`; ``qarray.dequantize`` of it equals ``gptq(...).deq`` reshaped to ``w.shape``.

    Output columns are independent in GPTQ (the error feedback of column n only moves column n), so, like
    `bitlaws.quant.methods.rtn_kernel`, the kernel is quantized with its output axis padded by repeating the
    last column (`methods.padded_columns`) and cut back: kernels sharing an input size share one compiled
    program per spec, and the `QArray` is the same as without padding.
    """
    shape = tuple(jnp.shape(w))
    dtype = jnp.dtype(jnp.asarray(w).dtype).name
    padded = methods.padded_columns(jnp.asarray(w), spec)
    if padded != shape[-1]:
        w = methods.repeat_last_column(jnp.asarray(w), padded)
    result = gptq(w, hessian, spec, block_size=block_size, damp=damp, act_order=act_order)
    qa = _from_grid(result.q, result.scale, result.zero, spec, shape=(*shape[:-1], padded), dtype=dtype)
    return qa if padded == shape[-1] else methods.first_columns(qa, shape)


# Packing compiled as one program (op-by-op dispatch of the encoders costs more than the compilation).
_from_grid = jax.jit(qarray.from_grid, static_argnames=("spec", "shape", "reduce_axes", "dtype"))
