"""DiT-B/2 config (see `configs/models/dit.py`)."""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("bitlaws_configs_dit_family", pathlib.Path(__file__).with_name("dit.py"))
_family = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_family)


def get_config(arg=None):
    """The DiT-B/2 config (`arg` is unused)."""
    del arg
    return _family.get_config("b2")
