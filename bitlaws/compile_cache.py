"""JAX's persistent compilation cache for bitlaws commands: on by default, in the user's cache folder.

Most of a short bitlaws run on a CPU is XLA compilation (a demo sweep cell compiles its sampler programs before
it samples anything). JAX can keep every compiled program on disk, keyed by the program itself, the compile
options, the backend and the JAX version; a later process that compiles the same program reads the executable
back instead (the same numbers: it is the executable the compilation would produce). The `bitlaws` command line
and sweep worker processes turn it on:

=========================================  =============================================================
``BITLAWS_COMPILATION_CACHE``              effect
=========================================  =============================================================
unset                                      ``$XDG_CACHE_HOME/bitlaws/xla`` (``~/.cache/bitlaws/xla``)
a folder                                   that folder
``0`` / ``off`` / ``false`` / ``no``       off: every process compiles everything
=========================================  =============================================================

The folder can be deleted at any time (`make demo` adds about 13 MB, the `demo_ptq` sweep about 50 MB). Library
calls never change JAX's global configuration by themselves: `enable` is called by the CLI, by sweep worker
processes, and by a user who wants it.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional, Union

ENV = "BITLAWS_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")


def default_dir() -> Optional[pathlib.Path]:
    """The cache folder `ENV` selects (see the module docstring), or None when it turns the cache off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return pathlib.Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "bitlaws" / "xla"


def enable(folder: Union[str, os.PathLike, None] = None) -> Optional[pathlib.Path]:
    """Points JAX's persistent compilation cache at `folder` (default: `default_dir`) for this process.

    Every program is stored, however fast it compiled (a sweep's many small programs add up). JAX reads the
    setting when it first compiles, so call this before any computation; later calls in the same process have
    no effect on where JAX looks.

    Returns:
        The folder (created if missing), or None when the cache is off or the folder cannot be created (a
        read-only home: the run goes on without the cache).
    """
    folder = default_dir() if folder is None else pathlib.Path(folder).expanduser()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    import jax  # pylint: disable=g-import-not-at-top  (only the caller decides when JAX gets imported)

    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
