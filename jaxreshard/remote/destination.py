"""An object-store destination seen as a local folder, completed by writing its manifest last.

Object stores cannot rename, so the local rules (a temporary sibling, an atomic rename) become:
- One writer per destination: a lock object `<prefix>/.jaxreshard.lock`, created only if absent (a
  conditional PUT, `If-None-Match: *`), removed at the end; a second run is refused naming it.
- A destination holding objects is refused without `--overwrite`; with it, the old manifest is deleted FIRST,
  so from that instant the prefix no longer looks complete, and objects of the old output that the new one does
  not have are deleted only after the new manifest is written.
- Rank files upload while they are written (`objects.RemoteWriter`) to their final keys; the small files follow
  at the commit, then the manifest, last: an output is complete exactly when its manifest exists. Readers,
  `verify` and later runs treat a prefix without one as incomplete. A failed run aborts its uploads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError
from ..formats.manifest import MANIFEST_NAME, read_manifest, write_manifest
from ..formats.storage import LOCAL, LocalReader, Location, register_mount
from .catalogue import LOCK_NAME, head_object, list_objects
from .locks import LockObject
from .objects import RemoteReader
from .uploads import RemoteWriter
from .urls import RemoteError, Url, delete_objects, remote_error

log = logging.getLogger(__name__)


class DestinationStorage:
    """Files created under the mount's folder upload to `url`; the key is the path below the mount's first level
    (the temporary folder or the committed one: both stand for the destination itself)."""

    def __init__(self, store: Any, url: Url, root: Path) -> None:
        self.store, self.url, self._root = store, url, str(root)
        self.uploaded: dict[str, int] = {}  # relative name -> size, of the rank files already in the store
        self._run = secrets.token_hex(8)  # their version in the block cache: this run's upload
        self.writers: list[RemoteWriter] = []  # uploads not yet waited for

    def relative(self, location: Location) -> str:
        rest = os.fspath(location)[len(self._root) + 1 :]
        return rest.partition("/")[2]

    def open_read(self, location: Location) -> Any:
        rel = self.relative(location)
        if rel in self.uploaded:
            return RemoteReader(self.store, self.url.key(rel), self.uploaded[rel], self.url.child(rel), self._run)
        return LocalReader(location)

    def create(self, location: Location, size: int) -> RemoteWriter:
        rel = self.relative(location)
        spool = LOCAL.create(location, size)

        def done(path: Path) -> None:
            self.uploaded[self.relative(path)] = size

        writer = RemoteWriter(spool, self.store, self.url.key(rel), size, self.url.child(rel), done)
        self.writers.append(writer)
        return writer

    def finish_uploads(self) -> None:
        """Wait for every closed file's upload (the first failure raised; the others are aborted)."""
        writers, self.writers = self.writers, []
        try:
            for writer in writers:
                writer.finish()
        finally:
            for writer in writers:
                writer.abort()  # nothing for those finished

    def abort_uploads(self) -> list[str]:
        """A failed run: every upload not yet waited for is aborted (a closed file's too); the names of this
        run's files that are in the store nevertheless (their uploads had completed)."""
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.abort()
        done = [self.relative(w.spool_path) for w in writers if w.completed]
        return sorted({*done, *self.uploaded})

    def reopen(self, location: Location) -> Any:
        raise RemoteError(f"{self.url}: --resume keeps files on local disk only; rerun without --resume (an object "
                          "store's output is written again from the start)")


