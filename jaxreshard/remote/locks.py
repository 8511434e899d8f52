"""One writer per object-store destination (or per rank, for `--ranks` runs): lock objects.

A run creates `<prefix>/.jaxreshard.lock` (a whole output) or `.jaxreshard.lock-<host>-<pid>-<random>` naming its
ranks (some ranks), with a conditional PUT (`If-None-Match: *`), then lists the other lock objects: a whole
output conflicts with any, some ranks with the whole output and with runs holding any of the same ranks
(processes of one multi-host job never conflict: JAX gives each its own ranks). Both runs of a conflicting pair
check after creating theirs, so they never both go on. A lock of a run killed on this host (its pid gone) is
removed with a log line; other hosts' locks are never judged, and the message says how to remove one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from typing import Any

from .catalogue import LOCK_NAME
from .urls import RemoteError, Url, delete_objects, remote_error

log = logging.getLogger(__name__)


def _pid_namespace() -> int | None:
    """The pid namespace this process lives in (a pid is only judged gone by a process of the same one)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


class LockObject:
    """This run's lock object on `url` (see the module docstring)."""

    def __init__(self, store: Any, url: Url, *, shared: bool, ranks: list[int] | None, group: str | None) -> None:
        self.store, self.url, self.shared, self.ranks, self.group = store, url, shared, ranks, group
        self.name = f"{LOCK_NAME}-{socket.gethostname()[:64]}-{os.getpid()}-{secrets.token_hex(4)}" \
            if shared else LOCK_NAME  # fmt: skip
        self.held = False

    def take(self) -> None:
        import obstore
        from obstore.exceptions import AlreadyExistsError

        token = secrets.token_hex(8)
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                           "ranks": self.ranks, "group": self.group, "token": token,
                           "pid_namespace": _pid_namespace()}).encode()  # fmt: skip
        for attempt in range(2):
            try:
                obstore.put(self.store, self.url.key(self.name), body, mode="create")
                break
            except AlreadyExistsError:
                if attempt or not self._removed_if_stale(self.name):
                    raise RemoteError(f"{self.url}: another jaxreshard run is writing it (its lock object "
                                      f"{self.url.child(self.name)} exists); if no run is, delete that object"
                                      ) from None
            except Exception as e:
                raise remote_error(e, self.url.child(self.name), "creating the lock object") from None
        self.held = True
        if self._lock_body(self.name).get("token") != token:  # a store that ignores If-None-Match: both wrote
            self.held = False
            raise RemoteError(f"{self.url}: another run wrote the lock object {self.url.child(self.name)} at the same "
                              "time (this store does not honour conditional writes); run one at a time")
        other = self._conflicting_lock()
        if other is not None:
            self.release()
            raise RemoteError(f"{self.url}: another jaxreshard run is writing it (its lock object "
                              f"{self.url.child(other)} exists, for the whole output or for some of these ranks); "
                              "if no run is, delete that object")

    def _conflicting_lock(self) -> str | None:
        """Another run's lock this one cannot share the destination with (both runs check after creating theirs,
        so two conflicting runs never both go on)."""
        import obstore

        mine = set(self.ranks) if self.ranks is not None else None
        try:  # the top level only (object_store lists by path: a key prefix such as '.jaxreshard.lock' lists nothing)
            top = obstore.list_with_delimiter(self.store, prefix=self.url.prefix or None)["objects"]
        except Exception as e:
            raise remote_error(e, str(self.url), "listing") from None
        for meta in top:
            name = meta["path"].rpartition("/")[2]
            if name == self.name or not name.startswith(LOCK_NAME) or self._removed_if_stale(name):
                continue
            if not self.shared or name == LOCK_NAME:
                return name
            body = self._lock_body(name)
            if self.group is not None and body.get("group") == self.group:
                continue  # a process of the same multi-host job: JAX gives each its own ranks
            ranks = body.get("ranks")
            theirs = {int(r) for r in ranks} if isinstance(ranks, list) else None
            if mine is None or theirs is None or mine & theirs:
                return name
        return None

    def _lock_body(self, name: str) -> dict:
        import obstore

        try:
            body = json.loads(bytes(obstore.get(self.store, self.url.key(name)).bytes()))
            return body if isinstance(body, dict) else {}
        except Exception:  # noqa: BLE001 - unreadable or gone: treated as a lock on every rank
            return {}

    def _removed_if_stale(self, name: str) -> bool:
        """Remove another run's lock object if that run surely no longer runs: it was on this host and no process
        has its pid (a run killed with SIGKILL). Locks of other hosts are never judged."""
        body = self._lock_body(name)
        pid = body.get("pid")
        if body.get("host") != socket.gethostname() or body.get("pid_namespace") != _pid_namespace() \
                or not isinstance(pid, int) or pid == os.getpid():  # (containers share host names)
            return False
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            pass
        except OSError:
            return False
        log.warning("%s: removing the lock object of a killed run (pid %d on this host)", self.url.child(name), pid)
        delete_objects(self.store, self.url, [name])
        return True

    def release(self) -> None:
        """Remove this run's lock object (a failure is left for the next run's message to name)."""
        if self.held:
            self.held = False
            try:
                delete_objects(self.store, self.url, [self.name])
            except RemoteError:
                pass
