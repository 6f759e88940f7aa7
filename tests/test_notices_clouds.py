"""Alibaba and GCP sources against small loopback fakes of their metadata services.

The fakes follow the formats the clouds document: Alibaba's security-hardened
mode (token PUT with X-aliyun-ecs-metadata-token-ttl-seconds, then
X-aliyun-ecs-metadata-token) and ``instance/spot/termination-time`` (404, or a
UTC time); GCP's ``Metadata-Flavor: Google`` request and answer header and
``instance/preempted`` (``FALSE`` / ``TRUE``).
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runner.notices import AlibabaSource, Deduper, Ec2Source, GcpSource, NoticeKind, detect
from runner.notices.base import parse_utc_timestamp

Reply = tuple[int, str, dict[str, str]]


class FakeMetadata:
    """A loopback HTTP server whose answers come from `route(method, path, headers)`."""

    def __init__(self, route: Callable[[str, str, dict[str, str]], Reply]) -> None:
        self.route = route
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._reply("GET")

            def do_PUT(self) -> None:
                self._reply("PUT")

            def _reply(self, method: str) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.requests.append((method, self.path, headers))
                status, body, extra = fake.route(method, self.path, headers)
                payload = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.hostport = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class AlibabaState:
    """What the Alibaba fake serves: tokens it issued and the termination time."""

    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.termination: tuple[int, str] = (404, "")

    def route(self, method: str, path: str, headers: dict[str, str]) -> Reply:
        if method == "PUT" and path == "/latest/api/token":
            ttl = headers.get("x-aliyun-ecs-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, "", {}
            token = secrets.token_hex(16)
            self.tokens.add(token)
            return 200, token, {}
        if headers.get("x-aliyun-ecs-metadata-token") not in self.tokens:
            return 401, "", {}
        if path == "/latest/meta-data/instance/spot/termination-time":
            status, body = self.termination
            return status, body, {}
        return 404, "", {}


class GcpState:
    """What the GCP fake serves: the preempted flag, only to requests that say Metadata-Flavor."""

    def __init__(self) -> None:
        self.preempted = "FALSE"

    def route(self, method: str, path: str, headers: dict[str, str]) -> Reply:
        flavor = {"Metadata-Flavor": "Google"}
        if headers.get("metadata-flavor") != "Google":
            return 403, "Missing Metadata-Flavor:Google header.", flavor
        if path == "/computeMetadata/v1/instance/preempted":
            return 200, self.preempted, flavor
        if path == "/computeMetadata/v1/":
            return 200, "instance/\nproject/\n", flavor
        return 404, "", flavor


@pytest.fixture
def alibaba() -> Iterator[tuple[AlibabaState, FakeMetadata]]:
    state = AlibabaState()
    fake = FakeMetadata(state.route)
    yield state, fake
    fake.close()


@pytest.fixture
def gcp() -> Iterator[tuple[GcpState, FakeMetadata]]:
    state = GcpState()
    fake = FakeMetadata(state.route)
    yield state, fake
    fake.close()


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# -- Alibaba -------------------------------------------------------------------------


def test_alibaba_no_notice_while_404(alibaba):
    _, fake = alibaba
    assert AlibabaSource(fake.url).poll() == []


def test_alibaba_termination_time_is_termination_with_that_deadline(alibaba):
    state, fake = alibaba
    state.termination = (200, "2026-11-25T14:00:00Z")
    [notice] = AlibabaSource(fake.url).poll()
    assert notice.kind is NoticeKind.TERMINATION
    assert notice.source == "alibaba"
    assert notice.deadline == parse_utc_timestamp("2026-11-25T14:00:00Z")


def test_alibaba_uses_the_hardened_mode_token(alibaba):
    state, fake = alibaba
    state.termination = (200, "2026-11-25T14:00:00Z")
    source = AlibabaSource(fake.url)
    source.poll()
    source.poll()
    puts = [r for r in fake.requests if r[0] == "PUT"]
    gets = [r for r in fake.requests if r[0] == "GET"]
    assert len(puts) == 1 and puts[0][2]["x-aliyun-ecs-metadata-token-ttl-seconds"] == "21600"
    assert all(r[2]["x-aliyun-ecs-metadata-token"] in state.tokens for r in gets)


def test_alibaba_revoked_token_is_replaced(alibaba):
    state, fake = alibaba
    source = AlibabaSource(fake.url)
    source.poll()
    state.tokens.clear()
    state.termination = (200, "2026-11-25T14:00:00Z")
    assert len(source.poll()) == 1


@pytest.mark.parametrize("body", ["", "\n", "not a time"])
def test_alibaba_empty_or_non_time_answer_means_safe(alibaba, body):
    state, fake = alibaba
    state.termination = (200, body)
    assert AlibabaSource(fake.url).poll() == []


def test_alibaba_repeats_dedupe_to_one_event(alibaba):
    state, fake = alibaba
    state.termination = (200, "2026-11-25T14:00:00Z")
    source, deduper = AlibabaSource(fake.url), Deduper()
    assert len(deduper.filter(source.poll() + source.poll())) == 1


def test_alibaba_unreachable_is_empty_and_quick(closed_url):
    source = AlibabaSource(closed_url)
    started = time.monotonic()
    assert source.poll() == [] and not source.probe()
    assert time.monotonic() - started < 0.5


def test_alibaba_probe_and_env_endpoint(alibaba, monkeypatch):
    _, fake = alibaba
    monkeypatch.setenv("RUNNER_ALIBABA_METADATA_ENDPOINT", fake.url)
    source = AlibabaSource()
    assert source.endpoint == fake.url and source.probe()


# -- GCP ---------------------------------------------------------------------------


def test_gcp_false_is_no_notice(gcp):
    _, fake = gcp
    assert GcpSource(fake.url).poll() == []


def test_gcp_true_is_termination_with_thirty_seconds(gcp):
    state, fake = gcp
    state.preempted = "TRUE"
    [notice] = GcpSource(fake.url).poll()
    assert notice.kind is NoticeKind.TERMINATION and notice.source == "gcp"
    assert notice.seconds_left() == pytest.approx(30, abs=1)


def test_gcp_repeated_true_keeps_deadline_and_id(gcp):
    state, fake = gcp
    state.preempted = "TRUE"
    source, deduper = GcpSource(fake.url), Deduper()
    first = source.poll()
    time.sleep(0.05)
    second = source.poll()
    assert first[0].deadline == second[0].deadline and first[0].id == second[0].id
    assert len(deduper.filter(first + second)) == 1


def test_gcp_true_after_false_is_a_new_preemption(gcp):
    state, fake = gcp
    source = GcpSource(fake.url)
    state.preempted = "TRUE"
    [first] = source.poll()
    state.preempted = "FALSE"
    assert source.poll() == []
    time.sleep(0.01)
    state.preempted = "TRUE"
    [second] = source.poll()
    assert second.id != first.id


def test_gcp_sends_metadata_flavor(gcp):
    _, fake = gcp
    GcpSource(fake.url).poll()
    assert fake.requests[-1][2]["metadata-flavor"] == "Google"


def test_gcp_endpoint_from_gce_metadata_host(gcp, monkeypatch):
    state, fake = gcp
    monkeypatch.setenv("GCE_METADATA_HOST", fake.hostport)
    state.preempted = "TRUE"
    source = GcpSource()
    assert source.endpoint == fake.url
    assert len(source.poll()) == 1 and source.probe()


def test_gcp_unreachable_is_empty_and_quick(closed_url):
    source = GcpSource(closed_url)
    started = time.monotonic()
    assert source.poll() == [] and not source.probe()
    assert time.monotonic() - started < 0.5


def test_gcp_metadata_server_is_not_mistaken_for_ec2(gcp):
    # GCP's server shares 169.254.169.254 with EC2's; detection must tell them apart.
    _, fake = gcp
    assert not Ec2Source(fake.url).probe()
    found = detect(1.0, [Ec2Source(fake.url), AlibabaSource(fake.url), GcpSource(fake.url)])
    assert found.name == "gcp"
