"""The manifest: what an output of jaxreshard is, written last at its root as `jaxreshard.manifest.json`.

It records the layout every rank file was written with (per parameter: global shape, dtype, mesh, spec,
pipeline stages), the source it came from, the tool version, and per file its size and SHA-256. The next run
reads a distributed output without being told its layout, `--src-layout` mistakes are caught by comparing with
it, `verify` checks an output against it, and `--resume` knows which files of an interrupted run are complete.
Plain JSON so other tools (and people) can read it; pure data here, no layout logic.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import FormatError
from .storage import storage_for
from .untrusted import check_json_width

MANIFEST_NAME = "jaxreshard.manifest.json"
FORMAT = "jaxreshard.manifest"
VERSION = 1
MAX_MANIFEST_BYTES = 256 << 20  # a manifest of 1M parameters is ~200 MB; more is not ours
HASH_CHUNK = 8 << 20

MeshAxes = tuple[tuple[str, int], ...]
Spec = tuple[tuple[str, ...], ...]


@dataclass(frozen=True, slots=True)
class ParamRecord:
    """One parameter's global shape and dtype (a safetensors dtype code) and how it is laid out."""

    shape: tuple[int, ...]
    dtype: str
    mesh_axes: MeshAxes = ()
    spec: Spec = ()
    stages: tuple[int, ...] = (0,)

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "mesh": [[a, n] for a, n in self.mesh_axes],
                "spec": [list(axes) for axes in self.spec], "stages": list(self.stages)}


@dataclass(frozen=True, slots=True)
class FileRecord:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    num_ranks: int  # ranks of the layout (1: a complete checkpoint)
    params: dict[str, ParamRecord]  # in output order
    files: dict[str, FileRecord]  # relative POSIX paths under the output root
    output_format: str  # "safetensors", "ckpt", "hf", ...
    source: str = ""
    tool: str = ""
    created: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    extra: dict = field(default_factory=dict)  # anything a writer wants to add (kept on read)

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "tool": self.tool or _tool(), "created": self.created,
            "source": self.source, "output_format": self.output_format, "num_ranks": self.num_ranks,
            "params": {p: r.to_json() for p, r in self.params.items()},
            "files": {f: {"size": r.size, "sha256": r.sha256} for f, r in sorted(self.files.items())},
            **({"extra": self.extra} if self.extra else {}),
        }  # fmt: skip


