"""Frechet distance between two Gaussians, as used by FID.

For Gaussians N(mu1, sigma1) and N(mu2, sigma2) the squared Frechet
(2-Wasserstein) distance is::

    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

`frechet_distance` follows the procedure of pytorch-fid 0.3.0
(`pytorch_fid.fid_score.calculate_frechet_distance`) so that the numbers are
directly comparable with published FIDs:

1. the matrix square root is taken with `scipy.linalg.sqrtm` of the
   *non-symmetric* product ``sigma1 @ sigma2``;
2. only if that result is not finite, ``eps * I`` is added to both covariances
   and the square root is retried;
3. a complex result is accepted only if the imaginary part of its diagonal is
   negligible (``<= 1e-3`` in absolute value), and its real part is kept.

Differences from pytorch-fid, all confined to cases it does not handle well:

* Everything is computed in float64.  pytorch-fid's means are float32 when the
  features are float32 (``np.mean`` keeps the dtype), so its ``|mu1 - mu2|^2``
  is evaluated in float32; the resulting difference is ~1e-7 relative on that
  term, far below any meaningful FID resolution.
* Shapes are validated and errors name the offending argument.
* If the square root is still not finite after the ``eps`` retry, the trace is
  computed with the symmetric eigendecomposition formula of
  `frechet_distance_eigh` instead of returning NaN.  (scipy's Schur-based
  ``sqrtm`` handles singular, e.g. rank-deficient ``n < d``, covariances fine
  in practice; this is a last-resort fallback.)
* Round-off can make the distance of (nearly) identical statistics slightly
  negative.  A negative value is clamped to exactly 0.0 only when its magnitude
  is below ``1e-8 * scale`` with ``scale = |mu1 - mu2|^2 + tr(sigma1) +
  tr(sigma2)`` (the size of the terms that cancel); a larger negative value
  signals a real numerical problem and is returned unchanged so it stays
  visible.  Note that for *rank-deficient* covariances (e.g. n < d samples)
  the square root of the null space carries round-off of order
  ``sqrt(machine eps) * |sigma|`` per null direction, so even identical
  statistics give values of about ``-1e-7 * scale`` (e.g. -4e-4 for
  d = 2048 features from n = 100 samples).  Such values are finite and are
  left unclamped.

`frechet_distance_eigh` computes the same quantity through
``tr((sigma1 sigma2)^(1/2)) = tr((s1^(1/2) sigma2 s1^(1/2))^(1/2))``, where the
inner matrix is symmetric positive semi-definite; it needs only ``eigh`` and is
robust to singular covariances.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

__all__ = ["frechet_distance", "frechet_distance_eigh"]

# Largest tolerated |imag| on the diagonal of sqrtm(sigma1 @ sigma2) (pytorch-fid).
_IMAG_DIAG_ATOL = 1e-3
# Negative results with |value| below this fraction of the cancelling terms are
# treated as round-off and clamped to 0.
_CLAMP_REL = 1e-8


def _validate(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checks shapes and converts the statistics to float64.

    Args:
      mu1: Mean of set 1, shape (d,).
      sigma1: Covariance of set 1, shape (d, d).
      mu2: Mean of set 2, shape (d,).
      sigma2: Covariance of set 2, shape (d, d).

    Returns:
      The four arrays as float64 numpy arrays.

    Raises:
      ValueError: If a shape is wrong, the dimensions disagree, or a value is
        not finite.
    """
    arrays = {}
    for name, value, ndim in (
        ("mu1", mu1, 1),
        ("sigma1", sigma1, 2),
        ("mu2", mu2, 1),
        ("sigma2", sigma2, 2),
    ):
        arr = np.asarray(value)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
        if arr.ndim != ndim:
            want = "(d,)" if ndim == 1 else "(d, d)"
            raise ValueError(f"{name} must have shape {want}, got shape {arr.shape}")
        if ndim == 2 and arr.shape[0] != arr.shape[1]:
            raise ValueError(f"{name} must be square with shape (d, d), got shape {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError(f"{name} must have d >= 1, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        arrays[name] = arr
    d = arrays["mu1"].shape[0]
    for name in ("sigma1", "mu2", "sigma2"):
        if arrays[name].shape[0] != d:
            raise ValueError(
                f"{name} has dimension {arrays[name].shape[0]} but mu1 has dimension {d}; "
                f"expected mu (d,) and sigma (d, d) with the same d"
            )
    return arrays["mu1"], arrays["sigma1"], arrays["mu2"], arrays["sigma2"]


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy.linalg.sqrtm without the 'matrix is singular' warning.

    The result is checked for finiteness by the caller, which is what the
    warning would be about.

    Args:
      a: Square matrix, shape (d, d), float64.

    Returns:
      Principal square root, shape (d, d), float64 or complex128.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return scipy.linalg.sqrtm(a)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 @ sigma2)^(1/2)) via symmetric eigendecompositions.

    Negative eigenvalues (round-off of a PSD matrix) are clipped to 0.

    Args:
      sigma1: Symmetric PSD matrix, shape (d, d), float64.
      sigma2: Symmetric PSD matrix, shape (d, d), float64.

    Returns:
      The trace as a Python float.
    """
    s1 = 0.5 * (sigma1 + sigma1.T)
    s2 = 0.5 * (sigma2 + sigma2.T)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ s2 @ root1
    inner = 0.5 * (inner + inner.T)
    lam = np.linalg.eigvalsh(inner)
    return float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))


def _combine(diff: np.ndarray, sigma1: np.ndarray, sigma2: np.ndarray, tr_covmean: float) -> float:
    """Assembles the distance and clamps round-off negatives (see module doc).

    Args:
      diff: mu1 - mu2, shape (d,), float64.
      sigma1: Covariance 1, shape (d, d), float64.
      sigma2: Covariance 2, shape (d, d), float64.
      tr_covmean: tr((sigma1 sigma2)^(1/2)).

    Returns:
      The squared Frechet distance as a Python float.
    """
    mean_term = float(diff @ diff)
    tr1 = float(np.trace(sigma1))
    tr2 = float(np.trace(sigma2))
    value = mean_term + tr1 + tr2 - 2.0 * tr_covmean
    scale = mean_term + abs(tr1) + abs(tr2)
    if value < 0.0 and -value <= _CLAMP_REL * scale:
        value = 0.0
    return value


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Reproduces pytorch-fid 0.3.0's ``calculate_frechet_distance`` (see the
    module docstring for the exact procedure and the documented deviations).

    Args:
      mu1: Mean of the first feature set, shape (d,), any real dtype.
      sigma1: Covariance of the first set, shape (d, d), any real dtype.
      mu2: Mean of the second set, shape (d,).
      sigma2: Covariance of the second set, shape (d, d).
      eps: Diagonal offset added to both covariances if the first square root
        is not finite.

    Returns:
      The distance (this is "FID" when the inputs are Inception pool3
      statistics) as a Python float, computed in float64.

    Raises:
      ValueError: On malformed inputs, or if the matrix square root has a
        significant imaginary component on its diagonal (> 1e-3).
    """
    mu1, sigma1, mu2, sigma2 = _validate(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2

    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))

    if not np.all(np.isfinite(covmean)):
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        if np.iscomplexobj(covmean):
            imag_diag = np.abs(np.diagonal(covmean).imag)
            if not np.all(imag_diag <= _IMAG_DIAG_ATOL):
                raise ValueError(
                    "sqrtm(sigma1 @ sigma2) has a significant imaginary component: "
                    f"max |imag| on the diagonal {imag_diag.max():.3g}, "
                    f"max |imag| overall {np.abs(covmean.imag).max():.3g}; "
                    "are sigma1 and sigma2 symmetric positive semi-definite?"
                )
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    return _combine(diff, sigma1, sigma2, tr_covmean)


def frechet_distance_eigh(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
) -> float:
    """Squared Frechet distance via a symmetric eigendecomposition.

    Uses ``tr((sigma1 sigma2)^(1/2)) = tr((S sigma2 S)^(1/2))`` with
    ``S = sigma1^(1/2)``; both square roots are of symmetric PSD matrices and
    are taken with ``eigh`` (negative round-off eigenvalues clipped to 0).
    Agrees with `frechet_distance` for valid covariances, is never complex and
    is robust to singular covariances.  Inputs are symmetrised first.

    Args:
      mu1: Mean of the first feature set, shape (d,).
      sigma1: Covariance of the first set, shape (d, d), symmetric PSD.
      mu2: Mean of the second set, shape (d,).
      sigma2: Covariance of the second set, shape (d, d), symmetric PSD.

    Returns:
      The distance as a Python float (float64 arithmetic), with the same
      round-off clamping as `frechet_distance`.

    Raises:
      ValueError: On malformed inputs.
    """
    mu1, sigma1, mu2, sigma2 = _validate(mu1, sigma1, mu2, sigma2)
    return _combine(mu1 - mu2, sigma1, sigma2, _trace_sqrt_product_eigh(sigma1, sigma2))
