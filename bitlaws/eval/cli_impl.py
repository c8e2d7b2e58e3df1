"""Implementations of ``bitlaws eval fid`` and ``bitlaws eval stats`` (argument parsing lives in `bitlaws.cli`).

Both commands print their result to stdout and return a process exit code: 0 on success, 2 when an input is
missing or malformed (missing FID weight file, missing sample path, wrong image dtype/layout, npz without the
expected keys); the error message goes to stderr.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import numpy as np

from bitlaws.eval.fid import MIN_FULL_RANK_IMAGES, compute_fid, inception_stats, save_reference_stats

__all__ = ["cmd_eval_fid", "cmd_eval_stats", "format_fid_report"]


def _error(command: str, err: Exception) -> int:
    print(f"bitlaws eval {command}: error: {err}", file=sys.stderr)
    return 2


def _count(n: Optional[int]) -> str:
    return "unknown" if n is None else str(n)


def format_fid_report(result: dict[str, Any], is_splits: int = 10) -> str:
    """Human-readable lines for a `compute_fid` result (FID with both counts, IS, throughput).

    Args:
        result: The dict returned by `compute_fid`.
        is_splits: Splits used for the Inception Score (for the message when it is missing).

    Returns:
        The report, several lines, no trailing newline.
    """
    lines = [f"FID: {result['fid']:.6g}  (n_samples={result['n_samples']}, n_ref={_count(result['n_ref'])})"]
    if result["inception_score"] is None:
        lines.append(f"IS: n/a  (needs the fc head and >= {is_splits} samples)")
    else:
        lines.append(f"IS: {result['inception_score']:.4f} +- {result['inception_score_std']:.4f}  "
                     f"({is_splits} splits, n_samples={result['n_samples']})")
    lines.append(f"images/s: {result['images_per_sec']:.2f}  (sample feature extraction); "
                 f"total {result['seconds']:.1f} s")
    small = [name for name in ("n_samples", "n_ref")
             if result[name] is not None and result[name] < MIN_FULL_RANK_IMAGES]
    if small:
        lines.append(f"warning: {' and '.join(small)} < {MIN_FULL_RANK_IMAGES}: the covariance is singular and the "
                     "FID is biased upwards; compare only FIDs computed with the same sample counts")
    return "\n".join(lines)


def cmd_eval_fid(samples: str, ref: str, inception: Optional[str] = None, batch_size: int = 50, *,
                 progress: bool = True) -> int:
    """``bitlaws eval fid --samples S --ref R [--inception PATH] [--batch-size B]``.

    Args:
        samples: ADM sample ``.npz`` (``arr_0`` uint8 NHWC) or a folder of PNG files.
        ref: Reference statistics ``.npz`` (``mu``/``sigma``) or reference images (``.npz`` with ``arr_0`` or a
            PNG folder).
        inception: FID Inception weight file (default ``$BITLAWS_FID_INCEPTION`` or
            ``~/.cache/bitlaws/pt_inception-2015-12-05-6726825d.pth``).
        batch_size: Images per step per process.
        progress: Show progress bars.

    Returns:
        Exit code: 0 on success, 2 on a missing or malformed input (message on stderr).
    """
    try:
        result = compute_fid(samples, ref, inception_path=inception, batch_size=batch_size, progress=progress)
    except (FileNotFoundError, ValueError) as err:
        return _error("fid", err)
    print(format_fid_report(result))
    return 0


def cmd_eval_stats(source: str, out: str, inception: Optional[str] = None, batch_size: int = 50, *,
                   progress: bool = True) -> int:
    """``bitlaws eval stats --samples S.npz|DIR --out R.npz [--inception PATH] [--batch-size B]``.

    Writes reference statistics: ``mu`` (2048,) and ``sigma`` (2048, 2048) float64 (the pytorch-fid / ADM
    format) plus ``n`` (int64, the image count).

    Args:
        source: ADM sample ``.npz`` (``arr_0`` uint8 NHWC) or a folder of PNG files.
        out: Output ``.npz`` path (written exactly there).
        inception: FID Inception weight file (default as for `cmd_eval_fid`).
        batch_size: Images per step per process.
        progress: Show a progress bar.

    Returns:
        Exit code: 0 on success, 2 on a missing or malformed input (message on stderr).
    """
    try:
        run = inception_stats(source, inception_path=inception, batch_size=batch_size, progress=progress,
                              with_logits=False)
        if run.n < 2:
            raise ValueError(f"{source}: reference statistics need at least 2 images, got {run.n}")
        path = save_reference_stats(out, run.stats)
    except (FileNotFoundError, ValueError) as err:
        return _error("stats", err)
    mu_shape, sigma_shape = np.shape(run.stats.mu), np.shape(run.stats.sigma)
    print(f"wrote {path}: mu {mu_shape}, sigma {sigma_shape}, n={run.n}")
    print(f"images/s: {run.images_per_sec:.2f}; total {run.seconds:.1f} s")
    if run.n < MIN_FULL_RANK_IMAGES:
        print(f"warning: n={run.n} < {MIN_FULL_RANK_IMAGES}: the covariance is singular; FIDs against these "
              "statistics are biased upwards")
    return 0
