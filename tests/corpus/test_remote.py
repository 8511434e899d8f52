"""Bad object-store inputs (issue 12): missing buckets, prefixes and objects, refused permissions, hostile object
names under a source prefix, a source being written by another run, non-weight objects over the caps, and
destinations that overlap their source. Each is exit 2 with one line naming the URL or the key.

Every case runs against this session's moto server through a proxy (tests/remote): `{bucket}` is a fresh bucket
holding whatever the case's setup put there; `_NOW` hands the setups the bucket, the proxy and a monkeypatch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jaxreshard.remote import catalogue
from tests.remote.conftest import bucket, s3_env, s3_proxies, s3_proxy, s3_server  # noqa: F401 - fixtures

from .harness import Case, corpus_test

_NOW: dict = {}  # the running case's bucket, proxy, monkeypatch and example checkpoint
DP2MP4 = "configs/layouts/llama_dp2mp4.yaml"
MISSING = "jr-no-such-bucket-4d2e"  # never created on the test server


@pytest.fixture(autouse=True)
def _remote(bucket, s3_proxy, monkeypatch, llama) -> Iterator[None]:  # noqa: F811 - the imported fixtures
    _NOW.update(bucket=bucket, proxy=s3_proxy, monkeypatch=monkeypatch, llama=llama)
    yield
    _NOW.clear()
    for key in bucket.keys():  # one by one: moto cannot parse a bulk delete naming a control character
        bucket.s3.delete_object(Bucket=bucket.name, Key=key)


def _source(*extra: tuple[str, bytes], model: bool = True):
    """A setup: the example checkpoint as `src/model.safetensors` (unless not `model`) plus `extra` objects."""

    def setup(tmp: Path) -> dict[str, str]:
        b = _NOW["bucket"]
        if model:
            b.put("src/model.safetensors", _NOW["llama"].read_bytes())
        for key, data in extra:
            b.put(key, data)
        return {"bucket": b.name}

    return setup


def _cut_model(tmp: Path) -> dict[str, str]:
    """A setup: the example checkpoint cut to half its length (a partial upload, or a copy stopped midway)."""
    data = _NOW["llama"].read_bytes()
    return _source(("src/model.safetensors", data[: len(data) // 2]), model=False)(tmp)


def _patched(name: str, value: int, *extra: tuple[str, bytes]):
    """A setup: `_source(*extra)` with the catalogue's cap `name` lowered to `value` (so no case uploads GiBs)."""

    def setup(tmp: Path) -> dict[str, str]:
        _NOW["monkeypatch"].setattr(catalogue, name, value)
        return _source(*extra)(tmp)

    return setup


def _fault(status: int, method: str | None, code: str | None = None, path: str | None = None):
    """A setup: the example source, then every `method` request (to `path`) answered with `status` by the proxy."""

    def setup(tmp: Path) -> dict[str, str]:
        subs = _source()(tmp)
        _NOW["proxy"].fail(status, times=10_000, method=method, code=code, path=path)
        return subs

    return setup


def _src(*more: str) -> list[str]:
    return ["convert", "--src", "s3://{bucket}/src", "--dst", "{tmp}/out", *more]


def _dst(url: str, *more: str) -> list[str]:
    return ["convert", "--src", "{llama}", "--dst", url, *more]


_DEEP = "src/" + "/".join(f"d{i}" for i in range(20)) + "/x.json"
# refused by our own check, or (keys the client itself cannot list: '.', '..', empty parts, control characters)
# from the client's refusal, still naming the key
_NAME_RULE = (r"(an object name that cannot be a file here.*remove it from the prefix"
              r"|has a name that cannot be a path.*remove or rename it)")

