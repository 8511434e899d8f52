"""Object storage (`s3://`, `gs://`) as sources and destinations, for every command (issue 12).

A remote location is handed to the rest of jaxreshard as a local folder (a *view*): a source's listing and
headers are local and its tensor bytes are read by ranged GETs through the storage seam (`catalogue`); a
destination's files upload while they are written and the output is completed by its manifest, written last
(`destination`). Commands and the library call `source_view` / `destination_view` on their arguments; local
paths pass through untouched. `display` puts the URLs back into messages.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError, JaxreshardError
from ..formats.storage import register_mount
from .catalogue import mount_source
from .destination import DestinationMount
from .objects import drop_cache
from .urls import is_url, open_store, parse_url

F = TypeVar("F", bound=Callable[..., Any])
_DESTINATIONS: dict[str, DestinationMount] = {}  # the local folder standing for a destination -> its mount
_NAMES: dict[str, str] = {}  # a view's local root (and its spellings) -> the URL it stands for


def _root(kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"jaxreshard-{kind}-")).resolve()


@contextlib.contextmanager
def source_view(src: Any) -> Iterator[Any]:
    """`src` itself, or for a URL the local view of it, for the length of the block."""
    if not is_url(src):
        yield src
        return
    url = parse_url(src)
    base = _root("src")
    root = base / (url.prefix.rpartition("/")[2] or url.bucket)  # the view is named as the URL's last part
    root.mkdir()
    try:
        view = mount_source(open_store(url), url, root)
        _NAMES[str(root)] = str(url) if view == root else str(url).rpartition("/")[0]
        yield view
    finally:
        register_mount(root, None)
        _NAMES.pop(str(root), None)
        drop_cache()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def destination_view(dst: Any, *, overwrite: bool) -> Iterator[Any]:
    """`dst` itself, or for a URL a local folder standing for it (see `destination`), for the block."""
    if not is_url(dst):
        yield dst
        return
    url = parse_url(dst)
    root = _root("dst")
    mount = DestinationMount(open_store(url), url, root, overwrite=overwrite)
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
            names = [n for n in (*sources, destination) if n and is_url(bound.arguments.get(n))]
            if not names:
                return func(*args, **kwargs)
            originals = {}
            with contextlib.ExitStack() as stack, _messages_name_urls():
                for name in sources:
                    view = stack.enter_context(source_view(bound.arguments.get(name)))
                    originals[str(view)], bound.arguments[name] = bound.arguments.get(name), view
                if destination is not None:
                    _one_run(bound.arguments)
                    overwrite = bool(bound.arguments.get("overwrite", False))
                    bound.arguments[destination] = stack.enter_context(
                        destination_view(bound.arguments.get(destination), overwrite=overwrite))
                result = func(*bound.args, **bound.kwargs)
                return originals.get(str(result), result) if isinstance(result, Path) else result  # not the view

        return call  # type: ignore[return-value]

    return wrap


def _one_run(arguments: dict[str, Any]) -> None:
    hosts = arguments.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if arguments.get("ranks") not in (None, "") or arguments.get("resume") or hosts:
        flag = "--resume" if arguments.get("resume") else "--ranks" if arguments.get("ranks") else "several hosts"
        raise ConfigError(f"{flag} with an object-store destination is not supported: rank folders cannot be "
                          "committed one by one, nor files continued, without a rename; convert all ranks in one run "
                          "(--overwrite replaces an incomplete output), or write each node's ranks to local disk")


@contextlib.contextmanager
def _messages_name_urls() -> Iterator[None]:
    """An error raised while views are held names the URLs, not the views' local folders."""
    try:
        yield
    except JaxreshardError as e:
        e.args = (display(str(e)),)
        raise


def published(tmp: Path, target: Path) -> bool:
    """If `target` stands for a remote destination, publish the complete `tmp` to it (the commit of an object
    store: see `destination`) and move `tmp` to `target` locally, for what the caller reads back; else False."""
    mount = _DESTINATIONS.get(str(target))
    if mount is None:
        inside = next((m for t, m in _DESTINATIONS.items() if str(target).startswith(t + "/")), None)
        if inside is not None:  # one rank folder at a time (--ranks, several hosts): no rename to do it with
            raise ConfigError(f"{inside.url}: rank folders cannot be committed one by one to an object store; "
                              "convert all ranks in one process, or write each host's ranks to its local disk")
        return False
    mount.publish(tmp)
    os.rename(tmp, target)
    return True


def display(text: str) -> str:
    """`text` with every view's local folder (a destination's also with its temporaries) written as its URL."""
    for root, url in _NAMES.items():
        text = re.sub(re.escape(root) + r"(/out\b|/\.out\.[\w.-]+)?", lambda _m, u=url: u, text)
    return text


__all__ = ["views", "source_view", "destination_view", "published", "display", "is_url", "parse_url"]
