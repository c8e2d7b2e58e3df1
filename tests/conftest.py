"""One JAX persistent compilation cache for a whole test run (speed only; no test depends on it).

Many tests compile the same XLA programs: the same demo member's sampler in several test files, the same
trainer step in the parent process and in the sweep or CLI subprocesses it starts, the same program in both
``pytest -n 2`` workers. JAX's persistent cache is keyed by the compiled program itself, so a hit reads back the
executable that compiling would give (same numbers). The run creates one empty folder, points
``JAX_COMPILATION_CACHE_DIR`` at it before any JAX computation (xdist workers and subprocesses inherit the
environment) and deletes it at the end; a run never sees a cache from an earlier run.

``BITLAWS_TEST_XLA_CACHE=0`` turns it off (every program compiled, as before). Either way the `bitlaws` commands
and sweep workers that tests start use this run's folder (or none), never the user's cache
(``BITLAWS_COMPILATION_CACHE``, `bitlaws.compile_cache`).
"""

import os
import shutil
import tempfile

_OWNED = "BITLAWS_TEST_XLA_CACHE_OWNER"
_MIN_COMPILE_SECS = "0.2"  # smaller programs compile faster than they are written and read back


def pytest_configure(config):
    if os.environ.get("BITLAWS_TEST_XLA_CACHE", "1") == "0":
        os.environ["BITLAWS_COMPILATION_CACHE"] = "0"
        return
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (or a plain run): make this run's folder
        folder = tempfile.mkdtemp(prefix="bitlaws-test-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
        os.environ["BITLAWS_COMPILATION_CACHE"] = folder
        os.environ[_OWNED] = str(os.getpid())
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", _MIN_COMPILE_SECS)
    os.environ.setdefault("BITLAWS_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])  # a caller's own dir
    import jax  # pylint: disable=g-import-not-at-top  (after the environment is set)

    # JAX read the environment when first imported; an earlier import (a plugin) would have missed it.
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", _MIN_COMPILE_SECS)))


def pytest_unconfigure(config):
    if os.environ.get(_OWNED) == str(os.getpid()):
        shutil.rmtree(os.environ.get("JAX_COMPILATION_CACHE_DIR", ""), ignore_errors=True)
