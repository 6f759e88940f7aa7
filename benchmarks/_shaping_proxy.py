"""A loopback HTTP proxy that caps bandwidth and adds per-request latency, for benchmarks against moto.

moto on loopback answers in microseconds and moves bytes as fast as one
Python process copies them; a real S3 path has tens of milliseconds per
request and a bandwidth limit.  Put this in front of moto (as
`AWS_ENDPOINT_URL`) and the ratios between clients that make few large
requests and clients that make many small ones resemble a real path.

How it shapes:
- latency: every request waits `latency_s` before it is forwarded (the round
  trip and first-byte time of a real endpoint, paid once per request);
- bandwidth: request bodies (uploads) and response bodies (downloads) are
  streamed in chunks, each chunk paced by one `Pacer` per direction shared by
  all connections, so the cap is on the sum of all parallel streams, as a
  NIC's would be (`rate_Bps=None`: no cap).

Bodies are streamed, not buffered, so the first bytes of a large GET reach the
client while the rest still arrives (a chunked request body is the exception:
it is read whole, then forwarded with a length).  `requests`, `bytes_up` and
`bytes_down` count what passed; `GET /__proxy__/counters` returns them as JSON
(answered by the proxy itself, neither counted nor delayed), so a client in
another process can count the requests of one operation.  `SinkServer` is an upstream that stores
nothing (PUT/POST bodies are discarded, a GET returns `?bytes=N` zero bytes),
for measuring the proxy's own ceiling and for tests.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 256 * 1024
# Not forwarded: hop-by-hop headers, and Expect (this proxy answers 100-continue itself).
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "expect"}
COUNTERS_PATH = "/__proxy__/counters"


class Pacer:
    """Lets `rate_Bps` bytes per second through, summed over every thread that calls `take`.

    Each chunk is given the next free slot on one timeline (`n / rate`
    seconds long) and its caller sleeps until that slot ends.  The timeline
    may lag the clock by at most `burst_s`: a stream that overslept (a loaded
    machine wakes threads late) catches up by that much, and an idle pacer
    banks no more than that.
    """

    def __init__(self, rate_Bps: float | None, burst_s: float = 0.05):
        self.rate_Bps = rate_Bps
        self.burst_s = burst_s
        self._next = 0.0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        rate = self.rate_Bps
        if not rate or n <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(now - self.burst_s, self._next) + n / rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)


class ShapingProxy:
    """`with ShapingProxy(upstream, rate_Bps=200e6, latency_s=0.02) as p:` -> clients use `p.url`.

    `rate_Bps` and `latency_s` may be changed while it runs (for a ceiling
    measurement without a cap, then the capped run).
    """

    def __init__(self, upstream: str, rate_Bps: float | None = None, latency_s: float = 0.0):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.latency_s = latency_s
        self.up = Pacer(rate_Bps)
        self.down = Pacer(rate_Bps)
        self.requests = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def rate_Bps(self) -> float | None:
        return self.up.rate_Bps

    @rate_Bps.setter
    def rate_Bps(self, value: float | None) -> None:
        self.up.rate_Bps = self.down.rate_Bps = value

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}

    def _count(self, requests: int = 0, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_up += up
            self.bytes_down += down

    def _serve(self, client: BaseHTTPRequestHandler) -> None:
        """Forward one request: wait the latency, stream the body up, stream the reply down, both paced."""
        if client.command == "GET" and client.path == COUNTERS_PATH:
            _send_json(client, self.counters())
            return
        self._count(requests=1)
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        upstream = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=300)
        try:
            self._send_request(client, upstream)
            reply = upstream.getresponse()
            self._send_reply(client, reply)
        finally:
            upstream.close()

    def _send_request(self, client: BaseHTTPRequestHandler, upstream: http.client.HTTPConnection) -> None:
        chunked = client.headers.get("Transfer-Encoding", "").lower() == "chunked"
        body = _read_chunked(client) if chunked else None
        length = len(body) if body is not None else int(client.headers.get("Content-Length") or 0)
        upstream.putrequest(client.command, client.path, skip_host=True, skip_accept_encoding=True)
        for key, value in client.headers.items():
            if key.lower() not in HOP and key.lower() != "content-length":
                upstream.putheader(key, value)
        if length or client.command in ("PUT", "POST"):
            upstream.putheader("Content-Length", str(length))
        upstream.endheaders()
        sent = 0
        while sent < length:
            chunk = body[sent:sent + CHUNK] if body is not None else client.rfile.read(min(CHUNK, length - sent))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            self.up.take(len(chunk))
            upstream.send(chunk)
            sent += len(chunk)
        self._count(up=sent)

    def _send_reply(self, client: BaseHTTPRequestHandler, reply: http.client.HTTPResponse) -> None:
        headers = [(k, v) for k, v in reply.getheaders() if k.lower() not in HOP]
        length = reply.getheader("Content-Length")
        no_body = client.command == "HEAD" or reply.status in (204, 304) or 100 <= reply.status < 200
        buffered = None
        if length is None and not no_body:  # a chunked reply: read it whole to give it a length
            buffered = reply.read()
            length = str(len(buffered))
        client.send_response_only(reply.status)
        for key, value in headers:
            if key.lower() != "content-length":
                client.send_header(key, value)
        if length is not None:
            client.send_header("Content-Length", length)
        client.end_headers()
        if no_body:
            reply.read()
            return
        sent = 0
        while True:
            chunk = buffered[sent:sent + CHUNK] if buffered is not None else reply.read(CHUNK)
            if not chunk:
                break
            self.down.take(len(chunk))
            client.wfile.write(chunk)
            sent += len(chunk)
        self._count(down=sent)

    def __enter__(self) -> "ShapingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _send_json(client: BaseHTTPRequestHandler, payload: dict[str, int]) -> None:
    body = json.dumps(payload).encode()
    client.send_response_only(200)
    client.send_header("Content-Type", "application/json")
    client.send_header("Content-Length", str(len(body)))
    client.end_headers()
    client.wfile.write(body)


def read_counters(proxy_url: str) -> dict[str, int]:
    """A running ShapingProxy's counters, asked over HTTP (from any process)."""
    split = urllib.parse.urlsplit(proxy_url)
    conn = http.client.HTTPConnection(split.hostname, split.port, timeout=10)
    try:
        conn.request("GET", COUNTERS_PATH)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _read_chunked(client: BaseHTTPRequestHandler) -> bytes:
    parts = []
    while True:
        size = int(client.rfile.readline().split(b";")[0], 16)
        if size == 0:
            while client.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts)
        parts.append(client.rfile.read(size))
        client.rfile.readline()


class SinkServer:
    """An upstream that keeps nothing: PUT/POST bodies are read and dropped, GET /x?bytes=N returns N zero bytes."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                remaining = int(self.headers.get("Content-Length") or 0)
                while remaining > 0:
                    remaining -= len(self.rfile.read(min(CHUNK, remaining)))
                self.send_response_only(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                remaining = int(query.get("bytes", ["0"])[0])
                self.send_response_only(200)
                self.send_header("Content-Length", str(remaining))
                self.end_headers()
                zeros = bytes(CHUNK)
                while remaining > 0:
                    n = min(CHUNK, remaining)
                    self.wfile.write(zeros[:n])
                    remaining -= n

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "SinkServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
