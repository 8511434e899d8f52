"""Automatic conversion on several nodes: 8 real processes on localhost as 2 nodes x 4 devices.

Each process is its own python calling `auto_convert` with its own rank, as every process of a training job
does. Without a shared disk each node has its own output folder; the result must equal one offline conversion,
rank folder by rank folder, with each node's folder holding only its own ranks.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxreshard import api

from .helpers import tree

REPO = Path(__file__).parents[1]
FIX = REPO / "tests" / "fixtures" / "mindspore"
DP2MP4 = FIX / "strategy" / "dp2mp4.ckpt"
TIMEOUT_S = 120

WORKER = """
import json, sys
from jaxreshard.mindformers.auto import auto_convert
from jaxreshard.errors import JaxreshardError
try:
    print("OK", auto_convert(**json.loads(sys.argv[1])))
except JaxreshardError as e:
    print("ERR", e)
"""


def run_ranks(kwargs_by_rank: dict[int, dict]) -> dict[int, str]:
    """Start one python per rank at once; each prints `OK <path>` or `ERR <message>`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {r: subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(kw)], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r, kw in kwargs_by_rank.items()}
    deadline, results = time.monotonic() + TIMEOUT_S, {}
    for r, p in procs.items():
        out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
        assert p.returncode == 0, f"rank {r}: exit {p.returncode}\n{err}"
        results[r] = out.strip().splitlines()[-1]
    return results


def job(rank: int, src: Path, out: Path, **extra) -> dict:
    return dict(load_checkpoint=str(src), src_strategy_path_or_dir=None, dst_strategy=str(DP2MP4),
                output_dir=str(out), rank_id=rank, world_size=8, npu_num_per_node=4, timeout=60, poll=0.05,
                **extra)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """One offline conversion of the same checkpoint: the reference every rank folder must equal."""
    dst = tmp_path_factory.mktemp("offline") / "complete"
    api.convert(FIX / "ckpt" / "complete", dst, dst_strategy=DP2MP4)
    assert tree(dst) == tree(FIX / "ckpt" / "dp2mp4")  # and that is what MindSpore itself writes
    return dst


def rank_folders(root: Path) -> dict[str, dict[str, bytes]]:
    return {d.name: tree(d) for d in sorted(root.iterdir()) if d.is_dir()}


