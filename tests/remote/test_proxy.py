"""The test proxy itself: exact byte counts, faults seen by real clients (obstore and boto3), keep-alive and
streaming relays, and a clean stop. The storage tests trust these counts and faults, so they are checked here
against values computed independently (the object's own bytes, the requested range)."""

from __future__ import annotations

import http.client
import os
import threading
import time
from contextlib import closing
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.remote.proxy import S3Proxy
from tests.remote.server import ACCESS_KEY, REGION, SECRET_KEY, client

MIB = 1 << 20


def store(bucket_name: str, endpoint: str, retries: int = 0):
    """An obstore S3 store at `endpoint` (explicit settings: these tests check the proxy, not the env)."""
    from obstore.store import S3Store

    return S3Store(bucket_name, endpoint=endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                   region=REGION, client_options={"allow_http": True},
                   retry_config={"max_retries": retries, "backoff": {"init_backoff": timedelta(milliseconds=10),
                                                                     "max_backoff": timedelta(milliseconds=50)}})


def payload(n: int) -> bytes:
    return os.urandom(n)


def test_ranged_get_is_counted_exactly(bucket, s3_proxy):
    import obstore

    data = payload(3 * MIB + 17)
    bucket.put("obj", data)
    got = obstore.get_range(store(bucket.name, s3_proxy.url), "obj", start=1000, length=123_456)
    assert bytes(got) == data[1000:1000 + 123_456]
    assert s3_proxy.bytes_served == 123_456
    [ex] = s3_proxy.log
    assert (ex.method, ex.path, ex.range, ex.status, ex.sent, ex.fault) == (
        "GET", f"/{bucket.name}/obj", "bytes=1000-124455", 206, 123_456, None)


def test_whole_get_streams_in_pieces_and_counts_every_byte(bucket, s3_proxy):
    import obstore

    data = payload(5 * MIB + 3)  # several relay pieces
    bucket.put("obj", data)
    st = store(bucket.name, s3_proxy.url)
    assert bytes(obstore.get(st, "obj").bytes()) == data
    assert bytes(obstore.get_range(st, "obj", start=0, length=10)) == data[:10]
    assert s3_proxy.bytes_served == len(data) + 10
    assert s3_proxy.requests == 2
    s3_proxy.reset()
    assert (s3_proxy.requests, s3_proxy.bytes_served) == (0, 0)


def test_each_proxy_counts_only_its_own_host(bucket, s3_proxies):
    import obstore

    data = payload(4 * MIB)
    bucket.put("obj", data)
    host_a, host_b = s3_proxies(), s3_proxies()
    # ranges further apart than obstore's coalescing gap (1 MiB): two requests, only the asked bytes
    ranges = obstore.get_ranges(store(bucket.name, host_a.url), "obj", starts=[0, 3 * MIB],
                                ends=[100, 3 * MIB + 300])
    assert [bytes(r) for r in ranges] == [data[:100], data[3 * MIB:3 * MIB + 300]]
    assert bytes(obstore.get_range(store(bucket.name, host_b.url), "obj", start=5, length=7)) == data[5:12]
    assert host_a.bytes_served == 400
    assert host_b.bytes_served == 7
    assert sorted(e.range for e in host_b.log) == ["bytes=5-11"]


def test_injected_503_is_seen_without_retries_and_then_used_up(bucket, s3_proxy):
    import obstore

    bucket.put("obj", b"x" * 100)
    st = store(bucket.name, s3_proxy.url)
    fault = s3_proxy.fail(503, times=1, method="GET")
    with pytest.raises(Exception, match="503") as info:
        obstore.get(st, "obj").bytes()
    assert "SlowDown" in str(info.value)
    assert (fault.remaining, fault.hits, s3_proxy.pending) == (0, 1, 0)
    assert bytes(obstore.get(st, "obj").bytes()) == b"x" * 100  # the fault is used up
    assert [(e.status, e.fault) for e in s3_proxy.log] == [(503, "status"), (200, None)]


def test_client_retries_pass_through_faults(bucket, s3_proxy):
    import obstore

    bucket.put("obj", b"abc" * 1000)
    s3_proxy.fail(503, times=2)
    s3_proxy.fail(500, times=1)
    assert bytes(obstore.get(store(bucket.name, s3_proxy.url, retries=5), "obj").bytes()) == b"abc" * 1000
    assert [e.status for e in s3_proxy.log] == [503, 503, 500, 200]
    assert s3_proxy.pending == 0


def test_boto3_sees_status_faults_with_s3_error_codes(bucket, s3_proxy):
    from botocore.exceptions import ClientError

    bucket.put("obj", b"data")
    s3 = client(s3_proxy.url)
    for status, code in ((403, "AccessDenied"), (500, "InternalError"), (503, "SlowDown")):
        s3_proxy.fail(status)
        with pytest.raises(ClientError) as info:
            s3.get_object(Bucket=bucket.name, Key="obj")
        assert info.value.response["Error"]["Code"] == code
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert s3.get_object(Bucket=bucket.name, Key="obj")["Body"].read() == b"data"
    s3.close()


