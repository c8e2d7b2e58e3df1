"""Streaming ports: lazily read torch tensors, port plans, and checkpoints written a batch at a time."""

import collections
import importlib.util
import io
import json
import pathlib
import pickle
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws import checkpoint
from bitlaws.port import convert, mapping
from bitlaws.port.reader import read_state_dict
from bitlaws.port.safetensors_io import CorruptCheckpointError
from bitlaws.port.tables.dit import TABLE as DIT_TABLE
from bitlaws.port.torch_pickle import StoredTensor

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


# ------------------------------------------------------------------ a torch.save zip without torch


class _Global:
    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise NotImplementedError


class _Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.args = (storage, offset, shape, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return _Global("torch._utils", "_rebuild_tensor_v2"), self.args


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
    dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access
    dispatch[_Global] = lambda self, obj: self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def persistent_id(self, obj):
        return obj if isinstance(obj, tuple) and obj and obj[0] == "storage" else None


def _write(path, tensors, storages, byteorder="little", compress=zipfile.ZIP_STORED):
    """`tensors`: {name: (storage key, offset, shape, stride)}; `storages`: {key: 1-D native array}."""
    names = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}
    ids = {key: ("storage", _Global("torch", names[a.dtype]), key, "cpu", a.size) for key, a in storages.items()}
    state = collections.OrderedDict((name, _Tensor(ids[key], off, shape, stride))
                                    for name, (key, off, shape, stride) in tensors.items())
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buffer.getvalue())
        zf.writestr("archive/byteorder", byteorder)
        for key, array in storages.items():
            order = ">" if byteorder == "big" else "<"
            zf.writestr(f"archive/data/{key}", array.astype(array.dtype.newbyteorder(order)).tobytes(),
                        compress_type=compress)
    return path


def _strided_file(tmp_path, **kwargs):
    storage = np.arange(40, dtype=np.float32)
    tensors = {
        "full": ("0", 0, (5, 8), (8, 1)),
        "offset": ("0", 8, (2, 8), (8, 1)),
        "transposed": ("0", 0, (8, 5), (1, 8)),
        "every_other": ("0", 1, (3, 4), (8, 2)),
        "expanded": ("0", 3, (4, 3), (0, 1)),
        "counter": ("1", 0, (), ()),
    }
    return _write(tmp_path / "s.pth", tensors, {"0": storage, "1": np.array([7], np.int64)}, **kwargs)


# ------------------------------------------------------------------ lazy reader


@pytest.mark.parametrize("name,key", [("var_weights.pth", None), ("dit_weights.pth", None),
                                      ("dit_train_ckpt.pt", "ema"), ("dit_train_ckpt.pt", "model")])
def test_lazy_fixture_tensors_equal_eager(name, key):
    eager = read_state_dict(FIXTURES / name, key=key)
    lazy = read_state_dict(FIXTURES / name, key=key, lazy=True)
    assert list(lazy) == list(eager)
    for k, want in eager.items():
        assert isinstance(lazy[k], StoredTensor) and lazy[k].shape == want.shape and lazy[k].dtype == want.dtype
        got = np.asarray(lazy[k])
        assert got.flags.c_contiguous and got.flags.writeable
        assert got.dtype == want.dtype and np.array_equal(got, want), k


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_lazy_strided_views_match_eager(tmp_path, byteorder):
    path = _strided_file(tmp_path, byteorder=byteorder)
    eager, lazy = read_state_dict(path), read_state_dict(path, lazy=True)
    base = np.arange(40, dtype=np.float32)
    assert np.array_equal(eager["transposed"], base.reshape(5, 8).T)
    assert np.array_equal(eager["every_other"], base[1:].reshape(-1)[: 3 * 8].reshape(3, 8)[:, ::2][:, :4])
    for k, want in eager.items():
        got = np.asarray(lazy[k])
        assert got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want), k
        assert got.flags.c_contiguous and got.flags.writeable and got.dtype.isnative


def test_lazy_compressed_record_is_read_eagerly(tmp_path):
    path = _strided_file(tmp_path, compress=zipfile.ZIP_DEFLATED)
    lazy = read_state_dict(path, lazy=True)
    assert all(isinstance(v, np.ndarray) for v in lazy.values())
    assert np.array_equal(lazy["transposed"], read_state_dict(path)["transposed"])


def test_lazy_truncated_file_is_reported(tmp_path):
    storage = np.arange(1000, dtype=np.float32)
    path = _write(tmp_path / "t.pth", {"w": ("0", 0, (1000,), (1,))}, {"0": storage})
    raw = path.read_bytes()
    start = raw.index(storage.tobytes()[:64])
    path.write_bytes(raw[:start + 100])  # the zip's central directory is gone too: refused when opened
    with pytest.raises(CorruptCheckpointError):
        read_state_dict(path, lazy=True)