CASES = [
    # missing things
    Case("s3-missing-bucket-src", ["convert", "--src", f"s3://{MISSING}/src", "--dst", "{tmp}/out"], 2,
         rf"s3://{MISSING}/src: listing: no such bucket or object; check the URL", _source()),
    Case("s3-missing-bucket-dst", _dst(f"s3://{MISSING}/out"), 2,
         rf"s3://{MISSING}/out/\.jaxreshard\.lock: creating the lock object: no such bucket", _source()),
    Case("s3-missing-prefix", _src()[:2] + ["s3://{bucket}/nope", "--dst", "{tmp}/out"], 2,
         r"s3://jr-[\w-]+/nope: no such object or prefix", _source()),
    Case("s3-missing-object", ["convert", "--src", "s3://{bucket}/src/model.safetensor", "--dst", "{tmp}/out"], 2,
         r"s3://jr-[\w-]+/src/model\.safetensor: no such object or prefix", _source()),
    Case("s3-empty-bucket", ["convert", "--src", "s3://{bucket}", "--dst", "{tmp}/out"], 2,
         r"s3://jr-[\w-]+: no such object or prefix", _source(model=False)),
    Case("s3-verify-missing-prefix", ["verify", "s3://{bucket}/nope"], 2,
         r"s3://jr-[\w-]+/nope: no such object or prefix", _source()),
    # permissions
    Case("s3-denied-listing", _src(), 2, r"s3://jr-[\w-]+/src: listing: access denied", _fault(403, "GET")),
    Case("s3-denied-read", _src(), 2, r"s3://jr-[\w-]+/src/model\.safetensors: .*access denied",
         _fault(403, "GET", "AccessDenied", r"/src/model\.safetensors$")),
    Case("s3-denied-write", _dst("s3://{bucket}/out"), 2,
         r"s3://jr-[\w-]+/out/\.jaxreshard\.lock: creating the lock object: access denied", _fault(403, "PUT")),
    Case("s3-bad-credentials", _src(), 2, r"s3://jr-[\w-]+/src: listing: .*(credentials|access denied)",
         _fault(403, None, "InvalidAccessKeyId")),
    # URLs refused before any request
    Case("s3-credentials-in-url", ["convert", "--src", "s3://AKIDX:s3cr3t-value@{bucket}/src", "--dst", "{tmp}/o"],
         2, r"^(?!.*s3cr3t-value).*credentials or ports do not go into the URL", _source()),
    Case("s3-bad-bucket-name", ["convert", "--src", "s3://Not_A_Bucket/src", "--dst", "{tmp}/out"], 2,
         r"s3://Not_A_Bucket: not a valid bucket name"),
    Case("s3-dotdot-prefix", ["convert", "--src", "s3://{bucket}/src/../etc", "--dst", "{tmp}/out"], 2,
         r"the prefix has an empty, '\.' or '\.\.' part", _source()),
    # hostile object names under the source prefix
    Case("s3-key-dotdot", _src(), 2, r"src/a/\.\./b.*" + _NAME_RULE, _source(("src/a/../b", b"{}"))),
    Case("s3-key-dot", _src(), 2, r"src/\./c.*" + _NAME_RULE, _source(("src/./c", b"{}"))),
    Case("s3-key-empty-part", _src(), 2, r"src//d.*" + _NAME_RULE, _source(("src//d", b"{}"))),
    Case("s3-key-control-char", _src(), 2, r"src/x\\x01y.*" + _NAME_RULE, _source(("src/x\x01y", b"{}"))),
    Case("s3-key-del-char", _src(), 2, r"src/x\\x7fy.*" + _NAME_RULE, _source(("src/x\x7fy", b"{}"))),
    Case("s3-key-backslash", _src(), 2, r"src/x\\\\y.*" + _NAME_RULE, _source(("src/x\\y", b"{}"))),
    Case("s3-key-long-part", _src(), 2, _NAME_RULE, _source(("src/" + "n" * 256 + ".json", b"{}"))),
    Case("s3-key-too-deep", _src(), 2, r"src/d0/d1/.*" + _NAME_RULE, _source((_DEEP, b"{}"))),
    Case("s3-key-trailing-slash-with-bytes", _src(), 2, r"src/e.*(a key 'e/' holding bytes|a key ending in '/')",
         _source(("src/e/", b"data"))),
    Case("s3-key-file-and-folder", _src(), 2,
         r"s3://jr-[\w-]+/src/a: is both an object and the folder of other objects",
         _source(("src/a", b"{}"), ("src/a/b.json", b"{}"))),
    # broken weight objects: the line names the object's URL, never the local view it was read through
    Case("s3-truncated-safetensors", _src(), 2, r"^jaxreshard: error: (?!.*jaxreshard-src-)s3://jr-[\w-]+/src/model\.safetensors",
         _cut_model),
    Case("s3-header-length-huge", _src(), 2, r"^jaxreshard: error: (?!.*jaxreshard-src-)s3://jr-[\w-]+/src/model\.safetensors",
         _source((("src/model.safetensors", (1 << 60).to_bytes(8, "little") + b"{}")), model=False)),
    Case("s3-header-past-object", _src(), 2, r"^jaxreshard: error: (?!.*jaxreshard-src-)s3://jr-[\w-]+/src/model\.safetensors",
         _source((("src/model.safetensors", (5000).to_bytes(8, "little") + b'{"a": 1}')), model=False)),
    Case("s3-garbage-ckpt", _src(), 2, r"^jaxreshard: error: (?!.*jaxreshard-src-)s3://jr-[\w-]+/src/model\.ckpt",
         _source((("src/model.ckpt", bytes(range(256)) * 64)), model=False)),
    Case("s3-empty-object", _src(), 2, r"^jaxreshard: error: (?!.*jaxreshard-src-)s3://jr-[\w-]+/src/model\.safetensors",
         _source((("src/model.safetensors", b"")), model=False)),
    # a source still being written
    Case("s3-source-locked", _src(), 2,
         r"s3://jr-[\w-]+/src: is being written by a jaxreshard run .*s3://jr-[\w-]+/src/\.jaxreshard\.lock",
         _source(("src/.jaxreshard.lock", b"{}"))),
    Case("s3-verify-locked", ["verify", "s3://{bucket}/src"], 2, r"src/\.jaxreshard\.lock",
         _source(("src/.jaxreshard.lock", b"{}"))),
    # caps
    Case("s3-huge-non-weight-object", _src(), 2,
         r"s3://jr-[\w-]+/src/notes\.txt is 2 MiB: jaxreshard copies non-weight files whole \(at most 1 MiB each\)",
         _patched("MAX_SMALL_FILE", 1 << 20, ("src/notes.txt", bytes(2 << 20)))),
    Case("s3-huge-non-weight-object-65mib", _src(), 2, r"s3://jr-[\w-]+/src/events\.log is 65 MiB: .*at most 64 MiB",
         _source(("src/events.log", bytes(65 << 20)))),
    Case("s3-non-weight-total", _src(), 2, r"the non-weight files are over",
         _patched("MAX_SMALL_TOTAL", 1000, *((f"src/n{i}.json", bytes(400)) for i in range(3)))),
    Case("s3-too-many-objects", _src(), 2, r"s3://jr-[\w-]+/src: more than 3 objects under the prefix",
         _patched("MAX_OBJECTS", 3, *((f"src/n{i}.json", b"{}") for i in range(4)))),
    # destinations that overlap their source (refused locally: 'the destination overlaps the source')
    Case("s3-dst-is-src", ["convert", "--src", "s3://{bucket}/src", "--dst", "s3://{bucket}/src", "--overwrite",
                           "--dst-layout", DP2MP4], 2, r"overlaps the source", _source()),
    Case("s3-dst-inside-src", ["convert", "--src", "s3://{bucket}/src", "--dst", "s3://{bucket}/src/out",
                               "--dst-layout", DP2MP4], 2, r"overlaps the source", _source()),
    Case("s3-src-inside-dst", ["convert", "--src", "s3://{bucket}/src", "--dst", "s3://{bucket}", "--overwrite",
                               "--dst-layout", DP2MP4], 2, r"overlaps the source", _source()),
    Case("s3-dst-is-an-object", _dst("s3://{bucket}/src/model.safetensors"), 2,
         r"s3://jr-[\w-]+/src/model\.safetensors: .*(object|file)", _source()),
    # options an object-store destination cannot honour
    Case("s3-dst-resume", _dst("s3://{bucket}/out", "--dst-layout", DP2MP4, "--resume"), 2,
         r"--resume continues files on local disk; an object-store output is written again from the start",
         _source()),
]

test_case = corpus_test(CASES)
