"""OmniQuant core: LWC against a plain-numpy reference, packed == fake, gradients, LET, and block training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.ptq import omniquant_core as omni
from bitlaws.quant import QuantSpec, dequantize, fake_quant

_HIGHEST = jax.lax.Precision.HIGHEST


def _sigmoid32(v):
    return (np.float32(1) / (np.float32(1) + np.exp(-v.astype(np.float32)))).astype(np.float32)


def _np_lwc(w, gamma, beta, bits, signed, group):
    """Paper eq. 2-3 with loops over groups and output channels (float32 scales, min-max of the clipped range)."""
    k, n = w.shape
    group = group or k
    out = np.empty_like(w)
    for g in range(k // group):
        rows = slice(g * group, (g + 1) * group)
        for c in range(n):
            col = w[rows, c]
            up = _sigmoid32(np.asarray(gamma[g, c]))
            if signed:
                qmax = np.float32(2 ** (bits - 1) - 1)
                h = np.maximum(up * np.max(np.abs(col)) / qmax, np.float32(2.0**-126))
                out[rows, c] = np.clip(np.round(col / h), -qmax - 1, qmax) * h
            else:
                qmax = np.float32(2**bits - 1)
                lo = min(_sigmoid32(np.asarray(beta[g, c])) * np.min(col), np.float32(0))
                hi = max(up * np.max(col), np.float32(0))
                h = np.maximum(hi / qmax - lo / qmax, np.float32(2.0**-126))
                z = np.float32(np.clip(np.round(-lo / h), 0, qmax))
                out[rows, c] = (np.clip(np.round(col / h + z), 0, qmax) - z) * h
    return out


def _kernel(seed, k=64, n=32):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    w[rng.random(w.shape) < 0.02] *= 5.0  # weight outliers worth clipping
    return w


@pytest.mark.parametrize("bits,signed,group", [(4, False, 16), (3, True, None)])
def test_lwc_fake_quant_matches_numpy_reference(bits, signed, group):
    w = _kernel(0)
    fmt = f"{'' if signed else 'u'}int{bits}"
    spec = (QuantSpec(format=fmt, granularity="group", group_size=group, scale_dtype="float32") if group
            else QuantSpec(format=fmt, scale_dtype="float32"))
    rng = np.random.default_rng(1)
    shape = omni.lwc_shape(w, spec)
    gamma = rng.normal(1.5, 1.0, shape).astype(np.float32)
    beta = rng.normal(1.5, 1.0, shape).astype(np.float32)
    got = jax.jit(functools.partial(omni.lwc_fake_quant, spec=spec))(w, gamma, beta)
    np.testing.assert_allclose(np.asarray(got), _np_lwc(w, gamma, beta, bits, signed, group), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("spec", [
    QuantSpec(format="uint3", granularity="group", group_size=16),
    QuantSpec(format="int4"),
    QuantSpec(format="fp4_e2m1", granularity="group", group_size=16),
    QuantSpec(format="mxfp4"),
], ids=lambda s: s.short())
def test_lwc_quantize_equals_fake_quant_forward(spec):
    w = _kernel(2)
    shape = omni.lwc_shape(w, spec)
    rng = np.random.default_rng(3)
    gamma, beta = (jnp.asarray(rng.normal(2.0, 1.0, shape), jnp.float32) for _ in range(2))

    @jax.jit
    def both(w, gamma, beta):
        return omni.lwc_fake_quant(w, gamma, beta, spec), dequantize(omni.lwc_quantize(w, gamma, beta, spec))

    fake, packed = both(jnp.asarray(w), gamma, beta)
    assert packed.shape == w.shape
    np.testing.assert_allclose(np.asarray(fake), np.asarray(packed), rtol=1e-6, atol=0)


RTN_LOGIT = 30.0  # sigmoid(30) == 1.0 in float32: no clipping, i.e. plain min-max RTN


def test_lwc_without_clipping_is_rtn():
    w = jnp.asarray(_kernel(8))
    spec = QuantSpec(format="uint3", granularity="group", group_size=16)
    gamma, beta = omni.lwc_init(w, spec, RTN_LOGIT)

    @jax.jit
    def both(w, gamma, beta):
        return omni.lwc_fake_quant(w, gamma, beta, spec), fake_quant(w, spec)

    lwc, rtn = both(w, gamma, beta)
    np.testing.assert_array_equal(np.asarray(lwc), np.asarray(rtn))


@pytest.mark.parametrize("fmt", ["uint3", "int3"])
def test_lwc_gradients_are_finite_and_nonzero(fmt):
    w = jnp.asarray(_kernel(4))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((64, 64)), jnp.float32)
    spec = QuantSpec(format=fmt, granularity="group", group_size=16)
    gamma, beta = omni.lwc_init(w, spec)

    @jax.jit
    def grads(gamma, beta, w):
        def loss(gamma, beta, w):
            return jnp.mean(jnp.square(x @ omni.lwc_fake_quant(w, gamma, beta, spec) - x @ w))
        return jax.grad(loss, argnums=(0, 1, 2))(gamma, beta, w)

    g_gamma, g_beta, g_w = (np.asarray(g) for g in grads(gamma, beta, w))
    for g in (g_gamma, g_beta, g_w):
        assert np.all(np.isfinite(g))
    assert np.mean(g_gamma != 0) > 0.9 and np.any(g_w != 0)
    if fmt == "uint3":
        assert np.mean(g_beta != 0) > 0.9
    else:
        assert np.all(g_beta == 0)  # symmetric formats only use gamma


def test_let_identity_reference_and_fold():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((16, 12)).astype(np.float32)
    w = rng.standard_normal((12, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    w2, b2 = omni.let_transform(w, b, jnp.ones(12), jnp.zeros(12))
    np.testing.assert_array_equal(np.asarray(w2), w)
    np.testing.assert_array_equal(np.asarray(b2), b)
    np.testing.assert_array_equal(np.asarray(omni.let_input(x, jnp.ones(12), jnp.zeros(12))), x)
    s = np.exp(rng.normal(0, 1, 12)).astype(np.float32)
    delta = rng.standard_normal(12).astype(np.float32)
    w2, b2 = omni.let_transform(w, b, jnp.asarray(s), jnp.asarray(delta))
    ref_w = np.stack([s[j] * w[j] for j in range(12)])
    ref_b = b.astype(np.float64) + sum(delta[j] * w[j].astype(np.float64) for j in range(12))
    np.testing.assert_allclose(np.asarray(w2), ref_w, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b2), ref_b, rtol=1e-5, atol=1e-6)
    y = np.asarray(omni.let_input(x, jnp.asarray(s), jnp.asarray(delta)), np.float64) @ np.asarray(w2, np.float64) \
        + np.asarray(b2, np.float64)
    ref = x.astype(np.float64) @ w.astype(np.float64) + b
    assert np.linalg.norm(y - ref) <= 1e-5 * np.linalg.norm(ref)
    g = rng.standard_normal(12).astype(np.float32)
    beta = rng.standard_normal(12).astype(np.float32)
    g2, beta2 = omni.fold_let_into_affine(jnp.asarray(g), jnp.asarray(beta), jnp.asarray(s), jnp.asarray(delta))
    np.testing.assert_allclose(x * np.asarray(g2) + np.asarray(beta2), (x * g + beta - delta) / s, rtol=1e-5, atol=1e-5)


def test_let_init_centres_channels():
    w = jnp.asarray(np.random.default_rng(7).standard_normal((6, 4)), jnp.float32)
    act_min = jnp.asarray([-1.0, 0.0, 2.0, -4.0, -1.0, 0.0])
    act_max = jnp.asarray([3.0, 2.0, 6.0, 0.0, 1.0, 0.0])
    s, delta = omni.let_init(w, act_min=act_min, act_max=act_max)
    np.testing.assert_allclose(np.asarray(delta), [1.0, 1.0, 4.0, -2.0, 0.0, 0.0])
    assert float(s[5]) == 1.0 and np.all(np.asarray(s) > 0)
    s0, d0 = omni.let_init(w, jnp.abs(act_min) + 1.0)
    assert np.all(np.asarray(d0) == 0) and s0.shape == (6,)


# ------------------------------------------------------------------------------------------ block training

D, HID, T, N = 32, 64, 8, 96
OUTLIERS = (3, 11, 25)


def _toy_block(seed):
    """A LayerNorm-like affine with outlier channels, then two linears with GELU between; float params."""
    rng = np.random.default_rng(seed)
    ln_g = np.ones(D, np.float32) + 0.1 * rng.standard_normal(D).astype(np.float32)
    ln_g[list(OUTLIERS)] = 20.0
    params = dict(ln_g=ln_g, ln_b=0.5 * rng.standard_normal(D).astype(np.float32),
                  w1=(rng.standard_normal((D, HID)) / np.sqrt(D)).astype(np.float32),
                  b1=0.1 * rng.standard_normal(HID).astype(np.float32),
                  w2=(rng.standard_normal((HID, D)) / np.sqrt(HID)).astype(np.float32),
                  b2=0.1 * rng.standard_normal(D).astype(np.float32))
    z = rng.standard_normal((N, T, D)).astype(np.float32)
    x = z @ (np.eye(D) + 0.3 * rng.standard_normal((D, D))).astype(np.float32)  # correlated tokens
    return jax.tree.map(jnp.asarray, params), jnp.asarray(x)


def _norm(x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(jnp.var(x, axis=-1, keepdims=True) + 1e-6)


def _apply(fp, qp, x, *, w_spec, act_spec):
    """The integration's per-block function: LET on fc1 (log-parameterised scale), LWC on both linears."""
    h = _norm(x) * fp["ln_g"] + fp["ln_b"]
    lwc = qp.get("lwc", {})
    let = qp.get("let", {}).get("fc1")
    let = None if let is None else (jnp.exp(let[0]), let[1])
    y = omni.fake_linear(h, fp["w1"], fp["b1"], w_spec=w_spec, act_spec=act_spec, lwc=lwc.get("fc1"), let=let)
    return omni.fake_linear(jax.nn.gelu(y), fp["w2"], fp["b2"], w_spec=w_spec, act_spec=act_spec,
                            lwc=lwc.get("fc2"))


