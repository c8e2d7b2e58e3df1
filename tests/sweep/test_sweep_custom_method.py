"""Custom methods and calibrators from user code work in a sweep, in process and in spawned workers.

The user module registers a calibrator and a sweep method (RTN with that calibrator); a sweep config file
imports it (inserting its own folder into ``sys.path``). Workers re-execute the config file, so they know
the method too (`bitlaws.sweep.parallel.prepare_worker`). A config built in memory names the module in
``config.imports`` instead.
"""

import sys
import textwrap
import uuid

import ml_collections
import pytest

from bitlaws.configlib import load_config
from bitlaws.quant import calibrate, methods
from bitlaws.sweep import grid, runner
from bitlaws.sweep.results import read_records

USER_MODULE = '''
"""A user's quantization code: a calibrator and a sweep method that uses it."""
import dataclasses

import jax.numpy as jnp

from bitlaws.quant import quantize, register_calibrator, register_weight_method

CALIBRATOR = "{calibrator}"
METHOD = "{method}"


@register_calibrator(CALIBRATOR)
def shrunk_absmax(grouped, spec):  # [G, L, C] -> ([G, 1, C], [G, 1, C])
    axes = (1, 2) if spec.granularity == "tensor" else (1,)
    amax = 0.9 * jnp.max(jnp.abs(grouped), axis=axes, keepdims=True)
    return -amax, amax


@register_weight_method(METHOD)
def rtn_shrunk(kernel, spec, stats=None, reduce_axes=None):
    """RTN whose weight scales come from CALIBRATOR."""
    return quantize(kernel, dataclasses.replace(spec, calibrator=CALIBRATOR), reduce_axes)
'''

CONFIG_FILE = '''
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the user module lives next to this file

import ml_collections

import {module}  # registers the method and its calibrator


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.evaluator = "toy"
    config.evaluator_module = "bitlaws.sweep.toy"
    config.models = ("mlp-w8-d1", "mlp-w8-d2")
    config.settings = ("W16A16", "W4A16")
    config.formats = ("int",)
    config.methods = ({module}.METHOD,)
    config.seeds = (0,)
    config.toy = ml_collections.ConfigDict({{"batch": 16, "sleep_s": 0.0, "jit": True}})
    return config
'''


@pytest.fixture
def user_code(tmp_path):
    """Writes a fresh user module (unique names, not yet imported) and a sweep config importing it."""
    suffix = uuid.uuid4().hex[:8]
    module, method, calibrator = f"user_methods_{suffix}", f"rtn-shrunk-{suffix}", f"shrunk-{suffix}"
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / f"{module}.py").write_text(USER_MODULE.format(calibrator=calibrator, method=method))
    config_file = folder / "sweep.py"
    config_file.write_text(textwrap.dedent(CONFIG_FILE.format(module=module)))
    yield {"folder": folder, "module": module, "method": method, "config": str(config_file)}
    methods._METHODS.pop(method, None)  # pylint: disable=protected-access
    calibrate.CALIBRATORS.pop(calibrator, None)
    sys.modules.pop(module, None)
    while str(folder) in sys.path:
        sys.path.remove(str(folder))


def _metrics(summary):
    return {record["key"]: (record["method"], record["fid"], record["mt_bits"])
            for record in read_records(summary.results_path)}


def test_config_file_method_runs_in_two_workers_like_in_process(user_code, tmp_path):
    two = runner.run_sweep_from_config(user_code["config"], tmp_path / "two", workers=2, progress=False)
    assert two.failed == [] and two.complete and two.total == 4
    one = runner.run_sweep_from_config(user_code["config"], tmp_path / "one", workers=1, progress=False)
    assert one.failed == [] and one.complete
    metrics = _metrics(two)
    assert metrics == _metrics(one)
    quantized = {key: value for key, value in metrics.items() if "W4A16" in key}
    assert sorted(quantized) == [f"mlp-w8-d{d}|W4A16|int|{user_code['method']}|s0" for d in (1, 2)]
    assert all(method == user_code["method"] for method, _, _ in quantized.values())
    assert all(fid > 0 for _, fid, _ in quantized.values())
    # ``config_file`` is a runtime field: the same config loaded without the runner resumes the folder.
    again = runner.run_sweep(load_config(user_code["config"]), tmp_path / "two", workers=2, progress=False)
    assert again.evaluated == [] and again.complete


def test_in_memory_config_lists_the_module_in_imports(user_code, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(user_code["folder"]))  # spawned workers start with the parent's sys.path
    config = ml_collections.ConfigDict({
        "evaluator": "toy", "evaluator_module": "bitlaws.sweep.toy", "imports": [user_code["module"]],
        "models": ("mlp-w8-d1",), "settings": ("W4A16",), "formats": ("int",), "methods": (user_code["method"],),
        "seeds": (0,), "toy": {"batch": 16}})
    assert user_code["module"] not in sys.modules  # the method is unknown until the grid imports the module
    cells = grid.expand_grid(config)
    assert [cell.method for cell in cells] == [user_code["method"]]
    summary = runner.run_sweep(config, tmp_path / "run", workers=2, progress=False)
    assert summary.failed == [] and summary.complete


def test_config_imports_that_fail_name_the_module(tmp_path):
    config = ml_collections.ConfigDict({"imports": ["no_such_module_for_bitlaws_test"], "models": ("m",),
                                        "settings": ("W4A16",), "formats": ("int",), "methods": ("rtn",),
                                        "seeds": (0,)})
    with pytest.raises(ModuleNotFoundError, match="no_such_module_for_bitlaws_test"):
        grid.expand_grid(config)
