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
