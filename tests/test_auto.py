"""Automatic conversion at load time: no-op when matching, convert once, waiters, failures, timeouts."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest

from jaxreshard.errors import ConfigError, JaxreshardError
from jaxreshard.mindformers.auto import auto_convert, auto_convert_from_config, default_npu_num_per_node

from .helpers import tree

FIX = Path(__file__).parent / "fixtures" / "mindspore"
DP2MP4 = FIX / "strategy" / "dp2mp4.ckpt"


def test_matching_checkpoint_is_used_as_is(tmp_path):
    src = FIX / "ckpt" / "dp2mp2"
    got = auto_convert(src, FIX / "strategy" / "dp2mp2.ckpt", dst_strategy=FIX / "strategy" / "dp2mp2.json",
                       output_dir=tmp_path / "out")
    assert got == src and not (tmp_path / "out").exists()
    assert auto_convert(FIX / "ckpt" / "complete", None, output_dir=tmp_path / "out") == FIX / "ckpt" / "complete"


def test_mismatch_converts_once_and_reruns_reuse_it(tmp_path):
    got = auto_convert(FIX / "ckpt" / "complete", None, dst_strategy=DP2MP4, output_dir=tmp_path / "out")
    assert got == tmp_path / "out" / "complete"
    assert tree(got) == tree(FIX / "ckpt" / "dp2mp4")  # what MindSpore's transform writes
    stamp = (got / "rank_3" / "checkpoint_3.ckpt").stat().st_mtime_ns
    assert auto_convert(FIX / "ckpt" / "complete", None, dst_strategy=DP2MP4, output_dir=tmp_path / "out") == got
    assert (got / "rank_3" / "checkpoint_3.ckpt").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_blocks_converted_by_their_processes(tmp_path):
    """4 processes, transform_process_num 2: ranks 0 and 2 convert destination ranks 0-3 and 4-7."""
    results, errors = {}, []

    def job(rank):
        try:
            results[rank] = auto_convert(FIX / "ckpt" / "complete", None, dst_strategy=DP2MP4,
                                         output_dir=tmp_path / "out", transform_process_num=2, rank_id=rank,
                                         world_size=4, timeout=60, poll=0.05)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=job, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(results.values()) == {tmp_path / "out" / "complete"}
    assert tree(tmp_path / "out" / "complete") == tree(FIX / "ckpt" / "dp2mp4")


def _run(args):
    rank, src, out, timeout = args
    try:
        auto_convert(src, None, dst_strategy=DP2MP4, output_dir=out, transform_process_num=1, rank_id=rank,
                     world_size=3, timeout=timeout, poll=0.05)
        return "ok"
    except JaxreshardError as e:
        return str(e)


def test_converter_failure_fails_every_process(tmp_path):
    src = tmp_path / "complete"
    shutil.copytree(FIX / "ckpt" / "complete", src)
    path = src / "rank_0" / "checkpoint_0.ckpt"
    path.write_bytes(path.read_bytes()[:3000])  # truncated: the converter (rank 0) fails while planning
    with ProcessPoolExecutor(3, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_run, [(r, src, tmp_path / "out", 60) for r in range(3)]))
    assert all("truncated" in r or "corrupt" in r for r in results), results
    assert all("converter of block_0" in r for r in results[1:]), results  # waiters report the converter's error
    assert not (tmp_path / "out" / "complete").exists()


def test_waiting_times_out(tmp_path):
    # rank 1 of 2 waits for rank 0, which never runs
    with pytest.raises(JaxreshardError, match="did not finish within 1 s"):
        auto_convert(FIX / "ckpt" / "complete", None, dst_strategy=DP2MP4, output_dir=tmp_path / "out",
                     transform_process_num=1, rank_id=1, world_size=2, timeout=1, poll=0.05)


def test_config_keys(tmp_path):
    cfg = {"load_checkpoint": str(FIX / "ckpt" / "dp2mp2"),
           "src_strategy_path_or_dir": str(FIX / "strategy" / "dp2mp2.ckpt"),
           "auto_trans_ckpt": False, "output_dir": str(tmp_path)}
    assert auto_convert_from_config(cfg) == FIX / "ckpt" / "dp2mp2"  # auto_trans_ckpt off: load as is
    got = auto_convert_from_config({**cfg, "auto_trans_ckpt": True, "use_parallel": False})
    assert got == tmp_path / "transformed_checkpoint" / "dp2mp2"
    assert tree(got) == tree(FIX / "ckpt" / "dp2mp2__to__complete")  # use_parallel False: one complete file


# --- nodes (npu_num_per_node, shared_disk): the job's shape is checked on every process, one line each ---


def _auto(tmp_path, **kw):
    args = {"dst_strategy": DP2MP4, "output_dir": tmp_path / "out", "timeout": 5, "poll": 0.05}
    return auto_convert(kw.pop("src", FIX / "ckpt" / "complete"), None, **{**args, **kw})


@pytest.mark.parametrize("kw, message", [
    ({"npu_num_per_node": 3, "world_size": 8, "rank_id": 5},
     r"^npu_num_per_node 3 does not divide the world size 8 \(rank 5\)"),
    ({"npu_num_per_node": 4, "world_size": 8, "rank_id": 4, "transform_process_num": 3, "shared_disk": False},
     r"^transform_process_num 3 must divide the 4 devices of node 1 \(ranks 4-7\)"),
    ({"npu_num_per_node": 4, "world_size": 8, "rank_id": 5, "shared_disk": False, "src": Path("/nonexistent/ckpt")},
     r"^node 1 \(ranks 4-7\): source checkpoint /nonexistent/ckpt does not exist on this node"),
    ({"npu_num_per_node": 8, "world_size": 16, "rank_id": 8, "shared_disk": False},
     r"^node 1 \(ranks 8-15\): ranks 8-15 of the job's 16 are outside the destination layout, which has 8 ranks"),
    ({"npu_num_per_node": 8, "world_size": 16, "rank_id": 0, "shared_disk": False},
     r"^node 0 \(ranks 0-7\): ranks 8-15 of the job's 16 are outside the destination layout"),
    ({"npu_num_per_node": 2, "world_size": 4, "rank_id": 0, "shared_disk": False},
     (r"^node 0 \(ranks 0-1\): the destination layout has 8 ranks but the job only 4; destination ranks 4-7 "
     r"belong to no node")),
    ({"npu_num_per_node": 0, "world_size": 8, "rank_id": 0}, r"^npu_num_per_node must be a whole number of at least 1"),
    ({"world_size": 8, "rank_id": 8}, r"^rank 8 is outside the job's 8 ranks \(0-7\)"),
    ({"world_size": 8, "rank_id": 0, "shared_disk": "no"}, r"^shared_disk must be true or false, got 'no'"),
])  # fmt: skip
def test_job_shape_errors_name_the_node_and_ranks(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message) as info:
        _auto(tmp_path, **kw)
    assert "\n" not in str(info.value)


def test_default_npu_num_per_node(monkeypatch):
    monkeypatch.delenv("DEVICE_NUM_PER_NODE", raising=False)
    assert default_npu_num_per_node() == 8  # jax is imported here, but jax.distributed is not initialised
    monkeypatch.setenv("DEVICE_NUM_PER_NODE", "16")
    assert default_npu_num_per_node() == 16
    code = ("import sys, jaxreshard.mindformers.auto as a; n = a.default_npu_num_per_node(); "
            "print(n, 'jax' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "DEVICE_NUM_PER_NODE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["8", "False"]  # never imports JAX just to find out


def test_node_local_complete_destination_every_node_converts_it(tmp_path):
    """use_parallel False on 2 nodes without a shared disk: each node writes the complete checkpoint for itself."""
    results, errors = {}, []

    def run(rank):
        try:
            results[rank] = auto_convert_from_config(
                {"load_checkpoint": str(FIX / "ckpt" / "dp2mp2"), "src_strategy_path_or_dir": str(FIX / "strategy" /
                 "dp2mp2.ckpt"), "auto_trans_ckpt": True, "use_parallel": False, "npu_num_per_node": 2,
                 "shared_disk": "false", "output_dir": str(tmp_path / f"node{rank // 2}"), "timeout": 60},
                rank_id=rank, world_size=4)  # fmt: skip
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for node in (0, 1):
        got = tmp_path / f"node{node}" / "transformed_checkpoint" / "dp2mp2"
        assert results[2 * node] == results[2 * node + 1] == got
        assert tree(got) == tree(FIX / "ckpt" / "dp2mp2__to__complete")


@pytest.mark.parametrize("key, value, message", [
    ("npu_num_per_node", "x", r"npu_num_per_node must be a whole number, got 'x'"),
    ("shared_disk", "maybe", r"shared_disk must be true or false, got 'maybe'"),
    ("transform_process_num", 1.5, r"transform_process_num must be a whole number, got 1.5"),
    ("timeout", "soon", r"timeout must be a number of seconds, got 'soon'"),
])
def test_config_values_are_checked(tmp_path, key, value, message):
    cfg = {"load_checkpoint": str(FIX / "ckpt" / "complete"), "auto_trans_ckpt": True, "dst_strategy": str(DP2MP4),
           "output_dir": str(tmp_path), key: value}
    with pytest.raises(ConfigError, match=message):
        auto_convert_from_config(cfg)


# --- trust: a completed conversion is reused only when every file it wrote is still there and complete ---


def _convert_once(tmp_path):
    got = _auto(tmp_path)
    assert tree(got) == tree(FIX / "ckpt" / "dp2mp4")
    return got


def _damage_and_rerun(tmp_path, caplog, damage):
    got = _convert_once(tmp_path)
    damage(got)
    with caplog.at_level(logging.INFO, logger="jaxreshard"):
        again = _auto(tmp_path)
    assert again == got and tree(again) == tree(FIX / "ckpt" / "dp2mp4")  # converted again, complete
    return " ".join(r.getMessage() for r in caplog.records if "again" in r.getMessage())


def test_deleted_output_is_converted_again(tmp_path, caplog):
    why = _damage_and_rerun(tmp_path, caplog, shutil.rmtree)  # the marker folder beside it is left behind
    assert "converting block_0 again" in why and "is missing" in why


def test_truncated_output_is_converted_again(tmp_path, caplog):
    def truncate(out):
        path = out / "rank_3" / "checkpoint_3.ckpt"
        path.write_bytes(path.read_bytes()[:-100])

    assert "checkpoint_3.ckpt has" in _damage_and_rerun(tmp_path, caplog, truncate)


def test_missing_rank_file_is_converted_again(tmp_path, caplog):
    why = _damage_and_rerun(tmp_path, caplog, lambda out: (out / "rank_5" / "checkpoint_5.ckpt").unlink())
    assert "checkpoint_5.ckpt is missing" in why


def test_truncated_safetensors_found_by_its_header(tmp_path):
    """The header says where the data ends: a file cut short is caught even without a marker's sizes."""
    from jaxreshard.formats.safetensors_io import SafetensorsWriter
    from jaxreshard.mindformers.reuse import implied_size

    path = tmp_path / "x.safetensors"
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer = SafetensorsWriter(path, [("w", data.dtype, data.shape)], None)
    writer.write("w", data)
    writer.close()
    size = path.stat().st_size
    assert implied_size(path) == size and size == 8 + int.from_bytes(path.read_bytes()[:8], "little") + 48
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(JaxreshardError, match="truncated"):
        implied_size(path)


