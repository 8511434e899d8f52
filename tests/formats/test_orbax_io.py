"""Orbax in and out: `convert --output-format orbax` writes a standard orbax checkpoint that plain
`orbax-checkpoint` restores into any sharding; orbax checkpoints are `convert` sources.

Values are checked against the example generator and the `safetensors` package, never jaxreshard's reader;
orbax is used only through its public v1 API (`ocp.save`, `ocp.load`, `ocp.metadata`, `ocp.Context`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import jaxreshard as jr
from jaxreshard.cli import main
from jaxreshard.example import llama_params, llama_tensor
from jaxreshard.formats.manifest import MANIFEST_NAME

from ..helpers import nest

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = REPO / "configs" / "layouts"
DP2MP4 = str(LAYOUTS / "llama_dp2mp4.yaml")
MS = REPO / "tests" / "fixtures" / "mindspore"
BF16 = np.dtype(ml_dtypes.bfloat16)


def mesh_of(shape, axes):
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    n = int(np.prod(shape))
    return Mesh(np.array(devs[:n], dtype=object).reshape(shape), axes)




def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def like_checkpoint(path, leaves: dict) -> dict:
    """`leaves` (dotted name -> value) arranged in the tree structure the checkpoint's metadata has, as a plain
    orbax user would build an abstract tree (only the given names: use partial_load for a subset)."""
    meta = ocp.metadata(str(path)).metadata

    def walk(node, prefix):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                sub = walk(v, f"{prefix}{k}.")
                if sub is not None:
                    out[k] = sub
            return out or None
        return leaves.get(prefix[:-1])

    tree = walk(meta, "")
    assert set(flatten(tree)) == set(leaves), "names not in the checkpoint"
    return tree


def check_array(arr, full: np.ndarray, sharding) -> None:
    assert arr.sharding == sharding, (arr.sharding, sharding)
    assert arr.shape == full.shape and np.dtype(arr.dtype) == full.dtype
    for shard in arr.addressable_shards:
        exp = np.asarray(full[shard.index])
        got = np.asarray(shard.data)
        assert got.shape == exp.shape and got.tobytes() == exp.tobytes(), (shard.device, shard.index)


@pytest.fixture(scope="module")
def full():
    return {n: llama_tensor(n, d, s) for n, d, s in llama_params()}


@pytest.fixture(scope="module")
def orbax_out(llama, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("orbax") / "ck"
    rc = main(["convert", "--src", str(llama), "--dst", str(dst), "--dst-layout", DP2MP4, "--output-format", "orbax",
               "-q"])
    assert rc == 0
    return dst


# ------------------------------------------------------------------------------------------------ writing orbax


def test_written_orbax_is_standard_checkpoint(orbax_out, full):
    assert ocp.is_orbax_checkpoint(str(orbax_out))
    meta = flatten(ocp.metadata(str(orbax_out)).metadata)
    assert set(meta) == set(full)
    for name, value in full.items():
        assert tuple(meta[name].shape) == value.shape, name
        assert np.dtype(meta[name].dtype) == value.dtype, name  # 64-bit params stay 64-bit


def test_metadata_records_destination_sharding(orbax_out):
    meta = flatten(ocp.metadata(str(orbax_out)).metadata)
    for name, spec in [("model.layers.0.self_attn.q_proj.weight", ("mp", None)),
                       ("model.layers.1.self_attn.o_proj.weight", (None, "mp")),
                       ("model.embed_tokens.weight", ("mp", None))]:
        sm = meta[name].sharding_metadata
        assert sm is not None, name
        assert tuple(sm.partition_spec) == spec, (name, sm)
        assert list(sm.axis_names) == ["dp", "mp"]
        assert [int(x) for x in np.asarray(sm.shape).reshape(-1)] == [2, 4]
    sm = meta["model.norm.weight"].sharding_metadata
    assert tuple(sm.partition_spec) in ((), (None,))  # replicated


def test_plain_orbax_restores_into_different_sharding(orbax_out, full):
    mesh = mesh_of((4, 2), ("a", "b"))
    specs = {
        "model.embed_tokens.weight": P(None, ("a", "b")),
        "model.layers.0.self_attn.q_proj.weight": P("b", "a"),
        "model.layers.1.self_attn.o_proj.weight": P("a"),
        "model.layers.3.mlp.down_proj.weight": P(None, "a"),
        "model.norm.weight": P("b"),
        "lm_head.weight": P(),
    }
    abstract = {n: jax.ShapeDtypeStruct(full[n].shape, full[n].dtype, sharding=NamedSharding(mesh, s))
                for n, s in specs.items()}
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        restored = flatten(ocp.load(str(orbax_out), like_checkpoint(orbax_out, abstract)))
    assert set(restored) == set(specs)
    for n in specs:
        check_array(restored[n], full[n], abstract[n].sharding)


def test_plain_orbax_restores_everything_into_one_device(orbax_out, full):
    """A full restore (no partial load) of every parameter, 64-bit ones included. JAX's `enable_x64` context is
    thread-local and orbax restores in its own threads, so the global flag is set (and reset)."""
    mesh = mesh_of((1,), ("x",))
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        abstract = {n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P()))
                    for n, v in full.items()}
        restored = flatten(ocp.load(str(orbax_out), like_checkpoint(orbax_out, abstract)))
        for n, v in full.items():
            got = np.asarray(restored[n])
            assert got.dtype == v.dtype and got.tobytes() == v.tobytes(), n
    finally:
        jax.config.update("jax_enable_x64", before)


def test_orbax_to_safetensors_round_trip_keeps_every_byte(orbax_out, llama, tmp_path, full):
    back = tmp_path / "back"
    assert main(["convert", "--src", str(orbax_out), "--dst", str(back), "-q"]) == 0
    (f,) = list(back.rglob("*.safetensors"))
    got = load_file(str(f))
    orig = load_file(str(llama))
    assert set(got) == set(orig)
    for n, v in orig.items():
        assert got[n].dtype == v.dtype and got[n].shape == v.shape, n
        assert got[n].tobytes() == v.tobytes(), n
    assert got["train_state.step"].dtype == np.int64 and got["train_state.loss_scale"].dtype == np.float64
    assert got["train_state.step"].tobytes() == full["train_state.step"].tobytes()


def test_orbax_to_safetensors_round_trip_is_the_identical_file(orbax_out, llama, tmp_path):
    """Parameter order survives too: orbax -> complete safetensors gives back the original file."""
    back = tmp_path / "back"
    assert main(["convert", "--src", str(orbax_out), "--dst", str(back), "-q"]) == 0
    (f,) = list(back.rglob("*.safetensors"))
    assert f.read_bytes() == Path(llama).read_bytes()


def test_orbax_source_to_rank_files_equals_direct_conversion(orbax_out, llama, tmp_path):
    via = tmp_path / "via_orbax"
    direct = tmp_path / "direct"
    layout = str(LAYOUTS / "llama_dp2mp2pp2.yaml")
    jr.convert(orbax_out, via, dst_layout=layout)
    jr.convert(llama, direct, dst_layout=layout)
    via_files = sorted(p.relative_to(via) for p in via.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    direct_files = sorted(p.relative_to(direct) for p in direct.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    assert via_files == direct_files and len(via_files) == 8
    # tensor by tensor first (clear message), then the files byte for byte
    for rel in direct_files:
        a, b = load_file(str(via / rel)), load_file(str(direct / rel))
        assert set(a) == set(b), rel
        for n in b:
            assert a[n].dtype == b[n].dtype and a[n].tobytes() == b[n].tobytes(), (rel, n)
    for rel in direct_files:
        assert (via / rel).read_bytes() == (direct / rel).read_bytes(), rel


def test_orbax_source_from_plain_orbax_save(tmp_path, full):
    """A checkpoint written by plain `ocp.save` of sharded jax arrays converts to per-rank files."""
    mesh = mesh_of((2, 4), ("dp", "mp"))
    arrays = {n: jax.device_put(v, NamedSharding(mesh, P("mp") if v.ndim and v.shape[0] % 4 == 0 else P()))
              for n, v in full.items() if not n.startswith("train_state")}
    src = tmp_path / "plain"
    ocp.save(str(src), nest(arrays))
    dst = tmp_path / "ranks"
    jr.convert(src, dst, dst_layout=DP2MP4)
    mesh24 = mesh_of((2, 4), ("dp", "mp"))
    shardings = jr.layout_from_yaml(DP2MP4, {n: a.shape for n, a in arrays.items()}, devices=list(mesh24.devices.flat))
    for r in range(8):
        (f,) = list((dst / f"rank_{r}").glob("*.safetensors"))
        got = load_file(str(f))
        assert set(got) == set(arrays)
        for n in ["model.embed_tokens.weight", "model.layers.2.self_attn.o_proj.weight", "model.norm.weight"]:
            sh = shardings[n]
            idx = sh.devices_indices_map(full[n].shape)[sh.mesh.devices.flat[r]]
            assert got[n].tobytes() == np.asarray(full[n][idx]).tobytes(), (n, r)


def test_orbax_output_with_dtype_cast(llama, tmp_path, full):
    dst = tmp_path / "bf16"
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--output-format", "orbax", "--dtype", "bf16",
                 "-q"]) == 0
    meta = flatten(ocp.metadata(str(dst)).metadata)
    assert np.dtype(meta["model.norm.weight"].dtype) == BF16
    assert np.dtype(meta["train_state.step"].dtype) == np.int64
    mesh = mesh_of((8,), ("x",))
    names = ["model.norm.weight", "lm_head.weight"]
    abstract = {n: jax.ShapeDtypeStruct(full[n].shape, BF16, sharding=NamedSharding(mesh, P("x"))) for n in names}
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        restored = flatten(ocp.load(str(dst), like_checkpoint(dst, abstract)))
    for n in names:
        check_array(restored[n], full[n].astype(BF16), abstract[n].sharding)


def test_orbax_output_from_mindspore_with_strategy(tmp_path):
    from jaxreshard.box import Box
    from jaxreshard.formats.base import FileHandles, aligned_empty, read_box
    from jaxreshard.formats.mindspore_ckpt import read_ckpt_index

    dst = tmp_path / "ms_orbax"
    jr.convert(MS / "ckpt" / "dp2mp4", dst, src_strategy=MS / "strategy" / "dp2mp4.ckpt", output_format="orbax")
    index = read_ckpt_index(MS / "ckpt" / "complete" / "rank_0" / "checkpoint_0.ckpt")
    complete = {}
    with FileHandles() as h:
        for n, e in index.tensors.items():
            buf = aligned_empty(e.shape, e.dtype)
            read_box(h, e, Box.full(e.shape), buf)
            complete[n] = np.array(buf)
    mesh = mesh_of((2, 4), ("dp", "mp"))
    abstract = {n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P()))
                for n, v in complete.items()}
    restored = flatten(ocp.load(str(dst), like_checkpoint(dst, abstract)))
    assert set(restored) == set(complete)
    for n, v in complete.items():
        check_array(restored[n], v, abstract[n].sharding)


# ------------------------------------------------------------------------------------------------ errors


def test_existing_destination_without_overwrite(orbax_out, llama, capsys):
    before = sorted(p.relative_to(orbax_out) for p in orbax_out.rglob("*"))
    rc = main(["convert", "--src", str(llama), "--dst", str(orbax_out), "--output-format", "orbax", "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "overwrite" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(orbax_out) for p in orbax_out.rglob("*")) == before
    assert not list(orbax_out.parent.glob(".*partial*"))


def test_overwrite_replaces_orbax_destination(llama, tmp_path, full):
    dst = tmp_path / "ck"
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--output-format", "orbax", "-q"]) == 0
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--output-format", "orbax", "--dtype", "fp32",
                 "--overwrite", "-q"]) == 0
    meta = flatten(ocp.metadata(str(dst)).metadata)
    assert np.dtype(meta["lm_head.weight"].dtype) == np.float32


@pytest.mark.parametrize("how", ["garbage_metadata", "no_state", "empty_state"])
def test_broken_orbax_like_dir_is_a_clean_error(tmp_path, capsys, how):
    src = tmp_path / "broken"
    src.mkdir()
    (src / "_CHECKPOINT_METADATA").write_text("{not json" if how == "garbage_metadata" else "{}")
    if how == "empty_state":
        (src / "state").mkdir()
    rc = main(["convert", "--src", str(src), "--dst", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and str(src) in err
    mesh = mesh_of((1,), ("x",))
    with pytest.raises(jr.JaxreshardError):
        jr.load(src, {"a": NamedSharding(mesh, P())})
    assert not (tmp_path / "out").exists()


# orbax itself leaves asyncio callbacks behind when its metadata read fails ("Event loop is closed", raised in
# its own threads): that noise is orbax's, not what this test is about.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["no_data", "empty_data", "no_manifests"])
def test_damaged_orbax_checkpoint_is_a_clean_error(orbax_out, tmp_path, capsys, damage, drain_orbax_threads):
    """A real orbax checkpoint with its data or its OCDBT manifests gone: exit 2 with one line, no output."""
    import shutil

    src = tmp_path / "damaged"
    shutil.copytree(orbax_out, src)
    state = src / "state"
    data = [p for p in state.rglob("*") if p.is_file() and p.name != MANIFEST_NAME and p.parent.name == "d"]
    manifests = [p for p in state.rglob("manifest.ocdbt")]
    assert data and manifests
    for p in data if damage != "no_manifests" else manifests:
        if damage == "empty_data":
            p.write_bytes(b"")
        else:
            p.unlink()
    rc = main(["convert", "--src", str(src), "--dst", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    mesh = mesh_of((1,), ("x",))
    with pytest.raises(jr.JaxreshardError):
        jr.load(src, {"lm_head.weight": NamedSharding(mesh, P())}, strict=False)


@pytest.fixture
def drain_orbax_threads():
    """Let orbax's leftover callbacks fail in this test's teardown (where they are ignored), not in the next test."""
    import gc
    import time

    yield
    for _ in range(10):
        time.sleep(0.05)
        gc.collect()


def test_orbax_output_rejects_ranks(llama, tmp_path):
    rc = main(["convert", "--src", str(llama), "--dst", str(tmp_path / "o"), "--dst-layout", DP2MP4,
               "--output-format", "orbax", "--ranks", "0-3", "-q"])
    assert rc == 2


def test_orbax_source_with_ranks_writes_only_those(orbax_out, tmp_path):
    dst = tmp_path / "some"
    rc = main(["convert", "--src", str(orbax_out), "--dst", str(dst), "--dst-layout", DP2MP4, "--ranks", "2-3", "-q"])
    assert rc == 0
    assert sorted(p.name for p in dst.iterdir() if p.name != MANIFEST_NAME) == ["rank_2", "rank_3"]


def test_relative_paths_for_orbax_output_and_source(llama, tmp_path, monkeypatch):
    """orbax itself refuses relative paths; jaxreshard makes them absolute (before: a traceback on output and a
    false "damaged orbax checkpoint" on input)."""
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "--src", str(llama), "--dst", "rel_orbax", "--output-format", "orbax", "-q"]) == 0
    assert ocp.is_orbax_checkpoint(str(tmp_path / "rel_orbax"))
    assert main(["convert", "--src", "rel_orbax", "--dst", "back", "-q"]) == 0
    (f,) = list((tmp_path / "back").rglob("*.safetensors"))
    assert f.read_bytes() == Path(llama).read_bytes()
