"""`--resume`: keep the rank files an interrupted run completed, write only the rest.

While a run writes into its temporary folder, every file that is complete (written, fsynced, closed) is
recorded with its size and SHA-256 in a journal, `.jaxreshard.journal`, in that folder; the journal's first
line names the conversion (a key over the plan, the output options and the source files' sizes and times)
and, for people reading it, the owner (host, pid). A rerun with `--resume` looks for the newest temporary
folder of the same destination whose owner is gone (`fsutil.stale_partials`: by the host and pid in the
folder's name) and whose key is the same conversion, checks each journaled rank file's size
and SHA-256 again (a damaged one is written anew, never kept), moves the good ones into its own temporary
folder, and plans only the missing ranks. Rank files are independent, so the result is the same bytes as an
uninterrupted run. The journal never reaches the committed output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats.manifest import FileRecord, file_sha256, prefix_sha256
from .fsutil import partial_dir, stale_partials
from .plan import BoxReads, PerRankCopy, Plan
from .transforms import LoraFold

log = logging.getLogger(__name__)

JOURNAL = ".jaxreshard.journal"
MAX_JOURNAL_BYTES = 64 << 20  # ~300k files; a bigger "journal" is not ours and is ignored


@dataclass(frozen=True)
class Held:
    """Verified files of an interrupted run, moved into a temporary folder of ours until `start` takes them:
    complete ones, and (single-process runs) the others written in part, continued from parameter `skip`."""

    dir: Path
    files: dict[str, FileRecord]
    partial: dict[str, tuple[int, Any]] = field(default_factory=dict)  # rel -> (bytes, hashlib sha256 of them)
    skip: int = 0


def plan_key(plan: Plan, output: Any) -> str:
    """What must be equal for files of an interrupted run to be reused: the plan's parameters, layouts and
    rank files, the output options, and each source file's size and modification time. Plans whose data does
    not come from plain source files alone (LoRA folds, orbax restores) are never resumed."""
    if any(not isinstance(i.source, (BoxReads, PerRankCopy)) or any(isinstance(t, LoraFold) for t in i.transforms)
           for i in plan.params.values()):
        return os.urandom(16).hex()
    sources = sorted({str(e.path) for entries in plan.src_entries.values() for e in entries.values()})
    stats = []
    for path in sources:
        try:
            st = os.stat(path)
            stats.append([path, st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append([path, -1, -1])
    data = {
        "output": repr(output), "sources": stats,
        "params": [[p, list(i.shape), str(i.src_dtype), str(i.dst_dtype), repr(i.src_layout), repr(i.dst_layout),
                    isinstance(i.source, PerRankCopy)] for p, i in plan.params.items()],
        "ranks": [[r.dst_rank, r.dst_file, [[s.param, list(s.dst_box.start), list(s.dst_box.stop)] for s in r.shards],
                   [(t.param, t.value) for t in r.texts], list(r.order)] for r in plan.ranks],
    }  # fmt: skip
    return hashlib.sha256(json.dumps(data, default=str).encode()).hexdigest()


def adopt(dst: Path, key: str, plan: Plan, *, continuable: bool = False) -> Held | None:
    """Take over the verified rank files of the newest interrupted run of this conversion into `dst` (with
    `continuable`, also the files it wrote in part, when the last progress record of them verifies)."""
    dst = Path(dst).absolute()
    found = sorted((p for p in stale_partials(dst) if _header(p).get("key") == key),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    if not found:
        log.info("--resume: no interrupted run of this conversion into %s; converting everything", dst)
        return None
    old = found[0]
    wanted = {r.dst_file for r in plan.ranks}
    held = partial_dir(dst)
    files: dict[str, FileRecord] = {}
    for rel, record in _entries(old / JOURNAL).items():
        if rel not in wanted:
            continue
        path = old / rel
        if not _intact(path, record):
            log.warning("--resume: %s of the interrupted run is damaged; it is written again", rel)
            continue
        (held / rel).parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, held / rel)
        files[rel] = record
    partial, skip = _continue(old, held, wanted - set(files)) if continuable else ({}, 0)
    _journal(held, key, files, partial, skip)  # should this run die before taking them, a rerun adopts `held`
    shutil.rmtree(old, ignore_errors=True)
    log.info("--resume: kept %d of %d rank files from %s", len(files), len(wanted), old.name)
    if partial:
        log.info("--resume: continuing %d rank files after parameter %d of %d", len(partial), skip, len(plan.params))
    return Held(held, files, partial, skip)


def _continue(old: Path, held: Path, remaining: set[str]) -> tuple[dict[str, tuple[int, Any]], int]:
    """The files of the interrupted run's last progress record, if it covers every remaining rank file and
    each file's recorded prefix still has its SHA-256; they are moved into `held`."""
    record = _last_progress(old / JOURNAL)
    if record is None or set(record[1]) != remaining:
        return {}, 0
    skip, states = record
    prefixes = {}
    for rel, (size, sha) in states.items():
        path = old / rel
        try:
            h = prefix_sha256(path, size) if path.is_file() and not path.is_symlink() else None
        except OSError:
            h = None
        if h is None or h.hexdigest() != sha:
            log.warning("--resume: %s of the interrupted run is damaged; the unfinished ranks are written anew", rel)
            return {}, 0
        prefixes[rel] = (size, h)
    for rel in prefixes:
        (held / rel).parent.mkdir(parents=True, exist_ok=True)
        os.rename(old / rel, held / rel)
    return prefixes, skip


