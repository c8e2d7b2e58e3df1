"""GPTVQ (van Baalen et al., 2024): GPTQ with vector quantization, as a pure function, and its storage `VQArray`.

Layout (a kernel ``w`` ``[in, out]`` viewed as ``[K, N]``, leading axes flattened into K as in `gptq_core`):

* a *vector* is ``dim`` (d) consecutive input rows of one output column, ``w[v*d:(v+1)*d, n]``; GPTVQ's
  "d columns at a time" in the paper's ``[out, in]`` layout;
* a *codebook* serves a group of ``group_size`` consecutive input rows by ``group_cols`` consecutive output
  columns (default: all N columns), i.e. ``group_size / d * group_cols`` vectors; it holds ``2^(b*d)`` centroids
  of d values each (b = ``bits_per_dim``), so an index costs ``b*d`` bits and the weights b bits each plus the
  codebook overhead. Codebooks are indexed ``[R, C]`` with ``R = K / group_size`` and ``C = N / group_cols``.

Algorithm (GPTQ's error feedback, d rows at a time; ``H^-1 = U^T U`` with U upper, see `gptq_core`):

1. H is prepared as in GPTQ: dead inputs (``H_ii == 0``) get ``H_ii = 1`` and a zeroed weight row, then
   ``damp * mean(diag(H))`` is added to the diagonal. No act_order: it would break the consecutive rows of a
   vector.
2. When the first row of a row group is reached, its codebooks are initialised from the *current*
   (error-updated) weights of the group by weighted k-means (EM, `em_codebook`): coordinate t of a vector that
   starts at row j is weighted by ``1 / [H_F^-1]_tt`` with ``H_F^-1 = U_FF^T U_FF`` the inverse Hessian of the
   rows not yet quantized (F starts at j); its d x d block at j is ``U_dd^T U_dd`` for the diagonal block
   ``U_dd`` of U. Initial centroids: points at evenly spaced ranks of the Mahalanobis distance to the group
   mean (``init="mahalanobis"``, GPTVQ's deterministic initialisation) or a seeded random sample of points
   (``init="random"``). With float16 codebooks, each is rounded to its storage before it is used.
3. Each vector x (d rows, all N columns at once) takes the centroid minimising the paper's eq. 14,
   ``(x - c)^T (U_dd^T U_dd)^-1 (x - c)`` (``metric="full"``: the OBS loss of quantizing the d rows jointly
   while the later rows compensate), or the diagonal weighting of the EM step (``metric="diag"``).
4. The error ``E = U_dd^-T (x - q)`` (``[d, N]``) is fed to every later row k through ``U[j:j+d, k]``, within a
   block at once and to the rows after the block lazily (blocks of ``gcd(block_size, group_size)`` rows, so a
   group always starts at a block start, where all remaining rows are up to date).
5. Optionally (``codebook_update=True``) the centroids are re-fitted given the assignments: the exact least
   squares minimiser of ``tr((W - Q)^T H (W - Q))`` over all codebooks (W the original weights, H the damped
   Hessian; solved by Jacobi-preconditioned conjugate gradients), kept only if it lowers that error after
   rounding to the storage dtype.

Storage (`VQArray`): indices of ``b*d`` bits packed along the vector axis with `packing.pack_bits` (``b*d <= 8``),
codebooks in float16 with one int16 power-of-two exponent per codebook (``stored * 2^exp`` is the centroid; the
exponent puts the codebook's largest magnitude in ``(2^14, 2^15]`` so tiny or huge weights keep float16's 11
significant bits), or in float32 without exponents. `VQArray.nbytes` counts indices, codebooks and exponents.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from bitlaws.ptq import gptq_core
from bitlaws.quant import packing
from bitlaws.quant.qarray import PackedArray

HIGHEST = jax.lax.Precision.HIGHEST
CODEBOOK_DTYPES = ("float16", "float32")
INITS = ("mahalanobis", "random")
METRICS = ("full", "diag")
_F16_TOP_EXP = 15  # a codebook's largest magnitude is stored in (2^14, 2^15]


# ------------------------------------------------------------------------------------------------- storage


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VQArray(PackedArray):
    """A vector-quantized kernel: packed centroid indices + codebooks; layout is static pytree metadata.

    A `PackedArray`: packed layers hold it like a `QArray` (the seam dequantizes it, the bit accounting
    counts its `nbytes`, and `model_bits` = ``nbytes * 8``: VQ has no nominal per-weight width).

    Attributes:
        indices: uint8 ``[packed_length(K / dim, index_bits), N]``: the index of each vector, packed along the
            vector axis.
        codebooks: ``[R, C, 2^index_bits, dim]`` float16 mantissas (or float32 centroids).
        codebook_exp: ``[R, C]`` int16 power of two of each float16 codebook, or None for float32.
        shape: Shape of the original kernel (static).
        dim: Values per vector, d (static).
        group_size: Input rows per codebook (static).
        group_cols: Output columns per codebook (static).
        index_bits: Bits per index, ``bits_per_dim * dim`` (static).
        dtype: Name of the original dtype, restored by `dequantize_vq` (static).
    """

    indices: jax.Array
    codebooks: jax.Array
    codebook_exp: Optional[jax.Array]
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dim: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    group_cols: int = dataclasses.field(metadata=dict(static=True))
    index_bits: int = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True), default="float32")

    @property
    def view_shape(self) -> tuple[int, int]:
        n = self.shape[-1]
        return math.prod(self.shape) // n, n

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def num_codebooks(self) -> int:
        return int(self.codebooks.shape[0] * self.codebooks.shape[1])

    @property
    def nbytes(self) -> int:
        """Real storage in bytes: packed indices + codebooks (+ their exponents)."""
        total = self.indices.nbytes + self.codebooks.nbytes
        if self.codebook_exp is not None:
            total += self.codebook_exp.nbytes
        return int(total)

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight, ``nbytes * 8 / size`` (index bits / d plus the codebook overhead)."""
        return self.nbytes * 8 / self.size

    @property
    def model_bits(self) -> int:
        """Bits counted in the total model bits MT: everything stored, ``nbytes * 8``."""
        return self.nbytes * 8

    def dequantize(self, dtype=None) -> jax.Array:
        """``dequantize_vq(self, dtype)``: the ``shape`` kernel in `dtype` (default: the original dtype)."""
        return dequantize_vq(self, jnp.dtype(dtype or self.dtype).name)

    @property
    def codebooks_f32(self) -> jax.Array:
        """The centroids ``[R, C, 2^index_bits, dim]`` as float32 (exactly what `dequantize_vq` uses)."""
        return decode_codebooks(self.codebooks, self.codebook_exp)

    def __repr__(self) -> str:
        return (f"VQArray(shape={self.shape}, dim={self.dim}, index_bits={self.index_bits}, "
                f"group={self.group_size}x{self.group_cols}, nbytes={self.nbytes}, "
                f"bits_per_weight={self.bits_per_weight:.3f})")


