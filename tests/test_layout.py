import numpy as np
import pytest

from jaxreshard.box import Box
from jaxreshard.errors import LayoutError
from jaxreshard.layout import ParamLayout, layout_from_dict, layout_from_mesh, read_layout

LLAMA_RULES = {
    "mesh": {"dp": 2, "mp": 2},
    "pipeline_stages": 2,
    "params": [
        {"match": r"embed", "spec": ["mp", None], "stage": 0},
        {"match": r"layers\.(\d+)\.w", "spec": [None, "mp"], "stage": "by_layer"},
        {"match": r"layers\.(\d+)\..*", "spec": [], "stage": "by_layer"},
        {"match": r"head", "spec": [["dp", "mp"]], "stage": -1},
    ],
}


def test_resolve_stages_and_specs():
    layout = layout_from_dict(LLAMA_RULES)
    names = ["embed", "layers.0.w", "layers.0.n", "layers.1.w", "layers.2.w", "layers.3.w", "head", "step"]
    got = layout.resolve(names)
    assert layout.devices_per_stage == 4 and layout.num_ranks == 8
    assert got["embed"].spec == (("mp",), ()) and got["embed"].stages == (0,)
    # L = 4 distinct layers, S = 2: stage = layer * 2 // 4
    assert [got[f"layers.{i}.w"].stages for i in range(4)] == [(0,), (0,), (1,), (1,)]
    assert got["layers.0.n"].stages == (0,) and got["layers.0.n"].spec == ()
    assert got["head"].spec == (("dp", "mp"),) and got["head"].stages == (1,)
    # unmatched names are replicated on every stage
    assert got["step"].spec == () and got["step"].stages == (0, 1)
    assert got["layers.3.w"].global_ranks() == [4, 5, 6, 7]


