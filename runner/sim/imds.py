"""A local EC2 instance metadata service (IMDSv2) for tests, demos and drills.

Owns: an HTTP server on loopback that answers the paths the EC2 source reads,
with the same formats as AWS's amazon-ec2-metadata-mock, plus control
endpoints that script what a real IMDS does to us: a spot notice, a rebalance
recommendation, failures, slowness, a token PUT that hangs (the container hop
limit) or is refused, tokens revoked under our feet.

IMDSv2 semantics, as the real service and the mock have them:
- ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds``
  (1..21600), else 400; the answer is the token, with the TTL echoed;
- every GET needs a live token in ``X-aws-ec2-metadata-token``, else 401;
  a token expires TTL seconds after it was issued (IMDSv1 is not offered);
- ``spot/instance-action`` and ``spot/termination-time`` are 404 until a
  notice is scheduled and due, then ``{"action": ..., "time": ...}`` (and
  the bare time) with time = the notice time + 120 s;
- ``events/recommendations/rebalance`` is 404 until due, then
  ``{"noticeTime": ...}``.

Control endpoints (POST; query parameters as shown)::

    /_sim/spot-notice?delay=S&action=terminate|stop|hibernate
    /_sim/rebalance?delay=S
    /_sim/reset                    notices, failures, slowness, token mode
    /_sim/reset-tokens             revoke every issued token (next GET: 401)
    /_sim/fail?status=500&count=N  answer the next N metadata requests so
    /_sim/slow?seconds=S           delay every metadata answer by S (0: off)
    /_sim/token?mode=ok|hang|refuse
    GET /_sim/stats                counters, as JSON

Run it with ``python -m runner.sim.imds --notice-after 30`` (the CLI
wires the same `main()` as ``runner imds-sim``) and point a source at it with
``AWS_EC2_METADATA_SERVICE_ENDPOINT=<the printed URL>``.

Why it is long: one small HTTP server that plays all of IMDSv2 the
sources read (tokens, spot and rebalance notices, the instance's identity,
scripted faults) plus its command line; the parts only make sense
together, and none of it is on the runtime path.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from runner.notices.base import format_utc_timestamp

TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL_S = 21600
NOTICE_LEAD_S = 120.0  # AWS's two-minute warning
TOKEN_MODES = ("ok", "hang", "refuse")
DEFAULT_PORT = 1338  # amazon-ec2-metadata-mock's port
# How long a hanging token PUT holds the connection before it is dropped: far
# longer than any client timeout, short enough not to pile up threads.
HANG_S = 30.0

META = "/latest/meta-data"
INSTANCE_ACTION_PATH = f"{META}/spot/instance-action"
TERMINATION_TIME_PATH = f"{META}/spot/termination-time"
REBALANCE_PATH = f"{META}/events/recommendations/rebalance"


@dataclass
class InstanceIdentity:
    """The facts the simulated instance reports."""

    instance_id: str = "i-0123456789abcdef0"
    instance_type: str = "g5.xlarge"
    availability_zone: str = "us-east-1a"
    region: str = "us-east-1"
    lifecycle: str = "spot"
    # An example spot price for the simulated instance, USD per hour: EC2's metadata serves no
    # price, and offline there is no spot price history, so the demo passes it as a labelled
    # override.  About what a g5.xlarge went for in us-east-1 in 2026; not a quote.
    example_spot_price: float = 0.42

    def paths(self) -> dict[str, str]:
        return {
            f"{META}/instance-id": self.instance_id,
            f"{META}/instance-type": self.instance_type,
            f"{META}/placement/availability-zone": self.availability_zone,
            f"{META}/placement/region": self.region,
            f"{META}/instance-life-cycle": self.lifecycle,
        }


@dataclass
class _Scenario:
    """What the control endpoints have asked for; guarded by the simulator's lock."""

    spot_notice_at: float | None = None  # epoch time the notice becomes visible
    spot_action: str = "terminate"
    rebalance_at: float | None = None
    fail_status: int = 500
    fail_count: int = 0
    slow_s: float = 0.0
    token_mode: str = "ok"
    tokens: dict[str, float] = field(default_factory=dict)  # token -> monotonic expiry


