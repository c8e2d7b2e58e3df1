"""Released VAR-d20 (ImageNet 256x256): transformer, tokenizer, sampling protocol, checkpoint names."""

from bitlaws.configlib import load_sibling


def get_config(arg=None):
    """The VAR-d20 config (`arg` is unused)."""
    del arg
    return load_sibling(__file__, "_var_common.py").var_config(20)
