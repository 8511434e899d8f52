"""An object-store source seen as a local folder: its listing and headers local, its tensor bytes remote.

`mount_source("s3://bucket/prefix")` lists the prefix once and builds, in a private temporary folder, the same
tree: small non-weight files (configs, strategies, indexes, the manifest) downloaded whole (capped), weight
files (`.safetensors`, `.ckpt`) as sparse placeholders of their real size holding only their headers (a
safetensors header: one or two ranged GETs; a `.ckpt`'s record headers: the blocks its own indexer touches),
so every format, check and planner runs unchanged on it. The folder is registered with the storage seam: each
read of a placeholder's tensor bytes becomes a ranged GET of the object (`objects.RemoteReader`); nothing else
is downloaded. Object keys are untrusted names: '..', empty or control-character parts, a key that is also
another key's folder, and listings beyond the caps are refused (exit 2, naming the key).
"""

from __future__ import annotations

import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import FormatError, JaxreshardError
from ..formats import mindspore_ckpt
from ..formats.companions import WEIGHT_SUFFIXES
from ..formats.manifest import MANIFEST_NAME
from ..formats.safetensors_io import MAX_HEADER_BYTES
from ..formats.storage import LocalReader, Location, register_mount
from .objects import RemoteReader, get_run
from .urls import RemoteError, Url, open_store, remote_error

MAX_OBJECTS = 1_000_000
MAX_DEPTH = 16
MAX_SMALL_FILE = 64 << 20  # a non-weight file is downloaded whole up to this size
MAX_SMALL_TOTAL = 1 << 30
HEAD_BYTES = 1 << 20  # the first ranged GET of a safetensors file (its header is usually all in it)
PRIME_BLOCK = 64 << 10
PRIME_AHEAD = 64  # blocks (4 MiB): the most one read-ahead fetch of record headers takes
LOCK_NAME = ".jaxreshard.lock"
MOUNTED: dict[str, tuple[Url, dict[str, tuple[int, str]]]] = {}  # view root -> what a worker needs to mount it


def list_objects(store: Any, url: Url, mtimes: dict[str, float] | None = None,
                 versions: dict[str, str] | None = None) -> dict[str, int]:
    """{relative name: size} of the objects under `url` (folder markers skipped), names checked; `mtimes` is
    filled with their modification times (the views' files carry them, as a download would)."""
    import obstore
    from obstore.exceptions import InvalidPathError

    found: dict[str, int] = {}
    try:
        for batch in obstore.list(store, prefix=f"{url.prefix}/" if url.prefix else None, chunk_size=1000):
            for meta in batch:
                rel = meta["path"][len(url.prefix) + 1 :] if url.prefix else meta["path"]
                if meta["size"] == 0 and (rel.endswith("/") or not rel):
                    continue  # a console's folder marker (obstore lists 'a/' as 'a': see _check_aliases)
                found[check_key(url, rel)] = int(meta["size"])
                if mtimes is not None and versions is not None:
                    mtimes[rel] = meta["last_modified"].timestamp()
                    versions[rel] = meta.get("e_tag") or ""
                if len(found) > MAX_OBJECTS:
                    raise RemoteError(f"{url}: more than {MAX_OBJECTS} objects under the prefix; name the checkpoint's "
                                      "own folder")
    except JaxreshardError:
        raise
    except InvalidPathError as e:  # the client refuses a key before we see it: name it as the message gives it
        key = re.search(r"\"([^\"]{0,300})\"", str(e))
        named = f" ({key.group(1)!r})" if key else ""
        raise FormatError(f"{url}: an object under the prefix{named} has a name that cannot be a path (an empty, '.' "
                          "or '..' part, or a control character); remove or rename it") from None
    except Exception as e:
        raise remote_error(e, str(url), "listing") from None
    _check_aliases(url, found)
    return found


def check_key(url: Url, rel: str) -> str:
    parts = rel.split("/")
    bad = next((p for p in parts if p in ("", ".", "..") or len(p.encode("utf-8", "surrogatepass")) > 255
                or any(ord(c) < 32 or c in "\\\x7f" for c in p)), None)  # fmt: skip
    if bad is not None or len(parts) > MAX_DEPTH:
        raise FormatError(f"{url.child(rel[:200])!r}: an object name that cannot be a file here (an empty, '.' or '..' "
                          f"part, a control character, or deeper than {MAX_DEPTH} folders); remove it from the prefix")
    return rel


def _check_aliases(url: Url, names: dict[str, int]) -> None:
    """A name that is also the folder of other names: an empty one is a console's folder marker (obstore lists
    'a/' as 'a') and is dropped; one holding bytes cannot be both, and is refused."""
    folders = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
    clash = sorted(folders & names.keys())
    for name in clash:
        if names[name]:
            raise FormatError(f"{url.child(name)}: is both an object and the folder of other objects (perhaps a key "
                              f"'{name}/' holding bytes); remove one")
        del names[name]