class DestinationMount:
    """The state of one remote destination for the length of a command.

    `shared`: this run writes some ranks only (`--ranks`, one host of several): other runs may write other rank
    folders of the same destination at the same time, each under its own lock object naming its ranks; the
    root manifest is read-modified-written with conditional PUTs (`update_root`)."""

    def __init__(self, store: Any, url: Url, root: Path, *, overwrite: bool, shared: bool = False,
                 ranks: list[int] | None = None, group: str | None = None) -> None:  # fmt: skip
        self.store, self.url, self.root, self.overwrite = store, url, root, overwrite
        self.shared, self.ranks, self.group = shared, ranks, group
        self.storage = DestinationStorage(store, url, root)
        self.existing: dict[str, int] = {}
        self.lock = LockObject(store, url, shared=shared, ranks=ranks, group=group)
        self.listed = False  # this run's files are named by a manifest in the store (then they stay)

    @property
    def target(self) -> Path:
        return self.root / "out"

    def open(self) -> Path:
        """Take the lock, check what is there (deleting the old manifest first under `--overwrite`), register the
        mount; the local folder to write (a fresh destination: it does not exist yet; `shared`: it holds the
        root manifest and an empty folder per rank folder already in the store)."""
        if head_object(self.store, self.url) is not None:
            raise OutputExistsError(f"{self.url}: exists and is an object, not a folder; choose another destination")
        self.lock.take()
        try:
            self.existing = {n: s for n, s in list_objects(self.store, self.url).items()
                             if not n.startswith(LOCK_NAME)}  # fmt: skip
            if self.shared:
                self._mirror_root()
            elif self.existing and not self.overwrite:
                what = "an output" if MANIFEST_NAME in self.existing else \
                    f"{len(self.existing)} objects but no {MANIFEST_NAME} (an incomplete output, or other files)"
                raise OutputExistsError(f"{self.url}: already holds {what}; pass --overwrite to replace them")
            elif MANIFEST_NAME in self.existing:  # from now on the old output no longer looks complete
                delete_objects(self.store, self.url, [MANIFEST_NAME])
            register_mount(self.root, self.storage)
        except BaseException:
            self.close()
            raise
        return self.target

    def _mirror_root(self) -> None:
        """The local folder of a shared destination: its root manifest, and an empty folder for each rank folder
        in the store (so the usual checks see what exists)."""
        self.target.mkdir()
        folders = {n.split("/")[0] for n in self.existing if "/" in n}
        for folder in folders:
            (self.target / folder).mkdir()
        if MANIFEST_NAME in self.existing:
            self.pull_manifest()
            replaced = folders & {f"rank_{r}" for r in self.ranks or ()}
            if self.overwrite and replaced:  # their old files stop being listed before new ones replace them
                self.update_root(lambda: self._forget(replaced))
                self.listed = False  # (that update named none of this run's files)

    def _forget(self, folders: set[str]) -> None:
        old = read_manifest(self.target)
        if old is not None:
            files = {n: r for n, r in old.files.items() if n.split("/")[0] not in folders}
            write_manifest(self.target, dataclasses.replace(old, files=files))

    def pull_manifest(self) -> str | None:
        """Download the root manifest into the local folder; its ETag (None: there is none, the local copy is
        removed)."""
        import obstore

        path = self.target / MANIFEST_NAME
        try:
            got = obstore.get(self.store, self.url.key(MANIFEST_NAME))
            path.write_bytes(bytes(got.bytes()))
            return str(got.meta["e_tag"])
        except FileNotFoundError:
            path.unlink(missing_ok=True)
            return None
        except Exception as e:
            raise remote_error(e, self.url.child(MANIFEST_NAME), "reading") from None

    def update_root(self, merge: Callable[[], None], attempts: int = 20) -> None:
        """Run `merge` (it rewrites the local root manifest from the local copy) on the store's current manifest
        and upload the result only if nobody changed it meanwhile (If-Match / If-None-Match); else again."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        self.publish_root_files()
        for _ in range(attempts):
            etag = self.pull_manifest()
            merge()
            data = (self.target / MANIFEST_NAME).read_bytes()
            mode: Any = "create" if etag is None else {"e_tag": etag}
            try:
                obstore.put(self.store, self.url.key(MANIFEST_NAME), data, mode=mode)
                self.listed = True
                return
            except (AlreadyExistsError, PreconditionError):
                time.sleep(0.05 + 0.1 * secrets.randbelow(10) / 10)  # another host merged first: merge again
            except Exception as e:
                raise remote_error(e, self.url.child(MANIFEST_NAME), "updating") from None
        raise RemoteError(f"{self.url.child(MANIFEST_NAME)}: changed {attempts} times while this run merged its "
                          "ranks into it; run again")

    def publish_root_files(self) -> None:
        """The shared destination's top-level files (the source's companions) that the store lacks."""
        for path in sorted(self.target.iterdir()):
            if path.is_file() and path.name != MANIFEST_NAME and path.name not in self.existing:
                self._put(path, path.name)

    def publish(self, tmp: Path, folder: str = "") -> None:
        """Upload what the run wrote locally under `tmp` (to `folder` of the destination; rank files are already
        uploaded), the manifest last, then remove what the old output (or folder) had and the new one has not."""
        self.storage.finish_uploads()
        base = f"{folder}/" if folder else ""
        names = sorted(base + str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
        small = [n for n in names if n not in self.storage.uploaded and n != MANIFEST_NAME]
        with ThreadPoolExecutor(8, thread_name_prefix="jaxreshard-upload") as pool:
            for job in [pool.submit(self._put, tmp / n[len(base) :], n) for n in small]:
                job.result()
        if MANIFEST_NAME in names:
            self._put(tmp / MANIFEST_NAME, MANIFEST_NAME)
            self.listed = True
        stale = sorted(n for n in set(self.existing) - set(names) if n.startswith(base))
        if stale:
            delete_objects(self.store, self.url, stale)

    def _put(self, path: Path, name: str) -> None:
        import obstore

        if path.is_symlink():
            raise RemoteError(f"{path}: a symlink cannot be uploaded to {self.url}")
        try:  # a path streams (multipart for big files: orbax's, say); small ones go in one PUT
            obstore.put(self.store, self.url.key(name), path, use_multipart=path.stat().st_size > 64 << 20)
        except Exception as e:
            raise remote_error(e, self.url.child(name), "uploading") from None

    def close(self) -> None:
        """Release the mount and the lock (a lock left by a killed run is named by the next run's message); a
        failed run's uploads are aborted, never left to die with the process."""
        stored = self.storage.abort_uploads()
        if stored and not self.listed:  # a failed run: its files must not stay to look like an output
            with contextlib.suppress(RemoteError):
                delete_objects(self.store, self.url, stored)
        register_mount(self.root, None)
        self.lock.release()
