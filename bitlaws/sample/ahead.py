"""Compiling a sampler's programs ahead of use, concurrently: the cold start of a multi-program sampler.

A VAR sample runs ~20 programs (per scale: the transformer's and the tokenizer's; then the decode). Called one
after the other, each program is traced, lowered and compiled just before it runs, so the first call pays every
compilation in series (VAR-d16 on the 2-core CPU: ~35 s on top of a ~55 s sample). `Programs` knows the whole
list up front: one background thread lowers the programs in the order they will run and a thread pool compiles
them (XLA compiles outside the GIL), while the main thread already runs the first ones.

Executables are kept in a bounded process-wide cache keyed by the jitted function, its static arguments and the
shapes, dtypes and shardings of its dynamic arguments, so later calls reuse them. Anything this module cannot
serve - a key it does not hold, a failed compilation - falls back to calling the jitted function itself, which
compiles (or raises) as usual: the results are the same executables either way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import jax

MAX_EXECUTABLES = 512
"""Executables kept process-wide (oldest dropped first)."""

_EXECUTABLES: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()
_LOCK = threading.Lock()


def _leaf_signature(x: Any) -> tuple:
    sharding = getattr(x, "sharding", None) if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) else None
    return tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), sharding


def signature(fn: Callable, static: Mapping[str, Any], dynamic: Sequence[Any]) -> Hashable:
    """The cache key of ``fn(*dynamic, **static)``: the function, static values, and dynamic avals + shardings."""
    leaves, treedef = jax.tree.flatten(tuple(dynamic))
    return fn, tuple(sorted(static.items())), treedef, tuple(_leaf_signature(x) for x in leaves)


def abstract(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct` (with the sharding of jax arrays) of every leaf of `tree`."""
    def spec(x):
        sharding = x.sharding if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=bool(getattr(x, "weak_type", False)))

    return jax.tree.map(spec, tree)


def is_traced(tree: Any) -> bool:
    """Whether any leaf of `tree` is a tracer (then programs are part of an outer trace, not compiled here)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


class Programs:
    """Programs compiled ahead of use; see the module docstring.

    Usage::

        programs = Programs()
        programs.prepare([(fn, static_kwargs, abstract_dynamic_args), ...])   # returns at once
        out = programs.call(fn, static_kwargs, dynamic_args)                 # waits for its executable

    Every static argument is passed by keyword (``jax.jit(..., static_argnames=...)``), every dynamic one by
    position.
    """

    def __init__(self, workers: Optional[int] = None):
        self._workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._pending: dict[Hashable, concurrent.futures.Future] = {}

    def prepare(self, jobs: Sequence[tuple[Callable, Mapping[str, Any], Sequence[Any]]]) -> int:
        """Starts lowering and compiling every job whose executable is not held yet; returns how many started.

        Args:
            jobs: ``(jitted fn, static kwargs, dynamic args)`` in the order the programs will run; the dynamic
                args may be `jax.ShapeDtypeStruct` (`abstract`).
        """
        todo = []
        with _LOCK:
            for fn, static, dynamic in jobs:
                key = signature(fn, static, dynamic)
                if key in _EXECUTABLES or key in self._pending:
                    continue
                self._pending[key] = concurrent.futures.Future()
                todo.append((key, fn, dict(static), tuple(dynamic)))
        if todo:
            threading.Thread(target=self._lower_and_compile, args=(todo,), daemon=True,
                             name="bitlaws-compile-ahead").start()
        return len(todo)

    def _lower_and_compile(self, todo) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="bitlaws-xla")
        try:
            for key, fn, static, dynamic in todo:
                future = self._pending[key]
                try:
                    lowered = fn.lower(*dynamic, **static)
                except Exception as error:  # pylint: disable=broad-except  (the fallback call raises it again)
                    future.set_exception(error)
                    continue
                pool.submit(self._compile, key, lowered, future)
        finally:
            pool.shutdown(wait=False)

    @staticmethod
    def _compile(key: Hashable, lowered: Any, future: concurrent.futures.Future) -> None:
        try:
            compiled = lowered.compile()
        except Exception as error:  # pylint: disable=broad-except
            future.set_exception(error)
            return
        with _LOCK:
            _EXECUTABLES[key] = compiled
            while len(_EXECUTABLES) > MAX_EXECUTABLES:
                _EXECUTABLES.popitem(last=False)
        future.set_result(compiled)

    def call(self, fn: Callable, static: Mapping[str, Any], dynamic: Sequence[Any]) -> Any:
        """``fn(*dynamic, **static)``, through the executable compiled ahead when there is one."""
        key = signature(fn, static, dynamic)
        with _LOCK:
            compiled = _EXECUTABLES.get(key)
            future = self._pending.get(key)
        if compiled is None and future is not None:
            try:
                compiled = future.result()
            except Exception:  # pylint: disable=broad-except  (the jitted call below reports it)
                compiled = None
        if compiled is None:
            return fn(*dynamic, **static)
        return compiled(*dynamic)


def clear() -> None:
    """Drops every executable this module holds (tests; memory)."""
    with _LOCK:
        _EXECUTABLES.clear()
