"""`jaxreshard.load`: any checkpoint straight into sharded `jax.Array`s, plus `layout_from_yaml/strategy`.

Expected shard contents are always `full[shard.index]` (numpy slicing with the index JAX itself reports for
the device), and the full tensors come from the example generator, the `safetensors` package or MindSpore's
complete reference checkpoint, never from `load`'s own code path. Runs on the 8 fake CPU devices of conftest.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import jaxreshard as jr
from jaxreshard.box import Box
from jaxreshard.example import llama_params, llama_tensor
from jaxreshard.formats import rank_dirs
from jaxreshard.formats.base import FileHandles, aligned_empty, read_box
from jaxreshard.formats.manifest import MANIFEST_NAME
from jaxreshard.formats.mindspore_ckpt import read_ckpt_index
from jaxreshard.formats.safetensors_io import SafetensorsWriter

from .helpers import nest

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = REPO / "configs" / "layouts"
MS = REPO / "tests" / "fixtures" / "mindspore"
BF16 = np.dtype(ml_dtypes.bfloat16)

# ------------------------------------------------------------------------------------------------ helpers


def devices():
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def mesh_of(shape, axes, devs=None):
    devs = devs if devs is not None else devices()
    n = int(np.prod(shape))
    return Mesh(np.array(devs[:n], dtype=object).reshape(shape), axes)


def check_array(arr, full: np.ndarray, sharding) -> None:
    """`arr` has exactly `sharding`, the full shape/dtype, and each addressable shard equals full[index]."""
    assert isinstance(arr, jax.Array)
    assert arr.sharding == sharding, (arr.sharding, sharding)
    assert arr.shape == full.shape
    assert np.dtype(arr.dtype) == full.dtype, (arr.dtype, full.dtype)
    want_idx = sharding.addressable_devices_indices_map(full.shape)
    seen = set()
    for shard in arr.addressable_shards:
        seen.add(shard.device)
        assert tuple(shard.index) == tuple(want_idx[shard.device])
        got = np.asarray(shard.data)
        exp = np.asarray(full[shard.index])  # (not ascontiguousarray: it makes 0-d arrays 1-d)
        assert got.dtype == exp.dtype
        assert got.shape == exp.shape, (shard.device, got.shape, exp.shape)
        assert got.tobytes() == exp.tobytes(), f"shard on {shard.device} index {shard.index} differs"
    assert seen == set(sharding.addressable_devices)


def llama_full(skip64: bool = True) -> dict[str, np.ndarray]:
    out = {}
    for name, dtype, shape in llama_params():
        if skip64 and name.startswith("train_state."):
            continue
        out[name] = llama_tensor(name, dtype, shape)
    return out


def ms_full(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a MindSpore .ckpt, read whole (independent of load's planning)."""
    index = read_ckpt_index(path)
    out = {}
    with FileHandles() as handles:
        for name, entry in index.tensors.items():
            buf = aligned_empty(entry.shape, entry.dtype)
            read_box(handles, entry, Box.full(entry.shape), buf)
            out[name] = np.array(buf)
    return out


# Spec sets per mesh: None dims, a single axis, a tuple of axes, replicated.
LLAMA_SPEC_SETS = {
    "2x4": ((2, 4), ("dp", "mp"), {
        "model.embed_tokens.weight": P("mp", None),
        "model.layers.0.self_attn.q_proj.weight": P(None, "mp"),
        "model.layers.0.self_attn.k_proj.weight": P(("dp", "mp"), None),
        "model.layers.1.mlp.down_proj.weight": P("dp", "mp"),
        "model.layers.1.mlp.gate_proj.weight": P(("mp", "dp")),
        "model.layers.2.input_layernorm.weight": P("mp"),
        "model.norm.weight": P(),
        "lm_head.weight": P(None, ("dp", "mp")),
    }),
    "4x2": ((4, 2), ("a", "b"), {
        "model.embed_tokens.weight": P("b", "a"),
        "model.layers.0.self_attn.q_proj.weight": P("a"),
        "model.layers.0.self_attn.v_proj.weight": P(None, ("b", "a")),
        "model.layers.3.mlp.up_proj.weight": P(("a", "b"), None),
        "model.layers.3.post_attention_layernorm.weight": P(None),
        "lm_head.weight": P(),
    }),
    "8": ((8,), ("x",), {
        "model.embed_tokens.weight": P(None, "x"),
        "model.layers.2.self_attn.o_proj.weight": P("x", None),
        "model.layers.2.mlp.down_proj.weight": P(None, "x"),
        "model.norm.weight": P("x"),
        "lm_head.weight": P("x"),
    }),
    "1": ((1,), ("x",), {
        "model.embed_tokens.weight": P("x", None),
        "model.layers.1.self_attn.k_proj.weight": P(),
        "lm_head.weight": P(None, "x"),
    }),
}


