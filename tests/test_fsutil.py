"""Crash-safe output: `atomic_output`, `staged_rank_folders`, temporaries, `check_destination`, `--prefix`."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jaxreshard import fsops, fsutil
from jaxreshard.errors import ConfigError, JaxreshardError, OutputError, OutputExistsError
from jaxreshard.fsutil import atomic_output, check_destination, check_file_prefix, staged_rank_folders


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    """Hidden siblings the writer may have created (`.NAME.partial-*`, `.NAME.old-*`)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_success_renames_into_place(tmp_path):
    dst = tmp_path / "out"
    with atomic_output(dst) as tmp:
        assert tmp.is_dir() and tmp != dst
        assert tmp.parent == dst.parent, "a sibling, so the final rename stays on one file system"
        assert ".partial-" in tmp.name and tmp.name.startswith(".")
        assert not dst.exists(), "nothing that looks finished exists before the block completes"
        (tmp / "rank_0").mkdir()
        (tmp / "rank_0" / "a.bin").write_bytes(b"abc")
        (tmp / "top.txt").write_bytes(b"top")
    assert _tree(dst) == {"rank_0/a.bin": b"abc", "top.txt": b"top"}
    assert not tmp.exists()
    assert _leftovers(tmp_path, "out") == []


def test_creates_missing_parents(tmp_path):
    dst = tmp_path / "a" / "b" / "out"
    with atomic_output(dst) as tmp:
        (tmp / "f").write_bytes(b"1")
    assert _tree(dst) == {"f": b"1"}


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_removes_the_temp_dir_and_leaves_no_dst(tmp_path, exc):
    dst = tmp_path / "out"
    with pytest.raises(type(exc)):
        with atomic_output(dst) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise exc
    assert not dst.exists()
    assert not tmp.exists()
    assert _leftovers(tmp_path, "out") == []


def test_existing_non_empty_dst_is_refused_and_untouched(tmp_path):
    dst = tmp_path / "out"
    (dst / "sub").mkdir(parents=True)
    (dst / "sub" / "keep.bin").write_bytes(b"keep")
    (dst / "x").write_bytes(b"x")
    before = _tree(dst)
    entered = False
    with pytest.raises(OutputExistsError) as info:
        with atomic_output(dst):
            entered = True
    assert not entered
    assert str(dst) in str(info.value)
    assert "--overwrite" in str(info.value)
    assert _tree(dst) == before
    assert _leftovers(tmp_path, "out") == []


def test_existing_file_dst_is_refused(tmp_path):
    dst = tmp_path / "out"
    dst.write_bytes(b"file")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError):
            with atomic_output(dst, overwrite=overwrite):
                pass
        assert dst.read_bytes() == b"file"


