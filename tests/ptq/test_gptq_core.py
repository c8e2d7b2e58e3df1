"""GPTQ core: against a plain-numpy float64 Algorithm 1 (no blocking), the OBS loss identity, RTN comparison."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.ptq import gptq_core
from bitlaws.quant import QuantSpec, calibrate, qarray


def _layer(k, n, tokens=1024, seed=0, held_out=0):
    """Random kernel [k, n] and correlated inputs x = z @ A ([tokens, k]).

    Returns (w, x, H = x^T x / tokens, x_held_out) with `held_out` more tokens from the same distribution.
    """
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, k)) / np.sqrt(k) + 0.5 * np.eye(k)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    x = (rng.standard_normal((tokens, k)) @ a).astype(np.float32)
    x_held_out = (rng.standard_normal((held_out, k)) @ a).astype(np.float32)
    return w, x, (x.T.astype(np.float64) @ x / tokens).astype(np.float32), x_held_out


_dequantize = jax.jit(qarray.dequantize)  # one compiled program instead of op-by-op dispatch


def _spec(fmt, granularity="channel", group_size=None):
    return QuantSpec(format=fmt, granularity=granularity, group_size=group_size)


def gptq_reference(w, h, grid, scale, zero=None, damp=0.01, act_order=False):
    """Algorithm 1 of the GPTQ paper, one row (paper: column) at a time, float64, in our [in, out] layout.

    Args:
        w: [K, N] kernel; h: [K, K] mean of x x^T; grid: the format's representable values (units of scale).
        scale, zero: [G, C] static scales / zero points of the original row groups (C = N or 1).

    Rounding is to the nearest value of `grid` (a float64 argmin, independent of `format.round`).
    """
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    k, n = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    groups = np.shape(scale)[0]
    row_scale = np.broadcast_to(np.repeat(np.asarray(scale, np.float64), k // groups, 0), (k, n))
    row_zero = (np.zeros((k, n)) if zero is None else
                np.broadcast_to(np.repeat(np.asarray(zero, np.float64), k // groups, 0), (k, n)))
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h, row_scale, row_zero = w[perm], h[perm][:, perm], row_scale[perm], row_zero[perm]
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U
    deq = np.zeros_like(w)
    for j in range(k):
        units = w[j] / row_scale[j] + row_zero[j]
        q = grid[np.argmin(np.abs(units[:, None] - grid[None, :]), axis=1)]
        deq[j] = (q - row_zero[j]) * row_scale[j]
        err = (w[j] - deq[j]) / u[j, j]
        w[j + 1:] -= np.outer(u[j, j + 1:], err)
    return deq[np.argsort(perm)]


CASES = [  # (format, granularity, group_size, act_order, block_size, k, n)
    ("int4", "channel", None, False, 16, 96, 32),
    ("int3", "group", 32, True, 16, 96, 32),
    ("fp4_e2m1", "group", 32, False, 16, 96, 32),
    ("uint4", "channel", None, True, 128, 64, 16),   # one block larger than the layer
    ("nf4", "group", 24, False, 16, 72, 16),         # K not a multiple of the block: padded
    ("int3", "tensor", None, False, 32, 64, 16),
]


@pytest.mark.parametrize("fmt,granularity,group_size,act_order,block_size,k,n", CASES)
def test_matches_reference_algorithm(fmt, granularity, group_size, act_order, block_size, k, n):
    w, _, h, _ = _layer(k, n, seed=k + n)
    spec = _spec(fmt, granularity, group_size)
    result = gptq_core.gptq(w, h, spec, block_size=block_size, act_order=act_order)
    ref = gptq_reference(w, h, spec.format.grid(), result.scale, result.zero, act_order=act_order)
    ours = np.asarray(result.deq)
    rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert rel < 1e-4, rel
    # OBS identity: with error feedback the per-row losses add up to the damped-Hessian error exactly.
    hd = h.astype(np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(k)
    diff = ours.astype(np.float64) - w
    np.testing.assert_allclose(float(np.sum(np.asarray(result.losses, np.float64))), np.trace(diff.T @ hd @ diff),
                               rtol=1e-4)


def test_qarray_static_group_scales_with_act_order():
    """Groups stay the original contiguous row groups under act_order: scales, layout and size are RTN's."""
    w, _, h, _ = _layer(96, 32, seed=128)
    spec = _spec("int3", "group", 32)
    qa = gptq_core.quantize_weight(w, h, spec, block_size=16, act_order=True)
    result = gptq_core.gptq(w, h, spec, block_size=16, act_order=True)
    np.testing.assert_array_equal(np.asarray(_dequantize(qa)), np.asarray(result.deq))
    scale, zero = jax.jit(calibrate.group_params, static_argnums=1)(qarray.group_view(jnp.asarray(w), spec), spec)
    np.testing.assert_array_equal(np.asarray(qa.scale_f32), np.asarray(scale)[:, 0])
    assert zero is None and qa.zero_point is None
    assert qa.nbytes == jax.jit(qarray.quantize, static_argnums=1)(w, spec).nbytes


