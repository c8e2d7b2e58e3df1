"""Peak memory of `bitlaws port` on a released-size checkpoint (random weights, official ``torch.save`` layout).

Goal ([10/12] item 5): porting must stream the weights from the checkpoint file into the orbax writer, so the
peak resident memory of ``bitlaws port`` stays within 1.5x the checkpoint's bytes (VAR-d30: ~8 GB on disk).

The benchmark writes a random-weight checkpoint of the released model's size and key names, without torch:
the source keys and shapes come from the port table and ``nnx.eval_shape`` of our model (each table row's
transform inverted: ``kernel (in, out) -> weight (out, in)``, ``HWIO -> OIHW``), plus the buffers the port
ignores (VAR's ``attn_bias_for_masking`` / ``lvl_1L`` / zero ``zero_k_bias``, DiT's ``pos_embed``, the VQVAE's
``ema_vocab_hit_SV``). The file is a zip laid out as ``torch.save`` writes it (``archive/data.pkl``, one stored,
64-byte aligned record per tensor under ``archive/data/``); the pickle names ``torch._utils._rebuild_tensor_v2``
and ``torch.FloatStorage`` without importing torch. Then ``bitlaws port`` runs in a child process and its peak
RSS is read from ``os.wait4`` (``ru_maxrss``: anonymous and file-backed resident pages, high-water mark).

Printed: checkpoint bytes, the child's peak RSS, the ratio, and the port's wall time.

Usage::

    python benchmarks/port_memory.py                          # VAR-d30 (~8.0 GB file)
    python benchmarks/port_memory.py --model var_d16          # VAR-d16 (~1.2 GB)
    python benchmarks/port_memory.py --model vqvae            # the VAR tokenizer (~0.44 GB)
    python benchmarks/port_memory.py --model dit_xl2          # DiT-XL/2 256x256 (~2.7 GB)
    python benchmarks/port_memory.py --path model             # read -> NNX model -> save_model (in memory)
    python benchmarks/port_memory.py --keep /tmp/var_d30.pth  # keep (or reuse) the written checkpoint

``--path model`` runs the non-streaming composition that `bitlaws port` used before streaming
(``save_model(port(read_state_dict(file)))``), for comparison; ``--workdir`` chooses where the checkpoint and
the port are written (deleted afterwards unless ``--keep``).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import math
import os
import pathlib
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Any, Iterator

import numpy as np

GIB = 2.0**30
REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "models"

MODELS: dict[str, tuple[str, str]] = {  # name -> (port kind, config)
    "var_d16": ("var", "var_d16.py"),
    "var_d20": ("var", "var_d20.py"),
    "var_d24": ("var", "var_d24.py"),
    "var_d30": ("var", "var_d30.py"),
    "vqvae": ("vqvae", "var_d16.py"),
    "dit_xl2": ("dit", "dit_xl2.py"),
}
TABLES = {"var": "bitlaws.port.tables.var", "vqvae": "bitlaws.port.tables.vqvae", "dit": "bitlaws.port.tables.dit"}
SKIP_SRC = {"vqvae": r"quantize\.quant_resi\.(qresi\.|\{i\})"}
"""Table rows not used by the release (the VQVAE's Phi convs are ``quant_resi.qresi_ls.{i}`` with sharing 4)."""


# ------------------------------------------------------------------------------------------ source layout


def _inverse_shape(transform, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape whose table transform gives `shape`."""
    from bitlaws.port import mapping  # pylint: disable=g-import-not-at-top

    if transform is mapping.identity:
        return shape
    if transform is mapping.linear:
        return shape[::-1]
    if transform is mapping.conv:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if transform is mapping.conv1x1_to_linear:
        return (shape[1], shape[0], 1, 1)
    raise ValueError(f"no inverse for transform {transform!r}")


def source_layout(model: str) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """``[(source key, PyTorch shape, dtype)]`` of the released checkpoint of `model`, in model order."""
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from bitlaws import configlib  # pylint: disable=g-import-not-at-top
    from bitlaws.port import convert, mapping  # pylint: disable=g-import-not-at-top

    kind, config = MODELS[model]
    spec = convert.KINDS[kind]
    ctor = spec.ctor_from_config(configlib.load_config(str(CONFIGS / config)))
    _, state = nnx.split(nnx.eval_shape(lambda: spec.build(ctor)))
    target = {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(state)}
    table = importlib.import_module(TABLES[kind]).TABLE
    skip = re.compile(SKIP_SRC[kind]) if kind in SKIP_SRC else None
    rows = [(row, mapping._pattern_regex(row.dst)) for row in table  # pylint: disable=protected-access
            if len(row.sources) == 1 and not (skip and skip.search(row.src))]
    layout = []
    for key, leaf in target.items():
        for row, regex in rows:
            match = regex.fullmatch(key)
            if match:
                layout.append((row.src.format(**match.groupdict()), _inverse_shape(row.transform, leaf.shape),
                               np.dtype(leaf.dtype)))
                break
        else:
            raise ValueError(f"{model}: no table row produces {key}")
    f32 = np.dtype(np.float32)
    if kind == "var":
        depth, width = ctor["depth"], ctor["embed_dim"]
        length = sum(p * p for p in ctor["patch_nums"])
        layout += [(f"blocks.{i}.attn.zero_k_bias", (width,), f32) for i in range(depth)]
        layout += [("lvl_1L", (1, length), np.dtype(np.int64)), ("attn_bias_for_masking", (1, 1, length, length), f32)]
    elif kind == "dit":
        tokens = (ctor["input_size"] // ctor["patch_size"]) ** 2
        layout.append(("pos_embed", (1, tokens, ctor["hidden_size"]), f32))
    elif kind == "vqvae":
        layout.append(("quantize.ema_vocab_hit_SV", (len(ctor["v_patch_nums"]), ctor["vocab_size"]), f32))
    return layout


# ------------------------------------------------------------------------------------------ torch-format writer


class _Global:
    """A pickle GLOBAL (``module.name``) written without importing the module (torch is never imported)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce requires a callable
        raise NotImplementedError


class _Tensor:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())``."""

    def __init__(self, storage: tuple, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        strides = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, 0, self.shape, strides, False, collections.OrderedDict()))


class _StoragePickler(pickle._Pickler):  # pylint: disable=protected-access  (the pure-Python pickler's dispatch)
    dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access

    def _save_global_marker(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))

    dispatch[_Global] = _save_global_marker

    def persistent_id(self, obj: Any):
        return obj if isinstance(obj, tuple) and obj and obj[0] == "storage" else None


_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _random_chunks(key: str, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator,
                   chunk: int = 1 << 22) -> Iterator[bytes]:
    count = math.prod(shape)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        if key.endswith("zero_k_bias"):  # VAR's port refuses a non-zero key bias
            values = np.zeros(n, dtype)
        elif dtype.kind == "f":
            values = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
        else:
            values = np.arange(start, start + n, dtype=np.int64) % 1000
        yield values.astype(dtype.newbyteorder("<")).tobytes()


def write_torch_checkpoint(path: pathlib.Path, layout: list[tuple[str, tuple[int, ...], np.dtype]],
                           seed: int = 0) -> int:
    """Writes a flat state dict of random tensors as a ``torch.save`` zip; returns the file's size in bytes."""
    rng = np.random.default_rng(seed)
    state = collections.OrderedDict()
    for index, (key, shape, dtype) in enumerate(layout):
        storage = ("storage", _Global("torch", _STORAGE[dtype]), str(index), "cpu", math.prod(shape))
        state[key] = _Tensor(storage, tuple(shape))
    buffer = __import__("io").BytesIO()
    _StoragePickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", buffer.getvalue())
        zf.writestr("archive/byteorder", "little")
        for index, (key, shape, dtype) in enumerate(layout):
            info = zipfile.ZipInfo(f"archive/data/{index}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = math.prod(shape) * dtype.itemsize
            header_end = zf.fp.tell() + 30 + len(info.filename.encode()) + 4  # local header + padding field header
            pad = -header_end % 64  # align the record's data like torch.save does
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            with zf.open(info, "w") as f:
                for chunk in _random_chunks(key, shape, dtype, rng):
                    f.write(chunk)
        zf.writestr("archive/version", "3\n")
    return path.stat().st_size


# ------------------------------------------------------------------------------------------ measurement

_IN_MEMORY = """
import sys
from bitlaws import checkpoint, configlib
from bitlaws.port import convert
from bitlaws.port.reader import read_state_dict
kind, ckpt, config, out = sys.argv[1:]
spec = convert.KINDS[kind]
ctor = spec.ctor_from_config(configlib.load_config(config))
checkpoint.save_model(spec.port(read_state_dict(ckpt), ctor), out, dict(kind=kind, ctor=ctor))
"""


def run_port(kind: str, ckpt: pathlib.Path, config: pathlib.Path, out: pathlib.Path,
             path: str) -> tuple[int, float]:
    """Runs the port in a child process; returns (peak RSS bytes, wall seconds)."""
    if path == "cli":
        cmd = [sys.executable, "-m", "bitlaws.cli", "port", kind, "--ckpt", str(ckpt), "--config", str(config),
               "--out", str(out)]
    else:
        cmd = [sys.executable, "-c", _IN_MEMORY, kind, str(ckpt), str(config), str(out)]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"port failed with exit status {child.returncode}: {' '.join(cmd)}")
    return usage.ru_maxrss * 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="var_d30", choices=sorted(MODELS))
    parser.add_argument("--path", default="cli", choices=("cli", "model"),
                        help="cli: `bitlaws port` (streaming); model: read -> NNX model -> save_model")
    parser.add_argument("--workdir", default=None, help="folder for the checkpoint and the port (default: a temp dir)")
    parser.add_argument("--keep", default=None, help="checkpoint file to keep, or to reuse if it exists")
    args = parser.parse_args()

    kind, config = MODELS[args.model]
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="port_memory_", dir=args.workdir))
    try:
        ckpt = pathlib.Path(args.keep) if args.keep else workdir / f"{args.model}.pth"
        if ckpt.exists():
            print(f"reusing {ckpt}")
        else:
            start = time.perf_counter()
            layout = source_layout(args.model)
            write_torch_checkpoint(ckpt, layout)
            params = sum(math.prod(shape) for _, shape, _ in layout)
            print(f"wrote {ckpt}: {len(layout)} tensors, {params / 1e9:.3f}B values in "
                  f"{time.perf_counter() - start:.1f} s")
        size = ckpt.stat().st_size
        peak, seconds = run_port(kind, ckpt, CONFIGS / config, workdir / "port", args.path)
        print(f"{args.model} ({args.path}): checkpoint {size / 1e9:.3f} GB, peak RSS {peak / 1e9:.3f} GB, "
              f"ratio {peak / size:.2f} (goal <= 1.5), port {seconds:.1f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
