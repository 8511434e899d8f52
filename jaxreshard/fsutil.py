"""Crash-safe output: one writer per destination, a temporary sibling, fsync, an atomic commit.

- A lock next to the destination (`dstlock`) admits one writer per destination (or per destination rank).
- Everything is written into `.<name>.partial-<host>-<pid>-<random>`, a sibling of the destination, fsynced,
  and committed with `renameat2`: `RENAME_NOREPLACE` without `overwrite` (an output that appeared meanwhile,
  even an empty folder, is never replaced), `RENAME_EXCHANGE` with it (the destination path holds the old or
  the new output at every instant; the old one is removed afterwards). Where the file system lacks them, a
  check + rename (logged) is the fallback.
- On failure only our own temporary is removed; a later run removes temporaries whose owner on this host is
  gone (and says so), leaving those of live processes and other hosts alone.
- A destination that is a symlink is kept: the output goes where it points.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from .dstlock import destination_lock, lock_path
from .errors import ConfigError, OutputError, OutputExistsError
from .fsops import FAULT_ENV as FAULT_ENV  # re-exported: tests set it
from .fsops import fault, fsync_dir, fsync_tree, make_dir, make_parent, write_failure, writes_named
from .remote import published
from .renameat import RENAME_EXCHANGE, RENAME_NOREPLACE
from .renameat import Unsupported as _Unsupported
from .renameat import renameat2 as _renameat2

log = logging.getLogger(__name__)

__all__ = [
    "atomic_output",
    "check_destination",
    "check_file_prefix",
    "commit_tree",
    "destination_lock",
    "fault",
    "fsync_tree",
    "lock_path",
    "partial_dir",
    "remove_stale_partials",
    "resolve_destination",
    "staged_rank_folders",
    "stale_partials",
    "write_failure",
]  # fmt: skip

PREFIX_MAX = 128  # bytes; a rank file name is prefix + rank + suffix, and names are capped at 255 bytes


def resolve_destination(dst: str | Path) -> Path:
    """The real path a destination names (symlinks followed, also a dangling one): where the output goes, and
    what the lock and the temporaries sit next to."""
    return Path(os.path.realpath(Path(dst).absolute()))


def check_destination(dst: Path, sources: Sequence[Path], *, overwrite: bool) -> None:
    """Refuse a destination that exists (unless `overwrite`) or that overlaps a source: `sources` should list
    the source folder and every file actually read, so a rank folder or part file that is a symlink into the
    destination is caught too (`--overwrite` must never delete what a source reads)."""
    real_dst = resolve_destination(dst)
    for src in sources:
        src = Path(src).resolve()
        if real_dst == src or src in real_dst.parents or real_dst in src.parents:
            raise ConfigError(f"{dst}: the destination overlaps the source {src}; choose another destination")
    try:
        taken = real_dst.exists() and not (real_dst.is_dir() and not any(real_dst.iterdir()))
    except OSError as e:  # a name too long, a folder we may not list
        raise OutputError(f"{dst}: cannot be used as the destination: {e.strerror}; choose another destination") \
            from None
    if taken and overwrite and _holds_cwd(real_dst):
        raise ConfigError(f"{dst}: --overwrite would replace the current directory (or a folder holding it) "
                          f"{Path.cwd()}; choose another destination")
    if taken:
        if not real_dst.is_dir():
            raise OutputExistsError(f"{dst}: exists and is not a directory; remove it or choose another destination")
        if not overwrite:
            raise OutputExistsError(f"{dst}: already exists and is not empty; pass --overwrite to replace it")


def _holds_cwd(path: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return path == cwd or path in cwd.parents


def check_file_prefix(prefix: str) -> str:
    """`prefix` if it is a plain file-name prefix (rank files are `<prefix><rank>.<suffix>`), else ConfigError:
    no path separators, NUL or control characters, no leading '.', at most PREFIX_MAX bytes."""
    if not isinstance(prefix, str):
        raise ConfigError(f"--prefix must be a string, got {type(prefix).__name__}")
    bad = next((c for c in prefix if c in "/\\" or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None or prefix.startswith("."):
        what = "a leading '.'" if bad is None else f"the character {bad!r}"
        raise ConfigError(f"--prefix {prefix!r} contains {what}; it must be a plain file-name prefix such as "
                          "'checkpoint_' (files are always written inside --dst)")
    if len(prefix.encode("utf-8", "surrogatepass")) > PREFIX_MAX:
        raise ConfigError(f"--prefix is {len(prefix.encode('utf-8', 'surrogatepass'))} bytes long; at most "
                          f"{PREFIX_MAX} are allowed")
    return prefix


@contextlib.contextmanager
def atomic_output(dst: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Hold the destination's lock, yield a fresh temporary sibling directory; on success commit it as `dst`
    (see the module docstring), on error remove it. Stale temporaries of killed runs are removed first
    (`--resume` takes what it keeps from them before: see resume.py)."""
    target = resolve_destination(dst)
    check_destination(target, [], overwrite=overwrite)
    make_parent(target)
    with destination_lock(target, None):
        fault("locked")
        check_destination(target, [], overwrite=overwrite)  # again, now that no other run can write it
        was_empty_dir = target.is_dir()  # (check_destination passed: an empty folder, if anything)
        tmp = _fresh_partial(target)
        try:
            with _filled(target, tmp):
                yield tmp
            commit_tree(tmp, target, overwrite=overwrite, replace_empty_dir=was_empty_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def _filled(target: Path, tmp: Path) -> Iterator[None]:
    """The caller fills `tmp` (write errors name `target`); then it is made durable and the `before-commit` fault
    point runs, so every commit starts from a temporary that is complete on disk."""
    with writes_named(target):
        yield
    fsync_tree(tmp)
    fault("before-commit")


@contextlib.contextmanager
def staged_rank_folders(dst: Path, folders: Sequence[str], ranks: Sequence[int], *,
                        overwrite: bool = False) -> Iterator[Path]:  # fmt: skip
    """Like `atomic_output` for some ranks only (`--ranks`): lock only those ranks, yield a temporary, then
    commit each of its top-level `folders` into `dst` on its own; other rank folders are never touched."""
    target = resolve_destination(dst)
    make_parent(target)
    with destination_lock(target, ranks):
        fault("locked")
        taken = [f for f in folders if os.path.lexists(target / f)]
        if taken and not overwrite:
            raise OutputExistsError(f"{dst}: {', '.join(taken)} already exist; pass --overwrite to replace them")
        tmp = _fresh_partial(target)
        try:
            with _filled(target, tmp):
                yield tmp
            make_dir(target)
            for folder in folders:  # each rank folder replaces its old self only once complete
                commit_tree(tmp / folder, target / folder, overwrite=overwrite)
                fault("folder-committed")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def commit_tree(tmp: Path, target: Path, *, overwrite: bool, replace_empty_dir: bool = False) -> None:
    """Move the complete tree `tmp` to `target` (both in one folder). Without `overwrite` nothing that exists
    is replaced, except, with `replace_empty_dir`, the empty folder the user named as destination (if it is
    still empty); with `overwrite` an existing target is swapped out atomically, then removed. A folder standing
    for an object-store destination is published instead (its manifest last: see remote/destination.py)."""
    if published(tmp, target):
        return
    try:
        if overwrite and os.path.lexists(target):
            _swap_in(tmp, target)
        else:
            if replace_empty_dir and target.is_dir() and not target.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(target)  # an empty folder given as destination; fails if anything is in it now
            _rename_noreplace(tmp, target)
        fsync_dir(target.parent)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputError(f"{target}: appeared while this run was writing (another program?); it was left "
                              "as it is and this run's output was discarded") from None
        raise OutputError(f"committing {target} failed: {e.strerror}") from None


def _swap_in(tmp: Path, target: Path) -> None:
    try:
        _renameat2(tmp, target, RENAME_EXCHANGE)
    except _Unsupported:
        log.warning("%s: this file system cannot swap folders atomically; replacing the old output in two "
                    "steps (it is missing for an instant)", target)
        old = _temp_name(target, "old")
        os.rename(target, old)
        fault("commit-moved-old")
        os.rename(tmp, target)
    else:
        fault("commit-swapped")  # tmp now holds the old output
        old = _temp_name(target, "old")
        os.rename(tmp, old)
    fsync_dir(target.parent)
    if old.is_dir() and not old.is_symlink():  # replaced only after the new output is in place, as asked
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()  # a file or a symlink that stood where a rank folder goes (never what it points to)


def _rename_noreplace(src: Path, dst: Path) -> None:
    try:
        _renameat2(src, dst, RENAME_NOREPLACE)
    except _Unsupported:
        if os.path.lexists(dst):  # the fallback: a check, then a rename (a window, but a small one)
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)


