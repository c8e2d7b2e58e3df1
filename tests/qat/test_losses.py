"""Distillation losses against a float64 numpy reference with explicit per-position loops, and their gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.qat import losses
from bitlaws.qat.losses import LOSSES, forward_kl, get_loss, reverse_kl, topkld

NAMES = ("mse", "js", "fkl", "rkl", "topkld")


def _log_softmax(x):  # [V] float64
    x = x - x.max()
    return x - np.log(np.sum(np.exp(x)))


def reference(name, s, t, *, k=None, mask=None, temperature=1.0, form="divergence"):
    """Float64 loss with a loop per (batch row, position): Σ_t Σ_y terms, weighted by mask, mean over rows."""
    s = np.asarray(s, np.float64) / temperature
    t = np.asarray(t, np.float64) / temperature
    n_pos, vocab = s.shape[-2:]
    s, t = s.reshape(-1, n_pos, vocab), t.reshape(-1, n_pos, vocab)
    w = np.ones(s.shape[:-1]) if mask is None else np.broadcast_to(np.asarray(mask, np.float64), s.shape[:-1])
    total = 0.0
    for b in range(s.shape[0]):
        for p in range(n_pos):
            if w[b, p] == 0:
                continue
            x, y = s[b, p], t[b, p]
            ls, lt = _log_softmax(x), _log_softmax(y)
            ps, pt = np.exp(ls), np.exp(lt)
            fkl_terms, rkl_terms = pt * (lt - ls), ps * (ls - lt)
            if name == "mse":
                value = np.sum((x - y) ** 2)
            elif name == "fkl":
                value = np.sum(fkl_terms)
            elif name == "rkl":
                value = np.sum(rkl_terms)
            elif name == "js":
                m = 0.5 * (ps + pt)
                with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 = 0 (underflowed probabilities)
                    value = 0.5 * np.sum(np.where(pt > 0, pt * np.log(pt / m), 0.0))
                    value += 0.5 * np.sum(np.where(ps > 0, ps * np.log(ps / m), 0.0))
            else:
                top = set(np.argsort(-y, kind="stable")[:k].tolist())  # ties: the lower index first
                value = sum(rkl_terms[i] if i in top else fkl_terms[i] for i in range(vocab))
                if form == "divergence":  # generalised-KL mass terms: p log(p/q) - p + q per element
                    value += sum(pt[i] - ps[i] if i in top else ps[i] - pt[i] for i in range(vocab))
            total += w[b, p] * value
    return total / s.shape[0]


SMALL = (2, 3, 13)  # most tests share this shape (and K = 4) so their compiled programs are reused
K = 4


@functools.cache
def _loss_fn(name, k, temperature):
    fn = functools.partial(get_loss(name), temperature=temperature)
    return functools.partial(fn, k=k) if name == "topkld" else fn


@functools.cache
def _jitted(name, k, temperature, grad):
    fn = _loss_fn(name, k, temperature)
    return jax.jit(jax.value_and_grad(fn) if grad else fn)  # one compile per shape: faster than eager here


def call(name, s, t, k=K, *, mask=None, temperature=1.0):
    """The loss ``name``, jitted (``k`` only reaches topkld)."""
    return _jitted(name, k if name == "topkld" else None, temperature, False)(s, t, mask=mask)


def value_and_grad(name, s, t, k=K, *, mask=None, temperature=1.0):
    """The loss and its gradient wrt the student logits, jitted."""
    return _jitted(name, k if name == "topkld" else None, temperature, True)(s, t, mask=mask)


def logits(shape, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


CASES = [(name, (2, 3, 4096), k) for name in NAMES for k in ((0, 1, 600, 4096) if name == "topkld" else (None,))]
CASES += [(name, (2, 2, 3, 13), K) for name in NAMES] + [(name, (3, 13), K) for name in ("mse", "topkld")]


@pytest.mark.parametrize("name,shape,k", CASES)
def test_matches_reference(name, shape, k):
    s, t = logits(shape, 0, 2.0), logits(shape, 1, 2.0)
    got = call(name, s, t, k)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, reference(name, s, t, k=k), rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_temperature_and_float_mask(name):
    s, t = logits(SMALL, 2, 3.0), logits(SMALL, 3, 3.0)
    mask = np.array([[0.3, 1.0, 2.0], [0.0, 0.0, 0.0]], np.float32)  # row 2 fully masked: still counts in the mean
    got = call(name, s, t, mask=mask, temperature=2.5)
    np.testing.assert_allclose(got, reference(name, s, t, k=K, mask=mask, temperature=2.5), rtol=1e-4)


def test_topkld_endpoints_are_forward_and_reverse_kl():
    s, t = logits((2, 3, 4096), 5), logits((2, 3, 4096), 6)
    np.testing.assert_allclose(call("topkld", s, t, 0), call("fkl", s, t), rtol=1e-6)
    np.testing.assert_allclose(call("topkld", s, t, 4096), call("rkl", s, t), rtol=1e-6)


def test_topkld_ties_go_to_the_lower_index():
    t = np.zeros(SMALL, np.float32)  # all tied: the top-K set is {0, .., K-1}
    t[0, 1, [1, 4, 7, 12]] = 1.0  # exactly the top-K set {1, 4, 7, 12}
    t[1, 2, [2, 3]] = 1.0  # {2, 3} then the lower tied indices {0, 1}
    s = logits(SMALL, 7)
    np.testing.assert_allclose(call("topkld", s, t), reference("topkld", s, t, k=K), rtol=1e-5)
    paper = functools.partial(topkld, k=K, form="paper")
    np.testing.assert_allclose(paper(s, t), reference("topkld", s, t, k=K, form="paper"), rtol=1e-5)
    by_hand = 0.0
    for p, top in ((0, [0, 1, 2, 3]), (1, [1, 4, 7, 12]), (2, [0, 1, 2, 3]), (3, [0, 1, 2, 3]), (4, [0, 1, 2, 3]),
                   (5, [0, 1, 2, 3])):
        ls = _log_softmax(s.reshape(-1, 13)[p].astype(np.float64))
        lt = _log_softmax(t.reshape(-1, 13)[p].astype(np.float64))
        ps, pt = np.exp(ls), np.exp(lt)
        in_top = np.isin(np.arange(13), top)
        by_hand += np.sum(np.where(in_top, ps * (ls - lt), pt * (lt - ls)))
    np.testing.assert_allclose(paper(s, t), by_hand / 2, rtol=1e-5)


def test_topkld_divergence_form_is_minimal_at_the_teacher_and_eq7_is_not():
    t = logits(SMALL, 11, scale=2.0)
    near = t + 0.3 * logits(SMALL, 12)
    divergence = functools.partial(topkld, k=K)
    paper = functools.partial(topkld, k=K, form="paper")
    assert abs(float(divergence(t, t))) < 1e-6 and float(divergence(near, t)) > 0
    assert np.max(np.abs(jax.grad(divergence)(jnp.asarray(t), t))) < 1e-6  # stationary at P_S = P_T
    assert np.max(np.abs(jax.grad(paper)(jnp.asarray(t), t))) > 1e-2  # eq. 7 still pushes the student away
    # eq. 7 can be made negative by moving student mass off the teacher's top-K tokens
    _, top = jax.lax.top_k(jnp.asarray(t), K)
    pushed = np.asarray(jnp.put_along_axis(jnp.asarray(t), top, jnp.take_along_axis(jnp.asarray(t), top, -1) - 1.0,
                                           axis=-1, inplace=False))
    assert float(paper(pushed, t)) < 0 < float(divergence(pushed, t))
    with pytest.raises(ValueError, match="form='kl'"):
        topkld(t, t, k=K, form="kl")


@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_finite_differences(name):
    with jax.enable_x64(True):
        s = jnp.asarray(logits(SMALL, 8, 2.0), jnp.float64)
        t = jnp.asarray(logits(SMALL, 9, 2.0), jnp.float64)
        mask = jnp.asarray([[1.0, 0.5, 0.0], [1.0, 1.0, 2.0]])
        value, grad = value_and_grad(name, s, t, mask=mask, temperature=1.5)
        assert value.dtype == jnp.float64
        eps = 1e-6
        for idx in [(0, 0, 0), (0, 1, 3), (1, 2, 12), (1, 0, 5)]:  # the student only: the top-K set is fixed
            step = jnp.zeros_like(s).at[idx].set(eps)
            up, _ = value_and_grad(name, s + step, t, mask=mask, temperature=1.5)
            down, _ = value_and_grad(name, s - step, t, mask=mask, temperature=1.5)
            np.testing.assert_allclose(grad[idx], (up - down) / (2 * eps), rtol=1e-4, atol=1e-9)
        assert grad[0, 2].tolist() == [0.0] * 13  # a position weighted 0 gets no gradient


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_give_the_float32_loss_of_the_upcast_values(name):
    s = jnp.asarray(logits(SMALL, 10, 3.0), jnp.bfloat16)
    t = jnp.asarray(logits(SMALL, 11, 3.0), jnp.bfloat16)
    got = call(name, s, t)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, call(name, s.astype(jnp.float32), t.astype(jnp.float32)), rtol=1e-6)


def test_mixed_dtypes_compute_in_float32():
    s, t = jnp.asarray(logits(SMALL, 10), jnp.bfloat16), logits(SMALL, 11)
    got = call("fkl", s, t)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, call("fkl", s.astype(jnp.float32), t), rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_huge_logits_are_finite(name):
    s, t = logits(SMALL, 12, 1e4), logits(SMALL, 13, 1e4)  # probabilities underflow to 0
    value, grad = value_and_grad(name, s, t, mask=np.ones(3, bool))  # (the mask test's compiled program)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, reference(name, s, t, k=K), rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_identical_inputs_give_zero(name):
    s = logits(SMALL, 14, 3.0)
    for k in (0, K, 13) if name == "topkld" else (None,):
        assert abs(float(call(name, s, s, k))) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_mask_removes_positions(name):
    s, t = logits(SMALL, 15, 2.0), logits(SMALL, 16, 2.0)
    keep = np.array([True, False, True])
    s_garbage = s.copy()
    s_garbage[:, ~keep] = np.nan  # masked-out positions may hold anything
    value, grad = value_and_grad(name, s_garbage, t, mask=keep)  # a [T] mask broadcasts over the batch
    np.testing.assert_allclose(value, reference(name, s[:, keep], t[:, keep], k=K), rtol=1e-4)
    assert np.all(np.isfinite(grad)) and np.all(grad[:, ~keep] == 0)


def test_eager_matches_jit():
    s, t = logits(SMALL, 17), logits(SMALL, 18)
    mask = np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 2.0]], np.float32)
    eager = topkld(jnp.asarray(s), jnp.asarray(t), k=K, mask=mask, temperature=2.5)
    np.testing.assert_allclose(eager, call("topkld", s, t, mask=mask, temperature=2.5), rtol=1e-6)


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_errors_name_the_argument(name):
    s, fn = jnp.zeros((2, 3, 8)), _loss_fn(name, 2, 1.0)
    message = _raises("student_logits", fn, s, jnp.zeros((2, 3, 9)))
    assert "teacher_logits" in message and "(2, 3, 8)" in message and "(2, 3, 9)" in message
    _raises("at least 2 axes", fn, jnp.zeros(8), jnp.zeros(8))
    for bad in (0.0, -1.0, float("inf"), float("nan"), "hot"):
        _raises("temperature", fn, s, s, temperature=bad)
    _raises("mask", fn, s, s, mask=jnp.ones((2, 4)))
    _raises("mask", fn, s, s, mask=jnp.ones((5, 2, 3)))  # broadcasts, but to more than [..., T]


def test_k_out_of_range_names_k_and_v():
    s = jnp.zeros((2, 3, 8))
    for bad in (-1, 9, 1.5, True, None):
        message = _raises(r"\bk\b", topkld, s, s, k=bad)
        assert "V = 8" in message


def test_loss_lookup():
    assert {name: get_loss(name) for name in NAMES} == dict(LOSSES)
    assert LOSSES["fkl"] is forward_kl and LOSSES["rkl"] is reverse_kl
    message = _raises("kl2", get_loss, "kl2")
    assert all(name in message for name in NAMES)
    with pytest.raises(TypeError):
        losses.LOSSES["mine"] = forward_kl


def test_topkld_masked_equals_topkld_and_teacher_top_k_picks_k_per_position():
    s, t = jax.random.normal(jax.random.key(5), (2, 3, 4, 50))
    for k in (1, 7, 49):
        in_top = losses.teacher_top_k(t, k)
        assert in_top.dtype == jnp.bool_ and (in_top.sum(-1) == k).all()
        for form in losses.TOPKLD_FORMS:
            np.testing.assert_allclose(losses.topkld_masked(s, t, in_top, form=form, temperature=1.5),
                                       topkld(s, t, k=k, form=form, temperature=1.5), rtol=1e-6)
    assert not losses.teacher_top_k(t, 0).any() and losses.teacher_top_k(t, 50).all()
    with pytest.raises(ValueError, match=r"in_top shape \(4, 50\) != teacher_logits shape \(3, 4, 50\)"):
        losses.topkld_masked(s, t, in_top[0])
    with pytest.raises(ValueError, match="k must be an int with 0 <= k <= V = 50, got k=51"):
        losses.teacher_top_k(t, 51)