# ------------------------------------------------------------------ port plans


def _dit_config(tmp_path):
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    ctor = {k: v for k, v in manifest["fixtures"]["dit"]["ctor"].items() if k != "cls"}
    path = tmp_path / "dit_fixture.py"
    path.write_text(f"import ml_collections\n\n\ndef get_config(arg=None):\n"
                    f"    return ml_collections.ConfigDict({{'model': {ctor!r}}})\n")
    return str(path), ctor


def test_plan_reads_nothing_and_names_every_bad_key(tmp_path, monkeypatch):
    config, ctor = _dit_config(tmp_path)
    reads = []
    monkeypatch.setattr(StoredTensor, "read", lambda self: reads.append(self) or np.zeros(self.shape, self.dtype))
    state = read_state_dict(FIXTURES / "dit_weights.pth", lazy=True)
    plan = convert.port_plan("dit", state, ctor)
    assert not reads and isinstance(plan.abstract, nnx.Module)
    assert all(isinstance(leaf, checkpoint.DeferredArray) for leaf in jax.tree.leaves(plan.deferred_state()))
    state = dict(state)
    state["blocks.0.attn.qkv.weight"] = state.pop("blocks.0.attn.proj.weight")  # misshapen; proj missing
    state["extra.weight"] = state["y_embedder.embedding_table.weight"]
    with pytest.raises(mapping.PortError) as err:
        convert.port_plan("dit", state, ctor)
    assert not reads
    assert err.value.missing == ["blocks.0.attn.proj.kernel"]
    assert err.value.unexpected == ["extra.weight"]
    assert [m.split(" ")[0] for m in err.value.misshapen] == ["blocks.0.attn.qkv.kernel"]


def test_port_state_dict_outside_recording_builds_the_model(tmp_path):
    _, ctor = _dit_config(tmp_path)
    from bitlaws.models.dit import DiT  # pylint: disable=g-import-not-at-top

    state = read_state_dict(FIXTURES / "dit_weights.pth", lazy=True)
    model = mapping.port_state_dict(state, DIT_TABLE, lambda: DiT(**ctor, rngs=nnx.Rngs(0)), ignore=(r"pos_embed",))
    eager = mapping.to_state_dict(model)
    want = read_state_dict(FIXTURES / "dit_weights.pth")
    assert np.array_equal(eager["blocks.0.attn.qkv.kernel"], want["blocks.0.attn.qkv.weight"].T)
    with mapping.recording_plans() as plans:
        abstract = mapping.port_state_dict(state, DIT_TABLE, lambda: DiT(**ctor, rngs=nnx.Rngs(0)),
                                           ignore=(r"pos_embed",))
    assert len(plans) == 1 and plans[0].abstract is abstract
    assert isinstance(jax.tree.leaves(nnx.state(abstract))[0], jax.ShapeDtypeStruct)


def test_probed_transform_shapes():
    w = np.zeros((6, 4, 1, 1), np.float32)
    assert mapping._leaf(mapping.conv1x1_to_linear, (w,)).shape == (4, 6)  # pylint: disable=protected-access
    parts = (np.zeros((3,), np.float16), np.zeros((3,), np.float16))
    leaf = mapping._leaf(mapping.concat, parts)  # pylint: disable=protected-access
    assert leaf.shape == (6,) and leaf.dtype == np.float16
    with pytest.raises(ValueError, match="1x1 conv"):
        mapping._leaf(mapping.conv1x1_to_linear, (np.zeros((6, 4, 3, 3)),))  # pylint: disable=protected-access


# ------------------------------------------------------------------ streamed checkpoints


def _leaves_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert type(x) is type(y) and x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.mark.parametrize("name,key", [("dit_weights.pth", None), ("dit_train_ckpt.pt", "ema"),
                                      ("dit_weights.safetensors", None)])
def test_convert_equals_the_in_memory_port(tmp_path, name, key):
    config, ctor = _dit_config(tmp_path)
    out = convert.convert("dit", FIXTURES / name, tmp_path / "streamed", config, key=key)
    spec = convert.KINDS["dit"]
    model = spec.port(read_state_dict(FIXTURES / name, key=key), ctor)
    checkpoint.save_model(model, tmp_path / "in_memory", {})
    streamed = convert.load_ported(out)
    in_memory = checkpoint.load_model(lambda: spec.build(ctor), tmp_path / "in_memory")
    _leaves_identical(nnx.to_pure_dict(nnx.state(in_memory)), nnx.to_pure_dict(nnx.state(streamed)))
    for record in ("_METADATA", "_sharding"):
        assert (json.loads((out / "state" / record).read_text())
                == json.loads((tmp_path / "in_memory" / "state" / record).read_text())), record