def test_manifest_sizes_are_compared(tmp_path, caplog):
    """A manifest listing another size for a file: converted again (the conversion writes the record anew);
    when the manifest itself is damaged the converter says so (one line) instead of leaving its waiters to
    time out."""
    got = _convert_once(tmp_path)
    path = got / "jaxreshard.manifest.json"
    written = json.loads(path.read_text())  # the manifest the conversion wrote
    size = (got / "rank_3" / "checkpoint_3.ckpt").stat().st_size
    assert written["files"]["rank_3/checkpoint_3.ckpt"]["size"] == size
    stale = json.loads(path.read_text())
    stale["files"]["rank_3/checkpoint_3.ckpt"]["size"] = 1
    path.write_text(json.dumps(stale))
    with caplog.at_level(logging.INFO, logger="jaxreshard"):
        assert _auto(tmp_path) == got
    assert tree(got) == tree(FIX / "ckpt" / "dp2mp4")
    message = " ".join(r.getMessage() for r in caplog.records if "again" in r.getMessage())
    assert re.search(rf"checkpoint_3.ckpt has {size} bytes but .*jaxreshard.manifest.json lists 1", message), message
    assert json.loads(path.read_text())["files"] == written["files"]
    path.write_text(json.dumps({"format": "jaxreshard.manifest", "version": 1, "files": stale["files"]}))
    with pytest.raises(JaxreshardError, match=r"jaxreshard.manifest.json: damaged jaxreshard manifest \(KeyError: "
                       r"'params'\); remove it or re-run the conversion"):
        _auto(tmp_path)


