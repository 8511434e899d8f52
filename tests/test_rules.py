"""Transform rules (rules.py, composed.py): rename, transpose, stack and concat while converting or loading,
checked against numpy references, and `--reverse` back byte for byte."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxreshard as jr
from jaxreshard.api import plan_conversion
from jaxreshard.cli import main
from jaxreshard.errors import PlanError
from jaxreshard.rulemap import apply_rules
from jaxreshard.rules import Rules

E, H, F = 4, 8, 16  # experts, hidden, ffn
BF16 = ml_dtypes.bfloat16


def moe_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {"model.embed_tokens.weight": rng.standard_normal((32, H)).astype(BF16)}
    for layer in range(2):
        p = f"model.layers.{layer}"
        out[f"{p}.self_attn.q_proj.weight"] = rng.standard_normal((H, H)).astype(np.float32)
        for e in range(E):
            for w, shape in (("w1", (F, H)), ("w2", (H, F)), ("w3", (F, H))):
                out[f"{p}.block_sparse_moe.experts.{e}.{w}.weight"] = rng.standard_normal(shape).astype(BF16)
        out[f"{p}.input_layernorm.weight"] = rng.standard_normal(H).astype(np.float32)
    return out


def write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


STACK = {"rules": [{"from": "{p}.experts.{e}.{w}.weight", "to": "{p}.experts.{w}", "stack": "e", "axis": 0}]}
STACK_T = {"rules": [{"from": "{p}.experts.{e}.{w}.weight", "to": "{p}.experts.{w}.kernel", "stack": "e", "axis": 0,
                      "transpose": [1, 0]},
                     {"from": "{p}_proj.weight", "to": "{p}_proj.kernel", "transpose": [1, 0]},
                     {"from": "model.embed_tokens.weight", "to": "model.embed_tokens.embedding"}]}


def expected_stacked(src: dict[str, np.ndarray], transpose: bool) -> dict[str, np.ndarray]:
    """The numpy reference of STACK / STACK_T."""
    out = {}
    for name, t in src.items():
        if ".experts." in name:
            continue
        if transpose and name.endswith("_proj.weight"):
            out[name.replace(".weight", ".kernel")] = t.T
        elif transpose and name == "model.embed_tokens.weight":
            out["model.embed_tokens.embedding"] = t
        else:
            out[name] = t
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        for w in ("w1", "w2", "w3"):
            parts = [src[f"{p}.{e}.{w}.weight"] for e in range(E)]
            out[f"{p}.{w}" + (".kernel" if transpose else "")] = np.stack([x.T if transpose else x for x in parts])
    return out


EP_LAYOUT = """mesh: {ep: 4, mp: 2}
params:
  - {match: '.*experts\\.w[13](\\.kernel)?', spec: [ep, null, mp]}
  - {match: '.*experts\\.w2(\\.kernel)?', spec: [ep, mp, null]}
  - {match: '.*q_proj\\.(weight|kernel)', spec: [null, mp]}
  - {match: '.*', spec: []}
