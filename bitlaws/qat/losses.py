"""Distillation losses between a student's and a teacher's logits (the QAT objectives).

All losses take ``student_logits`` and ``teacher_logits`` of the same shape ``[..., T, V]``: the last axis is
the vocabulary V, the second to last the positions T, every axis before that a batch axis (none means one
batch row). With ``P = softmax(logits / temperature)`` per position and ``t`` the positions:

    mse          = Σ_t Σ_y (s_y - t_y)²                    (on the tempered logits, not probabilities)
    forward_kl   = Σ_t Σ_y P_T log(P_T / P_S)               KL(P_T || P_S), mode-covering
    reverse_kl   = Σ_t Σ_y P_S log(P_S / P_T)               KL(P_S || P_T), mode-seeking
    js           = Σ_t ½ KL(P_T || M) + ½ KL(P_S || M),      M = (P_T + P_S) / 2
    topkld       = Σ_t Σ_{y∈M_s} P_S log(P_S/P_T) + Σ_t Σ_{y∈M_c} P_T log(P_T/P_S)      (paper eq. 7)
                   + Σ_t Σ_{y∈M_s} (P_T - P_S) + Σ_t Σ_{y∈M_c} (P_S - P_T)            (form="divergence")

TopKLD splits each position's vocabulary by the teacher's top-K tokens ``M_s`` (the rest is ``M_c``): reverse
KL terms on the top-K set, forward KL terms on the tail. K = 0 gives `forward_kl`, K = V gives `reverse_kl`.

Eq. 7 as written (``form="paper"``) is, for 0 < K < V, a sum of *partial* KL sums: it is not minimised at
``P_S = P_T`` (its gradient there is ``P_y (a_y - Σ P a)`` with ``a = +1`` on M_s, ``-1`` on M_c, non-zero)
and it can be negative: a student lowers it by moving probability from the teacher's top-K tokens to the tail
(tests/qat/test_qat.py measured the forward KL of a toy student *rising* from 3.35 to 5.68 while eq. 7 fell).
The default ``form="divergence"`` adds the mass terms of the generalised KL between unnormalised measures,
``p log(p/q) - p + q >= 0`` elementwise: every term is non-negative and zero iff ``P_S = P_T`` there, so the
loss is a divergence with the same split (mode-seeking on M_s, mode-covering on M_c), equal to eq. 7 at
K = 0 and K = V (the added terms sum to 0 there) and differing from it by ``2 (P_T(M_s) - P_S(M_s))``
per position otherwise.

Reduction (all losses): the per-position sum over the last axis is weighted by ``mask``, summed over the
positions and averaged over the batch rows (a row whose positions are all masked out still counts in that
average: a mask never renormalises). `mse` has no vocabulary semantics: a DiT output ``[B, H, W, C]`` is distilled by
reshaping it to ``[B, H*W, C]``.

Numerics: logits are upcast to float32 (float64 stays float64) before anything, so bf16 inputs give a
float32 loss; everything is in log space (``log_softmax``), with KL terms written ``p * (log p - log q)``
so an underflowed ``p = 0`` contributes ``0 * finite = 0``. Logits must be finite (no ``-inf`` masking of
the vocabulary). No ``temperature²`` factor is applied.

All functions are plain and jit-able; ``temperature`` and ``k`` must be Python numbers (static under jit,
e.g. ``jax.jit(functools.partial(topkld, k=600))``), ``mask`` may be traced.
"""

from __future__ import annotations

import math
import types
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

_Terms = Callable[[jax.Array, jax.Array], jax.Array]  # (s, t) [..., T, V] -> per-element terms [..., T, V]


def _check_temperature(temperature) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"temperature must be a Python number, got {temperature!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return value


def _check_shapes(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
    if student_shape != teacher_shape:
        raise ValueError(f"student_logits shape {student_shape} != teacher_logits shape {teacher_shape}")
    if len(student_shape) < 2:
        raise ValueError(f"student_logits must have shape [..., T, V] (at least 2 axes), got {student_shape}")


def _reduce(student_logits, teacher_logits, terms: _Terms, mask, temperature) -> jax.Array:
    """Validates, upcasts and tempers the logits, and reduces ``terms(s, t)`` to the scalar loss."""
    s, t = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    _check_shapes(s.shape, t.shape)
    temperature = _check_temperature(temperature)
    dtype = jnp.promote_types(jnp.promote_types(s.dtype, t.dtype), jnp.float32)
    s, t = s.astype(dtype) / temperature, t.astype(dtype) / temperature  # [..., T, V]
    weights = None
    if mask is not None:
        mask = jnp.asarray(mask)
        try:
            fits = np.broadcast_shapes(mask.shape, s.shape[:-1]) == s.shape[:-1]
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"mask shape {mask.shape} does not broadcast to positions {s.shape[:-1]}")
        weights = jnp.broadcast_to(mask.astype(dtype), s.shape[:-1])  # [..., T]
        keep = (weights != 0)[..., None]  # [..., T, 1]
        # Zero masked-out positions' logits so garbage there (nan / inf) reaches neither value nor gradient.
        s, t = jnp.where(keep, s, 0), jnp.where(keep, t, 0)
    per_position = jnp.sum(terms(s, t), axis=-1)  # [..., T]
    if weights is not None:
        per_position = per_position * weights
    return jnp.mean(jnp.sum(per_position, axis=-1))  # sum over T, mean over the batch rows


