"""Parity verification against fixtures made with the official upstream code.

Usage::

    python -m bitlaws.port.verify tests/fixtures            # every fixture the folder's manifest lists
    python -m bitlaws.port.verify ../shared/fixtures --only var dit

For each array it prints ``max |ours - ref| / max |ref|`` (floats) or whether integers are identical, and
exits with status 1 if any float array exceeds the tolerance (1e-4 unless ``--tol``) or any integer array
differs. Fixtures this version does not know yet are skipped with a message. A run that checks nothing (no
folder or manifest, a manifest without fixtures, only unknown fixtures, ``--only`` naming none of the
listed ones) is an error: one line on stderr, exit status 2. Matmuls run at
``jax_default_matmul_precision='highest'``: bf16/TF32 matmuls would flip sampled tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import sys
from typing import Optional, Sequence

import numpy as np

DEFAULT_TOL = 1e-4
KNOWN_FIXTURES = ("vqvae", "var", "dit", "sdvae", "fid", "llamagen_vq", "llamagen_gpt", "llamagen_gpt_gqa", "mar_vae",
                  "mar")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One compared array.

    Attributes:
        fixture: Fixture name (``var``).
        name: Array name in the fixture file (``logits_tf``).
        integer: Whether the array holds integers (compared exactly).
        max_abs_err: ``max |ours - ref|``.
        max_ref: ``max |ref|``.
        shape_ok: Whether the shapes agree.
    """

    fixture: str
    name: str
    integer: bool
    max_abs_err: float
    max_ref: float
    shape_ok: bool = True

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / max(self.max_ref, 1e-30)

    def passed(self, tol: float = DEFAULT_TOL) -> bool:
        if not self.shape_ok:
            return False
        return self.max_abs_err == 0 if self.integer else bool(self.rel_err <= tol)

    def line(self, tol: float = DEFAULT_TOL) -> str:
        status = "ok  " if self.passed(tol) else "FAIL"
        if not self.shape_ok:
            return f"{status} {self.fixture}/{self.name}: shape mismatch"
        if self.integer:
            return f"{status} {self.fixture}/{self.name}: integers {'identical' if self.max_abs_err == 0 else 'differ'}"
        return (f"{status} {self.fixture}/{self.name}: max abs err {self.max_abs_err:.3e} / max |ref| "
                f"{self.max_ref:.3e} = {self.rel_err:.3e}")


def compare(fixture: str, name: str, ours, ref) -> Comparison:
    """Compares our array with a reference array (integers exactly, floats by max abs error)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    integer = np.issubdtype(ref.dtype, np.integer)
    if ours.shape != ref.shape:
        return Comparison(fixture, name, integer, float("inf"), float(np.abs(ref).max(initial=0)), False)
    if integer:
        err = float(np.abs(ours.astype(np.int64) - ref.astype(np.int64)).max(initial=0))
        return Comparison(fixture, name, True, err, float(np.abs(ref).max(initial=0)))
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    return Comparison(fixture, name, False, float(diff.max(initial=0)), float(np.abs(ref).max(initial=0)))


class FixtureFolderError(ValueError):
    """A fixture folder that cannot be verified: an unreadable manifest, or nothing in it to check."""


def load_manifest(folder: pathlib.Path) -> dict:
    """The folder's ``manifest.json``.

    Raises:
        FileNotFoundError: no such folder, or no manifest in it.
        FixtureFolderError: the manifest is not a JSON object with a ``fixtures`` mapping.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"fixture folder {folder} not found" if not folder.exists()
                                else f"{folder} is not a fixture folder (a file, not a folder)")
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a fixture folder needs its manifest.json")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FixtureFolderError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("fixtures", {}), dict):
        raise FixtureFolderError(f"{path} must be a JSON object whose 'fixtures' field maps names to entries")
    return manifest


def run_checks(folder, only: Optional[Sequence[str]] = None, log=print) -> list[Comparison]:
    """Runs every known fixture check in `folder`; returns all comparisons (unknown ones are skipped).

    Raises:
        FileNotFoundError: see `load_manifest`.
        FixtureFolderError: a bad manifest (see `load_manifest`), or no comparison was made (the message says
            why).
    """
    folder = pathlib.Path(folder)
    manifest = load_manifest(folder)
    listed = list(manifest.get("fixtures", {}))
    if not listed:
        raise FixtureFolderError(f"{folder / 'manifest.json'} lists no fixtures: nothing was checked")
    if only and not set(only) & set(listed):
        raise FixtureFolderError(f"--only {' '.join(only)}: {folder / 'manifest.json'} lists none of them "
                                  f"(it lists {', '.join(listed)}): nothing was checked")
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_default_matmul_precision", "highest")
    results: list[Comparison] = []
    for fixture in manifest.get("fixtures", {}):
        if only and fixture not in only:
            continue
        try:
            module = importlib.import_module(f"bitlaws.port.checks.{fixture}")
        except ModuleNotFoundError as e:
            if e.name != f"bitlaws.port.checks.{fixture}":
                raise
            log(f"skip {fixture}: this version of bitlaws has no check for the '{fixture}' fixture yet")
            continue
        results.extend(module.check(folder, manifest))
    if not results:
        raise FixtureFolderError(f"no fixture of {folder / 'manifest.json'} has a check in this version of "
                                  f"bitlaws: nothing was checked")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitlaws.port.verify", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=pathlib.Path, help="fixture folder with manifest.json")
    parser.add_argument("--only", nargs="*", choices=KNOWN_FIXTURES, help="check only these fixtures")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="max relative error for floats")
    args = parser.parse_args(argv)
    try:
        results = run_checks(args.folder, args.only)
    except (FileNotFoundError, FixtureFolderError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(r.line(args.tol))
    failed = [r for r in results if not r.passed(args.tol)]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
