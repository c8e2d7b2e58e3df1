"""Implementations of ``bitlaws eval fid`` and ``bitlaws eval stats`` (argument parsing lives in `bitlaws.cli`).

Both commands print their result to stdout and return a process exit code: 0 on success, 2 when an input is
missing or malformed (missing FID weight file, missing sample path, wrong image dtype/layout, npz without the
expected keys); the error message (one line) goes to stderr. The inputs are checked in the order of the
command line and before the Inception weights are read: ``--samples``, ``--ref`` / ``--out``, then
``--inception``; an ``.npz`` is checked from its header (keys, dtype, NHWC shape), reading at most one image.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bitlaws.eval.fid import (MIN_FULL_RANK_IMAGES, compute_fid, inception_stats, iter_samples_npz,
                              save_reference_stats)

__all__ = ["cmd_eval_fid", "cmd_eval_stats", "format_fid_report"]


def _error(command: str, err: Exception) -> int:
    print(f"bitlaws eval {command}: error: {err}", file=sys.stderr)
    return 2


def _check_images(flag: str, source: str, *, stats_ok: bool = False) -> None:
    """Checks an image source given on the command line before any network is loaded.

    Args:
        flag: The option that named it (``--samples``), for the message.
        source: An ADM ``.npz`` (``arr_0`` uint8 NHWC) or a folder of PNG files (their sizes are checked when
            they are read).
        stats_ok: Also accept a statistics ``.npz`` (``mu`` and ``sigma``), as ``--ref`` does.

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: not a PNG folder or ``.npz``; an npz that is not a zip archive, lacks the keys or holds
            images that are not uint8 ``[N, H, W, 3]`` (the shape in the message is the stored one).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{flag} {source}: no such sample file or folder (expected an ADM .npz with "
                                f"'arr_0' or a folder of .png files)")
    if path.is_dir():
        if not any(p.is_file() and p.suffix.lower() == ".png" for p in path.iterdir()):
            raise ValueError(f"{flag} {source}: folder holds no .png files")
        return
    if path.suffix.lower() != ".npz":
        raise ValueError(f"{flag} {source}: expected an ADM .npz (key 'arr_0', uint8 [N, H, W, 3]) or a folder of "
                         f".png files")
    try:
        if stats_ok:
            with zipfile.ZipFile(path) as archive:
                if {"mu.npy", "sigma.npy"} <= set(archive.namelist()):
                    return
        next(iter_samples_npz(path, 1), None)  # reads the header and at most one image
    except zipfile.BadZipFile as e:
        raise ValueError(f"{flag} {source}: not a valid .npz file ({e})") from e


def _load_inception(inception: Optional[str]) -> Any:
    """The FID Inception network; a missing weight file is reported in command-line terms (``--inception FILE``)."""
    from bitlaws.port.tables import inception as table  # pylint: disable=g-import-not-at-top

    try:
        return table.load_fid_inception(inception)
    except FileNotFoundError as e:
        path = Path(inception).expanduser() if inception else table.default_weights_path()
        if path.is_file():
            raise
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Download {table.WEIGHTS_FILE} (pytorch-fid "
            f"release asset: {table.WEIGHTS_URL}) and pass it with --inception FILE, put it at "
            f"{table.DEFAULT_PATH} or set ${table.ENV_VAR} to its path; bitlaws never downloads it.") from e


def _check_out_file(flag: str, out: str) -> None:
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {out} is a folder; give the path of the .npz file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag} {out}: folder {path.parent} does not exist")


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
        _check_images("--samples", samples)
        _check_images("--ref", ref, stats_ok=True)
        model = _load_inception(inception)
        result = compute_fid(samples, ref, model=model, batch_size=batch_size, progress=progress)
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
        _check_images("--samples", source)
        _check_out_file("--out", out)
        model = _load_inception(inception)
        run = inception_stats(source, model=model, batch_size=batch_size, progress=progress,
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
