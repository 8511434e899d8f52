"""rank_list_for_transform equals what real MindSpore returned for every reference conversion (manifest.json)."""

import json
from pathlib import Path

import pytest

from jaxreshard.formats.mindspore_strategy import read_strategy
from jaxreshard.mindspore import rank_list_for_transform

FIX = Path(__file__).parent / "fixtures" / "mindspore"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
CASES = [c for c in MANIFEST["conversions"] if c["src_strategy"]]


def pruned(src, dst, rank):
    """The maps MindSpore's _extract_src_dst_layout_map gives for `rank`."""
    dst_map = None
    src_map = dict(src.params)
    if dst is not None:
        stage = rank // dst.stage_device_num
        dst_map = {n: dst.layout_for_rank(n, rank) for n, p in dst.params.items() if stage in p.stages}
        for name in dst.params:
            if name not in dst_map:
                src_map.pop(name, None)
    return src_map, dst_map


@pytest.mark.parametrize("conv", CASES, ids=[c["name"] for c in CASES])
def test_rank_lists_match_mindspore(conv):
    src = read_strategy(FIX / conv["src_strategy"])
    dst = read_strategy(FIX / conv["dst_strategy"]) if conv["dst_strategy"] else None
    expected = conv["ms_rank_list_for_transform"]
    if isinstance(expected, str):
        expected = eval(expected)  # noqa: S307 - the manifest stores long dicts as their repr
    n_dst = dst.stage_device_num if dst else 1
    for rank, ranks in expected.items():
        src_map, dst_map = pruned(src, dst, int(rank))
        got = rank_list_for_transform(int(rank), src_map, dst_map, src.stage_device_num, n_dst)
        assert got == ranks, (conv["name"], rank)


def test_complete_source_needs_rank_0():
    assert rank_list_for_transform(5, None, None, 1, 8) == [0]