def mount_source(store: Any, url: Url, root: Path) -> Path:
    """Build the local view of `url` under the empty folder `root` and register it; the path to hand the formats
    (the folder, or the single object's placeholder when `url` names one object)."""
    mtimes: dict[str, float] = {}
    versions: dict[str, str] = {}
    names = list_objects(store, url, mtimes, versions)
    if not names:
        single = head_object(store, url)
        if single is None:
            raise RemoteError(f"{url}: no such object or prefix (nothing is listed under it); check the URL")
        base, leaf = url.prefix.rpartition("/")[0], url.prefix.rpartition("/")[2]
        url, names = Url(url.scheme, url.bucket, base), {leaf: single[0]}
        versions[leaf] = single[1]
        view = root / leaf
    else:
        view = root
    lock = next((url.child(n) for n in names if n.startswith(LOCK_NAME)), None) or _lock_above(store, url)
    if lock is not None:
        raise RemoteError(f"{url}: is being written by a jaxreshard run (or one that was killed: its lock object "
                          f"{lock} is there); wait for it, or delete the lock object and the output")
    remote = {n: s for n, s in names.items() if _is_weight(n)}
    small = {n: s for n, s in names.items() if n not in remote}
    big = next((n for n, s in small.items() if s > MAX_SMALL_FILE), None)
    if big is not None or sum(small.values()) > MAX_SMALL_TOTAL:
        what = f"{url.child(big)} is {small[big] >> 20} MiB" if big else "the non-weight files are over 1 GiB"
        raise FormatError(f"{what}: jaxreshard copies non-weight files whole (at most {MAX_SMALL_FILE >> 20} MiB "
                          "each); keep only the checkpoint, its configs and strategies under the prefix")
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(16, thread_name_prefix="jaxreshard-list") as pool:
        jobs = [pool.submit(_download, store, url, root, n) for n in small]
        jobs += [pool.submit(_placeholder, store, url, root, n, s, versions.get(n) or None) for n, s in remote.items()]
        for job in jobs:
            job.result()
    for name, mtime in mtimes.items():
        os.utime(root / name, (mtime, mtime))
    register_mount(root, SourceStorage(store, url, root, {n: (s, versions[n]) for n, s in remote.items()}))
    MOUNTED[str(root)] = (url, {n: (s, versions[n]) for n, s in remote.items()})
    return view


def _lock_above(store: Any, url: Url) -> str | None:
    """A lock object of a run writing a folder that holds `url` (`s3://b/out/rank_0` while `s3://b/out` is being
    written): each folder above is listed at its own level (a few requests)."""
    import obstore

    parts = url.prefix.split("/") if url.prefix else []
    for depth in range(len(parts)):
        above = "/".join(parts[:depth])
        try:
            top = obstore.list_with_delimiter(store, prefix=above or None)["objects"]
        except Exception as e:
            raise remote_error(e, str(url), "listing the folders above") from None
        lock = next((m["path"] for m in top if m["path"].rpartition("/")[2].startswith(LOCK_NAME)), None)
        if lock is not None:
            return f"{url.scheme}://{url.bucket}/{lock}"
    return None


def _is_weight(name: str) -> bool:
    leaf = name.rpartition("/")[2]
    return leaf.endswith(WEIGHT_SUFFIXES) and not (leaf.endswith(".ckpt") and "strategy" in leaf)


def head_object(store: Any, url: Url) -> tuple[int, str] | None:
    import obstore

    if not url.prefix:
        return None
    try:
        meta = obstore.head(store, url.prefix)
        return int(meta["size"]), meta.get("e_tag") or ""
    except FileNotFoundError:
        return None
    except Exception as e:
        raise remote_error(e, str(url), "looking it up") from None


def _fetch(store: Any, url: Url, name: str, start: int, length: int, etag: str | None) -> bytes:
    return bytes(get_run(store, url.key(name), url.child(name), start, start + length, etag))


def _download(store: Any, url: Url, root: Path, name: str) -> None:
    import obstore

    try:
        data = bytes(obstore.get(store, url.key(name)).bytes())
    except FileNotFoundError:  # listed, yet not there by that name: a key 'name/' holding bytes, or deleted since
        raise RemoteError(f"{url.child(name)}: listed under the prefix but cannot be read by that name (a key ending "
                          "in '/' that holds bytes, or an object deleted meanwhile); remove it") from None
    except Exception as e:
        raise remote_error(e, url.child(name), "downloading") from None
    (root / name).write_bytes(data)