def test_boxes_row_major_ranks():
    pl = ParamLayout((("dp", 2), ("mp", 4)), (("mp",), ()), (0,))
    # local rank r = (dp, mp) = divmod(r, 4): mp block r % 4
    assert [pl.box((8, 3), r) for r in (0, 1, 5)] == [
        Box((0, 0), (2, 3)),
        Box((2, 0), (4, 3)),
        Box((2, 0), (4, 3)),
    ]
    multi = ParamLayout((("dp", 2), ("mp", 4)), (("dp", "mp"),), (0,))
    assert [multi.box((16,), r).start[0] for r in range(8)] == [0, 2, 4, 6, 8, 10, 12, 14]
    minor_major = ParamLayout((("dp", 2), ("mp", 4)), (("mp", "dp"),), (0,))
    # mp major, dp minor: block = mp * 2 + dp
    assert [minor_major.box((16,), r).start[0] // 2 for r in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


SPECS = [
    (("mp",), ()),
    ((), ("mp",)),
    (("dp", "mp"), ()),
    (("mp", "dp"),),
    (("dp",), ("mp",)),
    (),
]


@pytest.mark.parametrize("spec", SPECS)
def test_boxes_match_jax_named_sharding(spec):
    """Our rank -> box rule is exactly JAX's device -> index rule on a row-major mesh."""
    import jax
    from jax.sharding import Mesh, NamedSharding

    pl = ParamLayout((("dp", 2), ("mp", 4)), spec, (0,))
    devices = np.array(jax.devices("cpu")[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("dp", "mp"))
    shape = (16, 8)
    index_map = NamedSharding(mesh, pl.partition_spec()).devices_indices_map(shape)
    for rank, device in enumerate(devices.flat):
        assert pl.box(shape, rank) == Box.from_index(index_map[device], shape)


def test_check_shape_errors_name_param():
    pl = ParamLayout((("mp", 4),), (("mp",), ()), (0,))
    with pytest.raises(LayoutError, match=r"'w' dim 0 of size 6 cannot be split 4 ways"):
        pl.check_shape("w", (6, 4))
    with pytest.raises(LayoutError, match=r"'b' has shape \[8\]"):
        pl.check_shape("b", (8,))
    pl.check_shape("w", (8, 3))


@pytest.mark.parametrize(
    "params, message",
    [
        ([{"match": "w", "spec": ["tp"]}], "unknown mesh axis 'tp'"),
        ([{"match": "w", "spec": ["mp", "mp"]}], "used twice"),
        ([{"match": "w", "spec": [3]}], "must be an axis name"),
        ([{"match": "(", "spec": []}], "bad regex"),
        ([{"match": "w", "spec": [], "stage": 5}], "stage must be"),
        ([{"match": "w", "spec": [], "color": 1}], "unknown keys"),
        ([{"spec": []}], "needs a 'match'"),
    ],
)
def test_bad_layouts(params, message):
    with pytest.raises(LayoutError, match=message):
        layout_from_dict({"mesh": {"mp": 2}, "params": params}, "x.yaml")


def test_by_layer_needs_integer_group():
    layout = layout_from_dict({"mesh": {"mp": 1}, "pipeline_stages": 2,
                               "params": [{"match": r"(\w+)\.w", "spec": [], "stage": "by_layer"}]})
    with pytest.raises(LayoutError, match="integer layer index"):
        layout.resolve(["a.w"])


def test_read_layout_files(tmp_path):
    path = tmp_path / "l.yaml"
    path.write_text("mesh: {dp: 2, mp: 4}\nparams:\n  - {match: 'a', spec: [mp, null]}\n")
    layout = read_layout(path)
    assert layout.mesh_axes == (("dp", 2), ("mp", 4)) and layout.pipeline_stages == 1
    (tmp_path / "bad.yaml").write_text("mesh: [1, 2\n")
    with pytest.raises(LayoutError, match="not valid YAML"):
        read_layout(tmp_path / "bad.yaml")
    with pytest.raises(LayoutError, match="cannot read"):
        read_layout(tmp_path / "missing.yaml")


def test_shipped_layouts_parse():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs" / "layouts").glob("llama_*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert read_layout(path).num_ranks == 8, path
    assert read_layout(files[0].parent / "fixture_dp2mp4pp2.yaml").num_ranks == 16


def test_layout_from_mesh():
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(4, 2), ("x", "y"))
    layout = layout_from_mesh(mesh, {r"w\d": P("x", None), "b": P(("x", "y"))})
    got = layout.resolve(["w1", "b", "other"])
    assert got["w1"].spec == (("x",), ()) and got["b"].spec == (("x", "y"),) and got["other"].spec == ()


# ------------------------------------------------------------------------------------------------ validation


def test_by_layer_uses_position_among_sorted_distinct_indices():
    """Indices {0, 1, 10, 11} on 2 stages: positions 0..3 -> stages 0, 0, 1, 1 (index * 2 // 4 would put 10
    and 11 on stages 5 and 5, i.e. on no rank at all)."""
    layout = layout_from_dict({"mesh": {"mp": 1}, "pipeline_stages": 2,
                               "params": [{"match": r"l\.(\d+)\.w", "spec": [], "stage": "by_layer"}]})
    got = layout.resolve(["l.11.w", "l.0.w", "l.10.w", "l.1.w"])
    assert {name: pl.stages for name, pl in got.items()} == {
        "l.0.w": (0,), "l.1.w": (0,), "l.10.w": (1,), "l.11.w": (1,)}
    assert {s for pl in got.values() for s in pl.stages} <= set(range(layout.pipeline_stages))


def test_by_layer_dense_indices_unchanged():
    """0..7 on 4 stages gives index * 4 // 8, as before (existing layouts keep their placement)."""
    layout = layout_from_dict({"mesh": {"mp": 1}, "pipeline_stages": 4,
                               "params": [{"match": r"l\.(\d+)", "spec": [], "stage": "by_layer"}]})
    got = layout.resolve([f"l.{i}" for i in range(8)])
    assert [got[f"l.{i}"].stages[0] for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"mesh": {"dp": 0}}, r"mesh axis 'dp' has size 0"),
        ({"mesh": {"dp": -2}}, r"mesh axis 'dp' has size -2"),
        ({"mesh": {"dp": True}}, r"mesh axis 'dp' has size True"),
        ({"mesh": {"dp": 2.0}}, r"mesh axis 'dp' has size 2.0"),
        ({"mesh": {"dp": "4"}}, r"mesh axis 'dp' has size '4'"),
        ({"mesh": {"dp": 65536}}, r"over 16384 devices"),
        ({"mesh": {"a": 1024, "b": 1024}}, r"over 16384 devices"),
        ({"mesh": {f"a{i}": 1 for i in range(33)}}, r"33 axes, over the cap of 32"),
        ({"mesh": {"dp": 8}, "pipeline_stages": 4096}, r"4096 pipeline stages x 8 devices = 32768 ranks"),
        ({"mesh": {"dp": 8}, "pipeline_stages": True}, r"pipeline_stages must be a positive integer"),
        ({"mesh": {"dp": 8}, "pipeline_stages": 0}, r"pipeline_stages must be a positive integer"),
        ({"mesh": [2, 4]}, r"mesh must map axis names"),
        ({"mesh": {1: 2}}, r"axis name 1 must be a non-empty string"),
        ({"params": "all"}, r"params must be a list"),
        ({"params": [{"match": 5, "spec": []}]}, r"match must be a regex string"),
        ({"params": [{"match": r"(a+)+$", "spec": []}]}, r"nests a repeat"),
        ({"params": [{"match": r"(.*)*x", "spec": []}]}, r"nests a repeat"),
        ({"params": [{"match": r"(a|aa)*b", "spec": []}]}, r"alternation"),
        ({"params": [{"match": r".*.*.*.*x", "spec": []}]}, r"4 unbounded repeats"),
        ({"params": [{"match": "a" * 2000, "spec": []}]}, r"over the cap of 1024"),
        ({"params": [{"match": "w", "spec": [], "stage": True}]}, r"stage must be"),
    ],
)
def test_refused_layouts(data, message):
    with pytest.raises(LayoutError, match=message):
        layout_from_dict(data, "x.yaml")


