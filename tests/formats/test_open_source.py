"""Source discovery (`jaxreshard.formats.open_source`) on wrong or hostile folders: canonical rank folder names,
regular files only, unreadable files named; correct sources are found exactly as before."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxreshard.errors import FormatError
from jaxreshard.formats import open_source, rank_dirs, untrusted
from jaxreshard.formats.untrusted import NotACheckpoint

from ..helpers import one_line_error


def _rank(folder: Path, name: str, value: float = 0.0) -> Path:
    (folder / name).mkdir(parents=True)
    path = folder / name / "model.safetensors"
    save_file({"w": np.full(2, value, np.float32)}, path)
    return path


def _refused(path: Path, *words: str, kind: type = FormatError) -> str:
    return one_line_error(lambda: open_source(path), *words, kind=kind)


def test_canonical_rank_folders_are_found_by_number(tmp_path):
    files = {r: _rank(tmp_path, f"rank_{r}", r) for r in (0, 1, 2, 10)}
    source = open_source(tmp_path)
    assert source.files == {r: (p,) for r, p in files.items()} and source.distributed


@pytest.mark.parametrize("alias", ["rank_00", "rank_01", "rank_\u0661", "rank_\uff11", "rank_0\u0660"],
                         ids=["zero-padded-0", "zero-padded-1", "arabic-indic-1", "fullwidth-1", "mixed"])
def test_a_non_canonical_rank_folder_is_refused_by_name(tmp_path, alias):
    """`rank_0` and `rank_00` (or `rank_١`, which `\\d` matches) would both be rank 0 or 1, and which one won
    depended on the order the directory was listed in."""
    _rank(tmp_path, "rank_0")
    _rank(tmp_path, "rank_1")
    _rank(tmp_path, alias, 9.0)
    _refused(tmp_path, repr(alias), "not named rank_<n> with ASCII digits")


def test_look_alikes_that_are_not_rank_names_are_ignored_as_before(tmp_path):
    _rank(tmp_path, "rank_0")
    _rank(tmp_path, "rank_0.bak")
    _rank(tmp_path, "rank_x")
    (tmp_path / "rank_00").write_text("a file, not a rank folder")
    assert rank_dirs(tmp_path) == {0: tmp_path / "rank_0"}
    assert list(open_source(tmp_path).files) == [0]


@pytest.mark.parametrize("special", ["/dev/null", "/dev/zero"])
def test_a_device_as_the_source_is_refused_at_once(special):
    _refused(Path(special), "character device", "regular file")


def test_a_fifo_as_the_source_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.ckpt")
    _refused(tmp_path / "model.ckpt", "FIFO")


def test_a_socket_as_the_source_is_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        _refused(path, "socket")


def test_a_fifo_in_a_rank_folder_is_refused_not_skipped(tmp_path):
    _rank(tmp_path, "rank_0")
    os.mkfifo(tmp_path / "rank_0" / "zz_last.safetensors")
    _refused(tmp_path, "zz_last.safetensors", "FIFO", "only regular files")


def test_a_dangling_link_in_a_rank_folder_is_refused(tmp_path):
    _rank(tmp_path, "rank_0")
    (tmp_path / "rank_0" / "zz.safetensors").symlink_to(tmp_path / "gone")
    _refused(tmp_path, "zz.safetensors", "does not exist")


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    """Tests run as root, where permissions do not bite, so the EACCES comes from a patched `os.open`."""
    path = _rank(tmp_path, "rank_0")
    real_open = os.open

    def denied(p, flags, *args):
        if Path(p) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real_open(p, flags, *args)

    monkeypatch.setattr(untrusted.os, "open", denied)
    _refused(tmp_path, str(path), "Permission denied")


def test_an_unlistable_folder_is_named(tmp_path, monkeypatch):
    _rank(tmp_path, "rank_0")

    def denied(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    _refused(tmp_path, str(tmp_path), "cannot list", "Permission denied")


def test_a_folder_with_no_checkpoint_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    _refused(tmp_path, "expected rank_<n>/ folders", kind=NotACheckpoint)
    _refused(tmp_path / "notes.txt", "unknown checkpoint format", kind=NotACheckpoint)