def test_overwrite_replaces_after_success(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.bin").write_bytes(b"old")
    with atomic_output(dst, overwrite=True) as tmp:
        assert _tree(dst) == {"old.bin": b"old"}, "the old output stays until the new one is complete"
        (tmp / "new.bin").write_bytes(b"new")
    assert _tree(dst) == {"new.bin": b"new"}
    assert _leftovers(tmp_path, "out") == []


def test_overwrite_keeps_the_old_dst_when_the_block_raises(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.bin").write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic_output(dst, overwrite=True) as tmp:
            (tmp / "new.bin").write_bytes(b"new")
            raise ValueError("interrupted")
    assert _tree(dst) == {"old.bin": b"old"}
    assert _leftovers(tmp_path, "out") == []


def test_empty_existing_dst_dir_is_allowed(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    with atomic_output(dst) as tmp:
        (tmp / "f").write_bytes(b"f")
    assert _tree(dst) == {"f": b"f"}
    assert _leftovers(tmp_path, "out") == []


def test_a_stale_partial_dir_of_another_process_is_left_alone(tmp_path):
    dst = tmp_path / "out"
    other = tmp_path / f".out.partial-{os.getpid() + 1}"
    other.mkdir()
    (other / "theirs").write_bytes(b"t")
    with atomic_output(dst) as tmp:
        (tmp / "f").write_bytes(b"f")
    assert _tree(other) == {"theirs": b"t"}
    assert _tree(dst) == {"f": b"f"}


# --------------------------------------------------------------------------------------------- check_destination


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "ckpt"
    (src / "rank_0").mkdir(parents=True)
    (src / "rank_0" / "checkpoint_0.safetensors").write_bytes(b"data")
    return src


@pytest.mark.parametrize("where", ["same", "inside", "deep_inside", "parent"])
def test_check_destination_refuses_overlap_with_source(tmp_path, where):
    src = _src(tmp_path)
    dst = {"same": src, "inside": src / "out", "deep_inside": src / "rank_0" / "out", "parent": tmp_path}[where]
    for overwrite in (False, True):
        with pytest.raises(JaxreshardError) as info:
            check_destination(dst, [src], overwrite=overwrite)
        assert str(src) in str(info.value) or str(dst) in str(info.value)
    assert _tree(src) == {"rank_0/checkpoint_0.safetensors": b"data"}


def test_overwrite_never_replaces_the_current_directory_or_a_folder_holding_it(tmp_path, monkeypatch):
    """`--dst . --overwrite` (or `..`) swapped the user's working folder, files and all, for the output."""
    (tmp_path / "work" / "keep").mkdir(parents=True)
    (tmp_path / "work" / "keep" / "file").write_text("precious")
    monkeypatch.chdir(tmp_path / "work" / "keep")
    for dst in (".", "..", str(tmp_path)):
        with pytest.raises(ConfigError, match=r"--overwrite would replace the current directory \(or a folder holding "
                                              rf"it\) {re.escape(str(tmp_path / 'work' / 'keep'))}; choose another"):
            check_destination(Path(dst), [], overwrite=True)
    check_destination(tmp_path / "work" / "other", [], overwrite=True)  # a sibling is fine
    assert (tmp_path / "work" / "keep" / "file").read_text() == "precious"


def test_a_destination_name_too_long_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match=r": cannot be used as the destination: File name too long; choose another"):
        check_destination(tmp_path / ("a" * 300), [], overwrite=False)


def test_check_destination_refuses_a_file_sources_directory(tmp_path):
    src = _src(tmp_path)
    src_file = src / "rank_0" / "checkpoint_0.safetensors"
    with pytest.raises(JaxreshardError):
        check_destination(src / "rank_0", [src_file], overwrite=True)
    with pytest.raises(JaxreshardError):
        check_destination(src_file, [src_file], overwrite=True)


def test_check_destination_sees_through_symlinks(tmp_path):
    src = _src(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(src)
    with pytest.raises(JaxreshardError):
        check_destination(link / "out", [src], overwrite=False)
    with pytest.raises(JaxreshardError):
        check_destination(src / "x", [link], overwrite=False)


def test_check_destination_accepts_a_sibling_and_a_similar_name(tmp_path):
    src = _src(tmp_path)
    check_destination(tmp_path / "out", [src], overwrite=False)
    check_destination(tmp_path / "ckpt_converted", [src], overwrite=False)  # shares a prefix, not a path
    check_destination(tmp_path / "ckpt2" / "x", [src], overwrite=False)


def test_check_destination_existing_outputs(tmp_path):
    src = _src(tmp_path)
    full = tmp_path / "full"
    full.mkdir()
    (full / "f").write_bytes(b"f")
    with pytest.raises(OutputExistsError):
        check_destination(full, [src], overwrite=False)
    check_destination(full, [src], overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_destination(empty, [src], overwrite=False)
    assert _tree(full) == {"f": b"f"}


# --------------------------------------------------------------------------------------------- the commit


def test_an_output_that_appears_meanwhile_is_never_replaced(tmp_path):
    dst = tmp_path / "out"
    for appeared in ("empty dir", "file"):
        with pytest.raises(OutputError, match="appeared while this run was writing"):
            with atomic_output(dst) as tmp:
                (tmp / "new.bin").write_bytes(b"new")
                dst.mkdir() if appeared == "empty dir" else dst.write_bytes(b"theirs")
        assert (dst.is_dir() and not any(dst.iterdir())) if appeared == "empty dir" else dst.read_bytes() == b"theirs"
        assert not tmp.exists()
        assert _leftovers(tmp_path, "out") == []
        dst.rmdir() if dst.is_dir() else dst.unlink()


def test_an_empty_dir_filled_meanwhile_is_not_replaced(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    with pytest.raises(OutputError):
        with atomic_output(dst) as tmp:
            (tmp / "new.bin").write_bytes(b"new")
            (dst / "theirs").write_bytes(b"t")
    assert _tree(dst) == {"theirs": b"t"}


def test_overwrite_swaps_and_removes_the_old_tree(tmp_path):
    dst = tmp_path / "out"
    (dst / "rank_0").mkdir(parents=True)
    (dst / "rank_0" / "old.bin").write_bytes(b"old")
    inode = dst.stat().st_ino
    with atomic_output(dst, overwrite=True) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
        new_inode = tmp.stat().st_ino
    assert _tree(dst) == {"new.bin": b"new"}
    assert dst.stat().st_ino == new_inode != inode, "the new tree itself was moved into place"
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_without_renameat2_the_fallback_still_commits(tmp_path, monkeypatch, caplog, overwrite):
    def unsupported(*args):
        raise fsutil._Unsupported

    monkeypatch.setattr(fsutil, "_renameat2", unsupported)
    dst = tmp_path / "out"
    if overwrite:
        dst.mkdir()
        (dst / "old.bin").write_bytes(b"old")
    with atomic_output(dst, overwrite=overwrite) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    assert _tree(dst) == {"new.bin": b"new"}
    assert ("cannot swap folders atomically" in caplog.text) == overwrite
    with pytest.raises(OutputError):  # the fallback's check still refuses an output that appeared meanwhile
        with atomic_output(tmp_path / "other") as tmp:
            (tmp_path / "other").write_bytes(b"theirs")
    assert (tmp_path / "other").read_bytes() == b"theirs"


def test_output_dirs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_output(tmp_path / "out") as tmp:
            (tmp / "rank_0").mkdir()
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
        assert stat.S_IMODE((tmp_path / "out" / "rank_0").stat().st_mode) == 0o750
    finally:
        os.umask(old)


def test_a_symlinked_destination_is_kept_and_written_through(tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic_output(link) as tmp:
        (tmp / "a").write_bytes(b"1")
    assert link.is_symlink() and _tree(real) == {"a": b"1"}
    with atomic_output(link, overwrite=True) as tmp:
        (tmp / "b").write_bytes(b"2")
    assert link.is_symlink() and os.readlink(link) == str(real) and _tree(real) == {"b": b"2"}
    with pytest.raises(OutputExistsError):
        with atomic_output(link):
            pass


def test_unwritable_parent_is_an_output_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(OutputError, match=r"cannot create .*new.*Read-only file system"):
        with atomic_output(tmp_path / "new" / "out"):
            pass


def test_staged_rank_folders_commit_each_folder_and_refuse_taken_ones(tmp_path):
    dst = tmp_path / "out"
    with staged_rank_folders(dst, ["rank_0", "rank_1"], [0, 1]) as tmp:
        for r in (0, 1):
            (tmp / f"rank_{r}").mkdir()
            (tmp / f"rank_{r}" / "f").write_bytes(b"%d" % r)
    with staged_rank_folders(dst, ["rank_2"], [2]) as tmp:
        (tmp / "rank_2").mkdir()
        (tmp / "rank_2" / "f").write_bytes(b"2")
    assert _tree(dst) == {"rank_0/f": b"0", "rank_1/f": b"1", "rank_2/f": b"2"}
    with pytest.raises(OutputExistsError, match="rank_1"):
        with staged_rank_folders(dst, ["rank_1"], [1]):
            pass
    with staged_rank_folders(dst, ["rank_1"], [1], overwrite=True) as tmp:
        (tmp / "rank_1").mkdir()
        (tmp / "rank_1" / "g").write_bytes(b"new")
    assert _tree(dst) == {"rank_0/f": b"0", "rank_1/g": b"new", "rank_2/f": b"2"}
    assert _leftovers(tmp_path, "out") == []


# --------------------------------------------------------------------------------------------- temporaries


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partial_names_carry_host_and_pid(tmp_path):
    with atomic_output(tmp_path / "out") as tmp:
        m = re.fullmatch(r"\.out\.partial-([^-]+)-(\d+)-([0-9a-f]{8})", tmp.name)
        assert m and m.group(1) == fsutil._host() and int(m.group(2)) == os.getpid()
        assert fsutil.stale_partials(tmp_path / "out") == [], "a live owner's partial is not stale"


def test_stale_partials_of_gone_owners_are_removed_and_reported(tmp_path, caplog):
    dst = tmp_path / "out"
    host, dead = fsutil._host(), _dead_pid()
    stale = tmp_path / f".out.partial-{host}-{dead}-0123abcd"
    live = tmp_path / f".out.partial-{host}-1-0123abcd"  # pid 1 always runs
    other_host = tmp_path / f".out.partial-elsewhere-{dead}-0123abcd"
    other_dst = tmp_path / f".other.partial-{host}-{dead}-0123abcd"
    old = tmp_path / f".out.old-{host}-{dead}-0123abcd"
    for d in (stale, live, other_host, other_dst, old):
        d.mkdir()
        (d / "x").write_bytes(b"x")
    assert fsutil.stale_partials(dst) == [stale]
    dst.mkdir()
    (dst / "old").write_bytes(b"o")
    with caplog.at_level(logging.WARNING):
        with atomic_output(dst, overwrite=True) as tmp:
            (tmp / "f").write_bytes(b"f")
    assert not stale.exists() and not old.exists()
    assert live.exists() and other_host.exists() and other_dst.exists()
    lines = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(lines) == 1 and stale.name in lines[0] and old.name in lines[0]


def test_an_old_tree_is_kept_when_the_destination_is_missing(tmp_path, caplog):
    dst = tmp_path / "out"
    old = tmp_path / f".out.old-{fsutil._host()}-{_dead_pid()}-0123abcd"
    old.mkdir()
    assert fsutil.remove_stale_partials(dst) == []
    assert old.exists() and "holds its previous output" in caplog.text


# --------------------------------------------------------------------------------------------- --prefix


@pytest.mark.parametrize("prefix", ["../../x", "a/b", "a\\b", "x\0y", ".hidden", "tab\t", "a" * 129, "/abs"])
def test_bad_prefixes_are_refused(prefix):
    with pytest.raises(ConfigError, match="--prefix"):
        check_file_prefix(prefix)


@pytest.mark.parametrize("prefix", ["checkpoint_", "", "llama-7b.", "модель_", "a" * 128])
def test_plain_prefixes_are_accepted(prefix):
    assert check_file_prefix(prefix) == prefix


# --------------------------------------------------------------------------------------------- the fault hook


def test_fault_fires_only_at_its_point_and_count(monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(fsops, "_FAULT_COUNTS", {})  # fault() lives in fsops; fsutil re-exports it
    monkeypatch.setenv(fsutil.FAULT_ENV, "param-written@2:TERM")
    for point in ("other", "param-written", "param-written", "param-written"):
        fsutil.fault(point)
    assert sent == [(os.getpid(), signal.SIGTERM)]
    monkeypatch.delenv(fsutil.FAULT_ENV)
    fsutil.fault("param-written")
    assert len(sent) == 1


def test_overwriting_a_rank_folder_that_is_a_symlink_replaces_the_link_only(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_bytes(b"p")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "rank_0").symlink_to(elsewhere)
    (dst / "rank_1").write_bytes(b"a file where a folder goes")
    with staged_rank_folders(dst, ["rank_0", "rank_1"], [0, 1], overwrite=True) as tmp:
        for r in (0, 1):
            (tmp / f"rank_{r}").mkdir()
            (tmp / f"rank_{r}" / "f").write_bytes(b"%d" % r)
    assert _tree(dst) == {"rank_0/f": b"0", "rank_1/f": b"1"} and not (dst / "rank_0").is_symlink()
    assert _tree(elsewhere) == {"precious": b"p"}
    assert _leftovers(tmp_path, "out") == []


def test_destination_failures_inside_the_block_are_named_as_writes(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(OutputError, match=r"writing .*/x\.bin failed: No space left on device; free space"):
        with atomic_output(dst) as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "x.bin"))
    with pytest.raises(OutputError, match=r"writing .*out failed: Read-only file system; make the destination"):
        with staged_rank_folders(dst, ["rank_0"], [0]):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    with pytest.raises(FileNotFoundError):  # anything else is not the destination's fault: left as it is
        with atomic_output(dst):
            raise FileNotFoundError(errno.ENOENT, "gone", "/some/source")
    assert not dst.exists() and _leftovers(tmp_path, "out") == []
