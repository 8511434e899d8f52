"""Fixtures for the object-storage tests: ONE moto S3 server per session on 127.0.0.1, a fresh bucket per test,
an environment that points the standard AWS variables at the server with fake credentials, and counting /
fault-injecting proxies (one per simulated host).

    def test_x(bucket, s3_env, tmp_path):          # env already points at the server
        bucket.upload(folder, "src")                # boto3, independent of jaxreshard
        convert(src=bucket.url("src"), dst=bucket.url("out"), ...)
        assert bucket.keys("out") == [...]

    def test_y(bucket, s3_proxy):                   # env points at a proxy in front of the server
        s3_proxy.fail(503, times=2)
        ...
        assert s3_proxy.pending == 0 and s3_proxy.bytes_served == ...

The whole tier is skipped when moto[server], boto3 or obstore is not installed (the `test` and `remote` extras).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("moto.server", reason="the object-storage tests need moto[server] (the `test` extra)")
pytest.importorskip("boto3", reason="the object-storage tests need boto3 (the `test` extra)")
pytest.importorskip("obstore", reason="the object-storage tests need obstore (the `remote` extra)")

from tests.remote.proxy import S3Proxy  # noqa: E402 - after the skips above
from tests.remote.server import Bucket, MotoS3, delete_bucket, fake_env, isolated_environ, new_bucket  # noqa: E402


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3]:
    """The session's moto S3 server (`.endpoint` is its http://127.0.0.1:PORT URL)."""
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: MotoS3, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> dict[str, str]:
    """Point this test's environment at the server: every AWS_* and proxy variable of the developer's environment
    removed, then fake credentials, AWS_REGION=us-east-1 and AWS_ENDPOINT_URL=the server; AWS_CONFIG_FILE and
    AWS_SHARED_CREDENTIALS_FILE name absent files, so ~/.aws is never read. Returns the variables set (the
    proxy fixtures change AWS_ENDPOINT_URL afterwards)."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy") or name in (
                "BOTO_CONFIG", "BOTO_PATH"):
            monkeypatch.delenv(name)
    home = tmp_path_factory.mktemp("aws_home")
    env = fake_env(s3_server.endpoint)
    env["AWS_CONFIG_FILE"] = str(home / "config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(home / "credentials")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def bucket(s3_server: MotoS3, s3_env: dict[str, str]) -> Iterator[Bucket]:
    """A fresh, empty bucket for this test (deleted with everything in it afterwards); the environment points at
    the server (`s3_env`). Its helpers (upload, download, keys, sizes, get, put, multipart_uploads) talk to the
    server directly with boto3, never through a proxy."""
    made = new_bucket(s3_server.endpoint)
    yield made
    delete_bucket(made)


@pytest.fixture
def s3_proxies(s3_server: MotoS3) -> Iterator[Callable[[], S3Proxy]]:
    """A factory of proxies in front of the server, one per simulated host (each counts only what passed through
    it); all are stopped after the test. Set a host's AWS_ENDPOINT_URL to `proxy.url` (see `host_env`)."""
    made: list[S3Proxy] = []

    def make() -> S3Proxy:
        proxy = S3Proxy(s3_server.endpoint)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()


@pytest.fixture
def s3_proxy(s3_proxies: Callable[[], S3Proxy], s3_env: dict[str, str],
             monkeypatch: pytest.MonkeyPatch) -> S3Proxy:
    """One proxy in front of the server, with this test's AWS_ENDPOINT_URL pointing at it (so jaxreshard, run in
    process, goes through it; the `bucket` helpers still go straight to the server)."""
    proxy = s3_proxies()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    return proxy


@pytest.fixture
def host_env(s3_server: MotoS3, tmp_path: Path) -> Callable[[str | None], dict[str, str]]:
    """`host_env(endpoint=None)`: a full environment for a subprocess (a simulated host of a multi-host run):
    os.environ without any AWS or proxy variable, plus fake credentials and AWS_ENDPOINT_URL=`endpoint` (default
    the server; pass `proxy.url` to count that host's bytes), HOME and the AWS config paths under tmp_path."""
    home = tmp_path / "host_home"
    home.mkdir(exist_ok=True)

    def env(endpoint: str | None = None) -> dict[str, str]:
        return isolated_environ(endpoint or s3_server.endpoint, home=home)

    return env