def test_faults_match_method_and_path(bucket, s3_proxy):
    import obstore

    bucket.put("a/one", b"1")
    bucket.put("b/two", b"2")
    st = store(bucket.name, s3_proxy.url)
    s3_proxy.fail(503, times=3, method="PUT")  # never a GET
    path_fault = s3_proxy.fail(500, times=1, path=r"/b/")
    assert bytes(obstore.get(st, "a/one").bytes()) == b"1"
    with pytest.raises(Exception, match="500"):
        obstore.get(st, "b/two").bytes()
    assert bytes(obstore.get(st, "b/two").bytes()) == b"2"
    assert path_fault.hits == 1 and s3_proxy.pending == 3
    with pytest.raises(Exception, match="503"):
        obstore.put(st, "c", b"3")
    assert s3_proxy.pending == 2
    s3_proxy.clear_faults()
    assert s3_proxy.pending == 0


def test_cut_connection_is_seen_and_counted(bucket, s3_proxy):
    import obstore

    data = payload(3 * MIB)
    bucket.put("obj", data)
    st = store(bucket.name, s3_proxy.url)
    s3_proxy.cut(after_bytes=MIB + 5)
    with pytest.raises(Exception, match="(?i)body|connection|closed"):
        obstore.get(st, "obj").bytes()
    [cut] = s3_proxy.log
    assert (cut.status, cut.sent, cut.fault) == (200, MIB + 5, "cut")
    assert bytes(obstore.get_range(st, "obj", start=MIB, length=MIB)) == data[MIB:2 * MIB]  # new connection works


def test_boto3_sees_a_cut_mid_body(bucket, s3_proxy):
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError

    bucket.put("obj", payload(2 * MIB))
    s3 = client(s3_proxy.url)
    s3_proxy.cut(after_bytes=1000)
    body = s3.get_object(Bucket=bucket.name, Key="obj")["Body"]
    with pytest.raises((IncompleteReadError, ResponseStreamingError, ProtocolError)):
        body.read()
    assert s3_proxy.log[0].sent == 1000
    s3.close()


def test_delay_holds_the_request(bucket, s3_proxy):
    import obstore

    bucket.put("obj", b"z")
    s3_proxy.delay(0.4)
    start = time.monotonic()
    assert bytes(obstore.get(store(bucket.name, s3_proxy.url), "obj").bytes()) == b"z"
    assert time.monotonic() - start >= 0.4
    assert s3_proxy.log[0].fault == "delay"


def test_multipart_upload_streams_through_and_is_counted(bucket, s3_proxy):
    import obstore

    part = 8 * MIB
    data = payload(2 * part + 12345)
    writer = obstore.open_writer(store(bucket.name, s3_proxy.url), "big", buffer_size=part)
    writer.write(data[:part + 1])  # more than one part: a multipart upload starts
    writer.flush()
    assert [u["Key"] for u in bucket.multipart_uploads()] == ["big"]
    writer.write(data[part + 1:])
    writer.close()
    assert bucket.multipart_uploads() == []
    assert bucket.get("big") == data
    parts = [e for e in s3_proxy.log if "partNumber=" in e.path]
    assert sorted(e.received for e in parts) == sorted([part, part, 12345])
    [complete] = [e for e in s3_proxy.log if e.method == "POST" and "uploadId=" in e.path]
    assert 0 < complete.received < 1000  # the small CompleteMultipartUpload XML
    assert s3_proxy.bytes_received == len(data) + complete.received


# moto checks that a request is signed, not the signature: a made-up one will do for hand-made requests
AUTH = {"Authorization": f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20260101/{REGION}/s3/aws4_request, "
                         "SignedHeaders=host, Signature=00"}


def test_keep_alive_and_chunked_request_bodies(bucket, s3_proxy):
    host, port = s3_proxy.url.removeprefix("http://").split(":")
    with closing(http.client.HTTPConnection(host, int(port), timeout=30)) as conn:
        pieces = [b"a" * 1000, b"b" * (MIB + 1), b"c"]
        conn.request("PUT", f"/{bucket.name}/chunked", body=iter(pieces), headers=AUTH, encode_chunked=True)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        sock = conn.sock
        conn.request("GET", f"/{bucket.name}/chunked", headers={"Range": "bytes=999-1001", **AUTH})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (206, b"abb")
        assert conn.sock is sock  # one keep-alive connection served both
    assert bucket.get("chunked") == b"".join(pieces)
    assert [e.received for e in s3_proxy.log] == [1000 + MIB + 2, 0]


class _ChunkedUpstream(BaseHTTPRequestHandler):
    """A stub server answering every GET with a chunked body of three known chunks."""

    protocol_version = "HTTP/1.1"
    CHUNKS = (b"hello ", b"x" * (MIB + 7), b" world")

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in self.CHUNKS:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format, *args) -> None:  # noqa: A002
        pass


