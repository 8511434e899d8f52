"""Automatic conversion at load time: no-op when matching, convert once, waiters, failures, timeouts."""

import shutil
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

from jaxreshard.auto import auto_convert, auto_convert_from_config
from jaxreshard.errors import JaxreshardError

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
    cfg = {"load_checkpoint": str(FIX / "ckpt" / "dp2mp2"), "src_strategy_path_or_dir": str(FIX / "strategy" / "dp2mp2.ckpt"),
           "auto_trans_ckpt": False, "output_dir": str(tmp_path)}
    assert auto_convert_from_config(cfg) == FIX / "ckpt" / "dp2mp2"  # auto_trans_ckpt off: load as is
    got = auto_convert_from_config({**cfg, "auto_trans_ckpt": True, "use_parallel": False})
    assert got == tmp_path / "transformed_checkpoint" / "dp2mp2"
    assert tree(got) == tree(FIX / "ckpt" / "dp2mp2__to__complete")  # use_parallel False: one complete file


def test_a_prefix_that_escapes_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(JaxreshardError, match=r"--prefix '\.\./\.\./x' contains the character '/'"):
        auto_convert(tmp_path / "ckpt", None, dst_layout="configs/layouts/llama_dp8.yaml",
                     output_dir=tmp_path / "out", prefix="../../x")
    assert list(tmp_path.iterdir()) == []