def test_largest_layout_plans_fast():
    """The cap is measured: a layout of exactly MAX_RANKS ranks resolves and gives its boxes at once."""
    import time

    from jaxreshard.caps import MAX_RANKS

    layout = layout_from_dict({"mesh": {"dp": MAX_RANKS // 4, "mp": 4}, "params": [{"match": "w", "spec": ["mp"]}]})
    start = time.monotonic()
    pl = layout.resolve(["w"])["w"]
    boxes = {pl.box((8,), r).start[0] for r in pl.global_ranks()}
    assert layout.num_ranks == MAX_RANKS and boxes == {0, 2, 4, 6}
    assert time.monotonic() - start < 5


def test_long_names_refused_before_matching():
    from jaxreshard.caps import MAX_NAME_CHARS

    layout = layout_from_dict({"params": [{"match": r".*x", "spec": []}]}, "x.yaml")
    assert layout.resolve(["a" * MAX_NAME_CHARS])  # at the cap: matched (and fast)
    with pytest.raises(LayoutError, match=f"over the cap of {MAX_NAME_CHARS}"):
        layout.resolve(["a" * (MAX_NAME_CHARS + 1)])


def test_worst_accepted_regex_matches_fast():
    """Three adjacent unbounded repeats (the most accepted) on a name at the length cap stay well under a second."""
    import time

    from jaxreshard.caps import MAX_NAME_CHARS

    layout = layout_from_dict({"params": [{"match": r"\w*\w*\w*!", "spec": []}]}, "x.yaml")
    start = time.monotonic()
    layout.resolve(["a" * MAX_NAME_CHARS])
    assert time.monotonic() - start < 3


def test_layout_constructed_directly_is_checked():
    from jaxreshard.layout import Layout

    with pytest.raises(LayoutError, match="size 0"):
        Layout((("dp", 0),), 1, ())
    with pytest.raises(LayoutError, match="over 16384 devices"):
        Layout((("dp", 2**20),), 1, ())


def test_layout_from_mesh_is_checked():
    class FakeMesh:  # only the two attributes layout_from_mesh reads
        axis_names = ("x",)
        devices = np.empty((4,))

    assert layout_from_mesh(FakeMesh(), {"w": ["x"]}).num_ranks == 4
    with pytest.raises(LayoutError, match="nests a repeat"):
        layout_from_mesh(FakeMesh(), {"(a+)+": ["x"]})
    with pytest.raises(LayoutError, match="pipeline_stages must be"):
        layout_from_mesh(FakeMesh(), {"w": ["x"]}, pipeline_stages=0)
    with pytest.raises(LayoutError, match="not a jax.sharding.Mesh"):
        layout_from_mesh(object(), {"w": ["x"]})
    with pytest.raises(LayoutError, match="must be a PartitionSpec or a list"):
        layout_from_mesh(FakeMesh(), {"w": 3})


def test_read_layout_refuses_fifo_and_aliases(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(LayoutError, match="not a regular file"):
        read_layout(tmp_path / "fifo.yaml")
    (tmp_path / "ok.yaml").write_text("mesh: {mp: 2}\nparams:\n"
                                      "  - {match: a, spec: &s [mp]}\n  - {match: b, spec: *s}\n")
    assert read_layout(tmp_path / "ok.yaml").resolve(["b"])["b"].spec == (("mp",),)


def test_by_layer_with_gaps_keeps_every_layer_end_to_end(tmp_path):
    """The issue's case through the CLI: layers {0, 1, 10, 11} on 2 stages; before the fix layers 10 and 11 were
    written to no rank at all. Every tensor must come back whole and equal after split and merge."""
    from safetensors.numpy import load_file, save_file

    from jaxreshard.cli import main

    tensors = {f"l.{i}.w": np.full((4, 2), i, dtype=np.float32) for i in (0, 1, 10, 11)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "pp2.yaml").write_text(
        "mesh: {mp: 2}\npipeline_stages: 2\nparams:\n  - {match: 'l\\.(\\d+)\\.w', spec: [mp], stage: by_layer}\n")
    split = ["convert", "--src", str(tmp_path / "model.safetensors"), "--dst", str(tmp_path / "pp"),
             "--dst-layout", str(tmp_path / "pp2.yaml"), "-q"]
    assert main(split) == 0
    stage1 = load_file(str(next((tmp_path / "pp" / "rank_2").glob("*.safetensors"))))
    assert sorted(stage1) == ["l.10.w", "l.11.w"]
    assert main(["convert", "--src", str(tmp_path / "pp"), "--src-layout", str(tmp_path / "pp2.yaml"),
                 "--dst", str(tmp_path / "whole"), "-q"]) == 0
    merged = load_file(str(next((tmp_path / "whole").rglob("*.safetensors"))))
    assert sorted(merged) == sorted(tensors) and all(np.array_equal(merged[k], v) for k, v in tensors.items())