def test_chunked_responses_are_relayed_and_counted():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _ChunkedUpstream)
    serving = threading.Thread(target=upstream.serve_forever, daemon=True)
    serving.start()
    try:
        with S3Proxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy:
            host, port = proxy.url.removeprefix("http://").split(":")
            with closing(http.client.HTTPConnection(host, int(port), timeout=30)) as conn:
                for _ in range(2):  # twice on one connection: the relayed framing must end where the body does
                    conn.request("GET", "/anything")
                    resp = conn.getresponse()
                    assert resp.getheader("Transfer-Encoding") == "chunked"
                    assert resp.read() == b"".join(_ChunkedUpstream.CHUNKS)
            assert proxy.bytes_served == 2 * sum(map(len, _ChunkedUpstream.CHUNKS))
    finally:
        upstream.shutdown()
        upstream.server_close()
        serving.join()


def test_stop_closes_idle_keep_alive_connections_and_joins(bucket, s3_server):
    before = set(threading.enumerate())
    proxy = S3Proxy(s3_server.endpoint)
    proxy.delay(30, path="/never-sent")  # a pending delay must not hold stop()
    bucket.put("obj", b"q")
    host, port = proxy.url.removeprefix("http://").split(":")
    conns = [http.client.HTTPConnection(host, int(port), timeout=30) for _ in range(3)]
    try:
        for conn in conns:  # each leaves a handler thread waiting for its next request
            conn.request("GET", f"/{bucket.name}/obj", headers=AUTH)
            assert conn.getresponse().read() == b"q"
        start = time.monotonic()
        proxy.stop()
        assert time.monotonic() - start < 5
        assert not proxy._thread.is_alive()
        deadline = time.monotonic() + 5  # the server's threads for the proxy's connections end when it closes them
        while time.monotonic() < deadline and set(threading.enumerate()) - before:
            time.sleep(0.05)
        assert set(threading.enumerate()) - before == set()
    finally:
        for conn in conns:
            conn.close()
        proxy.stop()  # a second stop is harmless


def test_proxy_refuses_bad_arguments(s3_proxy):
    with pytest.raises(ValueError, match="http://host:port"):
        S3Proxy("https://127.0.0.1:9")
    with pytest.raises(ValueError, match="times"):
        s3_proxy.fail(503, times=0)
    with pytest.raises(ValueError, match="code="):
        s3_proxy.fail(418)
    with pytest.raises(ValueError, match="after_bytes"):
        s3_proxy.cut(-1)
    assert s3_proxy.fail(418, code="Teapot").code == "Teapot"


def test_a_wrong_access_key_is_refused_like_s3_does(bucket, s3_proxy):
    import obstore
    from botocore.exceptions import ClientError
    from obstore.store import S3Store

    bucket.put("obj", b"secret data")
    s3_proxy.require_access_key(ACCESS_KEY)
    fault = s3_proxy.fail(503)  # not used up by a refused request
    wrong = S3Store(bucket.name, endpoint=s3_proxy.url, access_key_id="AKIAWRONG", secret_access_key="wrong-secret",
                    region=REGION, client_options={"allow_http": True}, retry_config={"max_retries": 0})
    with pytest.raises(Exception, match="403") as info:
        obstore.get(wrong, "obj").bytes()
    assert "InvalidAccessKeyId" in str(info.value)
    assert fault.remaining == 1
    s3 = client(s3_proxy.url)  # the right key passes (and meets the 503, then the object)
    with pytest.raises(ClientError, match="SlowDown"):
        s3.get_object(Bucket=bucket.name, Key="obj")
    assert s3.get_object(Bucket=bucket.name, Key="obj")["Body"].read() == b"secret data"
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket.name, "Key": "obj"})
    s3.close()
    host, port = s3_proxy.url.removeprefix("http://").split(":")
    with closing(http.client.HTTPConnection(host, int(port), timeout=30)) as conn:
        conn.request("GET", url.removeprefix(s3_proxy.url))  # presigned: the key id is in the query
        assert conn.getresponse().read() == b"secret data"
    assert [(e.status, e.fault) for e in s3_proxy.log] == [(403, "auth"), (503, "status"), (200, None), (200, None)]
    s3_proxy.require_access_key(None)
    assert bytes(obstore.get(wrong, "obj").bytes()) == b"secret data"


def test_boto3_uploads_with_expect_continue_pass_through(bucket, s3_proxy, tmp_path):
    data = payload(9 * MIB)  # boto3: a multipart upload of 8 MiB parts, each sent with Expect: 100-continue
    (tmp_path / "f").write_bytes(data)
    s3 = client(s3_proxy.url)
    s3.upload_file(str(tmp_path / "f"), bucket.name, "up")
    s3.put_object(Bucket=bucket.name, Key="small", Body=b"s" * 100)
    s3.close()
    assert bucket.get("up") == data and bucket.get("small") == b"s" * 100
    parts = sorted(e.received for e in s3_proxy.log if "partNumber=" in e.path)
    assert parts == [MIB, 8 * MIB] and bucket.multipart_uploads() == []