def _kl_terms(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """Elementwise ``p log(p / q)`` from log-probabilities (``p = 0`` gives exactly 0)."""
    return jnp.exp(logp) * (logp - logq)


def _log_probs(s: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)


def _doc_args(fn):
    fn.__doc__ += """
    Args:
        student_logits: ``[..., T, V]`` float (bf16 / f16 / f32 / f64) student logits.
        teacher_logits: same shape as ``student_logits``; callers ``stop_gradient`` it (gradients flow to both).
        mask: optional position weights broadcastable to ``[..., T]`` (bool or float); positions weighted 0
            contribute 0, the batch average is still over all batch rows.
        temperature: finite Python number > 0; both logits are divided by it.

    Returns:
        Scalar float32 loss (float64 for float64 inputs): per-position sum over V, weighted by ``mask``,
        summed over T, averaged over the leading batch axes.

    Raises:
        ValueError: mismatched shapes, fewer than 2 axes, a bad ``temperature`` or a ``mask`` that does not
            broadcast to ``[..., T]``.
    """
    return fn


@_doc_args
def mse(student_logits, teacher_logits, *, mask: Optional[jax.Array] = None, temperature: float = 1.0) -> jax.Array:
    """Squared error of the (tempered) logits, ``Σ_t Σ_y (s_y - t_y)²`` averaged over the batch.

    The last axis needs no vocabulary meaning (e.g. the channels of a DiT output reshaped to ``[B, H*W, C]``).
    """
    return _reduce(student_logits, teacher_logits, lambda s, t: jnp.square(s - t), mask, temperature)


@_doc_args
def forward_kl(student_logits, teacher_logits, *, mask: Optional[jax.Array] = None,
               temperature: float = 1.0) -> jax.Array:
    """Forward KL ``KL(P_T || P_S) = Σ_y P_T log(P_T / P_S)`` per position (mode-covering)."""
    def terms(s, t):
        logp_s, logp_t = _log_probs(s, t)
        return _kl_terms(logp_t, logp_s)
    return _reduce(student_logits, teacher_logits, terms, mask, temperature)


@_doc_args
def reverse_kl(student_logits, teacher_logits, *, mask: Optional[jax.Array] = None,
               temperature: float = 1.0) -> jax.Array:
    """Reverse KL ``KL(P_S || P_T) = Σ_y P_S log(P_S / P_T)`` per position (mode-seeking)."""
    def terms(s, t):
        logp_s, logp_t = _log_probs(s, t)
        return _kl_terms(logp_s, logp_t)
    return _reduce(student_logits, teacher_logits, terms, mask, temperature)


@_doc_args
def js(student_logits, teacher_logits, *, mask: Optional[jax.Array] = None, temperature: float = 1.0) -> jax.Array:
    """Jensen-Shannon divergence ``½ KL(P_T || M) + ½ KL(P_S || M)``, ``M = (P_T + P_S) / 2``, per position.

    ``log M = logaddexp(log P_T, log P_S) - log 2`` (stable in log space); the value lies in ``[0, log 2]``.
    """
    def terms(s, t):
        logp_s, logp_t = _log_probs(s, t)
        logm = jnp.logaddexp(logp_t, logp_s) - math.log(2.0)
        return 0.5 * _kl_terms(logp_t, logm) + 0.5 * _kl_terms(logp_s, logm)
    return _reduce(student_logits, teacher_logits, terms, mask, temperature)


TOPKLD_FORMS = ("divergence", "paper")


def teacher_top_k(teacher_logits, k: int) -> jax.Array:
    """Membership mask ``[..., T, V]`` bool of each position's K largest teacher logits (TopKLD's ``M_s``).

    ``jax.lax.top_k`` on the upcast logits: ties go to the lower vocabulary index, so exactly K tokens are
    chosen per position. No gradient flows through it. `k`: Python int in ``[0, V]`` (static under jit).
    """
    teacher = jnp.asarray(teacher_logits)
    vocab = teacher.shape[-1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= vocab:
        raise ValueError(f"k must be an int with 0 <= k <= V = {vocab}, got k={k!r}")
    k = int(k)
    if k in (0, vocab):
        return jnp.full(teacher.shape, k == vocab)
    teacher = jax.lax.stop_gradient(teacher.astype(jnp.promote_types(teacher.dtype, jnp.float32)))
    _, top = jax.lax.top_k(teacher, k)  # [..., T, K]
    return jnp.put_along_axis(jnp.zeros(teacher.shape, bool), top, True, axis=-1, inplace=False)  # [..., T, V]


def _topkld_terms(in_top: jax.Array, form: str) -> _Terms:
    def terms(s, t):
        logp_s, logp_t = _log_probs(s, t)
        value = jnp.where(in_top, _kl_terms(logp_s, logp_t), _kl_terms(logp_t, logp_s))
        if form == "divergence":
            p_s, p_t = jnp.exp(logp_s), jnp.exp(logp_t)
            value = value + jnp.where(in_top, p_t - p_s, p_s - p_t)
        return value
    return terms


def _check_form(form: str) -> None:
    if form not in TOPKLD_FORMS:
        raise ValueError(f"topkld form must be one of {TOPKLD_FORMS}, got form={form!r}")


def topkld(student_logits, teacher_logits, *, k: int, mask: Optional[jax.Array] = None,
           temperature: float = 1.0, form: str = "divergence") -> jax.Array:
    """TopKLD (paper eq. 7): reverse KL terms on the teacher's top-K tokens, forward KL terms on the rest.

    ``form="divergence"`` (default) adds the generalised-KL mass terms that make it minimal at the teacher
    (see the module docstring); ``form="paper"`` is eq. 7 literally.

    ``Σ_{y∈M_s} P_S log(P_S/P_T) + Σ_{y∈M_c} P_T log(P_T/P_S)`` per position, ``M_s`` the K tokens with the
    largest teacher logits (`teacher_top_k` on the untempered teacher logits, so the set does not depend on
    ``temperature``; ties go to the lower vocabulary index). K = 0 is `forward_kl`, K = V is `reverse_kl`
    (exactly: top_k is not called and no mass terms are added for either). `topkld_masked` takes a
    precomputed ``M_s`` instead of K.

    Args:
        student_logits: ``[..., T, V]`` float student logits.
        teacher_logits: same shape; callers ``stop_gradient`` it.
        k: Python int, ``0 <= k <= V`` (static under jit).
        mask: optional position weights broadcastable to ``[..., T]`` (bool or float); the batch average is
            still over all batch rows.
        temperature: finite Python number > 0; both logits are divided by it.
        form: ``divergence`` or ``paper`` (`TOPKLD_FORMS`).

    Returns:
        Scalar float32 loss (float64 for float64 inputs), reduced as the other losses.

    Raises:
        ValueError: ``k`` not an int in ``[0, V]``, an unknown ``form``, or the errors of the other losses.
    """
    _check_form(form)
    _check_shapes(np.shape(student_logits), np.shape(teacher_logits))
    vocab = np.shape(teacher_logits)[-1]
    in_top = teacher_top_k(teacher_logits, k)  # validates k
    if k == 0:
        return forward_kl(student_logits, teacher_logits, mask=mask, temperature=temperature)
    if k == vocab:
        return reverse_kl(student_logits, teacher_logits, mask=mask, temperature=temperature)
    return _reduce(student_logits, teacher_logits, _topkld_terms(in_top, form), mask, temperature)


def topkld_masked(student_logits, teacher_logits, in_top, *, mask: Optional[jax.Array] = None,
                  temperature: float = 1.0, form: str = "divergence") -> jax.Array:
    """`topkld` with the top-K membership ``in_top`` given (bool ``[..., T, V]``, e.g. `teacher_top_k` computed
    once per data row when the teacher's outputs are cached): the same value as ``topkld(..., k=K)`` for
    0 < K < V. ``in_top`` may be traced, so one compiled program serves every K.

    Raises:
        ValueError: ``in_top``'s shape differs from the logits', an unknown ``form``, or the other losses' errors.
    """
    _check_form(form)
    if np.shape(in_top) != np.shape(teacher_logits):
        raise ValueError(f"in_top shape {np.shape(in_top)} != teacher_logits shape {np.shape(teacher_logits)}")
    return _reduce(student_logits, teacher_logits, _topkld_terms(jnp.asarray(in_top, bool), form), mask,
                   temperature)


LOSSES = types.MappingProxyType({"mse": mse, "js": js, "fkl": forward_kl, "rkl": reverse_kl, "topkld": topkld})


def get_loss(name: str) -> Callable[..., jax.Array]:
    """The loss called ``name`` in `LOSSES` (``topkld`` also needs ``k=``).

    Raises:
        ValueError: ``name`` is not a known loss (the message lists the known names).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss name {name!r}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]
