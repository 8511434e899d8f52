"""Split, reshard and merge over a grid of layouts on 8 fake CPU devices.

Expected shards come from JAX itself (`NamedSharding.devices_indices_map` on a row-major mesh), not from
jaxreshard's own box code, and every chain must return the original bytes exactly.
"""


import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxreshard
from jaxreshard.formats.manifest import MANIFEST_NAME
from jaxreshard.layout import layout_from_dict

DTYPES = {
    "embed": (np.float32, (16, 8)),
    "layers.0.w": (ml_dtypes.bfloat16, (8, 16)),
    "layers.1.w": (np.float16, (8, 16)),
    "layers.2.w": (np.float64, (16, 8)),
    "layers.3.w": (np.int32, (8, 8)),
    "layers.0.norm": (np.int8, (8,)),
    "layers.1.norm": (np.uint8, (8,)),
    "layers.2.norm": (np.int16, (8,)),
    "layers.3.norm": (np.uint16, (8,)),
    "head": (np.uint32, (8, 8)),
    "mask": (np.bool_, (8, 8)),
    "big": (np.uint64, (16,)),
    "counter": (np.int64, ()),
    "scale": (np.float32, ()),
}


def make_tensors(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dtype, shape) in DTYPES.items():
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
        arr = raw.view(dtype).reshape(shape)  # arbitrary bit patterns, NaNs included: bytes must survive
        if dtype == np.bool_:
            arr = (raw % 2).astype(np.bool_).reshape(shape)
        out[name] = arr
    return out


def rules(row, col, vec, stage=None):
    """Layout rules: `row`/`col`/`vec` are spec entries (axis, list of axes, or None)."""
    st = {} if stage is None else {"stage": stage}
    return [
        {"match": r"embed", "spec": [row, None], **({} if stage is None else {"stage": 0})},
        {"match": r"layers\.(\d+)\.w", "spec": [None, col], **st},
        {"match": r"layers\.(\d+)\.norm", "spec": [vec], **st},
        {"match": r"head", "spec": [row, None], **({} if stage is None else {"stage": -1})},
        {"match": r"mask", "spec": [None, col]},
        {"match": r"big", "spec": [vec]},
    ]


LAYOUTS = {
    "dp8": {"mesh": {"dp": 8}, "params": rules(None, None, None)},
    "mp8": {"mesh": {"mp": 8}, "params": rules("mp", "mp", "mp")},
    "dp2mp4": {"mesh": {"dp": 2, "mp": 4}, "params": rules("mp", "mp", "mp")},
    "mp4dp2": {"mesh": {"mp": 4, "dp": 2}, "params": rules("mp", "dp", ["mp", "dp"])},
    "axes_list": {"mesh": {"a": 2, "b": 4}, "params": rules(["a", "b"], ["b", "a"], "b")},
    "dp2mp2pp2": {"mesh": {"dp": 2, "mp": 2}, "pipeline_stages": 2, "params": rules("mp", "mp", "dp", "by_layer")},
    "mp2pp4": {"mesh": {"mp": 2}, "pipeline_stages": 4, "params": rules("mp", "mp", "mp", "by_layer")},
}