"""


def complete(folder: Path) -> Path:
    """The one file of a complete output."""
    (path,) = folder.rglob("*.safetensors")
    return path


@pytest.mark.parametrize("rules", [STACK, STACK_T], ids=["stack", "stack+transpose+rename"])
def test_stack_experts_over_expert_parallel_layout_and_back(tmp_path, rules):
    src = moe_tensors()
    path = write(tmp_path / "src" / "model.safetensors", src)
    (tmp_path / "ep.yaml").write_text(EP_LAYOUT)
    jr.convert(path, tmp_path / "ep", dst_layout=tmp_path / "ep.yaml", transform=rules)
    want = expected_stacked(src, transpose=rules is STACK_T)
    # each rank holds its box of the stacked tensor: rank r = (ep, mp) coordinates (ep major)
    w1 = next(k for k in want if k.startswith("model.layers.1") and ".w1" in k)
    for rank in range(8):
        got = load_file(str(tmp_path / "ep" / f"rank_{rank}" / f"checkpoint_{rank}.safetensors"))
        ep, mp = divmod(rank, 2)
        cols = want[w1].shape[2] // 2
        np.testing.assert_array_equal(got[w1], want[w1][ep : ep + 1, :, mp * cols : (mp + 1) * cols])
    # merged back with the transform: the transformed checkpoint; reversed: the original bytes
    jr.convert(tmp_path / "ep", tmp_path / "whole", src_layout=tmp_path / "ep.yaml")
    whole = load_file(str(complete(tmp_path / "whole")))
    assert list(whole) == sorted(want) or set(whole) == set(want)
    for name, t in want.items():
        assert whole[name].dtype == t.dtype and whole[name].tobytes() == np.ascontiguousarray(t).tobytes(), name
    jr.convert(tmp_path / "ep", tmp_path / "back", src_layout=tmp_path / "ep.yaml", transform=rules, reverse=True)
    back = load_file(str(complete(tmp_path / "back")))
    assert set(back) == set(src)
    for name, t in src.items():  # every per-expert tensor byte for byte
        assert back[name].dtype == t.dtype and back[name].tobytes() == t.tobytes(), name


def test_reverse_straight_to_rank_files(tmp_path):
    """--reverse into a layout of the original names: the per-expert tensors split over mp."""
    src = moe_tensors()
    path = write(tmp_path / "src" / "model.safetensors", src)
    jr.convert(path, tmp_path / "stacked", transform=STACK)
    layout = tmp_path / "mp2.yaml"
    layout.write_text("mesh: {mp: 2}\nparams:\n  - {match: '.*experts\\.\\d+\\.w1\\.weight', spec: [mp, null]}\n"
                      "  - {match: '.*', spec: []}\n")
    jr.convert(complete(tmp_path / "stacked"), tmp_path / "mp", dst_layout=layout, transform=STACK,
               reverse=True)
    r1 = load_file(str(tmp_path / "mp" / "rank_1" / "checkpoint_1.safetensors"))
    name = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    np.testing.assert_array_equal(r1[name], src[name][F // 2 :])


def test_a_box_reads_only_the_source_regions_it_needs(tmp_path):
    path = write(tmp_path / "src" / "model.safetensors", moe_tensors())
    (tmp_path / "ep.yaml").write_text(EP_LAYOUT)
    plan = plan_conversion(path, dst_layout=tmp_path / "ep.yaml", transform=STACK_T).plan
    name = "model.layers.0.block_sparse_moe.experts.w1.kernel"  # [E, H, F] from E tensors [F, H]
    shard = next(s for s in plan.ranks[3].shards if s.param == name)  # ep 1, mp 1
    assert shard.dst_box.start == (1, 0, F // 2) and shard.dst_box.stop == (2, H, F)
    (piece,) = shard.pieces
    assert piece.part.src_param == "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    assert (piece.src_box.start, piece.src_box.stop) == ((F // 2, 0), (F, H))  # the permuted box, no more
    stats = jr.plan_stats(plan) if hasattr(jr, "plan_stats") else None
    total = sum(t.nbytes for t in moe_tensors().values())
    if stats is not None:
        assert stats.read_bytes == total  # every source byte read exactly once


def qkv_tensors(heads: int, kv_heads: int, dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    hidden = heads * dim
    return {f"l.{x}_proj.weight": rng.standard_normal((n * dim, hidden)).astype(np.float32)
            for x, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))}


def fused_reference(t: dict[str, np.ndarray], groups: int) -> np.ndarray:
    """Per group g: q_g, k_g, v_g (the layout Megatron-style fused QKV uses with G kv heads)."""
    chunks = {x: np.split(t[f"l.{x}_proj.weight"], groups) for x in "qkv"}
    return np.concatenate([c for g in range(groups) for c in (chunks["q"][g], chunks["k"][g], chunks["v"][g])])


@pytest.mark.parametrize("groups", [1, 2])
def test_fused_qkv_with_groups_and_gqa_sizes_and_back(tmp_path, groups):
    heads, kv, dim = 4, 2, 4
    src = qkv_tensors(heads, kv, dim)
    path = write(tmp_path / "src" / "model.safetensors", src)
    rules = {"rules": [{"from": "{p}.{x}_proj.weight", "to": "{p}.qkv_proj.weight", "concat": {"x": ["q", "k", "v"]},
                        "axis": 0, "groups": groups, "sizes": {"q": heads * dim, "k": kv * dim, "v": kv * dim}}]}
    layout = tmp_path / "mp2.yaml"
    layout.write_text("mesh: {mp: 2}\nparams:\n  - {match: '.*qkv_proj.*', spec: [mp, null]}\n")
    jr.convert(path, tmp_path / "mp", dst_layout=layout, transform=rules)
    want = fused_reference(src, groups)
    for r in range(2):
        got = load_file(str(tmp_path / "mp" / f"rank_{r}" / f"checkpoint_{r}.safetensors"))["l.qkv_proj.weight"]
        np.testing.assert_array_equal(got, np.split(want, 2)[r])
    jr.convert(tmp_path / "mp", tmp_path / "back", src_layout=layout, transform=rules, reverse=True)
    back = load_file(str(complete(tmp_path / "back")))
    assert set(back) == set(src)
    for name, t in src.items():
        assert back[name].tobytes() == t.tobytes(), name


def test_transpose_rename_and_unmatched_names_by_cli(tmp_path, capsys):
    src = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(3, dtype=np.int64)}
    path = write(tmp_path / "src" / "model.safetensors", src)
    rules = tmp_path / "t.yaml"
    rules.write_text("rules:\n  - {from: '{p}.weight', to: '{p}.kernel', transpose: [1, 0]}\n")
    assert main(["convert", "--src", str(path), "--dst", str(tmp_path / "out"), "--transform", str(rules),
                 "--quiet"]) == 0
    got = load_file(str(complete(tmp_path / "out")))
    np.testing.assert_array_equal(got["a.kernel"], src["a.weight"].T)
    np.testing.assert_array_equal(got["b"], src["b"])
    assert main(["plan", "--src", str(path), "--transform", str(rules)]) == 0
    out = capsys.readouterr().out
    assert "transform: 1 parameter(s) composed of 1 source tensor(s)" in out and "a.kernel" in out


def test_load_into_shardings_with_a_transform(tmp_path):
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    src = moe_tensors()
    path = write(tmp_path / "src" / "model.safetensors", src)
    want = expected_stacked(src, transpose=True)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("ep", "mp"))
    target = {}
    for name in want:
        spec = P("ep", None, "mp") if ".experts.w" in name else P()
        target[name] = NamedSharding(mesh, spec)
    out = jr.load(path, target, transform=STACK_T)
    for name, t in want.items():
        assert out[name].dtype == t.dtype
        np.testing.assert_array_equal(np.asarray(out[name]), t)
    w = "model.layers.0.block_sparse_moe.experts.w1.kernel"
    shard = next(s for s in out[w].addressable_shards if s.index[0].start == 2 and s.index[2].start == F // 2)
    np.testing.assert_array_equal(np.asarray(shard.data), want[w][2:3, :, F // 2 :])


def test_apply_rules_names_and_shapes():
    shapes = {"x.0.w": ((2, 3), np.dtype("f4")), "x.1.w": ((2, 3), np.dtype("f4")), "y": ((5,), np.dtype("i8"))}
    rules = Rules.load({"rules": [{"from": "{p}.{e}.w", "to": "{p}.w", "stack": "e", "axis": 1}]})
    out = apply_rules(rules, list(shapes), shapes)
    assert list(out) == ["x.w", "y"] and out["x.w"].shape == (2, 2, 3) and out["y"].rule is None
    back = apply_rules(rules, ["x.w", "y"], {"x.w": ((2, 2, 3), np.dtype("f4")), "y": shapes["y"]}, reverse=True)
    assert list(back) == ["x.0.w", "x.1.w", "y"] and back["x.1.w"].shape == (2, 3)
    with pytest.raises(PlanError, match=r"lacks e=1"):
        apply_rules(rules, ["x.0.w", "x.2.w"], {"x.0.w": shapes["x.0.w"], "x.2.w": shapes["x.1.w"]})


TEMPLATES = Path(__file__).parents[1] / "configs" / "transforms"
FLAX_TP = """mesh: {dp: 2, mp: 4}
params:
  - {match: '.*\\.(q|k|v|gate|up)_proj\\.kernel', spec: [null, mp]}
  - {match: '.*\\.(o|down)_proj\\.kernel', spec: [mp, null]}
  - {match: 'lm_head\\.kernel', spec: [null, mp]}
  - {match: '.*embed_tokens\\.embedding', spec: [mp, null]}
  - {match: '.*', spec: []}