class ImdsSimulator:
    """The simulator: start it, point `AWS_EC2_METADATA_SERVICE_ENDPOINT` at `url`.

    Usable as a context manager.  Every scripting method is also reachable
    over HTTP (see the module docstring), so a separate process can drive it.
    """

    def __init__(
        self, port: int = 0, host: str = "127.0.0.1", identity: InstanceIdentity | None = None
    ) -> None:
        self.identity = identity or InstanceIdentity()
        self._scenario = _Scenario()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stats: Counter[str] = Counter()
        self._server = ThreadingHTTPServer((host, port), _handler_class(self))
        # Daemon threads: stop() must not wait for a handler that is sleeping
        # on purpose (slow mode, a hanging token PUT).
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ImdsSimulator:
        """Serve in a background thread; returns self."""
        if self._thread is None:
            # A short poll interval makes stop() quick (shutdown waits for one).
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="imds-sim", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; sleeping handlers are cut short."""
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> ImdsSimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- scripting --------------------------------------------------------------

    def schedule_spot_notice(self, delay: float = 0.0, action: str = "terminate") -> float:
        """Make the spot notice appear `delay` seconds from now; returns its deadline (epoch)."""
        if action not in ("terminate", "stop", "hibernate"):
            raise ValueError(f"action must be terminate, stop or hibernate, got {action!r}")
        # Whole seconds, as AWS writes the time: the deadline we return is
        # exactly the one a client will parse.
        at = float(int(time.time() + delay))
        with self._lock:
            self._scenario.spot_notice_at = at
            self._scenario.spot_action = action
        return at + NOTICE_LEAD_S

    def schedule_rebalance(self, delay: float = 0.0) -> float:
        """Make the rebalance recommendation appear `delay` seconds from now; returns its time."""
        at = float(int(time.time() + delay))
        with self._lock:
            self._scenario.rebalance_at = at
        return at

    def reset(self) -> None:
        """Clear notices, failures, slowness and the token mode; tokens stay valid."""
        with self._lock:
            tokens = self._scenario.tokens
            self._scenario = _Scenario(tokens=tokens)

    def reset_tokens(self) -> None:
        """Revoke every issued token, as a restarted IMDS would."""
        with self._lock:
            self._scenario.tokens.clear()

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next `count` metadata requests (token PUTs included) with `status`."""
        if count < 0 or not 400 <= status <= 599:
            raise ValueError(f"need count >= 0 and a 4xx/5xx status, got {count}, {status}")
        with self._lock:
            self._scenario.fail_count = count
            self._scenario.fail_status = status

    def set_slow(self, seconds: float) -> None:
        """Delay every metadata answer by `seconds` (0 turns it off)."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        with self._lock:
            self._scenario.slow_s = seconds

    def set_token_mode(self, mode: str) -> None:
        """``ok``; ``hang`` (the PUT never answers, like a hop limit of 1); ``refuse`` (403)."""
        if mode not in TOKEN_MODES:
            raise ValueError(f"token mode must be one of {', '.join(TOKEN_MODES)}, got {mode!r}")
        with self._lock:
            self._scenario.token_mode = mode

    def stats(self) -> dict[str, int]:
        """Counters: token_puts, tokens_issued, unauthorized, get:<path>, failed_on_purpose."""
        with self._lock:
            return dict(self._stats)

    # -- what the handler asks ------------------------------------------------

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def _take_failure(self) -> int | None:
        """The status to fail this request with, if failures are scheduled."""
        with self._lock:
            if self._scenario.fail_count <= 0:
                return None
            self._scenario.fail_count -= 1
            self._stats["failed_on_purpose"] += 1
            return self._scenario.fail_status

    def _slow_s(self) -> float:
        with self._lock:
            return self._scenario.slow_s

    def _token_mode(self) -> str:
        with self._lock:
            return self._scenario.token_mode

    def _issue_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._scenario.tokens[token] = time.monotonic() + ttl
            self._stats["tokens_issued"] += 1
        return token

    def _token_left(self, token: str | None) -> float | None:
        """Seconds the token has left, or None when it is missing, unknown or expired."""
        if not token:
            return None
        with self._lock:
            expiry = self._scenario.tokens.get(token)
            if expiry is None:
                return None
            left = expiry - time.monotonic()
            if left <= 0:
                del self._scenario.tokens[token]
                return None
            return left

    def _metadata(self, path: str) -> str | None:
        """The body for a metadata GET, or None for 404."""
        now = time.time()
        with self._lock:
            scenario = self._scenario
            spot_due = scenario.spot_notice_at is not None and now >= scenario.spot_notice_at
            rebalance_due = scenario.rebalance_at is not None and now >= scenario.rebalance_at
            spot_at, action, rebalance_at = scenario.spot_notice_at, scenario.spot_action, scenario.rebalance_at
        if path in (INSTANCE_ACTION_PATH, TERMINATION_TIME_PATH):
            if not spot_due or spot_at is None:
                return None
            when = format_utc_timestamp(spot_at + NOTICE_LEAD_S)
            return json.dumps({"action": action, "time": when}) if path == INSTANCE_ACTION_PATH else when
        if path == REBALANCE_PATH:
            if not rebalance_due or rebalance_at is None:
                return None
            return json.dumps({"noticeTime": format_utc_timestamp(rebalance_at)})
        return self._static(path)

    def _static(self, path: str) -> str | None:
        facts = self.identity.paths()
        if path in facts:
            return facts[path]
        if path.rstrip("/") == META:
            return _listing([*facts, INSTANCE_ACTION_PATH, REBALANCE_PATH])
        return None

    def _control(self, action: str, query: dict[str, str]) -> Any:
        """Run a control endpoint; returns what to answer as JSON.  Raises ValueError/KeyError."""
        handlers: dict[str, Callable[[], Any]] = {
            "spot-notice": lambda: {
                "deadline": self.schedule_spot_notice(
                    float(query.get("delay", 0)), query.get("action", "terminate")
                )
            },
            "rebalance": lambda: {"notice_time": self.schedule_rebalance(float(query.get("delay", 0)))},
            "reset": self.reset,
            "reset-tokens": self.reset_tokens,
            "fail": lambda: self.fail_next(int(query.get("count", 1)), int(query.get("status", 500))),
            "slow": lambda: self.set_slow(float(query.get("seconds", 0))),
            "token": lambda: self.set_token_mode(query.get("mode", "ok")),
        }
        result = handlers[action]()
        return result if result is not None else {"ok": True}


def _handler_class(sim: ImdsSimulator) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to one simulator (http.server wants a class)."""

    class Handler(_ImdsHandler):
        simulator = sim

    return Handler


