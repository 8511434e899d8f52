"""What a layout argument is: the planner follows the value, not the keyword (planners/sides.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import jaxreshard
from jaxreshard.errors import ConfigError, FormatError, LayoutError
from jaxreshard.formats.mindspore_strategy import Strategy
from jaxreshard.layout import Layout
from jaxreshard.planners import MindSporePlanner, NativePlanner, StrategyPath, is_strategy_path, one_side, read_side

REPO = Path(__file__).parents[2]
FIX = REPO / "tests" / "fixtures" / "mindspore"
LAYOUT = REPO / "configs" / "layouts" / "llama_dp2mp4.yaml"


def files(root: Path) -> dict[str, bytes]:
    """Every rank file's bytes (the manifest records when it was written, so it is left out)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("rank_*/*")) if p.is_file()}


@pytest.mark.parametrize("path, strategy", [
    (LAYOUT, False),
    (FIX / "strategy" / "dp2mp4.ckpt", True),  # binary protobuf
    (FIX / "strategy" / "dp2mp2.json", True),  # JSON with parallel_layout_item
    (FIX / "strategy" / "pp_stages", True),  # a folder of per-stage files
])  # fmt: skip
def test_strategies_are_recognised_by_content(path, strategy):
    assert is_strategy_path(path) is strategy
    assert isinstance(read_side(path), Strategy if strategy else Layout)
    assert isinstance(read_side(str(path)), Strategy if strategy else Layout)


def test_a_renamed_strategy_file_is_still_a_strategy(tmp_path):
    odd = tmp_path / "strategy.txt"
    odd.write_bytes((FIX / "strategy" / "dp2mp4.ckpt").read_bytes())
    assert isinstance(read_side(odd), Strategy)


def test_a_yaml_layout_with_any_suffix_is_a_layout(tmp_path):
    odd = tmp_path / "layout.conf"
    odd.write_text(LAYOUT.read_text())
    side = read_side(odd)
    assert isinstance(side, Layout) and side.num_ranks == 8


def test_the_strategy_alias_always_reads_a_strategy(tmp_path):
    """`--src-strategy` given a YAML file reports a strategy problem (as before), not a layout."""
    assert one_side(None, LAYOUT, "src") == StrategyPath(LAYOUT)
    with pytest.raises(FormatError, match="llama_dp2mp4.yaml"):
        read_side(StrategyPath(LAYOUT))


def test_both_spellings_of_one_side_are_refused():
    with pytest.raises(ConfigError, match="give --dst-layout or --dst-strategy, not both"):
        one_side(LAYOUT, FIX / "strategy" / "mp4.ckpt", "dst")


def test_an_unusable_object_names_what_is_accepted():
    with pytest.raises(ConfigError, match=r"cannot use 42 as a layout: give a YAML path, a MindSpore strategy"):
        read_side(42)


def test_a_missing_layout_path_is_a_layout_error(tmp_path):
    with pytest.raises(LayoutError, match="nope.yaml"):
        read_side(tmp_path / "nope.yaml")


def test_planner_is_chosen_by_what_the_sides_are(monkeypatch):
    """Strategies only: MindSpore semantics; a strategy beside a native layout: native semantics."""
    made = []
    for cls in (MindSporePlanner, NativePlanner):
        def plan(self, request, _plan=cls.plan):
            made.append(type(self))
            return _plan(self, request)

        monkeypatch.setattr(cls, "plan", plan)
    src, strategy = FIX / "ckpt" / "dp2mp4", FIX / "strategy" / "dp2mp4.ckpt"
    jaxreshard.plan_conversion(src, src_layout=strategy)
    jaxreshard.plan_conversion(src, src_strategy=strategy)
    jaxreshard.plan_conversion(src, src_layout=strategy, dst_layout=LAYOUT)
    assert made == [MindSporePlanner, MindSporePlanner, NativePlanner]


def test_strategy_as_layout_keyword_writes_the_same_bytes(tmp_path):
    """`dst_layout=<strategy file>` is the same conversion as `dst_strategy=` (MindSpore parity)."""
    src = FIX / "ckpt" / "dp2mp4"
    kw = dict(src_layout=FIX / "strategy" / "dp2mp4.ckpt", output_format="ckpt")
    jaxreshard.convert(src, tmp_path / "a", dst_layout=FIX / "strategy" / "mp4.ckpt", **kw)
    jaxreshard.convert(src, tmp_path / "b", dst_strategy=FIX / "strategy" / "mp4.ckpt", **kw)
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert len(a) == 4 and a == b
