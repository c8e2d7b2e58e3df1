"""Tests for the torch-free checkpoint readers in ``bitlaws.port``."""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitlaws.port import UnsafeCheckpointError, read_safetensors, read_state_dict, write_safetensors
from bitlaws.port.safetensors_io import CorruptCheckpointError, read_safetensors_metadata
from bitlaws.port.torch_pickle import load_torch_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


# ----------------------------------------------------------------------------- helpers


def write_torch_zip(
    path: Path,
    data_pkl: bytes,
    storages: dict[str, bytes] | None = None,
    byteorder: str | None = "little",
    archive: str = "archive",
) -> Path:
    """Writes a zip laid out like ``torch.save`` output."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{archive}/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr(f"{archive}/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            zf.writestr(f"{archive}/data/{key}", raw)
        zf.writestr(f"{archive}/version", "3\n")
    return path


def assert_same_state_dict(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert np.array_equal(got, want), name


class FakeStorage:
    """Stands for a torch storage while pickling; becomes a persistent id."""

    def __init__(self, storage_type: type, key: str, numel: int):
        self.storage_type, self.key, self.numel = storage_type, key, numel


class FakeTensor:
    """Pickles exactly like a torch tensor: ``_rebuild_tensor_v2`` over a storage."""

    def __init__(self, rebuild: Callable[..., Any], storage: FakeStorage, offset: int,
                 size: tuple[int, ...], stride: tuple[int, ...]):
        self.rebuild, self.storage = rebuild, storage
        self.offset, self.size, self.stride = offset, size, stride

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride)
        if self.rebuild.__name__ == "_rebuild_tensor_v2":
            args += (False, collections.OrderedDict())  # requires_grad, backward_hooks
        return self.rebuild, args


class FakeParameter:
    """Pickles like ``nn.Parameter``: ``_rebuild_parameter(tensor, requires_grad, hooks)``."""

    def __init__(self, rebuild: Callable[..., Any], tensor: FakeTensor):
        self.rebuild, self.tensor = rebuild, tensor

    def __reduce__(self):
        return self.rebuild, (self.tensor, True, collections.OrderedDict())


class _TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> tuple | None:
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


class FakeTorch:
    """Fake ``torch`` / ``torch._utils`` modules, so real pickles can be produced."""

    def __init__(self, utils: types.ModuleType, torch_module: types.ModuleType):
        self._utils, self._torch = utils, torch_module

    def storage(self, type_name: str, key: str, numel: int) -> FakeStorage:
        return FakeStorage(getattr(self._torch, type_name), key, numel)

    def tensor(self, storage: FakeStorage, offset: int, size: tuple[int, ...],
               stride: tuple[int, ...], rebuild: str = "_rebuild_tensor_v2") -> FakeTensor:
        return FakeTensor(getattr(self._utils, rebuild), storage, offset, size, stride)

    def parameter(self, tensor: FakeTensor) -> FakeParameter:
        return FakeParameter(self._utils._rebuild_parameter, tensor)

    def dumps(self, obj: Any, protocol: int = 2) -> bytes:
        import io

        buffer = io.BytesIO()
        _TorchLikePickler(buffer, protocol=protocol).dump(obj)
        return buffer.getvalue()


_STORAGE_NAMES = ("FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage",
                  "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage")


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> FakeTorch:
    """Installs fake ``torch`` modules in ``sys.modules`` for this test only."""
    torch_module = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def make_rebuild(name: str) -> Callable[..., Any]:
        def rebuild(*args: Any) -> Any:
            raise AssertionError("the fake rebuild function must never be called")

        rebuild.__module__, rebuild.__name__, rebuild.__qualname__ = "torch._utils", name, name
        return rebuild

    for name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter"):
        setattr(utils, name, make_rebuild(name))
    for name in _STORAGE_NAMES:
        setattr(torch_module, name, type(name, (), {"__module__": "torch"}))
    torch_module._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch_module)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return FakeTorch(utils, torch_module)


# ------------------------------------------------------------ 1. real torch.save fixtures


@pytest.mark.parametrize("name", ["var_weights", "dit_weights"])
def test_pth_matches_safetensors(name: str) -> None:
    from_torch = read_state_dict(FIXTURES / f"{name}.pth")
    expected = read_state_dict(FIXTURES / f"{name}.safetensors")
    assert len(expected) > 10
    assert_same_state_dict(from_torch, expected)
    assert all(a.flags.c_contiguous and a.flags.writeable for a in from_torch.values())


def test_var_fixture_has_int64_and_float32() -> None:
    sd = read_state_dict(FIXTURES / "var_weights.pth")
    assert sd["lvl_1L"].dtype == np.int64 and sd["lvl_1L"].shape == (1, 30)
    assert sd["attn_bias_for_masking"].dtype == np.float32


@pytest.mark.parametrize("key", ["model", "ema"])
def test_train_checkpoint_key_selects_state_dict(key: str) -> None:
    sd = read_state_dict(FIXTURES / "dit_train_ckpt.pt", key=key)
    assert "steps" not in sd
    assert_same_state_dict(sd, read_state_dict(FIXTURES / "dit_weights.safetensors"))


def test_train_checkpoint_without_key_lists_choices() -> None:
    with pytest.raises(ValueError, match="nested") as info:
        read_state_dict(FIXTURES / "dit_train_ckpt.pt")
    message = str(info.value)
    assert "'model'" in message and "'ema'" in message
    assert "steps" not in message
    assert "dit_train_ckpt.pt" in message


def test_train_checkpoint_raw_tree_shares_tensors_and_keeps_steps() -> None:
    tree = load_torch_checkpoint(FIXTURES / "dit_train_ckpt.pt")
    assert list(tree) == ["model", "ema", "steps"]
    assert tree["steps"] == 1000
    assert tree["model"] is tree["ema"]  # saved once, referenced twice


@pytest.mark.parametrize("bad_key", ["steps", "optimizer", "model.nope"])
def test_train_checkpoint_bad_key(bad_key: str) -> None:
    with pytest.raises(KeyError, match="model"):
        read_state_dict(FIXTURES / "dit_train_ckpt.pt", key=bad_key)


def test_storage_record_read_once_for_shared_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: collections.Counter[str] = collections.Counter()
    original_open = zipfile.ZipFile.open

    def counting_open(self: zipfile.ZipFile, name: Any, *args: Any, **kwargs: Any) -> Any:
        opened[name.filename if isinstance(name, zipfile.ZipInfo) else name] += 1
        return original_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    read_state_dict(FIXTURES / "dit_train_ckpt.pt", key="ema")
    data_records = {name: n for name, n in opened.items() if "/data/" in name}
    assert len(data_records) == 32
    assert set(data_records.values()) == {1}


# ------------------------------------------------------------------ 2. malicious pickles


class Evil:
    def __init__(self, func: Callable[..., Any], args: tuple):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_payloads(marker: Path) -> dict[str, Evil]:
    return {
        "system": Evil(os.system, (f"touch {marker}",)),
        "eval": Evil(eval, (f"open({str(marker)!r}, 'w').close()",)),
        "exec": Evil(exec, (f"open({str(marker)!r}, 'w').close()",)),
        "Popen": Evil(subprocess.Popen, (["touch", str(marker)],)),
        "getattr": Evil(getattr, ("", "join")),
    }


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("refused", ["system", "eval", "exec", "Popen", "getattr"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path, refused: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = _evil_payloads(marker)[refused]
    path = write_torch_zip(tmp_path / "evil.pt", pickle.dumps({"w": payload}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    # Protocol <= 2 writes Python 2 module names (__builtin__.eval, commands.Popen).
    assert re.search(rf"'[\w.]+\.{refused}'", message), message
    assert str(path) in message
    assert not marker.exists()


def test_os_system_reports_posix_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(os.system, (f"touch {marker}",)), protocol=2)
    path = write_torch_zip(tmp_path / "evil.pth", evil)
    with pytest.raises(UnsafeCheckpointError, match=r"\b(posix|nt)\.system\b"):
        load_torch_checkpoint(path)
    assert not marker.exists()


def test_unsafe_error_is_an_unpickling_error() -> None:
    assert issubclass(UnsafeCheckpointError, pickle.UnpicklingError)
    assert issubclass(CorruptCheckpointError, ValueError)


def test_evil_global_next_to_real_tensors_is_refused(tmp_path: Path, fake_torch: FakeTorch) -> None:
    marker = tmp_path / "pwned"
    storage = fake_torch.storage("FloatStorage", "0", 4)
    tree = {"w": fake_torch.tensor(storage, 0, (4,), (1,)), "x": Evil(os.system, (f"touch {marker}",))}
    path = write_torch_zip(tmp_path / "mixed.pt", fake_torch.dumps(tree), {"0": np.ones(4, "<f4").tobytes()})
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_state_dict(path)
    assert not marker.exists()


def test_legacy_torch_format_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    legacy = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(
        Evil(os.system, (f"touch {marker}",)), protocol=2
    )
    path = tmp_path / "old.pt"
    path.write_bytes(legacy)
    with pytest.raises(ValueError, match="legacy torch.save format not supported; re-save with torch>=1.6"):
        read_state_dict(path)
    assert not marker.exists()


# ------------------------------------------------------- 3. hand-made archives with views


def test_views_over_one_shared_storage(tmp_path: Path, fake_torch: FakeTorch,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    values = np.arange(12, dtype=np.float32) * 1.5
    storage = fake_torch.storage("FloatStorage", "0", 12)
    tree = collections.OrderedDict(
        base=fake_torch.tensor(storage, 0, (3, 4), (4, 1)),
        transposed=fake_torch.tensor(storage, 0, (4, 3), (1, 4)),
        window=fake_torch.tensor(storage, 5, (2, 3), (4, 1)),
        column=fake_torch.tensor(storage, 2, (3,), (4,)),
        expanded=fake_torch.tensor(storage, 1, (2, 3), (0, 2)),
        scalar=fake_torch.tensor(storage, 7, (), ()),
        empty=fake_torch.tensor(storage, 0, (0, 5), (5, 1)),
        legacy=fake_torch.tensor(storage, 4, (4,), (1,), rebuild="_rebuild_tensor"),
    )
    path = write_torch_zip(tmp_path / "views.pt", fake_torch.dumps(tree), {"0": values.tobytes()})

    opened: list[str] = []
    original_open = zipfile.ZipFile.open

    def counting_open(self: zipfile.ZipFile, name: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return original_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    sd = read_state_dict(path)

    grid = values.reshape(3, 4)
    expected = {
        "base": grid,
        "transposed": grid.T,
        "window": grid[1:, 1:],
        "column": grid[:, 2],
        "expanded": np.broadcast_to(values[1:6:2], (2, 3)),
        "scalar": np.array(values[7]),
        "empty": np.zeros((0, 5), np.float32),
        "legacy": values[4:8],
    }
    assert_same_state_dict(sd, expected)
    assert opened.count("archive/data/0") == 1
    for name, array in sd.items():
        assert array.flags.c_contiguous and array.flags.writeable, name
    sd["base"][0, 0] = -1.0  # copies, not views of one buffer
    assert sd["transposed"][0, 0] == 0.0


@pytest.mark.parametrize(
    ("type_name", "dtype"),
    [
        ("DoubleStorage", np.float64), ("FloatStorage", np.float32), ("HalfStorage", np.float16),
        ("BFloat16Storage", ml_dtypes.bfloat16), ("LongStorage", np.int64), ("IntStorage", np.int32),
        ("ShortStorage", np.int16), ("CharStorage", np.int8), ("ByteStorage", np.uint8),
        ("BoolStorage", np.bool_),
    ],
)
@pytest.mark.parametrize("byteorder", ["little", "big", None])
def test_storage_dtypes_and_byteorder(tmp_path: Path, fake_torch: FakeTorch, type_name: str,
                                      dtype: Any, byteorder: str | None) -> None:
    values = (np.arange(6) - 2).astype(dtype).reshape(2, 3)
    raw = values.view(f"u{values.itemsize}").astype(f"{'>' if byteorder == 'big' else '<'}u{values.itemsize}")
    storage = fake_torch.storage(type_name, "7", 6)
    tree = {"t": fake_torch.tensor(storage, 0, (2, 3), (3, 1))}
    path = write_torch_zip(tmp_path / "t.pt", fake_torch.dumps(tree), {"7": raw.tobytes()}, byteorder)
    sd = read_state_dict(path)
    assert_same_state_dict(sd, {"t": values})


def test_parameters_and_plain_containers(tmp_path: Path, fake_torch: FakeTorch) -> None:
    storage = fake_torch.storage("HalfStorage", "0", 4)
    tree = collections.OrderedDict(
        weight=fake_torch.parameter(fake_torch.tensor(storage, 0, (2, 2), (2, 1))),
        extras={"tags": {"a", "b"}, "frozen": frozenset([1]), "blob": b"\x00\xff", "z": 1 + 2j,
                "items": [1, 2.5, None, True, ("x", "y")]},
    )
    raw = np.array([1, 2, 3, 4], "<f2").tobytes()
    path = write_torch_zip(tmp_path / "containers.pt", fake_torch.dumps(tree), {"0": raw})
    loaded = load_torch_checkpoint(path)
    assert isinstance(loaded, collections.OrderedDict)
    assert np.array_equal(loaded["weight"], np.array([[1, 2], [3, 4]], np.float16))
    assert loaded["extras"] == {"tags": {"a", "b"}, "frozen": frozenset([1]), "blob": b"\x00\xff",
                                "z": 1 + 2j, "items": [1, 2.5, None, True, ("x", "y")]}
    with pytest.raises(ValueError, match="pass key= one of \\['extras'\\]"):
        read_state_dict(path)
    flat = write_torch_zip(tmp_path / "p.pt", fake_torch.dumps({"w": tree["weight"]}), {"0": raw})
    assert_same_state_dict(read_state_dict(flat), {"w": np.array([[1, 2], [3, 4]], np.float16)})


def test_dotted_key_for_deeper_nesting(tmp_path: Path, fake_torch: FakeTorch) -> None:
    storage = fake_torch.storage("LongStorage", "0", 3)
    tensor = fake_torch.tensor(storage, 0, (3,), (1,))
    tree = {"a": {"b": {"w": tensor, "lr": 0.1}}, "c": {"x": tensor}, "n": 3}
    path = write_torch_zip(tmp_path / "deep.pt", fake_torch.dumps(tree),
                           {"0": np.array([4, 5, 6], "<i8").tobytes()})
    with pytest.raises(ValueError, match=r"pass key= one of \['a', 'c'\]"):
        read_state_dict(path)
    with pytest.raises(ValueError, match=r"pass key= one of \['a\.b'\]"):
        read_state_dict(path, key="a")
    assert_same_state_dict(read_state_dict(path, key="a.b"), {"w": np.array([4, 5, 6])})
    assert_same_state_dict(read_state_dict(path, key="c"), {"x": np.array([4, 5, 6])})
    with pytest.raises(KeyError, match="a.b"):
        read_state_dict(path, key="zzz")


def test_view_outside_storage_is_corrupt(tmp_path: Path, fake_torch: FakeTorch) -> None:
    storage = fake_torch.storage("FloatStorage", "0", 12)
    tree = {"too_big": fake_torch.tensor(storage, 0, (4, 4), (4, 1))}
    path = write_torch_zip(tmp_path / "oob.pt", fake_torch.dumps(tree), {"0": bytes(48)})
    with pytest.raises(CorruptCheckpointError, match="oob.pt") as info:
        read_state_dict(path)
    assert "'0'" in str(info.value)


def test_storage_shorter_than_numel_is_corrupt(tmp_path: Path, fake_torch: FakeTorch) -> None:
    storage = fake_torch.storage("FloatStorage", "0", 12)
    tree = {"t": fake_torch.tensor(storage, 0, (12,), (1,))}
    path = write_torch_zip(tmp_path / "short.pt", fake_torch.dumps(tree), {"0": bytes(40)})
    with pytest.raises(CorruptCheckpointError, match="short.pt"):
        read_state_dict(path)


def test_missing_storage_record_is_corrupt(tmp_path: Path, fake_torch: FakeTorch) -> None:
    storage = fake_torch.storage("FloatStorage", "3", 2)
    path = write_torch_zip(tmp_path / "missing.pt",
                           fake_torch.dumps({"t": fake_torch.tensor(storage, 0, (2,), (1,))}))
    with pytest.raises(CorruptCheckpointError, match="archive/data/3"):
        read_state_dict(path)


def test_truncated_torch_zip_is_corrupt(tmp_path: Path) -> None:
    blob = (FIXTURES / "dit_weights.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated.pth"):
        read_state_dict(path)


def test_bad_crc_in_storage_is_corrupt(tmp_path: Path, fake_torch: FakeTorch) -> None:
    raw = np.arange(64, dtype="<f4").tobytes()
    storage = fake_torch.storage("FloatStorage", "0", 64)
    tree = {"t": fake_torch.tensor(storage, 0, (64,), (1,))}
    path = write_torch_zip(tmp_path / "crc.pt", fake_torch.dumps(tree), {"0": raw})
    blob = bytearray(path.read_bytes())
    at = blob.find(raw) + 100
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptCheckpointError, match="crc.pt"):
        read_state_dict(path)


def test_zip_without_data_pkl_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CorruptCheckpointError, match="data.pkl"):
        read_state_dict(path)


# -------------------------------------------------------------------- 4. safetensors, npz

ROUND_TRIP_DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
                     ml_dtypes.float8_e5m2, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]
DTYPE_TAGS = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL"]


def test_safetensors_round_trip_all_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for i, dtype in enumerate(ROUND_TRIP_DTYPES):
        shape = [(3, 5), (7,), (), (2, 0, 3)][i % 4]
        tensors[f"z{i}.{np.dtype(dtype).name}"] = (rng.normal(size=shape) * 20).astype(dtype)
    tensors["a.big_endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    tensors["m.non_contiguous"] = np.arange(12, dtype=np.int32).reshape(3, 4).T
    path = tmp_path / "rt.safetensors"
    write_safetensors(path, tensors, metadata={"format": "np", "step": "3"})

    loaded = read_safetensors(path)
    expected = {k: np.array(v, dtype=v.dtype.newbyteorder("=")) for k, v in tensors.items()}
    assert_same_state_dict(loaded, expected)
    assert read_safetensors_metadata(path) == {"format": "np", "step": "3"}

    blob = path.read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    assert (8 + header_len) % 8 == 0
    header = json.loads(blob[8:8 + header_len])
    assert [header[k]["dtype"] for k in list(tensors)[: len(DTYPE_TAGS)]] == DTYPE_TAGS
    assert blob[8 + header_len + header["a.big_endian"]["data_offsets"][0]:][:4] == struct.pack("<f", 0.0)
    assert header["a.big_endian"]["data_offsets"][1] - header["a.big_endian"]["data_offsets"][0] == 24


@pytest.mark.parametrize("name", ["var_weights", "dit_weights", "sdvae_weights", "dit_io"])
def test_rewriting_reference_file_is_byte_identical(tmp_path: Path, name: str) -> None:
    original = FIXTURES / f"{name}.safetensors"
    write_safetensors(tmp_path / "copy.safetensors", read_safetensors(original))
    assert (tmp_path / "copy.safetensors").read_bytes() == original.read_bytes()


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(ROUND_TRIP_DTYPES),
    shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_safetensors_round_trip_property(dtype: Any, shape: tuple[int, ...], seed: int) -> None:
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize,
                                               dtype=np.uint8)
    array = raw.view(np.bool_ if dtype is np.bool_ else dtype).reshape(shape)
    if dtype is np.bool_:
        array = raw.astype(bool).reshape(shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.safetensors"
        write_safetensors(path, {"x": array, "y": array.T})
        loaded = read_safetensors(path)
    assert list(loaded) == ["x", "y"]
    assert loaded["x"].dtype == array.dtype and loaded["x"].shape == shape
    assert loaded["x"].tobytes() == array.tobytes()  # bitwise, so NaNs compare equal
    assert loaded["y"].shape == shape[::-1] and loaded["y"].tobytes() == array.T.tobytes()


def test_write_safetensors_rejects_unsupported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="complex128"):
        write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex128)})
    with pytest.raises(ValueError, match="__metadata__"):
        write_safetensors(tmp_path / "m.safetensors", {"__metadata__": np.zeros(2)})


def raw_safetensors(path: Path, header: dict[str, Any], buffer: bytes, header_len: int | None = None) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if header_len is None else header_len) + encoded + buffer)
    return path


def _f32(offsets: list[int], shape: list[int], dtype: str = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize(
    ("header", "buffer_len", "needle"),
    [
        ({"ok": _f32([0, 8], [2]), "bad_dtype": _f32([8, 16], [2], "F7")}, 16, "'bad_dtype'"),
        ({"ok": _f32([0, 8], [2]), "past_end": _f32([8, 24], [4])}, 16, "'past_end'"),
        ({"first": _f32([0, 8], [2]), "overlaps": _f32([4, 12], [2])}, 16, "'overlaps'"),
        ({"wrong_count": _f32([0, 8], [3])}, 16, "'wrong_count'"),
        ({"bad_shape": _f32([0, 8], [-2])}, 16, "'bad_shape'"),
        ({"reversed": _f32([8, 0], [0])}, 16, "'reversed'"),
    ],
)
def test_corrupt_safetensors_names_tensor(tmp_path: Path, header: dict, buffer_len: int, needle: str) -> None:
    path = raw_safetensors(tmp_path / "bad.safetensors", header, bytes(buffer_len))
    with pytest.raises(CorruptCheckpointError) as info:
        read_state_dict(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: raw_safetensors(p, {"x": _f32([0, 8], [2])}, bytes(8), header_len=10**6),
        lambda p: raw_safetensors(p, {"x": _f32([0, 8], [2])}, bytes(8), header_len=2**64 - 1),
        lambda p: p.write_bytes(b"\x05\x00"),
        lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{oops"),
        lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"),
        lambda p: p.write_bytes(struct.pack("<Q", 17) + b'{"a":{}, "a":{}}'),
    ],
    ids=["header-past-eof", "huge-header-len", "short-file", "bad-json", "not-object", "duplicate-key"],
)
def test_corrupt_safetensors_header_names_file(tmp_path: Path, make: Callable[[Path], Any]) -> None:
    path = tmp_path / "hdr.safetensors"
    make(path)
    with pytest.raises(CorruptCheckpointError, match="hdr.safetensors"):
        read_safetensors(path)


def test_truncated_safetensors_names_last_tensor(tmp_path: Path) -> None:
    blob = (FIXTURES / "dit_weights.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(blob[:-10])
    last_key = list(read_safetensors(FIXTURES / "dit_weights.safetensors"))[-1]
    with pytest.raises(CorruptCheckpointError, match="cut.safetensors") as info:
        read_safetensors(path)
    assert repr(last_key) in str(info.value)


def test_npz_reading_keeps_order_and_prefix_key(tmp_path: Path) -> None:
    arrays = {"model.w": np.arange(6, dtype=np.float32).reshape(2, 3), "model.b": np.array([1, 2], np.int8),
              "ema.w": np.ones((2, 3), np.float16)}
    path = tmp_path / "weights.npz"
    np.savez(path, **arrays)
    assert_same_state_dict(read_state_dict(path), arrays)
    assert_same_state_dict(read_state_dict(path, key="model"),
                           {"w": arrays["model.w"], "b": arrays["model.b"]})
    with pytest.raises(KeyError, match="nothing"):
        read_state_dict(path, key="nothing")


def test_npz_object_array_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([Evil(os.system, (f"touch {marker}",))], dtype=object))
    with pytest.raises(UnsafeCheckpointError, match="obj.npz"):
        read_state_dict(path)
    assert not marker.exists()


def test_garbage_npz_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(CorruptCheckpointError, match="garbage.npz"):
        read_state_dict(path)


# ------------------------------------------------------------- 5. dispatch and bad paths


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        read_state_dict(path)


def test_unknown_extension_and_content(tmp_path: Path) -> None:
    path = tmp_path / "weights.xyz"
    path.write_bytes(b"hello, definitely not a checkpoint")
    with pytest.raises(ValueError, match="weights.xyz") as info:
        read_state_dict(path)
    message = str(info.value)
    assert "safetensors" in message and ".npz" in message and ".pth" in message


@pytest.mark.parametrize("source", ["dit_weights.pth", "dit_weights.safetensors"])
def test_unknown_extension_is_sniffed_by_content(tmp_path: Path, source: str) -> None:
    path = tmp_path / "weights.data"
    shutil.copy(FIXTURES / source, path)
    assert_same_state_dict(read_state_dict(path), read_state_dict(FIXTURES / "dit_weights.safetensors"))


def test_torch_file_must_hold_a_dict(tmp_path: Path, fake_torch: FakeTorch) -> None:
    storage = fake_torch.storage("FloatStorage", "0", 2)
    tensor = fake_torch.tensor(storage, 0, (2,), (1,))
    path = write_torch_zip(tmp_path / "tensor.pt", fake_torch.dumps(tensor), {"0": bytes(8)})
    with pytest.raises(ValueError, match="not a dict"):
        read_state_dict(path)
    assert np.array_equal(load_torch_checkpoint(path), np.zeros(2, np.float32))
