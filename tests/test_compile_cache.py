"""Where the `bitlaws` commands keep JAX's persistent compilation cache, and how a user turns it off."""

import pathlib
import subprocess
import sys

import pytest

from bitlaws import compile_cache


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "bitlaws" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "bitlaws" / "xla"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.default_dir() == tmp_path / "mine"
    for off in ("0", "off", "False", " no "):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.default_dir() is None
        assert compile_cache.enable() is None


def test_enable_survives_a_folder_it_cannot_create(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert compile_cache.enable(blocker / "xla") is None  # the run goes on without a cache


@pytest.mark.parametrize("setting", ["folder", "off"])
def test_second_process_reads_the_programs_the_first_compiled(tmp_path, setting):
    """Two fresh processes compile the same program through `enable`: the second one hits the cache (or not)."""
    folder = tmp_path / "cache"
    value = str(folder) if setting == "folder" else "0"
    script = f"""
import logging, os
os.environ["BITLAWS_COMPILATION_CACHE"] = {value!r}
from bitlaws import compile_cache
import jax, jax.numpy as jnp
hits = []
class Hits(logging.Handler):
    def emit(self, record):
        hits.append("cache hit" in record.getMessage())
jax.config.update("jax_log_compiles", True)
logging.getLogger("jax").addHandler(Hits())
print(compile_cache.enable())
jax.jit(lambda x: jnp.cos(x) @ x.T + 2.0)(jnp.ones((7, 5))).block_until_ready()
print(any(hits))
"""
    outputs = []
    for _ in range(2):
        env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        outputs.append(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                      env=env).stdout.split())
    if setting == "folder":
        assert outputs[0] == [str(folder), "False"] and outputs[1] == [str(folder), "True"]
        assert any(pathlib.Path(folder).iterdir())
    else:
        assert outputs[0] == outputs[1] == ["None", "False"]
        assert not folder.exists()