def test_timeout_names_the_block_and_its_converter(tmp_path):
    with pytest.raises(JaxreshardError, match=r"automatic conversion for node 1 \(ranks 4-7\) did not finish within "
                       r"1 s: still waiting for node_1_block_0 \(converter: rank 4; no completion marker"):
        _auto(tmp_path, rank_id=5, world_size=8, npu_num_per_node=4, shared_disk=False, timeout=1)


def test_guessed_node_size_only_matters_without_a_shared_disk(tmp_path, monkeypatch):
    """12 processes and the default of 8 devices per node: fine with one disk (nodes do not matter), an error
    naming the default without one."""
    monkeypatch.delenv("DEVICE_NUM_PER_NODE", raising=False)
    with pytest.raises(JaxreshardError, match=r"did not finish within 0 s: still waiting for block_0 "
                       r"\(converter: rank 0; no completion marker"):
        _auto(tmp_path, rank_id=5, world_size=12, timeout=0)
    with pytest.raises(ConfigError, match=r"^npu_num_per_node 8 \(the default: this host's devices, "
                       r"DEVICE_NUM_PER_NODE or 8\) does not divide the world size 12 \(rank 5\)"):
        _auto(tmp_path, rank_id=5, world_size=12, shared_disk=False)


def test_markers_of_a_failed_conversion_do_not_block_a_fixed_source(tmp_path):
    """A conversion that failed wrote no output: after the source is fixed (another fingerprint) the same
    output_dir converts it; an output holding another conversion's files is still never overwritten."""
    src = tmp_path / "complete"
    shutil.copytree(FIX / "ckpt" / "complete", src)
    path = src / "rank_0" / "checkpoint_0.ckpt"
    good = path.read_bytes()
    path.write_bytes(good[:3000])
    with pytest.raises(JaxreshardError, match="truncated"):
        _auto(tmp_path, src=src)
    path.write_bytes(good)
    got = _auto(tmp_path, src=src)
    assert tree(got) == tree(FIX / "ckpt" / "dp2mp4")
    with pytest.raises(ConfigError, match="holds the conversion of another checkpoint or layout"):
        _auto(tmp_path, src=src, prefix="other_")


