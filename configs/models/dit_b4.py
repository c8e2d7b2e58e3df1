"""DiT-B/4 config (see `configs/models/dit.py`)."""

from bitlaws.configlib import load_sibling


def get_config(arg=None):
    """The DiT-B/4 config (`arg` is unused)."""
    del arg
    return load_sibling(__file__, "dit.py").get_config("b4")