def llama_target(key: str):
    shape, axes, specs = LLAMA_SPEC_SETS[key]
    mesh = mesh_of(shape, axes)
    return {name: NamedSharding(mesh, spec) for name, spec in specs.items()}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def llama_dp2mp4(llama, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("dist") / "dp2mp4"
    jr.convert(llama, dst, dst_layout=str(LAYOUTS / "llama_dp2mp4.yaml"))
    return dst


@pytest.fixture(scope="module")
def llama_pp(llama, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("dist") / "dp2mp2pp2"
    jr.convert(llama, dst, dst_layout=str(LAYOUTS / "llama_dp2mp2pp2.yaml"))
    return dst


@pytest.fixture(scope="module")
def full():
    return llama_full()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small complete checkpoint with every interesting dtype (for casts and renames)."""
    rng = np.random.default_rng(7)
    tensors = {
        "w.f32": rng.standard_normal((8, 16)).astype(np.float32),
        "w.f16": rng.standard_normal((16, 8)).astype(np.float16),
        "w.bf16": rng.standard_normal((8, 8)).astype(BF16),
        "w.f64": rng.standard_normal((8, 4)).astype(np.float64),
        "i.i32": rng.integers(-1000, 1000, (8, 8)).astype(np.int32),
        "i.i8": rng.integers(-100, 100, (16,)).astype(np.int8),
        "i.u8": rng.integers(0, 255, (8,)).astype(np.uint8),
        "i.bool": (rng.integers(0, 2, (8, 2)) == 1),
        "s.scalar": np.asarray(3.25, dtype=np.float32),
    }
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    writer = SafetensorsWriter(path, [(n, a.dtype, a.shape) for n, a in tensors.items()])
    for n, a in tensors.items():
        writer.write(n, a)
    writer.close()
    return path, tensors


# ------------------------------------------------------------------------------------------------ sources x meshes


@pytest.mark.parametrize("key", list(LLAMA_SPEC_SETS))
def test_load_complete_safetensors(llama, full, key):
    target = llama_target(key)
    out = jr.load(llama, target, strict=False)
    assert set(out) == set(target)
    for name, sharding in target.items():
        check_array(out[name], full[name], sharding)


def test_load_complete_safetensors_reference_reader(llama):
    """The expected values agree with the `safetensors` package's own reading of the file."""
    ref = load_file(str(llama))
    target = llama_target("2x4")
    out = jr.load(llama, target, strict=False)
    for name, sharding in target.items():
        check_array(out[name], ref[name], sharding)


@pytest.mark.parametrize("key", ["2x4", "4x2", "8", "1"])
def test_load_distributed_safetensors(llama_dp2mp4, full, key):
    target = llama_target(key)
    out = jr.load(llama_dp2mp4, target, src_layout=str(LAYOUTS / "llama_dp2mp4.yaml"), strict=False)
    for name, sharding in target.items():
        check_array(out[name], full[name], sharding)


@pytest.mark.parametrize("key", ["2x4", "8"])
def test_load_pipeline_distributed_safetensors(llama_pp, full, key):
    target = llama_target(key)
    out = jr.load(llama_pp, target, src_layout=str(LAYOUTS / "llama_dp2mp2pp2.yaml"), strict=False)
    for name, sharding in target.items():
        check_array(out[name], full[name], sharding)


def test_load_distributed_with_python_layout(llama, full, tmp_path):
    mesh = mesh_of((4, 2), ("m", "d"))
    layout = (mesh, {r".*_proj\.weight": P(None, "m"), r"model\.embed_tokens\.weight": P(("m", "d"), None)})
    dist = tmp_path / "dist"
    jr.convert(llama, dist, dst_layout=layout)
    target = llama_target("2x4")
    out = jr.load(dist, target, src_layout=layout, strict=False)
    for name, sharding in target.items():
        check_array(out[name], full[name], sharding)


def test_distributed_without_layout_is_an_error(llama_dp2mp4, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(llama_dp2mp4, foreign)
    (foreign / MANIFEST_NAME).unlink()  # as another tool writes it: nothing records the layout
    with pytest.raises(jr.JaxreshardError, match="src.layout|src.strategy"):
        jr.load(foreign, llama_target("1"), strict=False)


MS_CASES = ["dp2mp4", "dp2mp2", "mp4", "dp2mp2_opt", "dp4_opt", "dp2mp2_layout", "dp1mp2pp2"]


@pytest.fixture(scope="module")
def ms_complete():
    return ms_full(MS / "ckpt" / "complete" / "rank_0" / "checkpoint_0.ckpt")


def ms_target(full: dict, mesh_key: str):
    if mesh_key == "2x4":
        mesh = mesh_of((2, 4), ("dp", "mp"))
        specs = {
            "embedding.embedding_table": P("mp", None),
            "layer1.weight": P(None, ("dp", "mp")),
            "layer1.bias": P("mp"),
            "layer2.weight": P("dp", "mp"),
            "layer2.bias": P(),
            "norm.gamma": P(("mp", "dp")),
            "adam_m.layer1.weight": P("dp"),
            "adam_v.layer1.weight": P(None, "mp"),
            "global_step": P(),
            "learning_rate": P(),
        }
    else:
        mesh = mesh_of((8,), ("x",))
        specs = {name: (P("x") if full[name].ndim and full[name].shape[0] % 8 == 0 else P()) for name in full}
    return {n: NamedSharding(mesh, s) for n, s in specs.items()}


@pytest.mark.parametrize("layout", MS_CASES)
@pytest.mark.parametrize("mesh_key", ["2x4", "8"])
def test_load_mindspore_ckpt_with_strategy(ms_complete, layout, mesh_key):
    target = ms_target(ms_complete, mesh_key)
    out = jr.load(MS / "ckpt" / layout, target, src_strategy=MS / "strategy" / f"{layout}.ckpt")
    assert set(out) == set(ms_complete)
    for name, sharding in target.items():
        check_array(out[name], ms_complete[name], sharding)


def test_load_mindspore_complete_ckpt(ms_complete):
    target = ms_target(ms_complete, "2x4")
    out = jr.load(MS / "ckpt" / "complete", target)
    for name, sharding in target.items():
        check_array(out[name], ms_complete[name], sharding)


def test_load_mindspore_strategy_folder(ms_complete):
    """A pipeline strategy given as the folder of per-stage strategy files."""
    target = ms_target(ms_complete, "8")
    out = jr.load(MS / "ckpt" / "dp1mp2pp2", target, src_strategy=MS / "strategy" / "pp_stages")
    for name, sharding in target.items():
        check_array(out[name], ms_complete[name], sharding)


# ------------------------------------------------------------------------------------------------ orbax source




@pytest.fixture(scope="module")
def orbax_llama(tmp_path_factory, full):
    """An orbax checkpoint written by plain orbax (`ocp.save`) of jax arrays with some sharding."""
    import orbax.checkpoint.experimental.v1 as ocp

    mesh = mesh_of((2, 4), ("dp", "mp"))
    arrays = {}
    for name, value in full.items():
        spec = P("mp") if value.ndim and value.shape[0] % 4 == 0 else P()
        arrays[name] = jax.device_put(value, NamedSharding(mesh, spec))
    path = tmp_path_factory.mktemp("orbax") / "ckpt"
    ocp.save(str(path), nest(arrays))
    return path


@pytest.mark.parametrize("key", list(LLAMA_SPEC_SETS))
def test_load_orbax(orbax_llama, full, key):
    target = llama_target(key)
    out = jr.load(orbax_llama, target, strict=False)
    for name, sharding in target.items():
        check_array(out[name], full[name], sharding)


def test_load_orbax_strict_all_params(orbax_llama, full):
    mesh = mesh_of((2, 4), ("dp", "mp"))
    target = {n: NamedSharding(mesh, P(None, "mp") if v.ndim == 2 else P()) for n, v in full.items()}
    out = jr.load(orbax_llama, target)  # strict: orbax holds exactly these names
    for name, sharding in target.items():
        check_array(out[name], full[name], sharding)


def test_load_orbax_with_cast_and_sds(orbax_llama, full):
    mesh = mesh_of((4, 2), ("a", "b"))
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    target = {n: jax.ShapeDtypeStruct(full[n].shape, jnp.bfloat16, sharding=NamedSharding(mesh, P("a")))
              for n in names}
    out = jr.load(orbax_llama, target, dtype="bf16", strict=False)
    for n in names:
        check_array(out[n], full[n].astype(BF16), target[n].sharding)


def test_load_orbax_rejects_src_layout(orbax_llama):
    with pytest.raises(jr.JaxreshardError):
        jr.load(orbax_llama, llama_target("1"), src_layout=str(LAYOUTS / "llama_dp2mp4.yaml"), strict=False)


# ------------------------------------------------------------------------------------------------ target forms


def test_nested_dict_target(llama, full):
    mesh = mesh_of((2, 4), ("dp", "mp"))
    target = {
        "model": {
            "embed_tokens": {"weight": NamedSharding(mesh, P("mp"))},
            "layers": {"0": {"self_attn": {"q_proj": {"weight": NamedSharding(mesh, P(None, "dp"))}}}},
            "norm": {"weight": NamedSharding(mesh, P())},
        },
        "lm_head": {"weight": NamedSharding(mesh, P(("dp", "mp")))},
    }
    out = jr.load(llama, target, strict=False)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(lambda _: 0, target, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))
    check_array(out["model"]["embed_tokens"]["weight"], full["model.embed_tokens.weight"],
                target["model"]["embed_tokens"]["weight"])
    check_array(out["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"],
                full["model.layers.0.self_attn.q_proj.weight"],
                target["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"])
    check_array(out["model"]["norm"]["weight"], full["model.norm.weight"], target["model"]["norm"]["weight"])
    check_array(out["lm_head"]["weight"], full["lm_head.weight"], target["lm_head"]["weight"])


def test_shape_dtype_struct_target(llama, full):
    mesh = mesh_of((4, 2), ("a", "b"))
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    target = {n: jax.ShapeDtypeStruct(full[n].shape, full[n].dtype,
                                      sharding=NamedSharding(mesh, P(*("a", None)[: full[n].ndim])))
              for n in names}
    out = jr.load(llama, target, strict=False)
    for n in names:
        assert out[n].shape == target[n].shape and out[n].dtype == target[n].dtype
        check_array(out[n], full[n], target[n].sharding)


def test_mixed_pytree_target(llama, full):
    """Lists, tuples, Sharding and ShapeDtypeStruct leaves, non-named shardings; same structure back."""
    mesh = mesh_of((2, 4), ("dp", "mp"))
    q = "model.layers.{}.self_attn.q_proj.weight"
    target = {
        "model": {
            "layers": [
                {"self_attn": {"q_proj": {"weight": NamedSharding(mesh, P("dp", "mp"))}}},
                {"self_attn": {"q_proj": {"weight": jax.ShapeDtypeStruct(
                    full[q.format(1)].shape, full[q.format(1)].dtype, sharding=NamedSharding(mesh, P(None, "mp")))}}},
            ],
            "norm": {"weight": SingleDeviceSharding(devices()[5])},
        },
        "lm_head": {"weight": jax.ShapeDtypeStruct((512, 128), np.float16, sharding=NamedSharding(mesh, P()))},
    }
    out = jr.load(llama, target, strict=False)
    assert isinstance(out["model"]["layers"], list) and len(out["model"]["layers"]) == 2
    check_array(out["model"]["layers"][0]["self_attn"]["q_proj"]["weight"], full[q.format(0)],
                NamedSharding(mesh, P("dp", "mp")))
    check_array(out["model"]["layers"][1]["self_attn"]["q_proj"]["weight"], full[q.format(1)],
                NamedSharding(mesh, P(None, "mp")))
    check_array(out["model"]["norm"]["weight"], full["model.norm.weight"], SingleDeviceSharding(devices()[5]))
    check_array(out["lm_head"]["weight"], full["lm_head.weight"], NamedSharding(mesh, P()))


def test_tuple_pytree_target(llama, full):
    mesh = mesh_of((8,), ("x",))
    target = {"lm_head": (NamedSharding(mesh, P("x")),)}  # tuple index 0 -> name "lm_head.0"
    out = jr.load(llama, target, rename=[(r"^lm_head\.weight$", "lm_head.0")], strict=False)
    assert isinstance(out["lm_head"], tuple)
    check_array(out["lm_head"][0], full["lm_head.weight"], NamedSharding(mesh, P("x")))


# ------------------------------------------------------------------------------------------------ strict errors


def test_strict_reports_everything_at_once(llama, full):
    mesh = mesh_of((2, 4), ("dp", "mp"))
    target = {n: NamedSharding(mesh, P()) for n in full}
    del target["model.layers.3.mlp.up_proj.weight"]  # -> unexpected (with strict)
    target["model.layers.9.self_attn.q_proj.weight"] = NamedSharding(mesh, P())  # missing from checkpoint
    target["model.norm.weight"] = jax.ShapeDtypeStruct((64,), np.float32, sharding=NamedSharding(mesh, P()))
    target["lm_head.weight"] = jax.ShapeDtypeStruct((512, 128), np.float32, sharding=NamedSharding(mesh, P()))
    with pytest.raises(jr.JaxreshardError) as info:
        jr.load(llama, target)
    assert isinstance(info.value, jr.PlanError)
    msg = str(info.value)
    for name in ["model.layers.3.mlp.up_proj.weight", "train_state.step", "train_state.loss_scale",
                 "model.layers.9.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"]:
        assert name in msg, (name, msg)
    assert "missing" in msg and "unexpected" in msg
    assert "64" in msg and "128" in msg  # the wrong shape is shown
    assert "float16" in msg and "float32" in msg  # the wrong dtype is shown


def test_strict_false_ignores_unexpected(llama, full):
    target = llama_target("1")
    with pytest.raises(jr.PlanError, match="unexpected"):
        jr.load(llama, target)
    out = jr.load(llama, target, strict=False)
    assert set(out) == set(target)


def test_missing_key_errors_even_without_strict(llama):
    mesh = mesh_of((1,), ("x",))
    target = {"lm_head.weight": NamedSharding(mesh, P()), "no.such.param": NamedSharding(mesh, P())}
    with pytest.raises(jr.JaxreshardError, match=re.escape("no.such.param")):
        jr.load(llama, target, strict=False)


def test_wrong_shape_alone(llama):
    mesh = mesh_of((1,), ("x",))
    target = {"lm_head.weight": jax.ShapeDtypeStruct((128, 512), np.float16, sharding=NamedSharding(mesh, P()))}
    with pytest.raises(jr.JaxreshardError, match=re.escape("lm_head.weight")):
        jr.load(llama, target, strict=False)


def test_wrong_dtype_alone(llama):
    mesh = mesh_of((1,), ("x",))
    target = {"model.norm.weight": jax.ShapeDtypeStruct((128,), BF16, sharding=NamedSharding(mesh, P()))}
    with pytest.raises(jr.JaxreshardError, match=re.escape("model.norm.weight")):
        jr.load(llama, target, strict=False)


def test_shape_dtype_struct_without_sharding(llama):
    target = {"model.norm.weight": jax.ShapeDtypeStruct((128,), np.float32)}
    with pytest.raises(jr.JaxreshardError, match="sharding"):
        jr.load(llama, target, strict=False)


def test_errors_raised_before_reading(llama, monkeypatch):
    """Validation happens up front: nothing is read when the target is wrong."""
    from jaxreshard import fill

    def boom(*a, **k):
        raise AssertionError("read before validation")

    monkeypatch.setattr(fill, "read_box", boom)
    mesh = mesh_of((1,), ("x",))
    target = {"lm_head.weight": NamedSharding(mesh, P()), "absent": NamedSharding(mesh, P())}
    with pytest.raises(jr.JaxreshardError):
        jr.load(llama, target, strict=False)


# ------------------------------------------------------------------------------------------------ dtype cast


@pytest.mark.parametrize("dtype, want", [
    ("bf16", BF16), ("bfloat16", BF16), (jnp.bfloat16, BF16), ("fp16", np.dtype(np.float16)),
    (np.float16, np.dtype(np.float16)), ("fp32", np.dtype(np.float32)), (np.float32, np.dtype(np.float32)),
])
def test_dtype_cast(small, dtype, want):
    path, tensors = small
    mesh = mesh_of((2, 4), ("dp", "mp"))
    specs = {"w.f32": P("dp", "mp"), "w.f16": P("mp"), "w.bf16": P(None, "mp"), "w.f64": P("mp"),
             "i.i32": P("mp"), "i.i8": P("mp"), "i.u8": P("dp"), "i.bool": P("mp"), "s.scalar": P()}
    target = {n: NamedSharding(mesh, s) for n, s in specs.items()}
    out = jr.load(path, target, dtype=dtype)
    for name, arr in tensors.items():
        exp = arr.astype(want) if np.issubdtype(arr.dtype, np.floating) or arr.dtype == BF16 else arr
        check_array(out[name], exp, target[name])


def test_dtype_cast_bf16_rounding_equals_ml_dtypes(tmp_path):
    """Values that need rounding (ties included) round like ml_dtypes' astype."""
    bits = np.arange(0, 1 << 16, 7, dtype=np.uint32)[:4096] << 16 | np.uint32(0x8000)  # exact ties
    vals = bits.view(np.float32)
    vals = vals[np.isfinite(vals)][:2048].reshape(256, 8)
    rng = np.random.default_rng(0)
    other = rng.standard_normal((256, 8)).astype(np.float32)
    path = tmp_path / "r.safetensors"
    w = SafetensorsWriter(path, [("ties", vals.dtype, vals.shape), ("rand", other.dtype, other.shape)])
    w.write("ties", vals)
    w.write("rand", other)
    w.close()
    mesh = mesh_of((8,), ("x",))
    target = {"ties": NamedSharding(mesh, P("x")), "rand": NamedSharding(mesh, P(None, "x"))}
    out = jr.load(path, target, dtype="bf16")
    check_array(out["ties"], vals.astype(BF16), target["ties"])
    check_array(out["rand"], other.astype(BF16), target["rand"])


def test_dtype_cast_with_shape_dtype_struct(small):
    path, tensors = small
    mesh = mesh_of((2, 4), ("dp", "mp"))
    target = {"w.f32": jax.ShapeDtypeStruct((8, 16), jnp.bfloat16, sharding=NamedSharding(mesh, P("dp"))),
              "i.i32": jax.ShapeDtypeStruct((8, 8), jnp.int32, sharding=NamedSharding(mesh, P("mp")))}
    out = jr.load(path, target, dtype="bf16", strict=False)
    check_array(out["w.f32"], tensors["w.f32"].astype(BF16), target["w.f32"].sharding)
    check_array(out["i.i32"], tensors["i.i32"], target["i.i32"].sharding)
    # without the cast the bf16 struct does not match the f32 checkpoint
    with pytest.raises(jr.JaxreshardError, match="w.f32"):
        jr.load(path, target, strict=False)


def test_dtype_cast_from_distributed_source(llama_dp2mp4, full):
    target = llama_target("4x2")
    out = jr.load(llama_dp2mp4, target, src_layout=str(LAYOUTS / "llama_dp2mp4.yaml"), dtype=np.float32,
                  strict=False)
    for name, sharding in target.items():
        check_array(out[name], full[name].astype(np.float32), sharding)


# ------------------------------------------------------------------------------------------------ rename


def test_rename_regex_table(llama, full):
    mesh = mesh_of((2, 4), ("dp", "mp"))
    table = [(r"^model\.layers\.(\d+)\.", r"layers_\1."), (r"^model\.", "")]
    target = {
        "layers_0.self_attn.q_proj.weight": NamedSharding(mesh, P("mp")),
        "layers_3.mlp.down_proj.weight": NamedSharding(mesh, P(None, "mp")),
        "embed_tokens.weight": NamedSharding(mesh, P(("dp", "mp"))),
        "norm.weight": NamedSharding(mesh, P()),
        "lm_head.weight": NamedSharding(mesh, P("dp")),
    }
    out = jr.load(llama, target, rename=table, strict=False)
    check_array(out["layers_0.self_attn.q_proj.weight"], full["model.layers.0.self_attn.q_proj.weight"],
                target["layers_0.self_attn.q_proj.weight"])
    check_array(out["layers_3.mlp.down_proj.weight"], full["model.layers.3.mlp.down_proj.weight"],
                target["layers_3.mlp.down_proj.weight"])
    check_array(out["embed_tokens.weight"], full["model.embed_tokens.weight"], target["embed_tokens.weight"])
    check_array(out["norm.weight"], full["model.norm.weight"], target["norm.weight"])
    check_array(out["lm_head.weight"], full["lm_head.weight"], target["lm_head.weight"])
    # the original names are no longer there
    with pytest.raises(jr.JaxreshardError, match="model.norm.weight"):
        jr.load(llama, {"model.norm.weight": NamedSharding(mesh, P())}, rename=table, strict=False)


def test_rename_table_into_nested_target(llama, full):
    mesh = mesh_of((4, 2), ("a", "b"))
    table = [(r"^model\.layers\.(\d+)\.", r"layers_\1.")]
    target = {"layers_2": {"self_attn": {"k_proj": {"weight": NamedSharding(mesh, P("a", "b"))}}}}
    out = jr.load(llama, target, rename=table, strict=False)
    check_array(out["layers_2"]["self_attn"]["k_proj"]["weight"], full["model.layers.2.self_attn.k_proj.weight"],
                NamedSharding(mesh, P("a", "b")))


def test_rename_callable_skips_none(llama, full):
    mesh = mesh_of((8,), ("x",))
    seen = []

    def rename(name):
        seen.append(name)
        if name.startswith("train_state.") or ".mlp." in name:
            return None
        return name.replace("model.layers.", "layers_").replace("model.", "")

    kept = {n for n in full if ".mlp." not in n}
    target = {rename(n): NamedSharding(mesh, P("x") if full[n].ndim == 2 else P()) for n in kept}
    seen.clear()
    out = jr.load(llama, target, rename=rename)  # strict: skipped names are not "unexpected"
    assert "train_state.step" in seen
    assert set(out) == set(target)
    for n in kept:
        check_array(out[rename(n)], full[n], target[rename(n)])


def test_rename_with_distributed_source(llama_dp2mp4, full):
    mesh = mesh_of((2, 4), ("dp", "mp"))
    target = {"layers_1.self_attn.o_proj.weight": NamedSharding(mesh, P("mp", "dp"))}
    out = jr.load(llama_dp2mp4, target, src_layout=str(LAYOUTS / "llama_dp2mp4.yaml"),
                  rename=[(r"^model\.layers\.(\d+)\.", r"layers_\1.")], strict=False)
    check_array(out["layers_1.self_attn.o_proj.weight"], full["model.layers.1.self_attn.o_proj.weight"],
                target["layers_1.self_attn.o_proj.weight"])


# ------------------------------------------------------------------------------------------------ layouts -> shardings


def rank_files(dist: Path) -> dict[int, dict[str, np.ndarray]]:
    out = {}
    for rank, d in rank_dirs(dist).items():
        (f,) = list(d.glob("*.safetensors"))
        out[rank] = load_file(str(f))
    return out


def test_layout_from_yaml_matches_convert(llama, llama_dp2mp4, full):
    shardings = jr.layout_from_yaml(LAYOUTS / "llama_dp2mp4.yaml", llama)
    assert set(shardings) == {n for n, _, _ in llama_params()}
    files = rank_files(llama_dp2mp4)
    assert sorted(files) == list(range(8))
    for name in ["model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight",
                 "model.layers.2.mlp.up_proj.weight", "model.norm.weight"]:
        sh = shardings[name]
        assert isinstance(sh, NamedSharding)
        assert sh.mesh.shape == {"dp": 2, "mp": 4}
        idx = sh.devices_indices_map(full[name].shape)
        for r in range(8):
            dev = sh.mesh.devices.flat[r]
            assert dev == jax.devices()[r]
            assert files[r][name].tobytes() == np.asarray(full[name][idx[dev]]).tobytes(), (name, r)
    out = jr.load(llama, {n: shardings[n] for n in full}, strict=False)
    for n in full:
        check_array(out[n], full[n], shardings[n])


def test_layout_from_yaml_with_names_shapes_and_devices(full):
    devs = list(reversed(jax.devices()))
    params = {n: v.shape for n, v in full.items()}
    shardings = jr.layout_from_yaml(str(LAYOUTS / "llama_dp2mp4.yaml"), params, devices=devs)
    sh = shardings["model.embed_tokens.weight"]
    assert list(sh.mesh.devices.flat) == devs
    assert sh.spec == P("mp", None) or tuple(sh.spec) == ("mp", None)
    names_only = jr.layout_from_yaml(str(LAYOUTS / "llama_dp2mp4.yaml"), list(full))
    assert set(names_only) == set(full)


def test_layout_from_yaml_stage(llama, llama_pp, full):
    path = LAYOUTS / "llama_dp2mp2pp2.yaml"
    s0 = jr.layout_from_yaml(path, llama, stage=0)
    s1 = jr.layout_from_yaml(path, llama, stage=1)
    assert "model.embed_tokens.weight" in s0 and "model.embed_tokens.weight" not in s1
    assert "lm_head.weight" in s1 and "lm_head.weight" not in s0
    assert "model.norm.weight" in s1 and "model.norm.weight" not in s0
    assert "model.layers.0.self_attn.q_proj.weight" in s0 and "model.layers.0.self_attn.q_proj.weight" not in s1
    assert "model.layers.3.mlp.down_proj.weight" in s1 and "model.layers.3.mlp.down_proj.weight" not in s0
    assert "train_state.step" in s0 and "train_state.step" in s1  # unmatched: every stage
    files = rank_files(llama_pp)
    for stage, shs, name in [(0, s0, "model.layers.1.self_attn.q_proj.weight"),
                             (1, s1, "model.layers.3.self_attn.o_proj.weight"),
                             (1, s1, "lm_head.weight")]:
        sh = shs[name]
        assert sh.mesh.devices.size == 4
        idx = sh.devices_indices_map(full[name].shape)
        for r in range(4):
            dev = sh.mesh.devices.flat[r]
            got = files[stage * 4 + r][name]
            assert got.tobytes() == np.asarray(full[name][idx[dev]]).tobytes(), (name, stage, r)
        for r in range(8):
            if r // 4 != stage:
                assert name not in files[r]
    all_stages = jr.layout_from_yaml(path, llama)
    assert set(all_stages) == set(s0) | set(s1)


@pytest.mark.parametrize("layout", ["dp2mp4", "dp2mp2", "mp4", "dp2mp2_layout"])
def test_layout_from_strategy_matches_mindspore_rank_files(ms_complete, layout):
    strategy = MS / "strategy" / f"{layout}.ckpt"
    src = MS / "ckpt" / layout
    for params in (MS / "ckpt" / "complete", {n: v.shape for n, v in ms_complete.items()}):
        shardings = jr.layout_from_strategy(strategy, params)
        for name in ["embedding.embedding_table", "layer1.weight", "layer2.weight", "layer1.bias", "norm.gamma"]:
            sh = shardings[name]
            assert isinstance(sh, NamedSharding)
            idx = sh.devices_indices_map(ms_complete[name].shape)
            n = sh.mesh.devices.size
            for r in range(n):
                ranked = ms_full(src / f"rank_{r}" / f"checkpoint_{r}.ckpt")
                dev = sh.mesh.devices.flat[r]
                assert dev == jax.devices()[r]
                exp = np.asarray(ms_complete[name][idx[dev]])
                assert ranked[name].tobytes() == exp.tobytes(), (layout, name, r)
    out = jr.load(src, shardings, src_strategy=strategy)
    for name, sh in shardings.items():
        check_array(out[name], ms_complete[name], sh)


def test_layout_from_strategy_pipeline_stage(ms_complete):
    strategy = MS / "strategy" / "dp1mp2pp2.ckpt"
    src = MS / "ckpt" / "dp1mp2pp2"
    everything = jr.layout_from_strategy(strategy, MS / "ckpt" / "complete")
    staged = {s: jr.layout_from_strategy(strategy, MS / "ckpt" / "complete", stage=s) for s in (0, 1)}
    assert set(staged[0]) | set(staged[1]) == set(everything)
    assert set(staged[0]) != set(staged[1])
    for stage, shs in staged.items():
        for name, sh in shs.items():
            if name not in ("embedding.embedding_table", "layer1.weight", "layer2.weight"):
                continue
            n = sh.mesh.devices.size
            assert n == 2
            idx = sh.devices_indices_map(ms_complete[name].shape)
            for r in range(n):
                ranked = ms_full(src / f"rank_{stage * n + r}" / f"checkpoint_{stage * n + r}.ckpt")
                dev = sh.mesh.devices.flat[r]
                exp = np.asarray(ms_complete[name][idx[dev]])
                assert ranked[name].tobytes() == exp.tobytes(), (name, stage, r)


# ------------------------------------------------------------------------------------------------ jax.distributed

SCRIPT = textwrap.dedent('''
    import os, sys
    pid, port, ckpt, dist, layout = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxreshard as jr
    from jaxreshard.example import llama_params, llama_tensor

    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devs, dtype=object).reshape(2, 4), ("dp", "mp"))
    full = {n: llama_tensor(n, d, s) for n, d, s in llama_params() if not n.startswith("train_state")}
    specs = {
        "model.embed_tokens.weight": P("dp", None),
        "model.layers.0.self_attn.q_proj.weight": P("dp", "mp"),
        "model.layers.1.mlp.down_proj.weight": P(None, ("dp", "mp")),
        "model.layers.2.self_attn.k_proj.weight": P("mp", "dp"),
        "model.norm.weight": P(),
        "lm_head.weight": P("dp"),
    }
    target = {n: NamedSharding(mesh, s) for n, s in specs.items()}

    # count the bytes this process reads from the checkpoint
    import jaxreshard.fill as fill
    read = [0]
    real = fill.read_box
    def counting(handles, entry, box, out):
        read[0] += out.nbytes
        return real(handles, entry, box, out)
    fill.read_box = counting

    def own_bytes():
        total = 0
        for n, sh in target.items():
            boxes = {tuple((s.indices(d)[:2]) for s, d in zip(i, full[n].shape))
                     for i in sh.addressable_devices_indices_map(full[n].shape).values()}
            for b in boxes:
                total += int(np.prod([hi - lo for lo, hi in b])) * full[n].dtype.itemsize
        return total

    for src, kw in ((ckpt, {}), (dist, {"src_layout": layout})):
        read[0] = 0
        out = jr.load(src, target, strict=False, **kw)
        for n, sh in target.items():
            arr = out[n]
            assert arr.sharding == sh, (n, arr.sharding)
            assert arr.shape == full[n].shape
            assert len(arr.addressable_shards) == 4
            for shard in arr.addressable_shards:
                assert shard.device.process_index == pid
                exp = np.asarray(full[n][shard.index])
                got = np.asarray(shard.data)
                assert got.tobytes() == exp.tobytes(), (src, n, shard.index)
        mine, everything = own_bytes(), sum(v.nbytes for n, v in full.items() if n in target)
        assert mine < everything
        print("READ", pid, "dist" if kw else "complete", read[0], mine, everything, flush=True)
    print("OK", pid, flush=True)
    jax.distributed.shutdown()
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(llama, llama_dp2mp4, tmp_path_factory):
    """Run the worker script in 2 `jax.distributed` processes (4 CPU devices each); (returncode, output) each."""
    script = tmp_path_factory.mktemp("dist2") / "worker.py"
    script.write_text(SCRIPT)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(pid), str(port), str(llama), str(llama_dp2mp4),
                          str(LAYOUTS / "llama_dp2mp4.yaml")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for pid in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def test_two_process_jax_distributed(two_processes):
    """Each process gets exactly its own devices' shards, equal to the numpy slices (checked in the worker)."""
    for pid, (rc, out) in enumerate(two_processes):
        assert rc == 0, f"process {pid} failed:\n{out[-4000:]}"
        assert f"OK {pid}" in out


def test_two_process_reads_only_own_bytes(two_processes):
    """The contract: each process reads only the bytes its own devices need (never other processes' blocks)."""
    reads = []
    for pid, (rc, out) in enumerate(two_processes):
        assert rc == 0, f"process {pid} failed:\n{out[-4000:]}"
        for line in out.splitlines():
            if line.startswith("READ "):
                _, p, src, read, mine, everything = line.split()
                reads.append((int(p), src, int(read), int(mine), int(everything)))
    assert len(reads) == 4
    too_much = [r for r in reads if r[2] > r[3]]
    assert not too_much, f"(process, source, bytes read, bytes its devices need, all bytes): {too_much}"


# ------------------------------------------------------------------------------------------------ 64-bit, lifetime


def test_64bit_params_with_x64(llama):
    """With x64 on, int64/float64 parameters load exactly (README: 64-bit follows jax_enable_x64)."""
    mesh = mesh_of((2, 4), ("dp", "mp"))
    full64 = {n: llama_tensor(n, d, s) for n, d, s in llama_params() if n.startswith("train_state.")}
    with jax.enable_x64(True):
        target = {n: NamedSharding(mesh, P()) for n in full64}
        target["model.norm.weight"] = NamedSharding(mesh, P("mp"))
        out = jr.load(llama, target, strict=False)
        for n, v in full64.items():
            check_array(out[n], v, target[n])
        sds = {"train_state.step": jax.ShapeDtypeStruct((), np.int64, sharding=NamedSharding(mesh, P()))}
        out = jr.load(llama, sds, strict=False)
        check_array(out["train_state.step"], full64["train_state.step"], sds["train_state.step"].sharding)


def test_loaded_arrays_outlive_the_reader_and_compute(llama, full):
    """The returned arrays own valid memory after load returns (files closed, buffers dropped) and work in jit."""
    import gc

    target = llama_target("2x4")
    out = jr.load(llama, target, strict=False)
    gc.collect()
    doubled = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x * 2, t))(out)
    gc.collect()
    for name, sharding in target.items():
        check_array(out[name], full[name], sharding)
        assert np.asarray(doubled[name]).tobytes() == (full[name] * full[name].dtype.type(2)).tobytes()
