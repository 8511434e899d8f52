"""The order `--reverse` writes names in (rulemap.py, manifests.with_order): a joining forward conversion records
the source order, which survives reshards and puts a round trip back to the original file byte for byte;
without a record the reversed names follow the documented natural order."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxreshard as jr
from jaxreshard.errors import FormatError
from jaxreshard.rulemap import ORDER_KEY, recorded_order

MOE = "configs/transforms/hf_moe_stack_experts.yaml"
PREFIX = "model.layers.{}.block_sparse_moe"
EP4_MP2 = """mesh: {ep: 4, mp: 2}
params:
  - {match: '.*experts\\\\.w[13]', spec: [ep, mp, null]}
  - {match: '.*experts\\\\.w2', spec: [ep, null, mp]}
  - {match: '.*', spec: []}
"""
EP2_MP4 = EP4_MP2.replace("ep: 4, mp: 2", "ep: 2, mp: 4")
QKV = {"rules": [{"from": "{p}.{x}_proj.weight", "to": "{p}.qkv_proj.weight", "concat": {"x": ["q", "k", "v"]},
                  "axis": 0, "groups": 2, "sizes": {"q": 8, "k": 4, "v": 4}}]}


def header(path: Path) -> dict:
    """The safetensors JSON header, keys in file order."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def names_of(path: Path) -> list[str]:
    return [k for k in header(path) if k != "__metadata__"]


def moe_file(path: Path, experts: int = 4, metadata: dict[str, str] | None = None) -> Path:
    """Mixtral-like experts of two layers (12 experts: `experts.10` sorts before `experts.2` in the file)."""
    rng = np.random.default_rng(1)
    tensors = {}
    for layer in range(2):
        p = PREFIX.format(layer)
        tensors[f"{p}.gate.weight"] = rng.standard_normal((experts, 8)).astype(np.float32)
        for e in range(experts):
            for w in ("w1", "w2", "w3"):
                shape = (16, 8) if w == "w2" else (8, 16)
                tensors[f"{p}.experts.{e}.{w}.weight"] = rng.standard_normal(shape).astype(np.float32)
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_readme_moe_round_trip_gives_the_original_file(tmp_path: Path):
    src = moe_file(tmp_path / "moe.safetensors", experts=12)
    (tmp_path / "ep4_mp2.yaml").write_text(EP4_MP2)
    jr.convert(src, tmp_path / "ep", dst_layout=tmp_path / "ep4_mp2.yaml", transform=MOE)
    recorded = json.loads(header(tmp_path / "ep/rank_5/checkpoint_5.safetensors")["__metadata__"][ORDER_KEY])
    assert recorded == names_of(src)
    jr.convert(tmp_path / "ep", tmp_path / "back", src_layout=tmp_path / "ep4_mp2.yaml", transform=MOE, reverse=True)
    assert (tmp_path / "back/rank_0/checkpoint_0.safetensors").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("merged", [False, True])
def test_round_trip_through_a_reshard_of_the_stacked_checkpoint(tmp_path: Path, merged: bool):
    """ep4 x mp2 -> (ep2 x mp4, or merged to one file) without a transform -> reversed: the original file."""
    src = moe_file(tmp_path / "moe.safetensors", metadata={"format": "pt"})
    (tmp_path / "a.yaml").write_text(EP4_MP2)
    (tmp_path / "b.yaml").write_text(EP2_MP4)
    layout = None if merged else tmp_path / "b.yaml"
    jr.convert(src, tmp_path / "ep4", dst_layout=tmp_path / "a.yaml", transform=MOE)
    jr.convert(tmp_path / "ep4", tmp_path / "ep2", src_layout=tmp_path / "a.yaml", dst_layout=layout)
    last = "rank_0/checkpoint_0" if merged else "rank_7/checkpoint_7"
    assert ORDER_KEY in header(tmp_path / f"ep2/{last}.safetensors")["__metadata__"]
    jr.convert(tmp_path / "ep2", tmp_path / "back", src_layout=layout, transform=MOE, reverse=True)
    back = tmp_path / "back/rank_0/checkpoint_0.safetensors"
    assert header(back)["__metadata__"] == {"format": "pt"}
    assert back.read_bytes() == src.read_bytes()