def expected_stages(layout, name):
    """Stage of `name` computed here from the layout dict, independently of jaxreshard."""
    stages = layout.get("pipeline_stages", 1)
    for rule in layout["params"]:
        import re

        m = re.fullmatch(rule["match"], name)
        if m:
            stage = rule.get("stage", 0)
            if stage == "by_layer":
                return [int(m.group(1)) * stages // 4]
            return [stage % stages]
    return list(range(stages))


def expected_shard(layout, name, full, local_rank):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    spec = next((r["spec"] for r in layout["params"] if __import__("re").fullmatch(r["match"], name)), [])
    sizes = list(layout["mesh"].values())
    n = int(np.prod(sizes))
    mesh = Mesh(np.array(jax.devices("cpu")[:n]).reshape(sizes), tuple(layout["mesh"]))
    pspec = PartitionSpec(*[tuple(e) if isinstance(e, list) else e for e in spec])
    index = NamedSharding(mesh, pspec).devices_indices_map(full.shape)[mesh.devices.flat[local_rank]]
    return full[index]


def check_distributed(dst, layout, tensors):
    n = int(np.prod(list(layout["mesh"].values())))
    stages = layout.get("pipeline_stages", 1)
    for rank in range(n * stages):
        got = load_file(str(dst / f"rank_{rank}" / f"checkpoint_{rank}.safetensors"))
        want = [p for p in tensors if rank // n in expected_stages(layout, p)]
        assert sorted(got) == sorted(want), rank
        for name in want:
            exp = expected_shard(layout, name, tensors[name], rank % n)
            assert got[name].dtype == exp.dtype and got[name].shape == exp.shape, (rank, name)
            assert got[name].tobytes() == exp.tobytes(), (rank, name)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    tensors = make_tensors()
    save_file(tensors, str(root / "full.safetensors"))
    return root / "full.safetensors", tensors


@pytest.fixture(scope="module")
def splits(source, tmp_path_factory):
    """complete -> every layout, checked shard by shard."""
    path, tensors = source
    root = tmp_path_factory.mktemp("splits")
    out = {}
    for name, layout in LAYOUTS.items():
        dst = root / name
        jaxreshard.convert(path, dst, dst_layout=layout_from_dict(layout, name))
        out[name] = dst
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_split_matches_numpy_slices(source, splits, name):
    check_distributed(splits[name], LAYOUTS[name], source[1])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_merge_returns_original_bytes(source, splits, name, tmp_path):
    path, tensors = source
    jaxreshard.convert(splits[name], tmp_path / "m", src_layout=layout_from_dict(LAYOUTS[name], name))
    merged = tmp_path / "m" / "rank_0" / "checkpoint_0.safetensors"
    got = load_file(str(merged))
    original_order = list(load_file(str(path)))
    if LAYOUTS[name].get("pipeline_stages", 1) == 1:
        assert list(got) == original_order
    else:  # stages hold disjoint slices of the order; where they leave it ambiguous any consistent order is fine
        assert sorted(got) == sorted(original_order)
    for name_, arr in tensors.items():
        assert got[name_].dtype == arr.dtype and got[name_].tobytes() == arr.tobytes()


PAIRS = [
    ("dp2mp4", "mp8"),
    ("mp8", "axes_list"),
    ("axes_list", "dp2mp2pp2"),
    ("dp2mp2pp2", "mp2pp4"),
    ("mp2pp4", "mp4dp2"),
    ("mp4dp2", "dp8"),
    ("dp8", "dp2mp2pp2"),
]


@pytest.mark.parametrize("a, b", PAIRS)
def test_reshard_then_merge(source, splits, a, b, tmp_path):
    _, tensors = source
    la, lb = layout_from_dict(LAYOUTS[a], a), layout_from_dict(LAYOUTS[b], b)
    jaxreshard.convert(splits[a], tmp_path / "b", src_layout=la, dst_layout=lb)
    check_distributed(tmp_path / "b", LAYOUTS[b], tensors)
    jaxreshard.convert(tmp_path / "b", tmp_path / "c", src_layout=lb)
    merged = load_file(str(tmp_path / "c" / "rank_0" / "checkpoint_0.safetensors"))
    assert all(merged[k].tobytes() == v.tobytes() for k, v in tensors.items())


def test_split_merge_file_is_byte_identical(tmp_path):
    """Through pipeline stages and back, even the file bytes (order, header) are restored."""
    from jaxreshard.example import write_llama_checkpoint

    src = write_llama_checkpoint(tmp_path / "full.safetensors")
    layouts = [layout_from_dict(LAYOUTS[n], n) for n in ("dp2mp2pp2", "mp8")]
    jaxreshard.convert(src, tmp_path / "a", dst_layout=layouts[0])
    jaxreshard.convert(tmp_path / "a", tmp_path / "b", src_layout=layouts[0], dst_layout=layouts[1])
    jaxreshard.convert(tmp_path / "b", tmp_path / "c", src_layout=layouts[1])
    assert (tmp_path / "c" / "rank_0" / "checkpoint_0.safetensors").read_bytes() == src.read_bytes()


def test_source_files_unchanged(source, splits, tmp_path):
    import hashlib

    files = sorted(p for p in splits["dp2mp4"].rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    jaxreshard.convert(splits["dp2mp4"], tmp_path / "x", src_layout=layout_from_dict(LAYOUTS["dp2mp4"]))
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in files] == before