def test_two_nodes_without_a_shared_disk(tmp_path, offline):
    """Each node converts exactly its own ranks into its own folder; 2 converters per node split them."""
    outs = [tmp_path / "node0", tmp_path / "node1"]
    results = run_ranks({r: job(r, FIX / "ckpt" / "complete", outs[r // 4], shared_disk=False,
                                transform_process_num=2) for r in range(8)})
    for r, line in results.items():
        assert line == f"OK {outs[r // 4] / 'complete'}", (r, line)
    reference = rank_folders(offline)
    for node, out in enumerate(outs):
        got = rank_folders(out / "complete")
        assert sorted(got) == sorted(f"rank_{r}" for r in range(4 * node, 4 * node + 4))  # only its own ranks
        assert all(got[name] == reference[name] for name in got)
    assert not any((tmp_path / "node0" / "complete").glob("rank_[4-7]"))


@pytest.mark.parametrize("shared_disk", [False, True])
def test_two_nodes_one_shared_folder(tmp_path, offline, shared_disk):
    """The node-local call still works when every node sees one folder (disjoint rank folders and markers);
    and the shared-disk call (MindFormers' behaviour) gives the same output."""
    results = run_ranks({r: job(r, FIX / "ckpt" / "complete", tmp_path, shared_disk=shared_disk) for r in range(8)})
    assert set(results.values()) == {f"OK {tmp_path / 'complete'}"}, results
    assert tree(tmp_path / "complete") == tree(offline)
    markers = sorted(p.name for p in (tmp_path / ".complete.jaxreshard").glob("*.done"))
    assert markers == (["node_0_block_0.done", "node_1_block_0.done"] if not shared_disk else ["block_0.done"])


def test_converter_failure_is_raised_on_its_node_only(tmp_path, offline):
    """Node 1's copy of the source is truncated: its converter fails and its 3 waiters raise the converter's
    error within the timeout; node 0 does not wait for node 1 and loads its complete output."""
    bad = tmp_path / "node1_src" / "complete"
    shutil.copytree(FIX / "ckpt" / "complete", bad)
    path = bad / "rank_0" / "checkpoint_0.ckpt"
    path.write_bytes(path.read_bytes()[:3000])
    outs = [tmp_path / "node0", tmp_path / "node1"]
    start = time.monotonic()
    results = run_ranks({r: job(r, FIX / "ckpt" / "complete" if r < 4 else bad, outs[r // 4], shared_disk=False)
                         for r in range(8)})
    assert time.monotonic() - start < TIMEOUT_S
    assert [results[r] for r in range(4)] == [f"OK {outs[0] / 'complete'}"] * 4
    assert rank_folders(outs[0] / "complete") == {k: v for k, v in rank_folders(offline).items()
                                                  if k in {f"rank_{r}" for r in range(4)}}
    assert results[4].startswith("ERR ") and "truncated" in results[4], results[4]
    for r in (5, 6, 7):
        assert results[r].startswith("ERR automatic conversion failed in the converter of node_1_block_0 (rank 4, "
                                     "node 1 (ranks 4-7))"), results[r]
        assert "truncated" in results[r]
    assert not (outs[1] / "complete").exists()


NODE_WORKER = """
import json, sys, threading, yaml
from jaxreshard.mindformers.auto import auto_convert_from_config
cfg = yaml.safe_load(open(sys.argv[1]))
node, npu, out = int(sys.argv[2]), int(cfg["npu_num_per_node"]), sys.argv[3]
results = {}
def run(rank):
    try:
        results[rank] = "OK " + str(auto_convert_from_config(cfg, rank_id=rank, output_dir=out, timeout=100))
    except Exception as e:
        results[rank] = "ERR " + repr(e)
threads = [threading.Thread(target=run, args=(r,)) for r in range(node * npu, (node + 1) * npu)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(results))
"""
AUTO_CONFIGS = sorted((REPO / "configs" / "auto").glob("*.yaml"))


@pytest.mark.parametrize("config", AUTO_CONFIGS, ids=[p.stem for p in AUTO_CONFIGS])
def test_shipped_auto_configs_run(tmp_path, config):
    """configs/auto/*: every node (a process running its devices' ranks as threads) gets the output it should
    load, equal rank folder by rank folder to the offline conversion of the same checkpoint and strategy."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    nodes = cfg["world_size"] // cfg["npu_num_per_node"]
    assert nodes == 2
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 16 devices per stage for the ModelArts one
    env["PYTHONPATH"] = str(REPO)
    outs = [tmp_path / ("shared" if cfg["shared_disk"] else f"node{k}") for k in range(nodes)]
    offline = subprocess.Popen([sys.executable, "-m", "jaxreshard", "convert", "--src", cfg["load_checkpoint"],
                                "--dst-strategy", cfg["dst_strategy"], "--dst", str(tmp_path / "offline"), "-q"],
                               cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    procs = [subprocess.Popen([sys.executable, "-c", NODE_WORKER, str(config), str(k), str(outs[k])], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(nodes)]
    results = [json.loads(p.communicate(timeout=TIMEOUT_S)[0]) for p in procs]
    offline_err = offline.communicate(timeout=TIMEOUT_S)[1]
    assert offline.returncode == 0, offline_err
    reference = rank_folders(tmp_path / "offline")
    assert len(reference) == cfg["world_size"]
    for k, (out, got) in enumerate(zip(outs, results)):
        assert set(got.values()) == {f"OK {out / 'transformed_checkpoint' / 'complete'}"}, got
        mine = rank_folders(out / "transformed_checkpoint" / "complete")
        wanted = reference if cfg["shared_disk"] else {
            f"rank_{r}": reference[f"rank_{r}"] for r in range(k * len(got), (k + 1) * len(got))}
        assert mine == wanted
