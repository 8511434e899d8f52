"""Every conversion real MindSpore 2.10 made in tests/fixtures/mindspore, reproduced byte for byte.

The fixtures' manifest.json lists each `transform_checkpoints` call (source dir, strategies, outputs); we run
the same conversion and compare every output file with MindSpore's, bytes and file names alike.
"""

import json
from pathlib import Path

import pytest

import jaxreshard

from .helpers import tree as outputs  # every file but the manifest, by relative path

FIX = Path(__file__).parent / "fixtures" / "mindspore"
MANIFEST = json.loads((FIX / "manifest.json").read_text())




def run(tmp_path, src, src_strategy, dst_strategy, **kw) -> Path:
    dst = tmp_path / "out"
    jaxreshard.convert(
        FIX / src, dst,
        src_strategy=FIX / src_strategy if src_strategy else None,
        dst_strategy=FIX / dst_strategy if dst_strategy else None,
        **kw,
    )  # fmt: skip
    return dst


@pytest.mark.parametrize("conv", MANIFEST["conversions"], ids=[c["name"] for c in MANIFEST["conversions"]])
def test_conversion_matches_mindspore(tmp_path, conv):
    expected_files = conv["outputs"] if isinstance(conv["outputs"], list) else eval(conv["outputs"])  # noqa: S307
    ref_root = FIX / Path(expected_files[0]).parent.parent
    fmt = Path(expected_files[0]).suffix.lstrip(".")
    dst = run(tmp_path, conv["src_dir"], conv["src_strategy"], conv["dst_strategy"], output_format=fmt)
    got, want = outputs(dst), outputs(ref_root)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name


def test_by_stage_path_matches_mindspore(tmp_path):
    dst = run(tmp_path, "ckpt/dp1mp2pp2", "strategy/pp_stages/ckpt_strategy_rank_0.ckpt", "strategy/dp2mp2.ckpt")
    got, want = outputs(dst), outputs(FIX / "ckpt/pp_stage0_file__to__dp2mp2__by_stage")
    assert sorted(got) == sorted(want) == [f"rank_{r}/checkpoint_{r}_part0.ckpt" for r in range(4)]
    assert got == want


PROBES = ["dp4", "dp4mp2_8dev", "mp2_2dev", "mp4", "opt"]


@pytest.mark.parametrize("probe", PROBES)
def test_replica_choice_matches_mindspore(tmp_path, probe):
    """Sources whose data-parallel replicas differ: with exact_replicas we copy the replica MindSpore copies."""
    dst = run(tmp_path, "inconsistent/src", "inconsistent/src_dp2mp2.ckpt", f"inconsistent/dst_{probe}.ckpt",
              exact_replicas=True, prefix="c_")
    got, want = outputs(dst), outputs(FIX / f"inconsistent/out_{probe}")
    assert sorted(got) == sorted(want)
    assert got == want


def test_default_reads_each_block_once(tmp_path):
    """Without exact_replicas, replicas are assumed equal and each block is read once (lowest rank)."""
    plan = jaxreshard.plan_conversion(
        FIX / "inconsistent/src", src_strategy=FIX / "inconsistent/src_dp2mp2.ckpt",
        dst_strategy=FIX / "inconsistent/dst_dp4.ckpt",
    ).plan  # fmt: skip
    shards = {id(s) for r in plan.ranks for s in r.shards if not plan.params[s.param].direct}
    sources = {item.src_rank for r in plan.ranks for s in r.shards for item in s.reads
               if not plan.params[s.param].direct}
    copied = {(s.param, s.dst_box) for r in plan.ranks for s in r.shards if not plan.params[s.param].direct}
    assert sources == {0, 1} and len(shards) == len(copied)