def _tool() -> str:
    try:
        from importlib.metadata import version

        return f"jaxreshard {version('jaxreshard')}"
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "jaxreshard"


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write `root/jaxreshard.manifest.json` atomically (temporary name, fsync, rename)."""
    path = Path(root) / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_dumps(manifest.to_json()))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _dumps(data: dict) -> str:
    """JSON with one line per parameter and per file (readable, and ~10x smaller than indenting every list)."""
    lines = []
    for key, value in data.items():
        if key in ("params", "files") and isinstance(value, dict) and value:
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_manifest(root: Path) -> Manifest | None:
    """The manifest at `root`, or None when there is none; FormatError if it is there but not valid."""
    path = Path(root) / MANIFEST_NAME
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None
    if not path.is_file() or st.st_size > MAX_MANIFEST_BYTES:
        raise FormatError(f"{path}: not a jaxreshard manifest (not a regular file, or over {MAX_MANIFEST_BYTES} bytes)")
    try:
        raw = path.read_bytes()
        check_json_width(raw, path, "jaxreshard manifest")
        data = json.loads(raw)
        return _parse(data)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise FormatError(f"{path}: damaged jaxreshard manifest ({type(e).__name__}: {e}); remove it or re-run the "
                          "conversion") from None


def _parse(data: object) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a jaxreshard manifest")
    if data.get("version") != VERSION:
        raise ValueError(f"version {data.get('version')!r}; this jaxreshard reads version {VERSION}")
    params = {}
    for name, p in dict(data["params"]).items():
        params[str(name)] = ParamRecord(
            tuple(_nonneg(s) for s in p["shape"]), str(p["dtype"]),
            tuple((str(a), _positive(n)) for a, n in p.get("mesh", [])),
            tuple(tuple(str(a) for a in axes) for axes in p.get("spec", [])),
            tuple(_nonneg(s) for s in p.get("stages", [0])),
        )  # fmt: skip
    files = {str(f): FileRecord(_nonneg(r["size"]), str(r["sha256"])) for f, r in dict(data["files"]).items()}
    for f in files:
        if f.startswith("/") or ".." in Path(f).parts or "\0" in f:
            raise ValueError(f"file entry {f!r} leaves the output folder")
    return Manifest(_positive(data["num_ranks"]), params, files, str(data.get("output_format", "")),
                    str(data.get("source", "")), str(data.get("tool", "")), str(data.get("created", "")),
                    dict(data.get("extra") or {}))


def _nonneg(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def _positive(value: object) -> int:
    if _nonneg(value) < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return value  # type: ignore[return-value]


def file_sha256(path: Path) -> str:
    """SHA-256 of a whole file, streamed in large chunks (bounded memory)."""
    return prefix_sha256(path, None).hexdigest()


def prefix_sha256(path: Path, size: int | None) -> Any:
    """A hashlib sha256 fed with the first `size` bytes of a file (all of it for None); it can be continued."""
    h = hashlib.sha256()
    reader = storage_for(path).open_read(path)  # an object store's file is read from the store, not its view
    try:
        end = reader.size() if size is None else min(size, reader.size())
        buf = memoryview(bytearray(min(HASH_CHUNK, max(end, 1))))
        for offset in range(0, end, len(buf)):
            n = reader.readinto(offset, buf[: min(len(buf), end - offset)])
            h.update(buf[:n])
            if n < min(len(buf), end - offset):
                break
    finally:
        reader.close()
    return h


class StreamingHash:
    """SHA-256 of a file being written at offsets: bytes are hashed as they are written while the writes
    arrive in file order (the usual case: parameters are written in file order), else the file is hashed
    again from disk (page cache) at `digest`, so the result is always the hash of the file's bytes.

    Hashing runs on one background thread per process (hashlib releases the GIL), overlapping the next
    parameter's reads and writes; at most `MAX_PENDING` bytes wait, so memory stays bounded."""

    def __init__(self, prefix: tuple[int, Any] | None = None) -> None:
        """`prefix`: (n, a hashlib sha256 of the file's first n bytes), to continue a file already written
        that far (`--resume`)."""
        self._next, self._hash = prefix if prefix is not None else (0, hashlib.sha256())
        self._in_order = True
        self._pending: collections.deque[tuple[Future, int]] = collections.deque()
        self._pending_bytes = 0

    def update(self, offset: int, data: bytes | memoryview) -> None:
        if not (self._in_order and offset == self._next):
            self._in_order = False
            return
        n = len(memoryview(data).cast("B"))
        self._next += n
        if n < ASYNC_MIN_BYTES:
            self._wait(0)
            self._hash.update(data)
            return
        self._wait(MAX_PENDING - n)
        self._pending.append((_executor().submit(self._hash.update, data), n))  # data stays alive until hashed
        self._pending_bytes += n

    def _wait(self, allowed: int) -> None:
        while self._pending and self._pending_bytes > max(allowed, 0):
            future, n = self._pending.popleft()
            future.result()
            self._pending_bytes -= n

    def snapshot(self) -> tuple[int, str] | None:
        """(n, SHA-256 of the first n bytes) hashed so far, or None when writes came out of order."""
        self._wait(0)
        return (self._next, self._hash.copy().hexdigest()) if self._in_order else None

    def digest(self, path: Path, size: int) -> str:
        self._wait(0)
        if self._in_order and self._next == size:
            return self._hash.hexdigest()
        return file_sha256(path)


ASYNC_MIN_BYTES = 1 << 20  # smaller updates are hashed at once (a thread hop costs more than hashing them)
MAX_PENDING = 1 << 30
_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_PID = 0


def _executor() -> ThreadPoolExecutor:
    """The process's hashing thread (made anew in a forked child: threads do not survive a fork)."""
    global _EXECUTOR, _EXECUTOR_PID
    if _EXECUTOR is None or _EXECUTOR_PID != os.getpid():
        _EXECUTOR, _EXECUTOR_PID = ThreadPoolExecutor(1, thread_name_prefix="jaxreshard-sha256"), os.getpid()
    return _EXECUTOR
