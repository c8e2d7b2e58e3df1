"""Inception Score (IS) from classifier logits.

Follows openai/improved-gan (``inception_score/model.py``), which the ADM
evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) also uses:

* p(y|x) = softmax(logits) per image;
* the images are split into ``splits`` contiguous chunks, chunk ``i`` being
  rows ``[i * n // splits, (i + 1) * n // splits)``;
* per chunk, IS_i = exp(mean_x KL(p(y|x) || p(y))) with p(y) the mean of
  p(y|x) over the chunk;
* the result is (mean, std) of IS_i over the chunks (population std, ddof=0).

For n = 50,000 and ``splits=10`` the chunks are exactly the ADM evaluator's
``split_size=5000`` chunks; ADM reports only the mean.

Numerics: everything is float64 and computed in log space (log-softmax and a
log-sum-exp for log p(y)), so classes whose probability underflows contribute
exactly 0 instead of the ``0 * log(0) = nan`` the reference code can produce.
"""

from __future__ import annotations

import numpy as np
import scipy.special

__all__ = ["inception_score"]


def _validate_logits(logits: np.ndarray, splits: int) -> np.ndarray:
    """Checks the logits and the split count, returns float64 logits.

    Args:
      logits: Array of shape (n, num_classes).
      splits: Number of chunks.

    Returns:
      The logits as a float64 array of shape (n, num_classes).

    Raises:
      ValueError: On a bad rank, empty class axis, too few rows, bad ``splits``
        or non-finite logits.
    """
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits must be a positive integer, got {splits!r}")
    arr = np.asarray(logits)
    if arr.ndim != 2:
        raise ValueError(
            f"logits must be 2-D with shape (n, num_classes), got shape {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"logits must be a real numeric array, got dtype {arr.dtype}")
    n, num_classes = arr.shape
    if num_classes < 1:
        raise ValueError(f"logits must have at least one class column, got shape {arr.shape}")
    if n < splits:
        raise ValueError(
            f"need at least as many rows as splits: got {n} rows of logits for splits={splits} "
            "(every chunk must contain at least one image)"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("logits contain non-finite values (NaN or inf)")
    return arr


def _chunk_score(log_p: np.ndarray) -> float:
    """exp(mean KL(p(y|x) || p(y))) for one chunk.

    Args:
      log_p: Log-probabilities log p(y|x), shape (m, num_classes), float64.

    Returns:
      The chunk's Inception Score.
    """
    log_marginal = scipy.special.logsumexp(log_p, axis=0) - np.log(log_p.shape[0])
    p = np.exp(log_p)
    kl = np.sum(p * (log_p - log_marginal[None, :]), axis=1)
    return float(np.exp(np.mean(kl)))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score of a set of images from their classifier logits.

    Args:
      logits: Pre-softmax classifier outputs, shape (n, num_classes), any real
        dtype (computed in float64).  For FID Inception this is the
        1008-way logit layer.
      splits: Number of contiguous chunks (10 in the standard protocol);
        requires ``n >= splits``.

    Returns:
      ``(mean, std)`` of the per-chunk scores as Python floats.  IS lies in
      [1, num_classes]: 1 when every prediction equals the marginal, and
      num_classes for confident predictions spread evenly over all classes.

    Raises:
      ValueError: If ``logits`` is not 2-D and finite, or has fewer rows than
        ``splits``, or ``splits`` is not a positive integer.
    """
    arr = _validate_logits(logits, splits)
    log_p = scipy.special.log_softmax(arr, axis=1)
    n = arr.shape[0]
    scores = np.array(
        [_chunk_score(log_p[i * n // splits : (i + 1) * n // splits]) for i in range(splits)]
    )
    return float(np.mean(scores)), float(np.std(scores))