def _journal(folder: Path, key: str, files: dict[str, FileRecord], partial: dict[str, tuple[int, Any]],
             skip: int) -> None:
    """A journal naming us as the owner of `folder` and the files it holds (as an interrupted run's would)."""
    _begin_journal(folder, key)
    record = journal_writer(folder)
    for rel, rec in files.items():
        record(rel, rec)
    if partial:
        progress_writer(folder)(skip, {rel: (size, h.hexdigest()) for rel, (size, h) in partial.items()})


def _begin_journal(folder: Path, key: str) -> None:
    header = {"journal": 1, "key": key, "host": socket.gethostname(), "pid": os.getpid()}
    (folder / JOURNAL).write_text(json.dumps(header) + "\n")


def _journal_records(journal: Path) -> list[bytes]:
    """The journal's lines after its header; none when it cannot be read or is over the size cap."""
    try:
        if journal.stat().st_size > MAX_JOURNAL_BYTES:
            return []
        return journal.read_bytes().splitlines()[1:]
    except OSError:
        return []


def _last_progress(journal: Path) -> tuple[int, dict[str, tuple[int, str]]] | None:
    for line in reversed(_journal_records(journal)):
        try:
            item = json.loads(line)
            skip, states = item["progress"], item["files"]
            out = {str(rel): (int(size), str(sha)) for rel, (size, sha) in dict(states).items()}
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(skip, int) and all(not r.startswith("/") and ".." not in r.split("/") for r in out):
            return skip, out
    return None


def _intact(path: Path, record: FileRecord) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size == record.size \
            and file_sha256(path) == record.sha256  # fmt: skip
    except OSError:
        return False


def start(tmp: Path, key: str, held: Held | None) -> dict[str, FileRecord]:
    """Begin the journal of `tmp` and move the held files in; returns their records."""
    _begin_journal(tmp, key)
    files: dict[str, FileRecord] = {}
    if held is not None:
        record = journal_writer(tmp)
        for rel in [*held.files, *held.partial]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.rename(held.dir / rel, tmp / rel)
        for rel, rec in held.files.items():
            record(rel, rec)
            files[rel] = rec
        shutil.rmtree(held.dir, ignore_errors=True)  # only its journal is left
    return files


def progress_writer(tmp: Path):
    """`on_progress` for the executor: append how far the open files are written (first k parameters)."""
    path = Path(tmp) / JOURNAL

    def record(skip: int, states: dict[str, tuple[int, str]]) -> None:
        _append(path, {"progress": skip, "files": {r: list(v) for r, v in states.items()}})

    return record


def journal_writer(tmp: Path):
    """`on_file` for the executor: append one complete file's record to `tmp`'s journal (any process)."""
    path = Path(tmp) / JOURNAL

    def record(rel: str, rec: FileRecord) -> None:
        _append(path, {"file": rel, "size": rec.size, "sha256": rec.sha256})

    return record


def _append(path: Path, item: dict) -> None:
    """One journal line, durable before returning: a single small O_APPEND write, so lines of concurrent
    workers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(item) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def finish(tmp: Path) -> None:
    """Remove the journal: the folder is about to become the output."""
    (Path(tmp) / JOURNAL).unlink(missing_ok=True)


def _header(folder: Path) -> dict:
    try:
        with open(folder / JOURNAL, "rb") as f:
            head = json.loads(f.readline(4096))
        return head if isinstance(head, dict) else {}
    except (OSError, ValueError):
        return {}


def _entries(journal: Path) -> dict[str, FileRecord]:
    """The complete files a journal records (a torn last line, from a kill mid-write, is ignored)."""
    out: dict[str, FileRecord] = {}
    for line in _journal_records(journal):
        try:
            item = json.loads(line)
            rel, size, sha = str(item["file"]), item["size"], item["sha256"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(size, int) and isinstance(sha, str) and not rel.startswith("/") and ".." not in rel.split("/"):
            out[rel] = FileRecord(size, sha)
    return out