def test_unwritable_output_dir_is_a_config_error(tmp_path):
    (tmp_path / "out").write_text("a file where the output folder should be")
    with pytest.raises(ConfigError, match=r"^node 0 \(ranks 0\): automatic conversion cannot write .*out"):
        _auto(tmp_path)


def _stale_failure(tmp_path, age_s=600):
    """The failure marker of an earlier attempt at this same conversion, as a killed-and-restarted job leaves."""
    from jaxreshard.mindformers.auto import _fingerprint

    markers = tmp_path / "out" / ".complete.jaxreshard"
    markers.mkdir(parents=True)
    fingerprint = _fingerprint(FIX / "ckpt" / "complete", None, DP2MP4, None, "checkpoint_")
    (markers / "block_0.failed").write_text(json.dumps({"fingerprint": fingerprint, "error": "OSError: disk full"}))
    old = time.time() - age_s
    os.utime(markers / "block_0.failed", (old, old))


def test_restarted_job_does_not_fail_on_the_last_attempts_error(tmp_path):
    """The waiter starts first and sees the old failure; the converter, starting later, clears it and converts."""
    _stale_failure(tmp_path)
    results, errors = {}, []

    def run(rank):
        try:
            results[rank] = _auto(tmp_path, rank_id=rank, world_size=2, timeout=60)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    waiter = threading.Thread(target=run, args=(1,))
    waiter.start()
    time.sleep(0.5)  # the waiter has polled the stale marker several times by now
    run(0)
    waiter.join()
    assert not errors, errors
    assert results[0] == results[1] and tree(results[1]) == tree(FIX / "ckpt" / "dp2mp4")


def test_old_failure_nobody_clears_is_raised_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr("jaxreshard.mindformers.auto.STALE_FAILURE_GRACE_S", 0.3)
    _stale_failure(tmp_path)
    start = time.monotonic()
    with pytest.raises(JaxreshardError, match=r"failed in the converter of block_0 \(rank 0, node 0 \(ranks 0-1\)\): "
                       r"OSError: disk full"):
        _auto(tmp_path, rank_id=1, world_size=2, timeout=30)
    assert 0.3 <= time.monotonic() - start < 10


def test_default_npu_num_per_node_under_jax_distributed(monkeypatch):
    """Under an initialised jax.distributed the host's devices decide (DEVICE_NUM_PER_NODE is only a fallback)."""
    import types

    fake = types.SimpleNamespace(distributed=types.SimpleNamespace(is_initialized=lambda: True),
                                 local_device_count=lambda: 4)
    monkeypatch.setitem(sys.modules, "jax", fake)
    monkeypatch.setenv("DEVICE_NUM_PER_NODE", "16")
    assert default_npu_num_per_node() == 4
    fake.distributed.is_initialized = lambda: False
    assert default_npu_num_per_node() == 16


def test_a_prefix_that_escapes_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(JaxreshardError, match=r"--prefix '\.\./\.\./x' contains the character '/'"):
        auto_convert(tmp_path / "ckpt", None, dst_layout="configs/layouts/llama_dp8.yaml",
                     output_dir=tmp_path / "out", prefix="../../x")
    assert list(tmp_path.iterdir()) == []
