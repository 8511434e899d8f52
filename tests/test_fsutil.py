"""Crash-safe output: `atomic_output` and `check_destination`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jaxreshard.errors import JaxreshardError, OutputExistsError
from jaxreshard.fsutil import atomic_output, check_destination


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
