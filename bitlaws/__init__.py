"""bitlaws: quantize vision generative models (VAR, DiT) and measure their bit-level scaling laws.

``bitlaws.__version__`` is the installed package's version (``"unknown"`` when run from a tree that was
never installed); it is looked up on first use so that ``import bitlaws`` stays instant.

``bitlaws.load_quantized(dir)`` rebuilds a quantized checkpoint written by ``bitlaws ptq``
(`bitlaws.ptq.checkpoint.load_quantized`; imported on first use).
"""

from typing import Any


def package_version() -> str:
    """The version of the installed ``bitlaws`` distribution, or ``"unknown"``."""
    import importlib.metadata  # pylint: disable=g-import-not-at-top

    try:
        return importlib.metadata.version("bitlaws")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_quantized(directory):
    """Loads a quantized checkpoint: a `QuantizedCheckpoint` with ``.model`` and ``.metadata`` (see
    `bitlaws.ptq.checkpoint.load_quantized`)."""
    from bitlaws.ptq.checkpoint import load_quantized as load  # pylint: disable=g-import-not-at-top

    return load(directory)


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return package_version()
    raise AttributeError(f"module 'bitlaws' has no attribute {name!r}")
