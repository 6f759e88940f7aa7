"""The EC2 source against the IMDSv2 simulator, over real HTTP on loopback."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator

import pytest

from runner.notices import Deduper, Ec2Source, InstanceFacts, NoticeKind
from runner.sim.imds import NOTICE_LEAD_S, ImdsSimulator


@pytest.fixture
def sim() -> Iterator[ImdsSimulator]:
    with ImdsSimulator() as simulator:
        yield simulator


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _control(sim: ImdsSimulator, path: str) -> None:
    """Drive the simulator through its HTTP control endpoints, as a drill would."""
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=2)
    conn.request("POST", path, body=b"")
    answer = conn.getresponse()
    answer.read()
    conn.close()
    assert answer.status == 200, path


def test_no_notice_while_instance_action_is_404(sim):
    source = Ec2Source(sim.url)
    assert source.poll() == []
    assert sim.stats()["get:/latest/meta-data/spot/instance-action"] == 1


def test_spot_notice_is_termination_with_aws_deadline(sim):
    source = Ec2Source(sim.url)
    deadline = sim.schedule_spot_notice()
    [notice] = source.poll()
    assert notice.kind is NoticeKind.TERMINATION
    assert notice.source == "ec2"
    assert notice.deadline == deadline
    assert 0 < notice.seconds_left() <= NOTICE_LEAD_S
    assert "terminate" in notice.detail


@pytest.mark.parametrize("action", ["stop", "hibernate"])
def test_stop_and_hibernate_notices_are_terminations_too(sim, action):
    sim.schedule_spot_notice(action=action)
    [notice] = Ec2Source(sim.url).poll()
    assert notice.kind is NoticeKind.TERMINATION and action in notice.detail


def test_notice_appears_only_once_due(sim):
    source = Ec2Source(sim.url)
    _control(sim, "/_sim/spot-notice?delay=1")
    assert source.poll() == []
    time.sleep(1.1)
    assert [n.kind for n in source.poll()] == [NoticeKind.TERMINATION]


def test_same_notice_polled_twice_is_one_event_after_deduper(sim):
    source, deduper = Ec2Source(sim.url), Deduper()
    sim.schedule_spot_notice()
    first, second = source.poll(), source.poll()
    assert first == second and first[0].id == second[0].id
    assert len(deduper.filter(first) + deduper.filter(second)) == 1


def test_rebalance_recommendation_is_rebalance_without_deadline(sim):
    _control(sim, "/_sim/rebalance")
    [notice] = Ec2Source(sim.url).poll()
    assert notice.kind is NoticeKind.REBALANCE
    assert notice.deadline is None


def test_termination_and_rebalance_together(sim):
    sim.schedule_rebalance()
    sim.schedule_spot_notice()
    kinds = [n.kind for n in Ec2Source(sim.url).poll()]
    assert kinds == [NoticeKind.TERMINATION, NoticeKind.REBALANCE]


def test_token_is_refreshed_before_it_expires(sim):
    source = Ec2Source(sim.url, token_ttl=1)
    source.poll()
    time.sleep(0.8)  # past the refresh margin, not yet past the server's expiry
    sim.schedule_spot_notice()
    assert len(source.poll()) == 1
    stats = sim.stats()
    assert stats["tokens_issued"] == 2
    assert stats.get("unauthorized", 0) == 0


def test_expired_token_is_replaced_after_401(sim):
    source = Ec2Source(sim.url, token_ttl=1)
    source.poll()
    _control(sim, "/_sim/reset-tokens")  # as if IMDS restarted and forgot our token
    sim.schedule_spot_notice()
    assert len(source.poll()) == 1
    stats = sim.stats()
    assert stats["unauthorized"] == 1
    assert stats["tokens_issued"] == 2


def test_server_errors_give_empty_poll_then_recover(sim):
    source = Ec2Source(sim.url)
    source.poll()  # holds a token now
    sim.schedule_spot_notice()
    _control(sim, "/_sim/fail?status=500&count=2")
    assert source.poll() == []
    assert len(source.poll()) == 1


def test_failed_token_put_does_not_leave_source_deaf(sim):
    source = Ec2Source(sim.url)
    sim.schedule_spot_notice()
    sim.fail_next(1, status=503)  # the token PUT fails; the tokenless GET gets 401
    assert len(source.poll()) == 1  # ...which proves IMDS is up: a new PUT, and the GET succeeds
    assert sim.stats()["token_puts"] == 2


def test_slow_server_poll_returns_within_its_budget(sim):
    source = Ec2Source(sim.url, timeout=0.3, poll_budget=0.5)
    source.poll()
    sim.schedule_spot_notice()
    sim.set_slow(3)
    started = time.monotonic()
    assert source.poll() == []
    assert time.monotonic() - started < 0.8
    sim.set_slow(0)
    assert len(source.poll()) == 1


def test_unreachable_endpoint_gives_empty_poll_quickly(closed_port):
    source = Ec2Source(f"http://127.0.0.1:{closed_port}")
    started = time.monotonic()
    assert source.poll() == []
    assert not source.probe()
    assert time.monotonic() - started < 0.5
    assert "not reachable" in (source.check() or "")


def test_check_is_quiet_when_tokens_are_given(sim):
    assert Ec2Source(sim.url).check() is None


@pytest.mark.parametrize("mode, reason", [("hang", "timed out"), ("refuse", "HTTP 403")])
def test_check_explains_a_missing_token_and_the_hop_limit(sim, mode, reason):
    _control(sim, f"/_sim/token?mode={mode}")
    source = Ec2Source(sim.url, timeout=0.3)
    started = time.monotonic()
    warning = source.check()
    assert time.monotonic() - started < 1.0
    assert warning is not None
    assert reason in warning
    assert "HttpPutResponseHopLimit=2" in warning
    assert "cannot be read" in warning
    assert source.probe()  # still recognised as EC2, so `auto` picks it and the warning is shown


def test_instance_facts(sim):
    facts = Ec2Source(sim.url).instance_facts()
    assert facts == InstanceFacts(
        cloud="ec2",
        instance_id="i-0123456789abcdef0",
        instance_type="g5.xlarge",
        availability_zone="us-east-1a",
        region="us-east-1",
        lifecycle="spot",
    )


def test_instance_facts_unknown_when_unreachable(closed_port):
    facts = Ec2Source(f"http://127.0.0.1:{closed_port}").instance_facts()
    assert facts.instance_id is None and facts.lifecycle is None


def test_endpoint_comes_from_environment(sim, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", sim.url)
    source = Ec2Source()
    assert source.endpoint == sim.url
    sim.schedule_spot_notice()
    assert len(source.poll()) == 1


def test_default_endpoint_is_imds(monkeypatch):
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", raising=False)
    assert Ec2Source().endpoint == "http://169.254.169.254"


@pytest.mark.parametrize("endpoint", ["169.254.169.254", "ftp://host", "http://"])
def test_bad_endpoint_is_refused_up_front(endpoint):
    with pytest.raises(ValueError, match="http"):
        Ec2Source(endpoint)
