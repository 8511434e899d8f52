"""Object storage (`s3://`, `gs://`) as sources and destinations, for every command (issue 12).

A remote location is handed to the rest of jaxreshard as a local folder (a *view*): a source's listing and
headers are local and its tensor bytes are read by ranged GETs through the storage seam (`catalogue`); a
destination's files upload while they are written and the output is completed by its manifest, written last
(`destination`). Commands and the library call `source_view` / `destination_view` on their arguments; local
paths pass through untouched. `display` puts the URLs back into messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError, JaxreshardError
from ..formats.storage import register_mount
from ..values import parse_ranks
from .catalogue import MOUNTED, mount_again, mount_source
from .destination import DestinationMount
from .objects import drop_cache
from .urls import is_url, open_store, parse_url

F = TypeVar("F", bound=Callable[..., Any])
_DESTINATIONS: dict[str, DestinationMount] = {}  # the local folder standing for a destination -> its mount
_NAMES: dict[str, str] = {}  # a view's local root -> the URL it stands for (for `display`)


def _root(kind: str) -> Path:
    """A fresh private folder for a view, named with this process's pid; folders of views whose process is gone
    (killed: its `finally` never ran) are removed first, so spools of killed runs do not pile up."""
    _remove_orphans()
    return Path(tempfile.mkdtemp(prefix=f"jaxreshard-{kind}-{os.getpid()}-")).resolve()


def _remove_orphans() -> None:
    for folder in Path(tempfile.gettempdir()).glob("jaxreshard-[sd][rs][ct]-*-*"):
        pid = folder.name.split("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid() or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # another user's live process: not ours to judge


@contextlib.contextmanager
def source_view(src: Any) -> Iterator[Any]:
    """`src` itself, or for a URL the local view of it, for the length of the block."""
    if not is_url(src):
        yield src
        return
    url = parse_url(src)
    store = open_store(url)
    base = _root("src")
    root = base / (url.prefix.rpartition("/")[2] or url.bucket)  # the view is named as the URL's last part
    root.mkdir()
    try:
        view = mount_source(store, url, root)
        _NAMES[str(root)] = str(url) if view == root else str(url).rpartition("/")[0]
        yield view
    finally:
        register_mount(root, None)
        MOUNTED.pop(str(root), None)
        _NAMES.pop(str(root), None)
        drop_cache()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def destination_view(dst: Any, *, overwrite: bool, shared: bool = False, ranks: list[int] | None = None,
                     group: str | None = None) -> Iterator[Any]:  # fmt: skip
    """`dst` itself, or for a URL a local folder standing for it (see `destination`), for the block; `shared`:
    this run writes the rank folders `ranks` only (None: those a multi-host `group` gives this process)."""
    if not is_url(dst):
        yield dst
        return
    url = parse_url(dst)
    store = open_store(url)  # (a refused configuration leaves no folder behind)
    root = _root("dst")
    mount = DestinationMount(store, url, root, overwrite=overwrite, shared=shared, ranks=ranks,
                             group=group)  # fmt: skip
    try:
        target = mount.open()
        _DESTINATIONS[str(target)] = mount
        _NAMES[str(root)] = str(url)
        yield target
    finally:
        _DESTINATIONS.pop(str(root / "out"), None)
        _NAMES.pop(str(root), None)
        mount.close()
        drop_cache()
        shutil.rmtree(root, ignore_errors=True)


def views(*, sources: tuple[str, ...] = (), destination: str | None = None) -> Callable[[F], F]:
    """Decorate a library function so that its `sources` and `destination` arguments may be URLs: each is
    replaced by its view for the length of the call (a destination's `overwrite` argument is honoured)."""

    def wrap(func: F) -> F:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            names = [n for n in (*sources, destination) if n and _is_location(bound.arguments.get(n))]
            if not names:
                return func(*args, **kwargs)
            with contextlib.ExitStack() as stack, _messages_name_urls():
                _enter(stack, bound.arguments, sources, destination)
                return _named(func(*bound.args, **bound.kwargs))

        return call  # type: ignore[return-value]

    return wrap


def option_views(*, sources: tuple[str, ...] = (), destination: str | None = None) -> Callable[[F], F]:
    """`views` for a command handler taking one options dataclass: its fields `sources` and `destination`."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def call(opts: Any) -> Any:
            if not any(_is_location(getattr(opts, n, None)) for n in (*sources, destination) if n):
                return func(opts)
            values = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
            with contextlib.ExitStack() as stack, _messages_name_urls():
                _enter(stack, values, sources, destination)
                return func(dataclasses.replace(opts, **{n: values[n] for n in (*sources, destination) if n}))

        return call  # type: ignore[return-value]

    return wrap


def _is_location(value: Any) -> bool:
    """Whether `value` is an object-store URL; one mangled into a `Path` (which merges '//') is refused."""
    if isinstance(value, Path) and re.match(r"(s3|gs):/[^/]", str(value)):
        raise ConfigError(f"{value}: an object-store URL given as a Path (which merges its '//'); pass it as a "
                          "string, e.g. 's3://bucket/prefix'")
    return is_url(value)


def _enter(stack: contextlib.ExitStack, values: dict[str, Any], sources: tuple[str, ...],
           destination: str | None) -> None:  # fmt: skip
    """Replace the URLs among `values[sources]` and `values[destination]` by views held open by `stack`."""
    if destination is not None and is_url(values.get(destination)):
        _check_apart([values.get(n) for n in sources], values[destination])
    for name in sources:
        values[name] = stack.enter_context(source_view(values.get(name)))
    if destination is not None and is_url(values.get(destination)):
        values[destination] = stack.enter_context(destination_view(values[destination], **_writing(values)))


def _check_apart(sources: list[Any], destination: str) -> None:
    """A destination URL equal to, inside or holding a source URL is refused (it would overwrite what is read)."""
    dst = parse_url(destination)
    for src in (parse_url(s) for s in sources if is_url(s)):
        if (src.scheme, src.bucket) != (dst.scheme, dst.bucket):
            continue
        a, b = f"{src.prefix}/", f"{dst.prefix}/"
        if a.startswith(b) or b.startswith(a) or not src.prefix or not dst.prefix:
            raise ConfigError(f"{dst}: the destination overlaps the source {src}; choose another destination")


def _named(result: Any) -> Any:
    """A result naming a view (a path, or a report's `dst` and `files`) names the URL instead: the view is
    gone once the call returns."""
    if isinstance(result, Path):
        shown = display(str(result))
        return result if shown == str(result) else shown
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        fields = {f.name for f in dataclasses.fields(result)}
        changes = {n: _named(getattr(result, n)) for n in ("dst",) if n in fields}
        if "files" in fields and isinstance(result.files, tuple):  # type: ignore[union-attr]
            changes["files"] = tuple(_named(f) for f in result.files)  # type: ignore[union-attr]
        return dataclasses.replace(result, **changes) if changes else result
    if isinstance(result, list):
        return [_named(r) for r in result]
    return result


def _writing(arguments: dict[str, Any]) -> dict[str, Any]:
    """How a command's arguments write a remote destination: whole, or some ranks (`--ranks`, one host of a
    multi-host job) beside other runs."""
    if arguments.get("resume"):
        raise ConfigError("--resume continues files on local disk; an object-store output is written again from the "
                          "start: rerun without --resume (with --overwrite to replace an incomplete output)")
    ranks = arguments.get("ranks")
    wanted = parse_ranks(ranks) if isinstance(ranks, str) or ranks is None else sorted({int(r) for r in ranks})
    coordinator = arguments.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    group = f"{coordinator}/{arguments.get('num_processes') or os.environ.get('JAX_NUM_PROCESSES')}" \
        if coordinator else None  # fmt: skip
    return {"overwrite": bool(arguments.get("overwrite", False)), "shared": wanted is not None or group is not None,
            "ranks": wanted, "group": group}


@contextlib.contextmanager
def _messages_name_urls() -> Iterator[None]:
    """An error raised, or a jaxreshard log line written, while views are held names the URLs, not the views'
    local folders (log records are rewritten as they are made, in every thread, until the views are gone)."""
    make = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made = make(*args, **kwargs)
        if made.name.startswith("jaxreshard") and _NAMES:
            with contextlib.suppress(Exception):  # a malformed record is left for logging to report
                made.msg, made.args = display(made.getMessage()), ()
        return made

    logging.setLogRecordFactory(record)
    try:
        yield
    except JaxreshardError as e:
        e.args = (display(str(e)),)
        raise
    finally:
        logging.setLogRecordFactory(make)


def source_mounts() -> dict[str, Any]:
    """The source views of this process, for spawned workers (`adopt_source_mounts` in each)."""
    return dict(MOUNTED)


def adopt_source_mounts(mounts: dict[str, Any]) -> None:
    """In a spawned worker: register the parent's source views (their bytes are read from the store)."""
    for root, (url, remote) in mounts.items():
        mount_again(root, url, remote)


def published(tmp: Path, target: Path) -> bool:
    """If `target` stands for a remote destination, publish the complete `tmp` to it (the commit of an object
    store: see `destination`) and move `tmp` to `target` locally, for what the caller reads back; else False."""
    mount = _DESTINATIONS.get(str(target))
    if mount is not None:
        mount.publish(tmp)
        os.rename(tmp, target)
        return True
    mount = next((m for t, m in _DESTINATIONS.items() if str(target).startswith(t + "/")), None)
    if mount is None:
        return False
    if not mount.shared:
        raise ConfigError(f"{mount.url}: a rank folder committed on its own into a whole-output run")  # a bug
    mount.publish(tmp, folder=str(target.relative_to(mount.target)))  # one rank folder of a --ranks run
    return True


def updated_root(dst: Path, merge: Callable[[], None]) -> bool:
    """If `dst` stands for a shared remote destination, run `merge` (it rewrites the local root manifest from
    the local copy) against the store's current manifest and upload it conditionally (see `destination`);
    else False (the caller merges locally)."""
    mount = _DESTINATIONS.get(str(dst))
    if mount is None or not mount.shared:
        return False
    mount.update_root(merge)
    return True


def display(text: str) -> str:
    """`text` with every view's local folder (a destination's also with its temporaries) written as its URL."""
    for root, url in _NAMES.items():
        text = re.sub(re.escape(root) + r"(/out\b|/\.out\.[\w.-]+)?", lambda _m, u=url: u, text)
    return text


__all__ = ["views", "option_views", "source_mounts", "adopt_source_mounts", "source_view", "destination_view",
           "published", "updated_root", "display", "is_url", "parse_url"]