def vq_nbytes(shape: tuple[int, ...], *, bits_per_dim: int, dim: int, group_size: int,
              group_cols: Optional[int] = None, codebook_dtype: str = "float16") -> int:
    """Bytes the `VQArray` of a kernel of `shape` with this layout stores, computed analytically.

    Equals ``quantize_weight(w, h, ...).nbytes`` for a ``w`` of `shape` (layout not validated here: see
    `gptvq`). Indices: ``packed_length(K / dim, bits_per_dim * dim) * N`` bytes; each of the
    ``K / group_size * N / group_cols`` codebooks: ``2^(bits_per_dim * dim) * dim`` float16 (+ an int16
    exponent) or float32 values.
    """
    n = shape[-1]
    k = math.prod(shape) // n
    index_bits = bits_per_dim * dim
    codebooks = (k // group_size) * (n // (n if group_cols is None else group_cols))
    value_bytes = 2 if codebook_dtype == "float16" else 4
    per_codebook = 2**index_bits * dim * value_bytes + (2 if codebook_dtype == "float16" else 0)
    return packing.packed_length(k // dim, index_bits) * n + codebooks * per_codebook


def _ceil_log2(x: jax.Array) -> jax.Array:
    """Exact ``ceil(log2(x))`` for positive normal float32 x, int32."""
    mantissa, exponent = jnp.frexp(x)
    return jnp.where(mantissa == 0.5, exponent - 1, exponent).astype(jnp.int32)


def encode_codebooks(codebooks: jax.Array, dtype: str = "float16") -> tuple[jax.Array, Optional[jax.Array]]:
    """Float32 centroids ``[..., k, d]`` -> ``(stored, exp)``: float16 mantissas and an int16 exponent per codebook.

    Rounds to nearest. ``float32``: returned as is, no exponent.
    """
    codebooks = codebooks.astype(jnp.float32)
    if dtype == "float32":
        return codebooks, None
    top = jnp.max(jnp.abs(codebooks), axis=(-2, -1))
    exp = _ceil_log2(jnp.maximum(top, 2.0**-100)) - _F16_TOP_EXP  # [...], in [-115, 113]
    stored = jnp.ldexp(codebooks, -exp[..., None, None]).astype(jnp.float16)
    return stored, exp.astype(jnp.int16)


def decode_codebooks(stored: jax.Array, exp: Optional[jax.Array]) -> jax.Array:
    """Inverse of `encode_codebooks`: float32 centroids (exact)."""
    stored = stored.astype(jnp.float32)
    if exp is None:
        return stored
    return jnp.ldexp(stored, exp.astype(jnp.int32)[..., None, None])


def gather_view(codebooks: jax.Array, indices: jax.Array, group_size: int, group_cols: int) -> jax.Array:
    """Centroids ``[R, C, k, d]`` (float32) + indices ``[V, N]`` -> the ``[K, N]`` view (K = V * d)."""
    v, n = indices.shape
    d = codebooks.shape[-1]
    rows = (jnp.arange(v) * d // group_size)[:, None]  # [V, 1]
    cols = (jnp.arange(n) // group_cols)[None, :]  # [1, N]
    values = codebooks[rows, cols, indices]  # [V, N, d]
    return jnp.transpose(values, (0, 2, 1)).reshape(v * d, n)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_vq(vqa: VQArray, dtype=None) -> jax.Array:
    """Unpacks a `VQArray` to its original shape, in `dtype` (default: the original dtype)."""
    k, n = vqa.view_shape
    indices = packing.unpack_bits(vqa.indices, vqa.index_bits, k // vqa.dim, axis=0).astype(jnp.int32)
    view = gather_view(vqa.codebooks_f32, indices, vqa.group_size, vqa.group_cols)
    return view.reshape(vqa.shape).astype(dtype or vqa.dtype)


# ------------------------------------------------------------------------------------------ codebook fitting


def weighted_distances(x: jax.Array, codebook: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_t weights_t (x_t - c_t)^2`` for every point and centroid.

    Args:
        x: ``[M, d]`` points.
        codebook: ``[k, d]`` centroids.
        weights: ``[M, d]`` or ``[d]`` non-negative coordinate weights.

    Returns:
        ``[M, k]`` float32 (summed over the small static d without materialising ``[M, k, d]``).
    """
    weights = jnp.broadcast_to(weights, x.shape)
    total = 0.0
    for t in range(x.shape[-1]):
        total = total + weights[:, t, None] * jnp.square(x[:, t, None] - codebook[None, :, t])
    return total


def assign(x: jax.Array, codebook: jax.Array, weights: jax.Array) -> jax.Array:
    """Index ``[M]`` int32 of the centroid with the smallest weighted distance (first one on ties)."""
    return jnp.argmin(weighted_distances(x, codebook, weights), axis=1).astype(jnp.int32)


def mahalanobis_init(x: jax.Array, k: int) -> jax.Array:
    """k initial centroids ``[k, d]``: the points at evenly spaced ranks of their Mahalanobis distance to the mean.

    Rank ``round(i * (M - 1) / (k - 1))`` of the stable ascending order, i = 0..k-1 (so the centre and the
    farthest point are both taken). The covariance gets ``1e-6 * trace / d`` on its diagonal.
    """
    m, d = x.shape
    centred = x - jnp.mean(x, axis=0)
    cov = jnp.matmul(centred.T, centred, precision=HIGHEST) / m
    cov = cov + (1e-6 * jnp.trace(cov) / d + 1e-30) * jnp.eye(d)
    # (x - mu)^T cov^-1 (x - mu) = ||L^-1 (x - mu)||^2 with cov = L L^T.
    white = jax.scipy.linalg.solve_triangular(jnp.linalg.cholesky(cov), centred.T, lower=True)  # [d, M]
    dist = jnp.sum(jnp.square(white), axis=0)  # [M]
    order = jnp.argsort(dist, stable=True)
    ranks = [round(i * (m - 1) / max(k - 1, 1)) for i in range(k)]
    return x[order[jnp.asarray(ranks)]]


def random_init(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """k distinct points ``[k, d]`` drawn with `key`."""
    return x[jax.random.choice(key, x.shape[0], (k,), replace=False)]


def em_codebook(x: jax.Array, weights: jax.Array, init: jax.Array, iters) -> jax.Array:
    """Weighted k-means (Lloyd / hard EM) from `init`: `iters` rounds of assign + weighted mean.

    The M-step puts coordinate t of centroid c at ``sum_i w_it x_it / sum_i w_it`` over its points (the exact
    minimiser of the weighted objective); a centroid without points (or zero weight) keeps its position.

    Args:
        x: ``[M, d]`` points.
        weights: ``[M, d]`` non-negative coordinate weights.
        init: ``[k, d]`` initial centroids.
        iters: Number of rounds (a Python or traced integer).

    Returns:
        ``[k, d]`` float32 centroids.
    """
    k = init.shape[0]
    x = x.astype(jnp.float32)
    weights = jnp.broadcast_to(weights, x.shape).astype(jnp.float32)

    def step(_, codebook):
        idx = assign(x, codebook, weights)
        num = jax.ops.segment_sum(weights * x, idx, num_segments=k)  # [k, d]
        den = jax.ops.segment_sum(weights, idx, num_segments=k)  # [k, d]
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), codebook)

    return jax.lax.fori_loop(0, iters, step, init.astype(jnp.float32))


def codebook_least_squares(w: jax.Array, hessian: jax.Array, indices: jax.Array, codebooks: jax.Array, *,
                           group_size: int, group_cols: int, iters) -> jax.Array:
    """Centroids minimising ``tr((W - Q)^T H (W - Q))`` for fixed assignments (Q = `gather_view`).

    The objective is quadratic in the centroids; its normal equations ``S^T H S c = S^T H W`` (S the linear map
    centroids -> Q) are solved by `iters` steps of conjugate gradients from `codebooks`, preconditioned with
    the diagonal terms ``sum_{elements of c} H_kk``. Unused centroids keep their values.

    Args:
        w: ``[K, N]`` target weights.
        hessian: ``[K, K]`` (damped) Hessian.
        indices: ``[V, N]`` int32 assignments.
        codebooks: ``[R, C, k, d]`` float32 starting centroids.
        group_size, group_cols: The codebook layout.
        iters: Conjugate-gradient steps (a Python or traced integer).

    Returns:
        ``[R, C, k, d]`` float32 centroids.
    """
    decode = lambda c: gather_view(c, indices, group_size, group_cols)  # noqa: E731
    _, transpose = jax.vjp(decode, codebooks)
    matvec = lambda c: transpose(jnp.matmul(hessian, decode(c), precision=HIGHEST))[0]  # noqa: E731
    rhs = transpose(jnp.matmul(hessian, w, precision=HIGHEST))[0]
    diag = transpose(jnp.broadcast_to(jnp.diagonal(hessian)[:, None], w.shape))[0]
    inv_diag = jnp.where(diag > 0, 1.0 / jnp.where(diag > 0, diag, 1.0), 0.0)  # unused centroids: no step
    safe_div = lambda a, b: jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)  # noqa: E731

    def step(_, state):  # preconditioned conjugate gradients
        c, r, z, p, rz = state
        ap = matvec(p)
        alpha = safe_div(rz, jnp.vdot(p, ap))
        c, r = c + alpha * p, r - alpha * ap
        z = inv_diag * r
        rz_new = jnp.vdot(r, z)
        p = z + safe_div(rz_new, rz) * p
        return c, r, z, p, rz_new

    r = rhs - matvec(codebooks)
    z = inv_diag * r
    return jax.lax.fori_loop(0, iters, step, (codebooks, r, z, z, jnp.vdot(r, z)))[0]


def _objective(w, hessian, deq):
    diff = w - deq
    return jnp.sum(diff * jnp.matmul(hessian, diff, precision=HIGHEST))


# ----------------------------------------------------------------------------------------------- algorithm


class GptvqResult(NamedTuple):
    """What `gptvq` returns.

    Attributes:
        indices: ``[V, N]`` int32 centroid index of each vector (V = K / dim).
        codebooks: ``[R, C, 2^(b*d), d]`` float32 effective centroids (what the storage decodes to).
        deq: ``[K, N]`` float32 dequantized weights.
        losses: ``[V]`` OBS loss of each vector row in the GPTQ pass, ``||U_dd^-T (x - q)||^2`` summed over
            columns; before any codebook update ``sum(losses) == tr((W - deq)^T H_d (W - deq))``.
    """

    indices: jax.Array
    codebooks: jax.Array
    deq: jax.Array
    losses: jax.Array


@functools.partial(jax.jit, static_argnames=("dim", "group_size", "group_cols", "index_bits", "block_size", "init",
                                             "metric"))
def _gptvq_view(w, hessian, damp, seed, em_iters, update_iters, float16, *, dim, group_size, group_cols, index_bits,
                block_size, init, metric):
    # em_iters, update_iters and the float16 switch are traced so that variants share one compilation.
    k, n = w.shape
    d, gs, gc = dim, group_size, group_cols
    ncent = 2**index_bits
    nrow_groups, ncol_groups = k // gs, n // gc
    nvec = k // d
    w, hessian, _ = gptq_core.prepare(w, hessian)
    hessian = gptq_core.damped(hessian, damp)
    u = gptq_core.inverse_cholesky_upper(hessian)  # [K, K]
    vec = jnp.arange(nvec)
    u_dd = u.reshape(nvec, d, nvec, d)[vec, :, vec, :]  # [V, d, d] diagonal blocks (upper)
    t_dd = jax.scipy.linalg.solve_triangular(u_dd, jnp.broadcast_to(jnp.eye(d), u_dd.shape), lower=False)  # U_dd^-1
    # EM weight of each row: 1 / [U_dd^T U_dd]_tt (the inverse-Hessian diagonal of the rows not yet quantized).
    em_weight = (1.0 / jnp.sum(jnp.square(u_dd), axis=1)).reshape(k)  # [K]
    key = jax.random.key(seed)
    storage_round = lambda c: jnp.where(float16, decode_codebooks(*encode_codebooks(c, "float16")), c)  # noqa: E731

    def init_codebooks(r, w_now):
        rows = jax.lax.dynamic_slice_in_dim(w_now, r * gs, gs, 0)  # [gs, N]
        x = rows.reshape(gs // d, d, ncol_groups, gc).transpose(2, 0, 3, 1).reshape(ncol_groups, -1, d)  # [C, M, d]
        wt = jax.lax.dynamic_slice_in_dim(em_weight, r * gs, gs).reshape(gs // d, 1, d)
        wt = jnp.broadcast_to(wt, (gs // d, gc, d)).reshape(-1, d)  # [M, d], the same for every column group

        def one(c, xc):
            if init == "mahalanobis":
                start = mahalanobis_init(xc, ncent)
            else:
                start = random_init(xc, ncent, jax.random.fold_in(jax.random.fold_in(key, r), c))
            return em_codebook(xc, wt, start, em_iters)

        cb = jax.vmap(one)(jnp.arange(ncol_groups), x)  # [C, k, d]
        return storage_round(cb)

    def block_step(start, w, cb_r, carry):
        indices, deq, losses = carry
        w1 = jax.lax.dynamic_slice_in_dim(w, start, block_size, 0)  # [B, N]
        u_rows = jax.lax.dynamic_slice_in_dim(u, start, block_size, 0)  # [B, K]
        u11 = jax.lax.dynamic_slice_in_dim(u_rows, start, block_size, 1)  # [B, B]

        def vec_step(s, c):
            w1, err1, idx1, deq1, loss1 = c
            v = start // d + s
            x = jax.lax.dynamic_slice_in_dim(w1, s * d, d, 0)  # [d, N]
            xv = x.T.reshape(ncol_groups, gc, d)  # [C, gc, d]
            if metric == "full":  # ||(x - c) U_dd^-1||^2 = (x - c)^T (U_dd^T U_dd)^-1 (x - c)  (eq. 14)
                ys = jnp.matmul(xv, t_dd[v], precision=HIGHEST)
                cs, wts = jnp.matmul(cb_r, t_dd[v], precision=HIGHEST), jnp.ones((d,))
            else:
                ys, cs, wts = xv, cb_r, jax.lax.dynamic_slice_in_dim(em_weight, v * d, d)
            idx = jax.vmap(lambda y, cb: assign(y, cb, wts))(ys, cs)  # [C, gc]
            q = jnp.take_along_axis(cb_r, idx[:, :, None], axis=1).reshape(n, d).T  # [d, N]
            err = jnp.matmul(t_dd[v].T, x - q, precision=HIGHEST)  # [d, N] = U_dd^-T (x - q)
            u_step = jax.lax.dynamic_slice_in_dim(u11, s * d, d, 0)  # [d, B]
            w1 = w1 - jnp.matmul(u_step.T, err, precision=HIGHEST)
            return (w1, jax.lax.dynamic_update_slice_in_dim(err1, err, s * d, 0),
                    idx1.at[s].set(idx.reshape(n)), jax.lax.dynamic_update_slice_in_dim(deq1, q, s * d, 0),
                    loss1.at[s].set(jnp.sum(jnp.square(err))))

        nsteps = block_size // d
        init_c = (w1, jnp.zeros((block_size, n)), jnp.zeros((nsteps, n), jnp.int32), jnp.zeros((block_size, n)),
                  jnp.zeros((nsteps,)))
        _, err1, idx1, deq1, loss1 = jax.lax.fori_loop(0, nsteps, vec_step, init_c)
        w = w - jnp.matmul(u_rows.T, err1, precision=HIGHEST)  # lazy update of all later rows
        indices = jax.lax.dynamic_update_slice_in_dim(indices, idx1, start // d, 0)
        deq = jax.lax.dynamic_update_slice_in_dim(deq, deq1, start, 0)
        losses = jax.lax.dynamic_update_slice_in_dim(losses, loss1, start // d, 0)
        return w, (indices, deq, losses)

    def group_step(r, carry):
        w, codebooks, rest = carry
        cb_r = init_codebooks(r, w)  # all rows of the group are up to date at its first block
        codebooks = codebooks.at[r].set(cb_r)

        def blocks(b, c):
            w, rest = c
            return block_step(r * gs + b * block_size, w, cb_r, rest)

        w, rest = jax.lax.fori_loop(0, gs // block_size, blocks, (w, rest))
        return w, codebooks, rest

    init_carry = (w, jnp.zeros((nrow_groups, ncol_groups, ncent, d)),
                  (jnp.zeros((nvec, n), jnp.int32), jnp.zeros((k, n)), jnp.zeros((nvec,))))
    _, codebooks, (indices, deq, losses) = jax.lax.fori_loop(0, nrow_groups, group_step, init_carry)

    def update(codebooks, deq):  # least-squares codebooks, kept only if they lower the error after rounding
        fitted = storage_round(codebook_least_squares(w, hessian, indices, codebooks, group_size=gs,
                                                      group_cols=gc, iters=update_iters))
        fitted_deq = gather_view(fitted, indices, gs, gc)
        better = _objective(w, hessian, fitted_deq) < _objective(w, hessian, deq)
        return jnp.where(better, fitted, codebooks), jnp.where(better, fitted_deq, deq)

    codebooks, deq = jax.lax.cond(update_iters > 0, update, lambda c, q: (c, q), codebooks, deq)
    return GptvqResult(indices=indices, codebooks=codebooks, deq=deq, losses=losses)


def _layout(k: int, n: int, bits_per_dim: int, dim: int, group_size: int, group_cols: Optional[int],
            block_size: int) -> tuple[int, int, int]:
    """Validates the layout; returns ``(index_bits, group_cols, effective block size)``."""
    for name, value in (("bits_per_dim", bits_per_dim), ("dim", dim), ("group_size", group_size),
                        ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    index_bits = bits_per_dim * dim
    if index_bits > 8:
        raise ValueError(f"bits_per_dim * dim = {index_bits} index bits; at most 8 are supported "
                         f"(bits_per_dim={bits_per_dim}, dim={dim})")
    if group_size % dim:
        raise ValueError(f"group_size={group_size} must be a multiple of dim={dim}")
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide the kernel's input dim {k}")
    group_cols = n if group_cols is None else group_cols
    if isinstance(group_cols, bool) or not isinstance(group_cols, int) or group_cols < 1 or n % group_cols:
        raise ValueError(f"group_cols={group_cols!r} must be a positive divisor of the output dim {n}")
    if block_size % dim:
        raise ValueError(f"block_size={block_size} must be a multiple of dim={dim}")
    vectors = group_size // dim * group_cols
    if vectors < 2**index_bits:
        raise ValueError(f"a codebook group holds {vectors} vectors (group_size={group_size} / dim={dim} x "
                         f"group_cols={group_cols}), fewer than its 2^{index_bits} centroids; use larger groups")
    return index_bits, group_cols, math.gcd(block_size, group_size)


def check_options(*, em_iters: int, update_iters: int, damp: float, init: str, metric: str,
                  codebook_dtype: str) -> None:
    """Validates the layout-independent options of `gptvq`; errors name the bad option."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if codebook_dtype not in CODEBOOK_DTYPES:
        raise ValueError(f"codebook_dtype must be one of {CODEBOOK_DTYPES}, got {codebook_dtype!r}")
    for name, value in (("em_iters", em_iters), ("update_iters", update_iters)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not damp >= 0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")


def gptvq(w: jax.Array, hessian: jax.Array, *, bits_per_dim: int, dim: int = 2, group_size: int = 256,
          group_cols: Optional[int] = None, em_iters: int = 30, codebook_update: bool = True,
          update_iters: int = 8, block_size: int = 128, damp: float = 0.01, seed: int = 0,
          init: str = "mahalanobis", metric: str = "full", codebook_dtype: str = "float16") -> GptvqResult:
    """Runs GPTVQ on a kernel; returns indices, effective codebooks, dequantized weights and losses.

    Args: see `quantize_weight`.

    Returns:
        A `GptvqResult`.
    """
    view, args, layout = _arguments(w, hessian, bits_per_dim=bits_per_dim, dim=dim, group_size=group_size,
                                    group_cols=group_cols, em_iters=em_iters, codebook_update=codebook_update,
                                    update_iters=update_iters, block_size=block_size, damp=damp, seed=seed,
                                    init=init, metric=metric, codebook_dtype=codebook_dtype)
    return _gptvq_view(view, *args, **layout)


def _arguments(w, hessian, *, bits_per_dim, dim, group_size, group_cols, em_iters, codebook_update, update_iters,
               block_size, damp, seed, init, metric, codebook_dtype):
    """Validates; returns ``(view [K, N], traced arguments, static layout)`` of `_gptvq_view`."""
    view = gptq_core.kernel_view(w)
    k, n = view.shape
    hessian = gptq_core.check_hessian(hessian, k)
    index_bits, group_cols, block = _layout(k, n, bits_per_dim, dim, group_size, group_cols, block_size)
    check_options(em_iters=em_iters, update_iters=update_iters, damp=damp, init=init, metric=metric,
                  codebook_dtype=codebook_dtype)
    args = (hessian, jnp.float32(damp), jnp.int32(seed), jnp.int32(em_iters),
            jnp.int32(update_iters if codebook_update else 0), jnp.bool_(codebook_dtype == "float16"))
    layout = dict(dim=dim, group_size=group_size, group_cols=group_cols, index_bits=index_bits, block_size=block,
                  init=init, metric=metric)
    return view, args, layout


def quantize_weight(w: jax.Array, hessian: jax.Array, *, bits_per_dim: int, dim: int = 2, group_size: int = 256,
                    group_cols: Optional[int] = None, em_iters: int = 30, codebook_update: bool = True,
                    update_iters: int = 8, block_size: int = 128, damp: float = 0.01, seed: int = 0,
                    init: str = "mahalanobis", metric: str = "full", codebook_dtype: str = "float16") -> VQArray:
    """GPTVQ-quantizes a kernel into a `VQArray`.

    Args:
        w: Kernel ``[in, out]`` (or ``[..., in, out]``, flattened to the ``[K, N]`` view), floating point.
        hessian: ``[K, K]`` mean of ``x x^T`` over calibration inputs (as for `gptq_core`).
        bits_per_dim: b; each codebook has ``2^(b * dim)`` centroids (``b * dim <= 8``).
        dim: d, input rows per vector.
        group_size: Input rows per codebook (a multiple of `dim` dividing K).
        group_cols: Output columns per codebook (a divisor of N); default all N, i.e. one codebook per
            ``group_size`` rows of the whole kernel.
        em_iters: Weighted k-means rounds of each codebook's initialisation (each costs
            ``O(K * N / dim * 2^(b * dim))``: on CPU the dominant cost for large layers).
        codebook_update: Re-fit the centroids by least squares after the assignment pass.
        update_iters: Conjugate-gradient steps of that fit (each costs one ``[K, K] x [K, N]`` matmul; the fit
            typically converges in a few).
        block_size: Rows per lazy batch update (the effective block is ``gcd(block_size, group_size)``).
        damp: Relative damping of the Hessian diagonal.
        seed: Seed of ``init="random"``.
        init: ``mahalanobis`` (deterministic) or ``random`` initial centroids.
        metric: ``full`` (eq. 14, the d x d inverse sub-Hessian) or ``diag`` assignment distance.
        codebook_dtype: ``float16`` (with a per-codebook exponent) or ``float32`` codebook storage.

    Returns:
        The `VQArray`; ``dequantize_vq`` of it equals ``gptvq(...).deq`` reshaped to ``w.shape``.
    """
    view, args, layout = _arguments(w, hessian, bits_per_dim=bits_per_dim, dim=dim, group_size=group_size,
                                    group_cols=group_cols, em_iters=em_iters, codebook_update=codebook_update,
                                    update_iters=update_iters, block_size=block_size, damp=damp, seed=seed,
                                    init=init, metric=metric, codebook_dtype=codebook_dtype)
    return _quantize_view(view, *args, **layout, shape=tuple(jnp.shape(w)),
                          dtype=jnp.dtype(jnp.asarray(w).dtype).name, codebook_dtype=codebook_dtype)


@functools.partial(jax.jit, static_argnames=("dim", "group_size", "group_cols", "index_bits", "block_size", "init",
                                             "metric", "shape", "dtype", "codebook_dtype"))
def _quantize_view(w, hessian, damp, seed, em_iters, update_iters, float16, *, dim, group_size, group_cols,
                   index_bits, block_size, init, metric, shape, dtype, codebook_dtype) -> VQArray:
    """`_gptvq_view` and the packing in one compiled program (one compilation per kernel shape, not two)."""
    result = _gptvq_view(w, hessian, damp, seed, em_iters, update_iters, float16, dim=dim, group_size=group_size,
                         group_cols=group_cols, index_bits=index_bits, block_size=block_size, init=init,
                         metric=metric)
    return _pack(result.indices, result.codebooks, shape=shape, dim=dim, group_size=group_size,
                 group_cols=group_cols, index_bits=index_bits, dtype=dtype, codebook_dtype=codebook_dtype)


def _pack(indices, codebooks, *, shape, dim, group_size, group_cols, index_bits, dtype, codebook_dtype) -> VQArray:
    stored, exp = encode_codebooks(codebooks, codebook_dtype)
    return VQArray(indices=packing.pack_bits(indices.astype(jnp.uint8), index_bits, axis=0), codebooks=stored,
                   codebook_exp=exp, shape=shape, dim=dim, group_size=group_size, group_cols=group_cols,
                   index_bits=index_bits, dtype=dtype)
