"""A small threaded HTTP/1.1 proxy in front of the test S3 server: it counts what the server served through it and
injects faults on request, so tests can check which bytes each simulated host read, and how the storage layer
copes with throttling, server errors, refusals and connections lost mid-read.

One `S3Proxy` per simulated host: point that host's AWS_ENDPOINT_URL at `proxy.url`, and `proxy.bytes_served` is
the number of response body bytes the server sent that host. Faults are rules taken in the order they were added:
the first rule that matches a request (method, and a regular expression searched in the request target: path and
query) and has uses left answers it, and uses one. `require_access_key` makes it refuse requests signed with any
other access key id (moto accepts any credentials), for wrong-credential tests.

Bodies stream through in pieces of at most 1 MiB in both directions (multipart parts of many MiB never sit whole in
memory); keep-alive connections, Content-Length and chunked bodies (request and response) are relayed as such.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

PIECE = 1 << 20
# S3's error code and message for each status the proxy can inject (`code=` overrides the code).
S3_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
}
_MESSAGES = {code: message for code, message in S3_ERRORS.values()} | {
    "InvalidAccessKeyId": "The AWS Access Key Id you provided does not exist in our records."}
# The access key id of a request: SigV4 (Authorization header or presigned query), SigV2 header, SigV2 presigned
_CREDENTIAL = re.compile(r"Credential=([^/,\s&]+)/|^AWS ([^:\s]+):|[?&]AWSAccessKeyId=([^&]+)")
# Headers that describe one connection, not the message: never relayed (bodies keep their own framing headers).
_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "upgrade", "te", "trailer"}


@dataclass
class Fault:
    """One injected-fault rule; `remaining` counts down as requests use it, `hits` counts up."""

    kind: str  # "status" (answer with an S3 error), "cut" (close mid-body), "delay" (then forward); "auth" in logs
    remaining: int
    method: str | None = None
    path: re.Pattern[str] | None = None
    status: int = 0
    code: str = ""
    after_bytes: int = 0
    seconds: float = 0.0
    hits: int = 0

    def matches(self, method: str, target: str) -> bool:
        return (self.remaining > 0 and (self.method is None or self.method == method.upper())
                and (self.path is None or self.path.search(target) is not None))


@dataclass
class Exchange:
    """One request as the proxy saw it. It is logged when the request arrives and its counts grow as bytes pass,
    each BEFORE the bytes are handed on, so once a client has a response the counts already include it.

    `sent`: response body bytes relayed to the client (after a cut, the bytes before it); `received`: request body
    bytes (payload, without chunk framing); `status`: 0 until the answer's status line is sent."""

    method: str
    path: str  # request target: path and query
    range: str | None  # the Range header, as sent
    status: int = 0
    sent: int = 0
    received: int = 0
    fault: str | None = None  # the kind of fault injected into this exchange, if any


@dataclass
class _Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    log: list[Exchange] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)


