"""Many hosts on JAX's multi-controller runtime: 2 localhost processes (CPU devices) equal one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jaxreshard.distributed import cluster_from, owned_ranks
from jaxreshard.errors import ConfigError

from .helpers import tree

REPO = Path(__file__).parents[1]
FIX = REPO / "tests" / "fixtures" / "mindspore"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_owned_ranks_follow_the_device_order():
    # 8 devices per stage, 2 stages, 2 processes with 4 devices each: process 1 owns local ranks 4-7 of each stage
    assert owned_ranks(list(range(16)), 8, 4, 1) == [4, 5, 6, 7, 12, 13, 14, 15]
    assert owned_ranks([0], 1, 1, 0) == [0] and owned_ranks([0], 1, 1, 1) == []


def test_cluster_arguments(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert cluster_from(None, None, None) is None
    assert cluster_from("h:1", 2, 1).process_id == 1
    with pytest.raises(ConfigError, match="--process-id"):
        cluster_from("h:1", 2, None)
    with pytest.raises(ConfigError, match="0..1"):
        cluster_from("h:1", 2, 2)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:2")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert cluster_from(None, None, None).num_processes == 4


@pytest.mark.parametrize("args, reference", [
    (["--dst-strategy", str(FIX / "strategy" / "dp2mp4.ckpt")], FIX / "ckpt" / "dp2mp4"),
    (["--dst-strategy", str(REPO / "configs" / "strategies" / "fixture_dp2mp4pp2" / "merged_ckpt_strategy.ckpt")],
     None),
])
def test_two_processes_equal_one(tmp_path, args, reference):
    """Each process writes only the ranks of its own devices; together they equal a single-process run."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base = [sys.executable, "-m", "jaxreshard", "convert", "--src", str(FIX / "ckpt" / "complete"), *args, "-q"]
    procs = [subprocess.Popen([*base, "--dst", str(tmp_path / "multi"), "--coordinator-address",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # each process wrote its own half of the ranks
    assert all("wrote 4 file(s)" in out or "wrote 8 file(s)" in out for out, _ in outs), outs
    single = subprocess.run([*base, "--dst", str(tmp_path / "single")], env=env, cwd=REPO, capture_output=True)
    assert single.returncode == 0, single.stderr
    assert tree(tmp_path / "multi") == tree(tmp_path / "single")
    if reference is not None:
        assert tree(tmp_path / "multi") == tree(reference)


@pytest.mark.parametrize("address", ["host", "host:", "host:0", "host:65536", ":1234", "a b:1", "host:12x", "::1:80"])
def test_coordinator_address_needs_host_and_port(address):
    with pytest.raises(ConfigError, match="must be host:port with a port in 1..65535"):
        cluster_from(address, 2, 0)


@pytest.mark.parametrize("address", ["localhost:1234", "10.0.0.1:80", "[::1]:65535", "node-01.cluster:8476"])
def test_coordinator_addresses_accepted(address):
    assert cluster_from(address, 2, 1).coordinator_address == address


@pytest.mark.parametrize("count, pid, pattern", [(0, 0, "num-processes 0"), (True, 0, "num-processes True"),
                                                 (2, 2, r"process-id 2 must be in 0..1"), (2, -1, "process-id -1")])
def test_process_counts_checked(count, pid, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cluster_from("localhost:1234", count, pid)


def test_environment_integers_checked(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "\u0661")  # an Arabic-Indic 1: int() would take it
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID='\u0661' is not a non-negative integer"):
        cluster_from(None, None, None)
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert cluster_from(None, None, None).process_id == 1
