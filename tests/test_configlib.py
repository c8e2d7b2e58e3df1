"""Config loading: file.py[:arg], sibling modules, typed overrides."""

import pathlib

import pytest

from bitlaws import configlib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_load_with_arg_and_overrides():
    config = configlib.load_config(f"{CONFIGS}/models/dit.py:l4", ["model.depth=3", "sampling.cfg_scale=2"])
    assert config.model.depth == 3 and config.model.patch_size == 4
    assert isinstance(config.sampling.cfg_scale, float) and config.sampling.cfg_scale == 2.0


def test_variant_file_uses_sibling_family():
    assert configlib.load_config(f"{CONFIGS}/models/var_d20.py").var.embed_dim == 1280


@pytest.mark.parametrize("override,match", [("model.nope=1", "nope"), ("model.depth=abc", "int"), ("depth", "key")])
def test_bad_overrides_name_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        configlib.load_config(f"{CONFIGS}/models/dit.py:xl2", [override])


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nothere.py"):
        configlib.load_config(f"{CONFIGS}/nothere.py")


def test_parse_arg():
    assert configlib.parse_arg("depth=4,quick,name=abc,lr=1e-3") == dict(depth=4, quick=True, name="abc", lr=1e-3)