def _placeholder(store: Any, url: Url, root: Path, name: str, size: int, etag: str | None) -> None:
    """A sparse file of `size` bytes holding only what the format's indexer reads of the object."""
    path = root / name
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in _header_regions(lambda start, n: _fetch(store, url, name, start, n, etag), name, size,
                                            path):
            f.seek(offset)
            f.write(data)


def _header_regions(fetch: Any, name: str, size: int, path: Path) -> list[tuple[int, bytes]]:
    if size == 0:
        return []
    if name.endswith(".safetensors"):
        head = fetch(0, min(size, HEAD_BYTES))
        if len(head) >= 8:
            want = 8 + struct.unpack("<Q", head[:8])[0]
            if len(head) < want <= min(size, 8 + MAX_HEADER_BYTES):
                head += fetch(len(head), want - len(head))
        return [(0, head)]
    if name.endswith(".ckpt"):
        buffer = _LazyBuffer(fetch, size)
        try:
            mindspore_ckpt.index_buffer(path, buffer)
        except FormatError:
            pass  # the same error comes again, with its file named, when the placeholder is read (a store
            # failure, a RemoteError, is not caught: it is reported as what it is)
        return sorted(buffer.blocks.items())
    return []


class _LazyBuffer:
    """Byte indexing and slicing of an object, fetched in `PRIME_BLOCK` blocks on first touch (for an indexer
    written against an mmap); the blocks fetched are kept to be written into the placeholder.

    Read-ahead adapts: a miss within four fetch-lengths after the last fetch doubles the next fetch (up to
    `PRIME_AHEAD` blocks), a longer jump over a tensor's bytes starts again at one block. A file of many small
    records is indexed in a few requests, one of big tensors in one small request per record, never downloading
    the tensors."""

    def __init__(self, fetch, size: int) -> None:
        self._fetch, self._size, self.blocks = fetch, size, {}
        self._next, self._ahead = -1, 1  # the block after the last fetch, and the next fetch's length

    def __len__(self) -> int:
        return self._size

    def _block(self, b: int) -> bytes:
        if b * PRIME_BLOCK not in self.blocks:
            near = 0 <= b - self._next <= 4 * self._ahead  # records close together: read further ahead
            self._ahead = min(2 * self._ahead, PRIME_AHEAD) if near else 1
            start = b * PRIME_BLOCK
            data = self._fetch(start, min(self._ahead * PRIME_BLOCK, self._size - start))
            for i in range(0, len(data), PRIME_BLOCK):
                self.blocks.setdefault(start + i, data[i : i + PRIME_BLOCK])
            self._next = b + max(1, -(-len(data) // PRIME_BLOCK))
        return self.blocks[b * PRIME_BLOCK]

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, int):
            index += self._size if index < 0 else 0
            if not 0 <= index < self._size:
                raise IndexError(index)
            return self._block(index // PRIME_BLOCK)[index % PRIME_BLOCK]
        start, stop, _ = index.indices(self._size)
        if stop - start > 64 * PRIME_BLOCK:  # a tensor's content, never wanted by the indexer without verify_crc
            raise FormatError("a record too large to read while indexing")
        return b"".join(self._block(b)[max(start - b * PRIME_BLOCK, 0) : stop - b * PRIME_BLOCK]
                        for b in range(start // PRIME_BLOCK, (stop - 1) // PRIME_BLOCK + 1)) if stop > start else b""


def mount_again(root: str, url: Url, remote: dict[str, tuple[int, str]]) -> None:
    """Register in this process (a spawned worker) a source view its parent built: without it the worker would
    read the placeholders' holes as zeros."""
    register_mount(Path(root), SourceStorage(open_store(url), url, Path(root), remote))
    MOUNTED[root] = (url, remote)


class SourceStorage:
    """The storage of a mounted source: placeholders read from the store, downloaded files locally."""

    def __init__(self, store: Any, url: Url, root: Path, remote: dict[str, tuple[int, str]]) -> None:
        self._store, self._url, self._root, self._remote = store, url, str(root), remote

    def open_read(self, location: Location) -> Any:
        rel = os.fspath(location)[len(self._root) + 1 :]
        known = self._remote.get(rel)
        if known is None:
            return LocalReader(location)
        version = known[1] or str(id(self))  # without an ETag: this listing's own identity
        return RemoteReader(self._store, self._url.key(rel), known[0], self._url.child(rel), version, known[1] or None)

    def create(self, location: Location, size: int) -> Any:
        raise RemoteError(f"{location}: a source is read-only")

    def reopen(self, location: Location) -> Any:
        raise RemoteError(f"{location}: a source is read-only")


__all__ = ["mount_source", "list_objects", "LOCK_NAME", "MANIFEST_NAME"]
