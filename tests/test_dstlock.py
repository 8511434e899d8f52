"""One writer per destination: the lock file's byte-range locks, across processes and within one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jaxreshard import dstlock
from jaxreshard.dstlock import destination_lock, lock_path
from jaxreshard.errors import OutputError

REPO = str(Path(__file__).resolve().parents[1])  # the package the subprocesses import
HOLDER = """
import sys
from pathlib import Path
from jaxreshard.dstlock import destination_lock
ranks = None if sys.argv[2] == "-" else [int(r) for r in sys.argv[2].split(",")]
with destination_lock(Path(sys.argv[1]), ranks):
    print("locked", flush=True)
    sys.stdin.read()
"""


def start_holder(dst: Path, ranks: str = "-") -> subprocess.Popen:
    """Another process holding `dst`'s lock (whole, or the ranks "0,1") until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(dst), ranks], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    dst = tmp_path / "out"
    proc = start_holder(dst)
    try:
        for ranks in (None, [3]):
            with pytest.raises(OutputError) as info:
                with destination_lock(dst, ranks):
                    pass
            assert f"process {proc.pid}" in str(info.value) and str(dst) in str(info.value)
    finally:
        stop(proc)
    with destination_lock(dst):  # free again once the holder is done
        pass
    assert not lock_path(dst).exists(), "the last holder removes the lock file"


def test_disjoint_rank_locks_coexist_and_overlapping_ones_conflict(tmp_path):
    dst = tmp_path / "out"
    proc = start_holder(dst, "0,1")
    try:
        with destination_lock(dst, [2, 3]):
            pass
        for ranks in ([1, 2], None):
            with pytest.raises(OutputError, match=f"process {proc.pid}"):
                with destination_lock(dst, ranks):
                    pass
    finally:
        stop(proc)


def test_a_killed_holder_releases_its_lock(tmp_path):
    dst = tmp_path / "out"
    proc = start_holder(dst)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert lock_path(dst).exists(), "a killed run leaves its (unlocked) lock file"
    with destination_lock(dst):
        pass
    assert not lock_path(dst).exists()


def test_within_one_process_overlaps_conflict_too(tmp_path):
    dst = tmp_path / "out"
    with destination_lock(dst, [0, 1]):
        with destination_lock(dst, [2]):
            with pytest.raises(OutputError, match=f"process {os.getpid()}"):
                with destination_lock(dst, [2, 5]):
                    pass
            with pytest.raises(OutputError):
                with destination_lock(dst):
                    pass
        assert lock_path(dst).exists(), "still held for ranks 0 and 1"
    with destination_lock(dst):
        pass
    assert dstlock._HELD == {}, "every descriptor closed"


def test_a_lock_file_replaced_while_locking_is_locked_again(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    real = dstlock._same_file
    calls = []

    def replaced_once(path, fd):
        calls.append(path)
        if len(calls) == 1:
            os.unlink(path)  # another program removes the file between our open and our lock
            return False
        return real(path, fd)

    monkeypatch.setattr(dstlock, "_same_file", replaced_once)
    with destination_lock(dst):
        assert lock_path(dst).exists()
        monkeypatch.setattr(dstlock, "_same_file", real)
        proc = subprocess.run([sys.executable, "-c", HOLDER, str(dst), "-"], input="", capture_output=True, check=False,
                              text=True, env={**os.environ, "PYTHONPATH": REPO})
        assert proc.returncode != 0 and "is writing this destination" in proc.stderr, \
            "the lock taken on the second file excludes others"
    assert len(calls) >= 2


def test_an_unwritable_parent_is_named(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(OutputError, match=r"cannot create the lock file .*\.out\.lock: Permission denied"):
        with destination_lock(tmp_path / "out"):
            pass


def test_rank_bytes_are_coalesced_into_ranges():
    assert dstlock._byte_ranges([3, 0, 1, 2, 7, 9, 8, 2]) == [(1, 4), (8, 3)]
    assert dstlock._byte_ranges(range(100_000)) == [(1, 100_000)], "one range, whatever the rank count"