@jax.jit
def _float_apply(fp, x):
    h = _norm(x) * fp["ln_g"] + fp["ln_b"]
    y = jax.nn.gelu(jnp.dot(h, fp["w1"], precision=_HIGHEST) + fp["b1"])
    return jnp.dot(y, fp["w2"], precision=_HIGHEST) + fp["b2"]


@jax.jit
def _fc1_input_range(fp, x):
    h = _norm(x) * fp["ln_g"] + fp["ln_b"]
    return jnp.min(h, axis=(0, 1)), jnp.max(h, axis=(0, 1))


def _lwc_params(fp, spec, value=omni.LWC_INIT):
    return {name: omni.lwc_init(fp[w], spec, value) for name, w in (("fc1", "w1"), ("fc2", "w2"))}


def test_train_block_lwc_beats_rtn_weight_only():
    fp, x = _toy_block(0)
    y = _float_apply(fp, x)
    # float32 scale storage: half the compile time of the float16 default (covered by the tests above)
    spec = QuantSpec(format="uint3", granularity="group", group_size=16, scale_dtype="float32")
    apply = functools.partial(_apply, w_spec=spec, act_spec=None)
    rtn = float(omni.block_mse(apply, fp, {"lwc": _lwc_params(fp, spec, RTN_LOGIT)}, x, y))
    qp, losses = omni.train_block(apply, fp, {"lwc": _lwc_params(fp, spec)}, x, y, steps=120, lr=1e-2,
                                  batch_size=32, seed=0)
    trained = float(omni.block_mse(apply, fp, qp, x, y))
    print(f"OmniQuant LWC W3(uint3/g16) block MSE ratio vs RTN: {trained / rtn:.3f}")
    assert losses.shape == (120,) and np.all(np.isfinite(np.asarray(losses)))
    assert trained < 0.9 * rtn


