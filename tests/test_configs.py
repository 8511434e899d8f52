"""The shipped job configs run as documented: the seed scenarios against the MindSpore fixtures, in order."""

from pathlib import Path

import pytest

from jaxreshard.cli import main
from jaxreshard.config import read_job
from jaxreshard.formats.manifest import MANIFEST_NAME
from jaxreshard.rules import Rules

from .helpers import tree

REPO = Path(__file__).parents[1]
FIX = REPO / "tests" / "fixtures" / "mindspore"
SCENARIOS = sorted((REPO / "configs" / "scenarios").glob("*.yaml"))


def test_every_config_parses():
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    jobs = [p for p in configs if not {"layouts", "auto", "transforms"} & set(p.relative_to(REPO).parts)]
    # (auto: load-time keys)
    assert len(SCENARIOS) >= 7
    for path in jobs:
        read_job(path)
    transforms = sorted((REPO / "configs" / "transforms").glob("*.yaml"))
    assert len(transforms) >= 2
    for path in transforms:  # transform templates are rules files (tests/test_rules.py runs each one)
        assert Rules.load(path).rules


def test_seed_scenarios_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").symlink_to(REPO / "tests")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for path in SCENARIOS:
        assert main(["--config", str(path.relative_to(REPO)), "-q"]) == 0, path.name
    out = tmp_path / "scenario_output"
    # byte-identical to what real MindSpore wrote for the same conversions
    assert tree(out / "1_dp2mp4") == tree(FIX / "ckpt" / "dp2mp4")
    assert tree(out / "4_complete") == tree(FIX / "ckpt" / "dp1mp2pp2__to__complete")
    assert tree(out / "5_dp2mp4_two_processes") == tree(FIX / "ckpt" / "dp2mp4")
    ranks = sorted(p.name for p in (out / "6_dp2mp4pp2").iterdir() if p.name != MANIFEST_NAME)
    assert ranks == sorted(f"rank_{r}" for r in range(16))
    assert len(tree(out / "2_dp2mp2pp2")) == len(tree(out / "3_dp2mp4")) == 8


def test_quickstart_config_is_a_quickstart():
    task, opts = read_job(REPO / "configs" / "quickstart.yaml")
    assert task == "quickstart" and len(opts.layouts) == 3
    for layout in opts.layouts:
        assert (REPO / layout).is_file()


@pytest.mark.parametrize("name", ["fixture_dp2mp2pp2", "fixture_dp2mp4pp2"])
def test_shipped_strategies_match_their_layouts(tmp_path, name):
    """configs/strategies/* are what `jaxreshard strategy` writes for configs/layouts/* (regenerate if not)."""
    out = tmp_path / "s"
    assert main(["strategy", "--src", str(FIX / "ckpt" / "complete"), "--layout",
                 str(REPO / "configs" / "layouts" / f"{name}.yaml"), "--out", str(out), "-q"]) == 0
    assert tree(out) == tree(REPO / "configs" / "strategies" / name)
