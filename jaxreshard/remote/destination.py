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

import json
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError
from ..formats.manifest import MANIFEST_NAME
from ..formats.storage import LOCAL, LocalReader, Location, register_mount
from .catalogue import LOCK_NAME, list_objects
from .objects import RemoteReader, RemoteWriter
from .urls import RemoteError, Url, remote_error


class DestinationStorage:
    """Files created under the mount's folder upload to `url`; the key is the path below the mount's first level
    (the temporary folder or the committed one: both stand for the destination itself)."""

    def __init__(self, store: Any, url: Url, root: Path) -> None:
        self.store, self.url, self._root = store, url, str(root)
        self.uploaded: dict[str, int] = {}  # relative name -> size, of the rank files already in the store
        self._run = secrets.token_hex(8)  # their version in the block cache: this run's upload

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

        return RemoteWriter(spool, self.store, self.url.key(rel), size, self.url.child(rel), done)

    def reopen(self, location: Location) -> Any:
        raise RemoteError(f"{self.url}: --resume keeps files on local disk only; rerun without --resume (an object "
                          "store's output is written again from the start)")


class DestinationMount:
    """The state of one remote destination for the length of a command."""

    def __init__(self, store: Any, url: Url, root: Path, *, overwrite: bool) -> None:
        self.store, self.url, self.root, self.overwrite = store, url, root, overwrite
        self.storage = DestinationStorage(store, url, root)
        self.existing: dict[str, int] = {}
        self.locked = False

    def open(self) -> Path:
        """Take the lock, check what is there (deleting the old manifest first under `--overwrite`), register the
        mount; the local folder to write (it does not exist yet, as a fresh destination)."""
        self._lock()
        try:
            self.existing = {n: s for n, s in list_objects(self.store, self.url).items() if n != LOCK_NAME}
            if self.existing and not self.overwrite:
                what = "an output" if MANIFEST_NAME in self.existing else \
                    f"{len(self.existing)} objects but no {MANIFEST_NAME} (an incomplete output, or other files)"
                raise OutputExistsError(f"{self.url}: already holds {what}; pass --overwrite to replace them")
            if MANIFEST_NAME in self.existing:
                self._delete([MANIFEST_NAME])  # from now on the old output no longer looks complete
            register_mount(self.root, self.storage)
        except BaseException:
            self.close()
            raise
        return self.root / "out"

    def _lock(self) -> None:
        import obstore
        from obstore.exceptions import AlreadyExistsError

        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
        try:
            obstore.put(self.store, self.url.key(LOCK_NAME), body, mode="create")
        except AlreadyExistsError:
            raise RemoteError(f"{self.url}: another jaxreshard run is writing it (its lock object "
                              f"{self.url.child(LOCK_NAME)} exists); if no run is, delete that object") from None
        except Exception as e:
            raise remote_error(e, self.url.child(LOCK_NAME), "creating the lock object") from None
        self.locked = True

    def publish(self, tmp: Path) -> None:
        """Upload what the run wrote locally (rank files are already uploaded), the manifest last, then remove
        what the old output had and the new one has not."""
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
        small = [n for n in names if n not in self.storage.uploaded and n != MANIFEST_NAME]
        with ThreadPoolExecutor(8, thread_name_prefix="jaxreshard-upload") as pool:
            for job in [pool.submit(self._put, tmp / n, n) for n in small]:
                job.result()
        if MANIFEST_NAME in names:
            self._put(tmp / MANIFEST_NAME, MANIFEST_NAME)
        stale = sorted(set(self.existing) - set(names))
        if stale:
            self._delete(stale)

    def _put(self, path: Path, name: str) -> None:
        import obstore

        if path.is_symlink():
            raise RemoteError(f"{path}: a symlink cannot be uploaded to {self.url}")
        try:
            obstore.put(self.store, self.url.key(name), path.read_bytes())
        except Exception as e:
            raise remote_error(e, self.url.child(name), "uploading") from None

    def _delete(self, names: list[str]) -> None:
        import obstore

        try:
            obstore.delete(self.store, [self.url.key(n) for n in names])
        except FileNotFoundError:
            pass
        except Exception as e:
            raise remote_error(e, self.url.child(names[0]), "deleting") from None

    def close(self) -> None:
        """Release the mount and the lock (a lock left by a killed run is named by the next run's message)."""
        register_mount(self.root, None)
        if self.locked:
            self.locked = False
            try:
                self._delete([LOCK_NAME])
            except RemoteError:
                pass  # the run's own outcome matters more; the next run names the lock object if it stays