def test_train_block_let_and_lwc_beat_rtn_with_act_quant():
    fp, x = _toy_block(1)
    y = _float_apply(fp, x)
    w_spec = QuantSpec(format="uint4", granularity="group", group_size=16, scale_dtype="float32")
    act_spec = QuantSpec(format="int6", granularity="token", scale_dtype="float32")
    apply = functools.partial(_apply, w_spec=w_spec, act_spec=act_spec)
    no_let = {"fc1": (jnp.zeros(D), jnp.zeros(D))}  # s = exp(0) = 1, delta = 0: the identity
    rtn = float(omni.block_mse(apply, fp, {"lwc": _lwc_params(fp, w_spec, RTN_LOGIT), "let": no_let}, x, y))
    act_min, act_max = _fc1_input_range(fp, x)
    s, delta = omni.let_init(fp["w1"], act_min=act_min, act_max=act_max)
    qp0 = {"lwc": _lwc_params(fp, w_spec), "let": {"fc1": (jnp.log(s), delta)}}
    init = float(omni.block_mse(apply, fp, qp0, x, y))
    qp, losses = omni.train_block(apply, fp, qp0, x, y, steps=120, lr={"lwc": 1e-2, "let": 5e-3}, batch_size=32,
                                  seed=0)
    trained = float(omni.block_mse(apply, fp, qp, x, y))
    print(f"OmniQuant LET+LWC W4A6 block MSE ratio vs RTN: init {init / rtn:.3f}, trained {trained / rtn:.3f}")
    assert trained < init < rtn
    assert float(jnp.mean(losses[-20:])) < float(jnp.mean(losses[:20]))
    again, _ = omni.train_block(apply, fp, qp0, x, y, steps=120, lr={"lwc": 1e-2, "let": 5e-3}, batch_size=32,
                                seed=0)
    for a, b in zip(jax.tree.leaves(qp), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # deterministic


def test_train_block_validates_arguments():
    fp, x = _toy_block(2)
    apply = functools.partial(_apply, w_spec=None, act_spec=None)
    with pytest.raises(ValueError, match="lr keys"):
        omni.train_block(apply, fp, {"lwc": {}}, x, x, steps=1, lr={"let": 1e-3}, batch_size=4)
    with pytest.raises(ValueError, match="leading axis"):
        omni.train_block(apply, fp, {}, x, x[:3], steps=1, lr=1e-3, batch_size=4)
    with pytest.raises(ValueError, match="steps"):
        omni.train_block(apply, fp, {}, x, x, steps=-1, lr=1e-3, batch_size=4)
    qp, losses = omni.train_block(apply, fp, {"a": jnp.ones(2)}, x, x, steps=0, lr=1e-3, batch_size=4)
    assert losses.shape == (0,) and float(qp["a"][0]) == 1.0
    idx = np.asarray(omni.batch_indices(10, 4, 5, seed=3))
    assert idx.shape == (5, 4) and sorted(idx.reshape(-1)[:10].tolist()) == list(range(10))