def test_convert_var_pth_equals_the_in_memory_port(tmp_path):
    fixtures = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
    var = {k: v for k, v in fixtures["var"]["ctor"].items() if k not in ("cls", "vae_local")}
    vqvae = {k: v for k, v in fixtures["vqvae"]["ctor"].items() if k != "cls"}
    config = tmp_path / "var_fixture.py"
    config.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                      f"    return ml_collections.ConfigDict({{'var': {var!r}, 'vqvae': {vqvae!r}}})\n")
    out = convert.convert("var", FIXTURES / "var_weights.pth", tmp_path / "streamed", str(config))
    ctor = checkpoint.load_metadata(out)["ctor"]
    model = convert.KINDS["var"].port(read_state_dict(FIXTURES / "var_weights.pth"), ctor)
    _leaves_identical(nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(convert.load_ported(out))))


def test_save_deferred_state_computes_in_batches(tmp_path):
    class Small(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(64, 32, rngs=rngs) for _ in range(4)])
            self.count = nnx.BatchStat(jnp.arange(3, dtype=jnp.int32))

    model = Small(nnx.Rngs(0))
    pure = nnx.to_pure_dict(nnx.state(model))
    events = []

    def deferred(path, value):
        name = jax.tree_util.keystr(path)

        def compute():
            events.append(name)
            return np.asarray(value)

        return checkpoint.DeferredArray(tuple(value.shape), value.dtype, compute)

    state = jax.tree_util.tree_map_with_path(deferred, pure)
    checkpoint.save_deferred_state(state, tmp_path / "deferred", {"a": 1}, batch_bytes=64 * 32 * 4)
    assert len(events) == len(jax.tree.leaves(pure)) == len(set(events))
    restored = checkpoint.load_model(lambda: Small(nnx.Rngs(1)), tmp_path / "deferred")
    _leaves_identical(pure, nnx.to_pure_dict(nnx.state(restored)))
    assert checkpoint.load_metadata(tmp_path / "deferred") == {"a": 1}
    with pytest.raises(ValueError, match="DeferredArray"):
        checkpoint.save_deferred_state(pure, tmp_path / "plain")
    sizes = [checkpoint.DeferredArray((n,), np.dtype(np.float32), None) for n in (4, 4, 4, 16, 1)]
    batches = checkpoint._batches([(d,) for d in sizes], 32)  # pylint: disable=protected-access
    assert [[d.shape[0] for (d,) in batch] for batch in batches] == [[4, 4], [4], [16], [1]]
    bad = jax.tree.map(lambda d: checkpoint.DeferredArray(d.shape, d.dtype, lambda: np.zeros((1,), d.dtype)), state)
    with pytest.raises(ValueError, match="computed shape"):
        checkpoint.save_deferred_state(bad, tmp_path / "bad")


# ------------------------------------------------------------------ the benchmark's writer


def _benchmark():
    spec = importlib.util.spec_from_file_location("port_memory", REPO / "benchmarks" / "port_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("port_memory", module)
    spec.loader.exec_module(module)
    return module


def test_benchmark_writer_is_read_back_aligned(tmp_path):
    bench = _benchmark()
    layout = [("a.weight", (3, 5), np.dtype(np.float32)), ("blocks.0.attn.zero_k_bias", (4,), np.dtype(np.float32)),
              ("lvl_1L", (1, 6), np.dtype(np.int64))]
    path = tmp_path / "w.pth"
    bench.write_torch_checkpoint(path, layout)
    state = read_state_dict(path, lazy=True)
    assert [(k, v.shape, v.dtype) for k, v in state.items()] == layout
    assert all(v.record.offset % 64 == 0 for v in state.values())
    assert not np.asarray(state["blocks.0.attn.zero_k_bias"]).any()
    assert np.array_equal(read_state_dict(path)["lvl_1L"], np.asarray(state["lvl_1L"]))


def test_benchmark_layout_fits_the_port():
    layout = _benchmark().source_layout("vqvae")
    state = {key: np.broadcast_to(np.zeros((), dtype), shape) for key, shape, dtype in layout}
    from bitlaws import configlib  # pylint: disable=g-import-not-at-top

    ctor = convert.KINDS["vqvae"].ctor_from_config(configlib.load_config(str(REPO / "configs/models/var_d16.py")))
    plan = convert.port_plan("vqvae", state, ctor)
    assert len(plan.leaves) == len(layout) - 1  # ema_vocab_hit_SV is ignored