class S3Proxy:
    """A proxy on 127.0.0.1 (free port) forwarding to `upstream` (an http:// URL); `stop()` (or leaving a `with`
    block) closes every connection and joins every thread."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self._stats = _Stats()
        self._stopping = threading.Event()
        self._access_key: str | None = None
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"s3proxy:{port}", daemon=True)
        self._thread.start()

    # --- faults -------------------------------------------------------------------------------------------------
    def fail(self, status: int = 503, times: int = 1, method: str | None = None, path: str | None = None,
             code: str | None = None) -> Fault:
        """Answer the next `times` matching requests with `status` and an S3 error body (503 SlowDown, 500
        InternalError, 403 AccessDenied, 404 NoSuchKey, or `code`), without forwarding them."""
        if code is None and status not in S3_ERRORS:
            raise ValueError(f"no S3 error code known for status {status}; pass code=")
        return self._add(Fault("status", times, status=status, code=code or S3_ERRORS[status][0]), method, path)

    def cut(self, after_bytes: int, times: int = 1, method: str | None = "GET", path: str | None = None) -> Fault:
        """Forward the next `times` matching requests, relay the response headers and the first `after_bytes`
        bytes of the body, then close the connection (a connection lost mid-read)."""
        if after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        return self._add(Fault("cut", times, after_bytes=after_bytes), method, path)

    def delay(self, seconds: float, times: int = 1, method: str | None = None, path: str | None = None) -> Fault:
        """Hold the next `times` matching requests for `seconds` before forwarding them."""
        return self._add(Fault("delay", times, seconds=seconds), method, path)

    def require_access_key(self, access_key_id: str | None) -> None:
        """Answer every request not signed with `access_key_id` (SigV4 or SigV2, header or presigned query) with
        403 InvalidAccessKeyId, as S3 answers wrong credentials (moto itself accepts any); None: accept all again.
        Only the key id is checked, never the signature."""
        self._access_key = access_key_id

    def _add(self, fault: Fault, method: str | None, path: str | None) -> Fault:
        if fault.remaining < 1:
            raise ValueError("times must be >= 1")
        fault.method = method.upper() if method else None
        fault.path = re.compile(path) if path is not None else None
        with self._stats.lock:
            self._stats.faults.append(fault)
        return fault

    def _take(self, method: str, target: str) -> Fault | None:
        with self._stats.lock:
            for fault in self._stats.faults:
                if fault.matches(method, target):
                    fault.remaining -= 1
                    fault.hits += 1
                    return fault
        return None

    @property
    def pending(self) -> int:
        """Fault uses not yet taken, over every rule."""
        with self._stats.lock:
            return sum(f.remaining for f in self._stats.faults)

    def clear_faults(self) -> None:
        with self._stats.lock:
            self._stats.faults.clear()

    # --- counters -----------------------------------------------------------------------------------------------
    def _record(self, exchange: Exchange) -> None:
        with self._stats.lock:
            self._stats.log.append(exchange)

    @property
    def log(self) -> list[Exchange]:
        """Every exchange so far, in the order the requests arrived (copies: a snapshot)."""
        with self._stats.lock:
            return [replace(e) for e in self._stats.log]

    @property
    def requests(self) -> int:
        with self._stats.lock:
            return len(self._stats.log)

    @property
    def bytes_served(self) -> int:
        """Response body bytes sent to clients, over every exchange so far."""
        with self._stats.lock:
            return sum(e.sent for e in self._stats.log)

    @property
    def bytes_received(self) -> int:
        """Request body bytes received from clients (uploads), over every exchange so far."""
        with self._stats.lock:
            return sum(e.received for e in self._stats.log)

    def reset(self) -> None:
        """Forget the log (and so the counters); faults stay."""
        with self._stats.lock:
            self._stats.log.clear()

    # --- life -----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop accepting, close every client connection (a keep-alive one would otherwise hold its thread), wake
        delayed requests and join every thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()  # joins the handler threads (ThreadingMixIn.block_on_close)
        self._thread.join()

    def __enter__(self) -> S3Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins them
    block_on_close = True

    def __init__(self, proxy: S3Proxy) -> None:
        self.proxy = proxy
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # type: ignore[override]
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # a client or the server hanging up is no bug of the proxy
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle keep-alive connection is closed after this many seconds
    server: _Server

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._drop_upstream()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # tests read the proxy's log instead

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def _relay(self) -> None:
        proxy = self.server.proxy
        if proxy._access_key is not None and _access_key(self.headers.get("Authorization"), self.path) != (
                proxy._access_key):
            fault: Fault | None = Fault("auth", 0, status=403, code="InvalidAccessKeyId")  # no rule is used up
        else:
            fault = proxy._take(self.command, self.path)
        self._exchange = Exchange(self.command, self.path, self.headers.get("Range"), fault=fault and fault.kind)
        proxy._record(self._exchange)
        body = _RequestBody(self.rfile, self.headers, self._exchange)
        if fault is not None and fault.kind == "delay":
            proxy._stopping.wait(fault.seconds)
        if fault is not None and fault.kind in ("status", "auth"):
            for _ in body:  # read the body so the connection stays usable for the next request
                pass
            self._answer_error(fault)
        else:
            self._forward(body, fault.after_bytes if fault and fault.kind == "cut" else None)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _relay

    def _answer_error(self, fault: Fault) -> None:
        message = _MESSAGES.get(fault.code, fault.code)
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(fault.code)}</Code>'
               f"<Message>{escape(message)}</Message><Resource>{escape(self.path)}</Resource>"
               "<RequestId>jaxreshard-test-proxy</RequestId></Error>").encode()
        self._exchange.status = fault.status
        self.send_response_only(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml)))
        self.send_header("x-amz-request-id", "jaxreshard-test-proxy")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _send_upstream(self, body: _RequestBody) -> http.client.HTTPResponse:
        """Send the request upstream on this connection's upstream connection; a stale keep-alive connection is
        replaced once, when no body byte has been sent yet."""
        for attempt in (0, 1):
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=120)
            conn = self._upstream
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP:
                        conn.putheader(name, value)
                conn.endheaders()
                for piece in body:
                    conn.send(piece)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop_upstream()
                if attempt or body.started:
                    raise
        raise AssertionError("unreachable")

    def _forward(self, body: _RequestBody, cut_after: int | None) -> None:
        try:
            resp = self._send_upstream(body)
        except (OSError, http.client.HTTPException):
            self._drop_upstream()
            self.close_connection = True
            self._exchange.status = 502
            self.send_error(502, "upstream unreachable")
            return
        self._exchange.status = resp.status
        chunked = "chunked" in (resp.getheader("Transfer-Encoding") or "").lower()
        has_body = self.command != "HEAD" and resp.status not in (204, 304)
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP:
                self.send_header(name, value)
        if has_body and not chunked and resp.getheader("Content-Length") is None:
            self.close_connection = True  # a body that ends when the connection does
            self.send_header("Connection", "close")
        self.end_headers()
        if has_body:
            self._relay_body(resp, chunked, cut_after)
        if cut_after is not None:
            self.wfile.flush()
            self.close_connection = True
            self._drop_upstream()  # the rest of the response is still unread on it
            self.connection.shutdown(socket.SHUT_RDWR)
        elif not resp.isclosed():
            resp.read()  # HEAD and bodiless answers: leave the upstream connection ready for the next request
        if resp.will_close:
            self._drop_upstream()

    def _relay_body(self, resp: http.client.HTTPResponse, chunked: bool, cut_after: int | None) -> None:
        sent = 0
        while cut_after is None or sent < cut_after:
            piece = resp.read(PIECE if cut_after is None else min(PIECE, cut_after - sent))
            if not piece:
                break
            sent += len(piece)
            self._exchange.sent = sent  # counted before the client can have it
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked and cut_after is None:
            self.wfile.write(b"0\r\n\r\n")


def _access_key(authorization: str | None, target: str) -> str | None:
    """The access key id a request was signed with, if any."""
    from urllib.parse import unquote

    found = _CREDENTIAL.search(authorization or "") or _CREDENTIAL.search(unquote(target))
    return next((g for g in found.groups() if g), None) if found else None


class _RequestBody:
    """The request body read from the client in pieces as they are relayed: Content-Length bytes, or chunked
    framing passed through unchanged (chunk sizes, extensions, trailers), so a signed streaming upload reaches the
    server exactly as sent."""

    def __init__(self, rfile: BinaryIO, headers, exchange: Exchange) -> None:
        self._rfile = rfile
        self._chunked = "chunked" in (headers.get("Transfer-Encoding") or "").lower()
        self._length = int(headers.get("Content-Length") or 0)
        self._exchange = exchange
        self.started = False
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        if self._done:
            return
        self._done = True
        for piece in self._chunks() if self._chunked else self._fixed():
            self.started = True
            yield piece

    def _fixed(self) -> Iterator[bytes]:
        left = self._length
        while left:
            piece = self._rfile.read(min(PIECE, left))
            if not piece:
                raise ConnectionError("client closed the connection mid-body")
            left -= len(piece)
            self._exchange.received += len(piece)
            yield piece

    def _chunks(self) -> Iterator[bytes]:
        while True:
            line = self._rfile.readline(65537)
            if not line.endswith(b"\n"):
                raise ConnectionError("bad chunk size line from client")
            yield line
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                break
            left = size + 2  # the data and its CRLF
            while left:
                piece = self._rfile.read(min(PIECE, left))
                if not piece:
                    raise ConnectionError("client closed the connection mid-chunk")
                left -= len(piece)
                yield piece
            self._exchange.received += size
        while True:  # trailers, then the empty line that ends the message
            line = self._rfile.readline(65537)
            yield line
            if line in (b"\r\n", b"\n", b""):
                break