class _ImdsHandler(BaseHTTPRequestHandler):
    """Routes requests: /_sim/* to the controls, the rest to IMDS semantics."""

    simulator: ImdsSimulator
    server_version = "EC2ws"  # what the real IMDS calls itself
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet by default: tests and drills poll every second or two.
        pass

    # -- routing ---------------------------------------------------------------

    def do_PUT(self) -> None:
        path = urlsplit(self.path).path
        if path != "/latest/api/token":
            self._answer(HTTPStatus.FORBIDDEN if path.startswith("/latest") else HTTPStatus.NOT_FOUND)
            return
        self._token_put()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/_sim/stats":
            self._answer(HTTPStatus.OK, json.dumps(self.simulator.stats()), "application/json")
            return
        self._metadata_get(path)

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        if not parts.path.startswith("/_sim/"):
            self._answer(HTTPStatus.METHOD_NOT_ALLOWED)
            return
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            result = self.simulator._control(parts.path[len("/_sim/") :], query)
        except KeyError:
            self._answer(HTTPStatus.NOT_FOUND, f"no control endpoint {parts.path}\n")
            return
        except ValueError as exc:
            self._answer(HTTPStatus.BAD_REQUEST, f"{exc}\n")
            return
        self._answer(HTTPStatus.OK, json.dumps(result), "application/json")

    # -- IMDS semantics -----------------------------------------------------------

    def _token_put(self) -> None:
        sim = self.simulator
        sim._count("token_puts")
        if self._delay_or_fail():
            return
        mode = sim._token_mode()
        if mode == "hang":
            # Like a PUT response dropped by a hop limit of 1: nothing comes back.
            sim._stopping.wait(HANG_S)
            self.close_connection = True
            return
        if mode == "refuse":
            self._answer(HTTPStatus.FORBIDDEN, "Forbidden\n")
            return
        ttl = _valid_ttl(self.headers.get(TTL_HEADER))
        if ttl is None:
            self._answer(HTTPStatus.BAD_REQUEST, "Bad Request\n")
            return
        self._answer(HTTPStatus.OK, sim._issue_token(ttl), headers={TTL_HEADER: str(ttl)})

    def _metadata_get(self, path: str) -> None:
        sim = self.simulator
        sim._count(f"get:{path}")
        if self._delay_or_fail():
            return
        left = sim._token_left(self.headers.get(TOKEN_HEADER))
        if left is None:
            sim._count("unauthorized")
            self._answer(HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
            return
        body = sim._metadata(path)
        ttl_header = {TTL_HEADER: str(int(left))}
        if body is None:
            self._answer(HTTPStatus.NOT_FOUND, "Not Found\n", headers=ttl_header)
        else:
            self._answer(HTTPStatus.OK, body, headers=ttl_header)

    def _delay_or_fail(self) -> bool:
        """Apply slowness and scheduled failures; True when the request was answered."""
        slow = self.simulator._slow_s()
        if slow > 0 and self.simulator._stopping.wait(slow):
            return True  # stopping: drop the request
        status = self.simulator._take_failure()
        if status is None:
            return False
        self._answer(status, f"{http.client.responses.get(status, 'Error')}\n")
        return True

    def _answer(
        self,
        status: int,
        body: str = "",
        content_type: str = "text/plain",
        headers: dict[str, str] | None = None,
    ) -> None:
        payload = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


def _listing(paths: Sequence[str]) -> str:
    """What IMDS answers for GET /latest/meta-data/: one entry a line, folders with "/"."""
    entries = set()
    for path in paths:
        head, sep, _ = path[len(META) + 1 :].partition("/")
        entries.add(head + ("/" if sep else ""))
    return "\n".join(sorted(entries))


def _valid_ttl(text: str | None) -> int | None:
    """The requested TTL when it is an integer in 1..21600, else None."""
    if text is None or not text.strip().isdigit():
        return None
    ttl = int(text)
    return ttl if 1 <= ttl <= MAX_TTL_S else None


# -- command line ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runner imds-sim",
        description="Serve a local EC2 instance metadata service (IMDSv2) that can simulate spot notices.",
    )
    defaults = InstanceIdentity()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port, 0 for any free one (default: %(default)s)"
    )
    parser.add_argument(
        "--notice-after", type=float, metavar="SECONDS", help="post a spot notice this many seconds after start"
    )
    parser.add_argument(
        "--action", default="terminate", choices=("terminate", "stop", "hibernate"), help="the spot instance-action"
    )
    parser.add_argument(
        "--rebalance-after", type=float, metavar="SECONDS", help="post a rebalance recommendation after this long"
    )
    parser.add_argument("--instance-id", default=defaults.instance_id)
    parser.add_argument("--instance-type", default=defaults.instance_type)
    parser.add_argument("--availability-zone", default=defaults.availability_zone)
    parser.add_argument("--region", default=defaults.region)
    parser.add_argument("--lifecycle", default=defaults.lifecycle, choices=("spot", "on-demand"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM.  Returns the exit code (0, or 2 if the port is taken)."""
    args = build_parser().parse_args(argv)
    identity = InstanceIdentity(
        args.instance_id, args.instance_type, args.availability_zone, args.region, args.lifecycle
    )
    try:
        sim = ImdsSimulator(port=args.port, host=args.host, identity=identity)
    except OSError as exc:
        reason = exc.strerror or exc
        print(f"imds-sim: cannot listen on {args.host}:{args.port} ({reason}); pick another --port", file=sys.stderr)
        return 2
    if args.notice_after is not None:
        sim.schedule_spot_notice(args.notice_after, args.action)
    if args.rebalance_after is not None:
        sim.schedule_rebalance(args.rebalance_after)
    # A SimpleQueue, not an Event: its put() is safe inside a signal handler
    # (see runner/notices/signals.py for why an Event is not).
    stop_requests: queue.SimpleQueue[int] = queue.SimpleQueue()
    previous = {
        signum: signal.signal(signum, lambda received, _frame: stop_requests.put(received))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    sim.start()
    print(f"IMDS simulator listening on {sim.url}", flush=True)
    print(f"  export AWS_EC2_METADATA_SERVICE_ENDPOINT={sim.url}", flush=True)
    try:
        stop_requests.get()
    finally:
        sim.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
