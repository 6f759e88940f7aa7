"""A real HTTP proxy on loopback in front of moto that fails requests the way S3 does (tests of retries over real HTTP).

moto cannot be asked to fail; this sits between the client and moto, set as
AWS_ENDPOINT_URL, and forwards every request it does not fail.  Faults:
- `503`: 503 SlowDown, the request never reaches moto (S3's throttle);
- `500`: 500 InternalError, never reaches moto;
- `reset`: the connection is reset before the request is forwarded;
- `lost-reply`: the request is forwarded and applied, then the connection is
  reset instead of the reply (the client cannot know the write happened);
- `stall`: the request is forwarded and applied, then the reply stalls: the
  status line and headers are sent, the body is not, for `stall_seconds`,
  then the connection is reset (a client read timeout shorter than that
  sees a timed-out read);
- `complete-fail`: a CompleteMultipartUpload (POST ...?uploadId=) is not
  forwarded and is answered 200 OK with an InternalError body, as S3 does
  when a complete fails after it has started replying; other requests are
  never drawn for it;
- `no-such-upload`: a CompleteMultipartUpload is not forwarded and is
  answered 404 NoSuchUpload, as S3 answers the retry of a complete that
  succeeded once the upload id is gone (moto answers such a retry with the
  object instead); other requests are never drawn for it.

Which requests fail: the first `fail_first`, every one for which
`fail(method, path)` is true (answered 503 ServiceUnavailable), and, with `faults`, a seeded
random share of the rest (`FaultPlan`: replayable from its seed, counted per
kind in `counts`).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# New kinds go at the end: a plan's draws for the kinds before them stay the same.
KINDS = ("503", "500", "reset", "lost-reply", "stall", "complete-fail", "no-such-upload")
_COMPLETE_ONLY = ("complete-fail", "no-such-upload")
_ERRORS = {
    "503": (503, b"SlowDown", b"Please reduce your request rate."),
    "500": (500, b"InternalError", b"We encountered an internal error. Please try again."),
    "unavailable": (503, b"ServiceUnavailable", b"Service is unavailable, try again."),  # fail_first / fail
}
# S3 may answer a CompleteMultipartUpload 200 OK and still fail it: the error is in the body.
_COMPLETE_FAILED = (200, b"InternalError", b"We encountered an internal error. Please try again.")
_NO_SUCH_UPLOAD = (404, b"NoSuchUpload", b"The specified multipart upload does not exist.")


@dataclass
class FaultPlan:
    """A seeded share of requests to fail, per kind: `rates={"503": 0.03, "lost-reply": 0.02}`.

    `only(method, path)` limits the faults to matching requests.  The draws
    come from the plan's own generator, in the order requests arrive.
    """

    rates: dict[str, float]
    seed: int = 0
    only: Callable[[str, str], bool] = lambda method, path: True
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self._rng = random.Random(self.seed)

    def draw(self, method: str, path: str) -> str | None:
        if not self.only(method, path):
            return None
        x = self._rng.random()
        for kind in KINDS:
            x -= self.rates.get(kind, 0.0)
            if x < 0:
                return kind if kind not in _COMPLETE_ONLY or is_complete_multipart(method, path) else None
        return None


def is_complete_multipart(method: str, path: str) -> bool:
    """CompleteMultipartUpload: POST /bucket/key?uploadId=... (CreateMultipartUpload is POST ...?uploads)."""
    return method == "POST" and "uploadId=" in urllib.parse.urlsplit(path).query


class FlakyProxy:
    """A loopback HTTP proxy that fails requests instead of forwarding them, when told to.

    `requests` counts what it was asked, `log` lists them ("METHOD path"),
    `counts` the faults injected per kind.  `hold(method, path)`, when given,
    is called before a request is forwarded: it may block, to keep that
    request in flight.  `before_forward(method, path, body)`, when given, runs
    just before a request goes to moto (to race it with another writer).
    """

    HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}

    def __init__(self, upstream: str, fail_first: int = 0, fail: Callable[[str, str], bool] | None = None,
                 hold: Callable[[str, str], None] | None = None, faults: FaultPlan | None = None,
                 before_forward: Callable[[str, str, bytes], None] | None = None, stall_seconds: float = 5.0):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.hold = hold or (lambda method, path: None)
        self.before_forward = before_forward or (lambda method, path, body: None)
        self.fail_first = fail_first
        self.fail = fail or (lambda method, path: False)
        self.faults = faults
        self.stall_seconds = stall_seconds
        self.requests = 0
        self.log: list[str] = []
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = _read_body(self)
                kind = proxy._choose(self.command, self.path)
                if kind in _ERRORS:
                    _send_error(self, *_ERRORS[kind])
                    return
                if kind == "complete-fail":
                    _send_error(self, *_COMPLETE_FAILED)
                    return
                if kind == "no-such-upload":
                    _send_error(self, *_NO_SUCH_UPLOAD)
                    return
                if kind == "reset":
                    _reset(self)
                    return
                proxy.hold(self.command, self.path)
                proxy.before_forward(self.command, self.path, body)
                status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                if kind == "lost-reply":
                    _reset(self)
                    return
                if kind == "stall":
                    _stall(self, status, headers, proxy.stall_seconds)
                    return
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in proxy.HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                self.send_header("Content-Length", str(len(data)) if self.command != "HEAD" else length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _choose(self, method: str, path: str) -> str | None:
        """The fault for this request (None: forward it as it is); counts it."""
        with self.lock:
            self.requests += 1
            self.log.append(f"{method} {path}")
            if self.requests <= self.fail_first or self.fail(method, path):
                kind: str | None = "unavailable"
            else:
                kind = self.faults.draw(method, path) if self.faults else None
            if kind:
                self.counts[kind] += 1
            return kind

    def _forward(self, method: str, path: str, request_headers, body: bytes):
        headers = {k: v for k, v in request_headers.items() if k.lower() not in self.HOP}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = b""
        while True:
            size = int(handler.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return out
            out += handler.rfile.read(size)
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _send_error(handler: BaseHTTPRequestHandler, status: int, code: bytes, message: bytes) -> None:
    payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>" + code + b"</Code><Message>"
               + message + b"</Message></Error>")
    handler.send_response(status)
    handler.send_header("Content-Type", "application/xml")
    handler.send_header("Content-Length", str(len(payload) if handler.command != "HEAD" else 0))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(payload)


def _stall(handler: BaseHTTPRequestHandler, status: int, headers, seconds: float) -> None:
    """Send the status and headers of a reply whose body never comes; reset after `seconds`."""
    handler.send_response(status)
    for k, v in headers:
        if k.lower() not in FlakyProxy.HOP:
            handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.flush()
    # The client's read timeout ends the wait first when it is shorter; a dead client, the socket.
    handler.connection.settimeout(seconds)
    try:
        handler.connection.recv(1)
    except OSError:
        pass
    _reset(handler)


def _reset(handler: BaseHTTPRequestHandler) -> None:
    """Close the client's connection with a TCP reset and no reply."""
    handler.close_connection = True
    sock = handler.connection
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