# ------------------------------------------------------------------------------------------------ temporaries


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def _temp_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def partial_dir(dst: Path) -> Path:
    """A fresh, uniquely named temporary sibling `.<name>.partial-<host>-<pid>-<random>` of `dst`, created
    with the umask's permissions (unique per process and call, so concurrent writers never share one)."""
    dst = resolve_destination(dst)
    for _ in range(100):
        tmp = _temp_name(dst, "partial")
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"cannot create {tmp}: {e.strerror}; make {dst.parent} writable or choose "
                              "another destination") from None
    raise OutputError(f"cannot find a free temporary name next to {dst}")


def _fresh_partial(target: Path) -> Path:
    """Our new, empty temporary for `target`, once the stale temporaries of killed runs are removed."""
    remove_stale_partials(target)
    return partial_dir(target)


def _owned_temporaries(dst: Path, kind: str) -> list[tuple[Path, str, int]]:
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.{kind}-([^-]+)-(\d+)-[0-9a-f]{{8}}")
    out = []
    with contextlib.suppress(OSError):
        for child in dst.parent.iterdir():
            m = pattern.fullmatch(child.name)
            if m:
                out.append((child, m.group(1), int(m.group(2))))
    return sorted(out)


def _gone(host: str, pid: int) -> bool:
    """True when the owner of a temporary surely no longer runs: on this host, and no process has its pid."""
    if host != _host() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def stale_partials(dst: Path) -> list[Path]:
    """Temporaries `.<name>.partial-*` of `dst` whose owner (a run on this host) is gone."""
    dst = resolve_destination(dst)
    return [p for p, host, pid in _owned_temporaries(dst, "partial") if _gone(host, pid)]


def remove_stale_partials(dst: Path) -> list[Path]:
    """Remove the stale temporaries of `dst` (partials, and old outputs a killed `--overwrite` was removing)
    and log one line naming them; returns what was removed."""
    dst = resolve_destination(dst)
    stale = stale_partials(dst)
    olds = [p for p, host, pid in _owned_temporaries(dst, "old") if _gone(host, pid)]
    if olds and not os.path.lexists(dst):  # a two-step replacement was killed between its steps: keep it
        log.warning("%s is missing but %s holds its previous output (a run was killed while replacing it); "
                    "rename it back or remove it", dst, olds[0])
        olds = []
    for path in stale + olds:
        shutil.rmtree(path, ignore_errors=True)
    if stale or olds:
        log.warning("removed %d stale temporary folder(s) of killed runs next to %s: %s", len(stale + olds),
                    dst, ", ".join(p.name for p in stale + olds))
    return stale + olds
