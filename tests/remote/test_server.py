"""The test server and its fixtures: the environment reaches the server and nothing of the developer's AWS setup,
and the boto3 bucket helpers put, fetch and list exactly what they say."""

from __future__ import annotations

import os

import pytest

from tests.remote.server import ACCESS_KEY, REGION, isolated_environ

MIB = 1 << 20


@pytest.fixture
def developer_env(monkeypatch):
    """A developer's shell with a real AWS setup and a web proxy (set before `s3_env`)."""
    for name, value in {"AWS_PROFILE": "prod", "AWS_SESSION_TOKEN": "real-token", "AWS_ENDPOINT_URL_S3": "https://x",
                        "AWS_CONFIG_FILE": "/home/dev/.aws/config", "HTTPS_PROXY": "http://10.0.0.1:3128"}.items():
        monkeypatch.setenv(name, value)


def test_s3_env_replaces_the_developers_aws_setup(developer_env, s3_env, s3_server):
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "HTTPS_PROXY"):
        assert name not in os.environ
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    assert s3_server.endpoint.startswith("http://127.0.0.1:")
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_REGION"]) == (ACCESS_KEY, REGION)
    assert not os.path.exists(os.environ["AWS_CONFIG_FILE"])
    assert not os.path.exists(os.environ["AWS_SHARED_CREDENTIALS_FILE"])


def test_obstore_reaches_the_bucket_from_the_environment_alone(bucket):
    import obstore
    from obstore.store import S3Store

    bucket.put("dir/obj", b"0123456789")
    store = S3Store(bucket.name, client_options={"allow_http": True})  # endpoint, keys and region from the env
    assert bytes(obstore.get_range(store, "dir/obj", start=2, length=3)) == b"234"
    obstore.put(store, "dir/new", b"abc")
    assert bucket.get("dir/new") == b"abc"


def test_s3_proxy_fixture_points_the_environment_at_the_proxy(bucket, s3_proxy):
    import obstore
    from obstore.store import S3Store

    assert os.environ["AWS_ENDPOINT_URL"] == s3_proxy.url != bucket.endpoint
    bucket.put("obj", b"x" * 1000)  # helpers go straight to the server: not counted
    assert s3_proxy.requests == 0
    assert bytes(obstore.get(S3Store(bucket.name, client_options={"allow_http": True}), "obj").bytes()) == b"x" * 1000
    assert s3_proxy.bytes_served == 1000


def test_upload_download_keys_and_sizes(bucket, tmp_path):
    src = tmp_path / "src"
    files = {"a.bin": os.urandom(10), "rank_0/b.bin": os.urandom(9 * MIB), "rank_1/c/d.txt": b""}  # 9 MiB: multipart
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    assert bucket.upload(src, "ck/pt") == sorted(f"ck/pt/{rel}" for rel in files)
    bucket.put("ck/ptx", b"not under ck/pt/")
    assert bucket.keys("ck/pt") == sorted(f"ck/pt/{rel}" for rel in files)
    assert bucket.sizes("ck/pt/") == {f"ck/pt/{rel}": len(data) for rel, data in files.items()}
    written = bucket.download("ck/pt", tmp_path / "back")
    assert [p.relative_to(tmp_path / "back").as_posix() for p in written] == sorted(files)
    for rel, data in files.items():
        assert (tmp_path / "back" / rel).read_bytes() == data
    assert bucket.upload(src / "a.bin", "one") == ["one/a.bin"]
    assert bucket.multipart_uploads() == []  # boto3's multipart upload completed


def test_multipart_uploads_lists_unfinished_ones_and_empty_aborts_them(bucket):
    started = bucket.s3.create_multipart_upload(Bucket=bucket.name, Key="out/rank_0.safetensors")
    bucket.put("out/done", b"1")
    assert [(u["Key"], u["UploadId"]) for u in bucket.multipart_uploads("out/")] == [
        ("out/rank_0.safetensors", started["UploadId"])]
    assert bucket.multipart_uploads("other/") == []
    bucket.empty()
    assert bucket.multipart_uploads() == [] and bucket.keys() == []


def test_isolated_environ_for_subprocess_hosts(tmp_path):
    base = {"PATH": "/usr/bin", "AWS_PROFILE": "prod", "AWS_ACCESS_KEY_ID": "AKIAREAL", "http_proxy": "http://p:1"}
    env = isolated_environ("http://127.0.0.1:9", base=base, home=tmp_path)
    assert env["PATH"] == "/usr/bin" and "AWS_PROFILE" not in env and "http_proxy" not in env
    assert env["AWS_ACCESS_KEY_ID"] == ACCESS_KEY and env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert env["HOME"] == str(tmp_path) and env["AWS_CONFIG_FILE"].startswith(str(tmp_path))