# Configurations of CASES (same shapes and static arguments: no new compilation).
@pytest.mark.parametrize("fmt,granularity,group_size,act_order", [("int3", "group", 32, True),
                                                                  ("int4", "channel", None, False)])
def test_output_error_clearly_below_rtn(fmt, granularity, group_size, act_order):
    k, n = 96, 32
    w, _, h, x_test = _layer(k, n, tokens=2048, seed=5, held_out=4096)
    spec = _spec(fmt, granularity, group_size)

    def rel_err(wq):
        return float(np.sum((x_test @ (np.asarray(wq) - w)) ** 2) / np.sum((x_test @ w) ** 2))

    e_gptq = rel_err(gptq_core.gptq(w, h, spec, block_size=16, act_order=act_order).deq)
    e_rtn = rel_err(jax.jit(lambda v: qarray.quantize_dequantize(v, spec)[0])(w))
    print(f"\n{spec.short()} act_order={act_order} held-out ||X(Wq-W)||^2/||XW||^2: GPTQ {e_gptq:.5f}  "
          f"RTN {e_rtn:.5f}  ratio {e_gptq / e_rtn:.3f}")
    assert e_gptq / e_rtn < 0.7


def test_dead_inputs_zero_their_rows():
    w, _, h, _ = _layer(96, 32, seed=3)
    h = h.copy()
    for i in (5, 40):
        h[i, :] = 0.0
        h[:, i] = 0.0
    result = gptq_core.gptq(w, h, _spec("int4"), block_size=16)
    deq = np.asarray(result.deq)
    assert np.all(np.isfinite(deq))
    np.testing.assert_array_equal(deq[[5, 40]], 0.0)
    ref = gptq_reference(w, h, _spec("int4").format.grid(), result.scale, result.zero)
    np.testing.assert_allclose(deq, ref, atol=1e-4 * np.abs(deq).max())


@pytest.mark.parametrize("fmt,granularity,group_size,act_order", [
    ("int4", "channel", None, False), ("int3", "group", 16, True), ("uint4", "channel", None, True),
    ("fp4_e2m1", "group", 16, False)])
def test_column_padding_gives_the_same_qarray_and_shares_programs(fmt, granularity, group_size, act_order):
    """quantize_weight pads the output axis (repeating the last column) so kernels of one input size share a
    compiled program; the QArray equals the unpadded GPTQ's bit for bit."""
    spec = _spec(fmt, granularity, group_size)
    w, _, h, _ = _layer(48, 1, seed=3)
    before = gptq_core._gptq_view._cache_size()
    for n in (7, 40, 33):
        w, _, _, _ = _layer(48, n, seed=n)
        qa = gptq_core.quantize_weight(w, h, spec, block_size=16, act_order=act_order)
        ref = gptq_core.gptq(w, h, spec, block_size=16, act_order=act_order)  # unpadded
        assert qa.shape == (48, n)
        np.testing.assert_array_equal(np.asarray(_dequantize(qa)), np.asarray(ref.deq))
        np.testing.assert_array_equal(np.asarray(qa.scale_f32), np.asarray(ref.scale))
    # the three padded kernels (1024 columns) share one program; the unpadded references add three
    assert gptq_core._gptq_view._cache_size() - before == 4


def test_no_column_padding_for_per_tensor_statistics():
    """A per-tensor MSE calibrator would see repeated columns: such kernels are quantized at their own width."""
    spec = QuantSpec(format="int4", granularity="tensor", calibrator="mse")
    w, _, h, _ = _layer(32, 12, seed=4)
    qa = gptq_core.quantize_weight(w, h, spec, block_size=16)
    np.testing.assert_array_equal(np.asarray(_dequantize(qa)), np.asarray(gptq_core.gptq(w, h, spec, block_size=16).deq))


def test_conv_kernel_and_dtype():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 4, 8, 32)), jnp.bfloat16)  # HWIO; view [96, 32] as in CASES[0]
    x = rng.standard_normal((256, 96)).astype(np.float32)
    qa = gptq_core.quantize_weight(w, x.T @ x / 256, _spec("int4"), block_size=16)
    assert qa.shape == (3, 4, 8, 32) and qa.dtype == "bfloat16"
    deq = _dequantize(qa)
    assert deq.shape == (3, 4, 8, 32) and deq.dtype == jnp.bfloat16


def test_argument_errors():
    w = np.zeros((64, 8), np.float32)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_core.gptq(w, np.eye(32, dtype=np.float32), _spec("int4"))
    with pytest.raises(ValueError, match="group_size"):
        gptq_core.gptq(w, np.eye(64, dtype=np.float32), _spec("int4", "group", 48))
    with pytest.raises(ValueError, match="token"):
        gptq_core.gptq(w, np.eye(64, dtype=np.float32), _spec("int4", "token"))
    with pytest.raises(ValueError, match="block_size"):
        gptq_core.gptq(w, np.eye(64, dtype=np.float32), _spec("int4"), block_size=0)
    with pytest.raises(ValueError, match="at least 2 axes"):
        gptq_core.gptq(np.zeros(8, np.float32), np.eye(8, dtype=np.float32), _spec("int4"))
