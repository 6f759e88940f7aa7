"""The IMDSv2 simulator keeps IMDSv2's rules, so tests against it mean something.

Spoken to with plain http.client, not with our EC2 source: these tests pin
the simulator's own behaviour (formats of amazon-ec2-metadata-mock, token
rules of IMDSv2, the control endpoints) independently of the client.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from runner.notices import Ec2Source, NoticeKind
from runner.notices.base import format_utc_timestamp
from runner.sim.imds import ImdsSimulator, main

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


@pytest.fixture
def sim() -> Iterator[ImdsSimulator]:
    with ImdsSimulator() as simulator:
        yield simulator


def _call(sim: ImdsSimulator, method: str, path: str, headers: dict[str, str] | None = None):
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=2)
    try:
        conn.request(method, path, body=b"" if method != "GET" else None, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read().decode(), dict(answer.getheaders())
    finally:
        conn.close()


def _token(sim: ImdsSimulator, ttl: int = 60) -> str:
    status, body, headers = _call(sim, "PUT", "/latest/api/token", {TTL: str(ttl)})
    assert status == 200 and headers[TTL] == str(ttl)
    return body


@pytest.mark.parametrize("headers", [{}, {TTL: "0"}, {TTL: "21601"}, {TTL: "soon"}])
def test_token_put_needs_a_valid_ttl(sim, headers):
    assert _call(sim, "PUT", "/latest/api/token", headers)[0] == 400


@pytest.mark.parametrize("headers", [{}, {TOKEN: "not-a-token"}])
def test_get_without_a_valid_token_is_401(sim, headers):
    assert _call(sim, "GET", "/latest/meta-data/instance-id", headers)[0] == 401


def test_token_works_until_its_ttl_then_401(sim):
    token = _token(sim, ttl=1)
    status, body, headers = _call(sim, "GET", "/latest/meta-data/instance-id", {TOKEN: token})
    assert (status, body) == (200, "i-0123456789abcdef0")
    assert TTL in headers  # remaining TTL echoed, as IMDS does
    time.sleep(1.05)
    assert _call(sim, "GET", "/latest/meta-data/instance-id", {TOKEN: token})[0] == 401


def test_spot_paths_404_until_notice_then_amazon_formats(sim):
    token = {TOKEN: _token(sim)}
    assert _call(sim, "GET", "/latest/meta-data/spot/instance-action", token)[0] == 404
    assert _call(sim, "GET", "/latest/meta-data/spot/termination-time", token)[0] == 404
    deadline = sim.schedule_spot_notice(action="stop")
    status, body, _ = _call(sim, "GET", "/latest/meta-data/spot/instance-action", token)
    assert status == 200
    assert json.loads(body) == {"action": "stop", "time": format_utc_timestamp(deadline)}
    assert _call(sim, "GET", "/latest/meta-data/spot/termination-time", token)[1] == format_utc_timestamp(deadline)
    assert deadline - time.time() == pytest.approx(120, abs=1.5)


def test_rebalance_404_until_recommended_then_notice_time(sim):
    token = {TOKEN: _token(sim)}
    path = "/latest/meta-data/events/recommendations/rebalance"
    assert _call(sim, "GET", path, token)[0] == 404
    at = sim.schedule_rebalance()
    status, body, _ = _call(sim, "GET", path, token)
    assert status == 200 and json.loads(body) == {"noticeTime": format_utc_timestamp(at)}


def test_metadata_listing_and_facts(sim):
    token = {TOKEN: _token(sim)}
    listing = _call(sim, "GET", "/latest/meta-data/", token)[1].splitlines()
    assert {"instance-id", "instance-type", "placement/", "spot/", "events/"} <= set(listing)
    assert _call(sim, "GET", "/latest/meta-data/placement/region", token)[1] == "us-east-1"
    assert _call(sim, "GET", "/latest/meta-data/instance-life-cycle", token)[1] == "spot"
    assert _call(sim, "GET", "/latest/meta-data/no-such-thing", token)[0] == 404


@pytest.mark.parametrize("status", [503, 599])
def test_fail_answers_n_requests_with_the_status(sim, status):
    assert _call(sim, "POST", f"/_sim/fail?status={status}&count=2")[0] == 200
    token = {TOKEN: "irrelevant"}
    statuses = [_call(sim, "GET", "/latest/meta-data/instance-id", token)[0] for _ in range(3)]
    assert statuses == [status, status, 401]


def test_reset_clears_the_scenario_but_keeps_tokens(sim):
    token = {TOKEN: _token(sim)}
    sim.schedule_spot_notice()
    sim.fail_next(5)
    assert _call(sim, "POST", "/_sim/reset")[0] == 200
    assert _call(sim, "GET", "/latest/meta-data/spot/instance-action", token)[0] == 404
    assert _call(sim, "POST", "/_sim/reset-tokens")[0] == 200
    assert _call(sim, "GET", "/latest/meta-data/spot/instance-action", token)[0] == 401


def test_bad_control_requests_say_so(sim):
    assert _call(sim, "POST", "/_sim/no-such-control")[0] == 404
    assert _call(sim, "POST", "/_sim/token?mode=sometimes")[0] == 400
    assert _call(sim, "POST", "/_sim/spot-notice?delay=soon")[0] == 400
    assert _call(sim, "POST", "/latest/meta-data/instance-id")[0] == 405


def test_stats_count_what_happened(sim):
    _token(sim)
    _call(sim, "GET", "/latest/meta-data/instance-id")
    status, body, _ = _call(sim, "GET", "/_sim/stats")
    stats = json.loads(body)
    assert status == 200
    assert stats["token_puts"] == 1 and stats["unauthorized"] == 1


def test_stop_does_not_wait_for_a_hanging_token_put(sim):
    sim.set_token_mode("hang")
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
    conn.request("PUT", "/latest/api/token", body=b"", headers={TTL: "60"})
    time.sleep(0.1)  # the handler is now hanging
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 1.0
    conn.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_command_line_serves_a_scheduled_notice_until_sigterm(capsys):
    # main() runs here, in the main thread as on the command line; a helper
    # thread plays the user: it polls the simulator, then sends SIGTERM.
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    seen: dict[str, object] = {}

    def use_then_stop() -> None:
        try:
            source = Ec2Source(url)
            for _ in range(100):
                if source.probe():
                    break
                time.sleep(0.02)
            seen["kinds"] = [n.kind for n in source.poll()]
            seen["type"] = source.instance_facts().instance_type
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    helper = threading.Thread(target=use_then_stop)
    helper.start()
    before = signal.getsignal(signal.SIGTERM)
    code = main(["--port", str(port), "--notice-after", "0", "--instance-type", "p4d.24xlarge"])
    helper.join()
    assert code == 0
    assert seen == {"kinds": [NoticeKind.TERMINATION], "type": "p4d.24xlarge"}
    assert f"IMDS simulator listening on {url}" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) == before


def test_command_line_reports_a_taken_port(capsys):
    with ImdsSimulator() as taken:
        assert main(["--port", str(taken.port)]) == 2
    assert "pick another --port" in capsys.readouterr().err
