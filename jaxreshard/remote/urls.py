"""Object-store locations: `s3://bucket/prefix` and `gs://bucket/prefix`, their stores, and their errors.

Stores come from `obstore` (the optional extra `jaxreshard[remote]`): one Rust client per bucket with
connection pooling, concurrent ranged GETs (`get_ranges` coalesces and overlaps them), multipart uploads, and
retries with backoff for throttling, 5xx answers and dropped connections. Credentials and endpoints come from
each store's standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_REGION`, `AWS_ENDPOINT_URL`; `GOOGLE_APPLICATION_CREDENTIALS`, `GOOGLE_SERVICE_ACCOUNT`); an `http://`
endpoint (a private or local server) is allowed without more settings. Messages name the URL only: never a
credential, a signature or a server's raw answer (which may echo request headers).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import ConfigError, JaxreshardError, OutputError

SCHEMES = ("s3", "gs")
_URL = re.compile(r"(s3|gs)://([^/]*)(/.*)?", re.DOTALL)
_BUCKET = {"s3": re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"),  # S3's rules; GCS allows '_' and 222 chars
           "gs": re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")}
RETRY_TIMEOUT = timedelta(minutes=3)  # total time spent retrying one request before the run fails
MAX_RETRIES = 10


class RemoteError(OutputError):
    """An object store refused or failed a request (exit 2: a missing bucket or object, a permission, a
    credential, or a store that kept failing after the retries)."""


def is_url(location: object) -> bool:
    """Whether `location` names an object-store location (a `str` starting with a supported scheme)."""
    return isinstance(location, str) and location.split("://", 1)[0].lower() in SCHEMES and "://" in location


@dataclass(frozen=True)
class Url:
    """A checked `scheme://bucket/prefix` (prefix without leading or trailing '/')."""

    scheme: str
    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, relative: str) -> str:
        """The object key of a file `relative` to this location."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def child(self, relative: str) -> str:
        return f"{self}/{relative}"


def parse_url(text: str) -> Url:
    """`text` as a `Url`, or ConfigError naming what is wrong (no credentials in URLs: use the environment)."""
    text = text.strip(" ") if isinstance(text, str) else text  # spaces only: a control character is part of
    scheme, sep, rest = text.partition("://") if isinstance(text, str) else ("", "", "")  # what was written
    match = _URL.fullmatch(scheme.lower() + sep + rest) if sep else None
    if match is None:  # nothing after the scheme is echoed: it may hold a key
        shown = f"{scheme[:10]}://..." if sep else f"a {type(text).__name__}"
        raise ConfigError(f"{shown} is not an object-store URL; write s3://bucket/prefix or gs://bucket/prefix")
    scheme, bucket, path = match.group(1), match.group(2), (match.group(3) or "").strip("/")
    if "@" in bucket or ":" in bucket:
        raise ConfigError(f"{scheme}://...: credentials or ports do not go into the URL; set AWS_ACCESS_KEY_ID, "
                          "AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL in the environment")
    if not _BUCKET[scheme].fullmatch(bucket):
        raise ConfigError(f"{scheme}://{_shown(bucket[:80])}: not a valid bucket name "
                          "(3-63 lower-case letters, digits, '.', '-')")
    parts = path.split("/") if path else []
    if any(p in ("", ".", "..") or any(ord(c) < 32 or c in "\\\x7f" for c in p) for p in parts):
        raise ConfigError(f"{scheme}://{bucket}/{_shown(path[:200])}: the prefix has an empty, '.' or '..' part or "
                          "a control character; name the folder plainly")
    return Url(scheme, bucket, "/".join(parts))


def _shown(text: str) -> str:
    """`text` as it is when printable, else its repr (a message stays one line)."""
    return text if text.isprintable() else repr(text)


def _obstore() -> Any:
    try:
        import obstore
        import obstore.store  # noqa: F401
    except ImportError:
        raise ConfigError("s3:// and gs:// locations need the optional extra: pip install 'jaxreshard[remote]'") \
            from None
    return obstore


def open_store(url: Url) -> Any:
    """An obstore store for `url`'s bucket (no prefix: keys are full), configured from the environment."""
    obstore = _obstore()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    client: dict[str, Any] = {"allow_http": True} if endpoint.startswith("http://") else {}
    client["timeout"] = timedelta(minutes=5)
    client["connect_timeout"] = timedelta(seconds=30)
    retry = {"max_retries": MAX_RETRIES, "retry_timeout": RETRY_TIMEOUT,
             "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=15),
                         "base": 2}}  # fmt: skip
    try:
        return obstore.store.from_url(f"{url.scheme}://{url.bucket}", client_options=client, retry_config=retry)
    except Exception as e:  # a configuration the store rejects (bad region, malformed endpoint)
        raise ConfigError(f"{url}: cannot configure the {url.scheme} client: {_kind(e)}; check the AWS_* / GOOGLE_* "
                          "environment") from None


def _kind(e: BaseException) -> str:
    """What went wrong, from the exception's class, and an HTTP status if the message has one."""
    status = re.search(r"status(?: code)?:? (\d{3})", str(e))
    return type(e).__name__ + (f" (HTTP {status.group(1)})" if status else "")


def remote_error(e: BaseException, where: str, doing: str) -> JaxreshardError:
    """One line for a failed store request on `where` (a URL), without the server's raw answer."""
    from obstore import exceptions as x

    if isinstance(e, (x.NotFoundError, FileNotFoundError)) or "(HTTP 404)" in _kind(e):
        return RemoteError(f"{where}: {doing}: no such bucket or object; check the URL and the endpoint")
    if isinstance(e, x.PermissionDeniedError):
        return RemoteError(f"{where}: {doing}: access denied; check the credentials' permissions on this bucket")
    if isinstance(e, x.UnauthenticatedError):
        return RemoteError(f"{where}: {doing}: the credentials were refused; check AWS_ACCESS_KEY_ID / "
                           "AWS_SECRET_ACCESS_KEY (or the store's own credential settings)")
    if "403" in _kind(e):
        return RemoteError(f"{where}: {doing}: access denied (HTTP 403); check the credentials and their permissions")
    return RemoteError(f"{where}: {doing} failed after retries: {_kind(e)}; the store is unreachable or kept failing")


def delete_objects(store: Any, url: Url, names: list[str]) -> None:
    """Delete the objects `names` (relative to `url`); one already gone is no error."""
    import obstore

    try:
        obstore.delete(store, [url.key(n) for n in names])
    except FileNotFoundError:
        pass
    except Exception as e:
        raise remote_error(e, url.child(names[0]), "deleting") from None
