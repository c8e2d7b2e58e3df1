"""The re-registration rule shared by every name registry (calibrators, weight methods, sweep methods, formats).

Registering a name that is free always works. Registering a taken name:

* with the same function (the same object, or one with the same ``__module__`` and ``__qualname__``, which is
  what re-running a notebook cell or re-importing a config file produces) replaces it silently;
* with a different function raises `ValueError`, unless the caller passes ``replace=True``. Built-in names
  (``minmax``, ``rtn``, ``none`` ...) follow the same rule, so they are never replaced by accident.
"""

from __future__ import annotations

from typing import Any, Optional


def same_function(a: Any, b: Any) -> bool:
    """True when `a` is `b`, or both are named functions with the same module and qualified name."""
    if a is b:
        return True
    names = [(getattr(f, "__module__", None), getattr(f, "__qualname__", None)) for f in (a, b)]
    return None not in names[0] and names[0] == names[1]


def check_register(what: str, name: str, old: Optional[Any], new: Any, replace: bool) -> None:
    """Raises unless `new` may be registered as `what` `name`, currently held by `old` (None when free).

    Args:
        what: The registry's noun for messages, e.g. ``"calibrator"``.
        name: The name being registered.
        old: What the name holds now, or None.
        new: What is being registered.
        replace: The caller's ``replace`` argument.

    Raises:
        ValueError: `name` holds a different function and `replace` is False (the message says how to replace it).
    """
    if old is None or replace or same_function(old, new):
        return
    held = f"{getattr(old, '__module__', '?')}.{getattr(old, '__qualname__', type(old).__name__)}"
    raise ValueError(f"{what} {name!r} is already registered (to {held}); pass replace=True to replace it")
