"""A real S3-compatible server on 127.0.0.1 for the object-storage tests and the remote benchmark: moto's server
mode in a thread of this process, plus boto3 helpers (test-only) that put, fetch and list what is in a bucket
independently of jaxreshard's own storage code, so a test's expectations never come from the code under test.

Only addresses on this machine are ever used: the server binds 127.0.0.1 on a free port, and `fake_env` points
every AWS variable at it with fake credentials (a developer's real AWS config is never read).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGION = "us-east-1"
ACCESS_KEY = "jaxreshard-test-key"
SECRET_KEY = "jaxreshard-test-secret"
# Every variable that could make a client reach a real account or another host: cleared by `fake_env`.
_CLEARED_PREFIXES = ("AWS_",)
_CLEARED = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "BOTO_CONFIG",
            "BOTO_PATH")


class MotoS3:
    """moto's S3 server on 127.0.0.1, a free port, served by a thread of this process until `stop()`.

    One per test session is enough: tests stay apart by each using a bucket of its own (`new_bucket`)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving, join the serving thread and close the listening socket."""
        self._server.stop()
        inner = getattr(self._server, "_server", None)  # ThreadedMotoServer.stop() leaves its socket open
        if inner is not None:
            inner.server_close()


def fake_env(endpoint: str) -> dict[str, str]:
    """The environment a client needs to reach `endpoint` with fake credentials: the standard AWS variables
    (what a user sets for a private S3-compatible server), nothing else."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata service for credentials
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def isolated_environ(endpoint: str, base: dict[str, str] | None = None, home: Path | None = None) -> dict[str, str]:
    """A copy of `base` (default: os.environ) with every AWS and proxy variable replaced by `fake_env(endpoint)`,
    for a subprocess; with `home`, HOME (where ~/.aws lives) and the AWS config file paths point under it."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(_CLEARED_PREFIXES) and k not in _CLEARED}
    env.update(fake_env(endpoint))
    if home is not None:
        env["HOME"] = str(home)
        env["AWS_CONFIG_FILE"] = str(home / ".aws" / "config")  # absent files: nothing is read from them
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(home / ".aws" / "credentials")
    return env


def client(endpoint: str) -> Any:
    """A boto3 S3 client for `endpoint` with the fake credentials, path-style addressing and no retries (a test
    helper must not hide a server fault)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1, "mode": "standard"}),
    )


_names = iter(range(1 << 62))
_names_lock = threading.Lock()


def unique_bucket_name(prefix: str = "jr") -> str:
    """A valid bucket name (3-63 lowercase characters) no other test of this session uses."""
    with _names_lock:
        n = next(_names)
    return f"{prefix}-{n}-{uuid.uuid4().hex[:8]}"


@dataclass
class Bucket:
    """One bucket on the test server, with boto3 helpers to put, fetch and list what is in it."""

    name: str
    endpoint: str  # the server itself (not a proxy): helpers bypass any fault injection
    s3: Any = field(repr=False)

    def url(self, prefix: str = "") -> str:
        """`s3://<bucket>/<prefix>` (no trailing slash added)."""
        return f"s3://{self.name}/{prefix}" if prefix else f"s3://{self.name}"

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.name, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.name, Key=key)["Body"].read()

    def upload(self, local: Path | str, prefix: str = "") -> list[str]:
        """Upload a file, or every file under a folder (relative paths become keys under `prefix`); returns the
        keys, sorted. Objects over 8 MiB go up as multipart uploads (boto3's transfer manager)."""
        local = Path(local)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        keys = []
        for path in files:
            rel = path.name if local.is_file() else path.relative_to(local).as_posix()
            key = f"{prefix.rstrip('/')}/{rel}" if prefix else rel
            self.s3.upload_file(str(path), self.name, key)
            keys.append(key)
        return sorted(keys)

    def download(self, prefix: str, local: Path | str) -> list[Path]:
        """Download every object under `prefix/` into `local`, keeping the key paths below the prefix; returns the
        files written, sorted."""
        local = Path(local)
        written = []
        for key in self.keys(prefix):
            rel = key[len(prefix):].lstrip("/") if prefix else key
            if not rel or ".." in Path(rel).parts:
                raise ValueError(f"key {key!r} has no safe local path below prefix {prefix!r}")
            out = local / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(self.name, key, str(out))
            written.append(out)
        return sorted(written)

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (a folder: `prefix/` when not empty), sorted."""
        folder = prefix.rstrip("/") + "/" if prefix else ""
        return sorted(obj["Key"] for obj in self._objects(folder))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: size} of every object under `prefix/`."""
        folder = prefix.rstrip("/") + "/" if prefix else ""
        return {obj["Key"]: obj["Size"] for obj in self._objects(folder)}

    def multipart_uploads(self, prefix: str = "") -> list[dict]:
        """The multipart uploads started and neither completed nor aborted (boto3 `list_multipart_uploads`), each
        {'Key', 'UploadId', ...}: after a failed run, none must be left."""
        out: list[dict] = []
        kwargs: dict[str, Any] = {"Bucket": self.name, "Prefix": prefix}
        while True:
            page = self.s3.list_multipart_uploads(**kwargs)
            out += page.get("Uploads", [])
            if not page.get("IsTruncated"):
                return out
            kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def empty(self) -> None:
        """Abort every multipart upload and delete every object (the bucket stays)."""
        for up in self.multipart_uploads():
            self.s3.abort_multipart_upload(Bucket=self.name, Key=up["Key"], UploadId=up["UploadId"])
        keys = [obj["Key"] for obj in self._objects("")]
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=self.name,
                                   Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})

    def _objects(self, prefix: str) -> Iterator[dict]:
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            yield from page.get("Contents", [])


def new_bucket(endpoint: str, name: str | None = None) -> Bucket:
    """Create a bucket on the server at `endpoint` (a fresh unique name by default)."""
    s3 = client(endpoint)
    bucket = Bucket(name or unique_bucket_name(), endpoint, s3)
    s3.create_bucket(Bucket=bucket.name)
    return bucket


def delete_bucket(bucket: Bucket) -> None:
    """Empty and delete a bucket, so a long session does not keep every test's objects in memory."""
    bucket.empty()
    bucket.s3.delete_bucket(Bucket=bucket.name)
    bucket.s3.close()


def serve_ranges_in_place() -> None:
    """Make this process's moto serve a ranged GET by copying only its range (benchmark use).

    moto keeps each object in a spooled temporary file and reads the WHOLE object for every GET, ranged or not,
    so a ranged read of a 1 GiB object costs 1 GiB of copying: a benchmark of concurrent range reads would measure
    moto, not the client. This keeps each object as one immutable `bytes` instead (in memory; the benchmark's
    objects fit), so a ranged GET slices it, as a real server reads only the range from disk."""
    import hashlib

    from moto.s3.models import FakeKey

    def get_value(self: Any) -> bytes:
        return self.__dict__.get("_bench_value", b"")

    def set_value(self: Any, new_value: bytes | str) -> None:
        data = new_value.encode() if isinstance(new_value, str) else bytes(new_value)
        self.__dict__["_bench_value"] = data
        self.contentsize = len(data)

    def etag(self: Any) -> str:
        if self._etag is None:
            self._etag = hashlib.md5(get_value(self)).hexdigest()
        return f'"{self._etag}"'

    FakeKey.value = property(get_value, set_value)  # type: ignore[method-assign, assignment]
    FakeKey.etag = property(etag)  # type: ignore[method-assign, assignment]
