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


def test_parse_arg_with_allowed_keys_names_the_unknown_one():
    assert configlib.parse_arg("quick, n_per_class=3", allowed=("quick", "n_per_class")) == dict(quick=True,
                                                                                                n_per_class=3)
    with pytest.raises(configlib.ConfigArgError, match=r"unknown argument\(s\) 'bogus'; allowed: quick, n_per_class"):
        configlib.parse_arg("quick,bogus=1", allowed=("quick", "n_per_class"))
    with pytest.raises(ValueError, match="allowed: none"):
        configlib.parse_arg("x", allowed=())


@pytest.mark.parametrize("spec,allowed", [("sweeps/demo.py", "quick, four, n_per_class"), ("sweeps/toy.py", "small"),
                                          ("demo/dit.py", "depth, steps, quick"), ("demo/var.py", "depth"),
                                          ("demo/vqvae.py", "steps, quick"), ("demo/classifier.py", "quick")])
def test_every_config_that_takes_an_argument_rejects_unknown_ones(spec, allowed):
    with pytest.raises(ValueError, match=rf"config '.*{spec}:bogus': unknown argument\(s\) 'bogus'.*{allowed}"):
        configlib.load_config(f"{CONFIGS}/{spec}:bogus")


def test_syntax_error_names_the_file_and_line(tmp_path):
    (tmp_path / "broken.py").write_text("import ml_collections\n\ndef get_config(:\n")
    with pytest.raises(ValueError, match=r"broken\.py' has a syntax error at line 3"):
        configlib.load_config(str(tmp_path / "broken.py"))
