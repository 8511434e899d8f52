"""execute.py's progress reports (for `--resume`): the open files are fsynced side by side, and a write that
failed behind surfaces there as the one-line error naming its file. Asserted with a barrier, never timing."""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jaxreshard.box import Box
from jaxreshard.errors import JaxreshardError
from jaxreshard.execute import PROGRESS_BYTES, _Run


class _Writer:
    def __init__(self, path: Path, barrier: threading.Barrier, fail: bool = False):
        self.path, self.barrier, self.fail = path, barrier, fail

    def sync(self):
        self.barrier.wait()  # broken (the test fails) unless every file's sync runs at once
        if self.fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return {self.path: (8, "ab" * 32)}


@dataclass(frozen=True)
class _Shard:
    dst_box: Box


def _run(tmp_path, writers, reports):
    shard = _Shard(Box.full((PROGRESS_BYTES,)))
    return SimpleNamespace(
        plan=SimpleNamespace(params={"p": SimpleNamespace(dst_dtype=np.dtype(np.uint8))}),
        users={"p": {shard: [0]}}, unsynced=0, on_progress=lambda k, states: reports.append((k, states)),
        writers=writers, files={r: f"rank_{r}/f" for r in writers}, dst_dir=tmp_path, position={"p": 4},
    )  # fmt: skip


def test_progress_fsyncs_the_open_files_side_by_side(tmp_path):
    barrier = threading.Barrier(4, timeout=30)
    writers = {r: _Writer(tmp_path / f"rank_{r}" / "f", barrier) for r in range(4)}
    reports: list = []
    _Run.progress(_run(tmp_path, writers, reports), "p")  # type: ignore[arg-type]
    assert reports == [(5, {f"rank_{r}/f": (8, "ab" * 32) for r in range(4)})]


def test_a_failed_sync_names_its_file(tmp_path):
    barrier = threading.Barrier(3, timeout=30)
    writers = {r: _Writer(tmp_path / f"rank_{r}" / "f", barrier, fail=r == 2) for r in range(3)}
    reports: list = []
    with pytest.raises(JaxreshardError, match=r"^writing rank_2/f failed: No space left on device"):
        _Run.progress(_run(tmp_path, writers, reports), "p")  # type: ignore[arg-type]
    assert reports == []