def test_fused_qkv_round_trip_gives_the_original_file(tmp_path: Path):
    rng = np.random.default_rng(2)
    tensors = {f"model.layers.{i}.self_attn.{x}_proj.weight": rng.standard_normal((8 if x in "qo" else 4, 8))
               .astype(np.float32) for i in range(2) for x in ("q", "k", "v", "o")}
    tensors["model.norm.weight"] = rng.standard_normal(8).astype(np.float32)
    src = tmp_path / "llama.safetensors"
    save_file(tensors, str(src))  # the file is in name order: k, o, q, v
    assert names_of(src)[:4] == [f"model.layers.0.self_attn.{x}_proj.weight" for x in "koqv"]
    jr.convert(src, tmp_path / "fused", transform=QKV)
    fused = tmp_path / "fused/rank_0/checkpoint_0.safetensors"
    assert names_of(fused)[:2] == ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight"]
    jr.convert(tmp_path / "fused", tmp_path / "back", transform=QKV, reverse=True)
    assert (tmp_path / "back/rank_0/checkpoint_0.safetensors").read_bytes() == src.read_bytes()


def test_without_a_record_reversed_experts_interleave_per_expert(tmp_path: Path):
    """A stacked checkpoint another tool wrote: each family (one layer's w1, w2, w3) expands at its first
    tensor's place, expert by expert, the weights in file order; other tensors keep their places."""
    rng = np.random.default_rng(3)
    stacked = {}
    for layer in (1, 0):
        p = PREFIX.format(layer)
        stacked[f"{p}.experts.w2"] = rng.standard_normal((3, 16, 8)).astype(np.float32)
        stacked[f"{p}.gate.weight"] = rng.standard_normal((3, 8)).astype(np.float32)
        stacked[f"{p}.experts.w1"] = rng.standard_normal((3, 8, 16)).astype(np.float32)
    src = tmp_path / "stacked.safetensors"
    save_file(stacked, str(src))
    order = names_of(src)  # safetensors sorts by name: layer 0 first, experts.w1 before experts.w2 before gate
    assert order == [f"{PREFIX.format(i)}.{n}" for i in (0, 1) for n in ("experts.w1", "experts.w2", "gate.weight")]
    jr.convert(src, tmp_path / "back", transform=MOE, reverse=True)
    expected = []
    for i in (0, 1):
        p = PREFIX.format(i)
        expected += [f"{p}.experts.{e}.{w}.weight" for e in range(3) for w in ("w1", "w2")] + [f"{p}.gate.weight"]
    back = tmp_path / "back/rank_0/checkpoint_0.safetensors"
    assert names_of(back) == expected
    assert "__metadata__" not in header(back)


def test_a_record_that_does_not_cover_the_names_falls_back_to_natural_order(tmp_path: Path):
    p = PREFIX.format(0)
    stacked = {f"{p}.experts.w1": np.zeros((2, 2, 2), np.float32), f"{p}.experts.w3": np.ones((2, 2, 2), np.float32)}
    src = tmp_path / "stacked.safetensors"
    save_file(stacked, str(src), metadata={ORDER_KEY: json.dumps(["other.weight"])})
    jr.convert(src, tmp_path / "back", transform=MOE, reverse=True)
    assert names_of(tmp_path / "back/rank_0/checkpoint_0.safetensors") == [
        f"{p}.experts.{e}.{w}.weight" for e in range(2) for w in ("w1", "w3")]


@pytest.mark.parametrize("text", ["[1, 2]", "not json", '{"a": 1}', '["x", "x"]'])
def test_a_damaged_record_is_a_format_error(text: str):
    with pytest.raises(FormatError, match=f"{ORDER_KEY}.*not a JSON list of distinct tensor names"):
        recorded_order({0: {ORDER_KEY: text}}, "ckpt")


def test_the_record_of_the_lowest_rank_is_read():
    assert recorded_order({3: {ORDER_KEY: '["b"]'}, 1: {ORDER_KEY: '["a", "b"]'}, 0: {}}, "ckpt") == ("a", "b")
    assert recorded_order({0: {"format": "pt"}}, "ckpt") == ()