"""


def test_hf_llama_to_flax_template_both_ways(tmp_path, llama):
    (tmp_path / "tp.yaml").write_text(FLAX_TP)
    template = TEMPLATES / "hf_llama_to_flax.yaml"
    jr.convert(llama, tmp_path / "tp", dst_layout=tmp_path / "tp.yaml", transform=template)
    jr.convert(tmp_path / "tp", tmp_path / "flax", src_layout=tmp_path / "tp.yaml")
    src, flax = load_file(str(llama)), load_file(str(complete(tmp_path / "flax")))
    assert len(flax) == len(src)
    for name, t in src.items():
        if name.endswith("_proj.weight") or name == "lm_head.weight":
            got = flax[name[: -len("weight")] + "kernel"]
            assert got.tobytes() == np.ascontiguousarray(t.T).tobytes(), name
        elif name == "model.embed_tokens.weight":
            assert flax["model.embed_tokens.embedding"].tobytes() == t.tobytes()
        else:
            assert flax[name].tobytes() == t.tobytes(), name  # norms keep their names
    jr.convert(tmp_path / "tp", tmp_path / "back", src_layout=tmp_path / "tp.yaml", transform=template, reverse=True)
    jr.convert(llama, tmp_path / "plain")  # the same bytes written without a transform
    assert complete(tmp_path / "back").read_bytes() == complete(tmp_path / "plain").read_bytes()


def test_moe_template_stacks_mixtral_and_qwen_names(tmp_path):
    rng = np.random.default_rng(3)
    src = {}
    for e in range(3):
        src[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] = rng.standard_normal((F, H)).astype(BF16)
        src[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] = rng.standard_normal((F, H)).astype(BF16)
    src["model.layers.0.mlp.shared_expert.gate_proj.weight"] = rng.standard_normal((F, H)).astype(BF16)
    src["model.layers.0.mlp.gate.weight"] = rng.standard_normal((3, H)).astype(np.float32)
    path = write(tmp_path / "src" / "model.safetensors", src)
    template = TEMPLATES / "hf_moe_stack_experts.yaml"
    jr.convert(path, tmp_path / "stacked", transform=template)
    got = load_file(str(complete(tmp_path / "stacked")))
    assert set(got) == {"model.layers.0.block_sparse_moe.experts.w1", "model.layers.0.mlp.experts.gate_proj",
                        "model.layers.0.mlp.shared_expert.gate_proj.weight", "model.layers.0.mlp.gate.weight"}
    want = np.stack([src[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] for e in range(3)])
    assert got["model.layers.0.mlp.experts.gate_proj"].tobytes() == want.tobytes()
    jr.convert(complete(tmp_path / "stacked"), tmp_path / "back", transform=template, reverse=True)
    back = load_file(str(complete(tmp_path / "back")))
    assert set(back) == set(src) and all(back[n].tobytes() == t.tobytes() for n, t in src.items())


def test_job_file_keys_transform_and_reverse(tmp_path):
    src = moe_tensors()
    path = write(tmp_path / "src" / "model.safetensors", src)
    (tmp_path / "t.yaml").write_text("rules:\n  - {from: '{p}.experts.{e}.{w}.weight', to: '{p}.experts.{w}', "
                                     "stack: e, axis: 0}\n")
    for name, extra in (("fwd", ""), ("back", "reverse: true\n")):
        source = path if name == "fwd" else complete(tmp_path / "fwd")
        (tmp_path / f"{name}.yaml").write_text(f"task: convert\nsrc: {source}\ndst: {tmp_path / name}\n"
                                               f"transform: {tmp_path / 't.yaml'}\nquiet: true\n{extra}")
        assert main(["--config", str(tmp_path / f"{name}.yaml")]) == 0
    stacked = load_file(str(complete(tmp_path / "fwd")))
    assert stacked["model.layers.0.block_sparse_moe.experts.w2"].shape == (E, H, F)
    back = load_file(str(complete(tmp_path / "back")))
    assert set(back) == set(src) and all(back[n].tobytes() == t.tobytes() for n, t in src.items())


def test_transform_with_dtype_cast_and_some_ranks(tmp_path):
    src = moe_tensors()
    path = write(tmp_path / "src" / "model.safetensors", src)
    (tmp_path / "ep.yaml").write_text(EP_LAYOUT)
    jr.convert(path, tmp_path / "ep", dst_layout=tmp_path / "ep.yaml", transform=STACK_T, dtype="fp16", ranks="5")
    assert [p.name for p in (tmp_path / "ep").glob("rank_*")] == ["rank_5"]
    got = load_file(str(tmp_path / "ep" / "rank_5" / "checkpoint_5.safetensors"))
    want = expected_stacked(src, transpose=True)
    name = "model.layers.1.block_sparse_moe.experts.w2.kernel"  # [E, F, H], spec [ep, mp, null]; rank 5: ep 2, mp 1
    np.testing.assert_array_equal(got[name], want[name][2:3, F // 2 :].astype(np.float16))
    np.testing.assert_array_equal(got["model.layers.0.input_layernorm.weight"],
                                  src["model.layers.0.input_layernorm.weight"].astype(np.float16))
