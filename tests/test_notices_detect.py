"""`auto` detection: finds the cloud that answers, and off-cloud never hangs."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from runner.notices import Ec2Source, GcpSource, NullSource, create_source, detect
from runner.sim.imds import ImdsSimulator


@pytest.fixture
def sim() -> Iterator[ImdsSimulator]:
    with ImdsSimulator() as simulator:
        yield simulator


@pytest.fixture
def closed_hostport() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def _point_clouds_at(monkeypatch, ec2: str, alibaba: str, gcp_hostport: str) -> None:
    """Aim the default candidates at loopback, so a real cloud under CI cannot answer."""
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", ec2)
    monkeypatch.setenv("RUNNER_ALIBABA_METADATA_ENDPOINT", alibaba)
    monkeypatch.setenv("GCE_METADATA_HOST", gcp_hostport)


def test_nothing_reachable_gives_null_source_quickly(monkeypatch, closed_hostport):
    closed = f"http://{closed_hostport}"
    _point_clouds_at(monkeypatch, closed, closed, closed_hostport)
    started = time.monotonic()
    source = detect(1.0)
    assert isinstance(source, NullSource)
    assert time.monotonic() - started < 1.5


def test_stalling_endpoints_do_not_hang_detection(monkeypatch, sim):
    sim.set_slow(5)  # accepts connections, answers nothing in time
    hostport = f"{sim.host}:{sim.port}"
    _point_clouds_at(monkeypatch, sim.url, sim.url, hostport)
    started = time.monotonic()
    assert isinstance(detect(0.5), NullSource)
    assert time.monotonic() - started < 1.0


def test_simulator_endpoint_is_detected_as_ec2(monkeypatch, sim, closed_hostport):
    _point_clouds_at(monkeypatch, sim.url, f"http://{closed_hostport}", closed_hostport)
    source = create_source("auto")
    assert isinstance(source, Ec2Source)
    assert source.endpoint == sim.url
    sim.schedule_spot_notice()
    assert len(source.poll()) == 1


def test_first_candidate_that_answers_wins(sim, closed_hostport):
    found = detect(1.0, [GcpSource(f"http://{closed_hostport}"), Ec2Source(sim.url)])
    assert found.name == "ec2"


def test_a_probe_that_raises_does_not_break_detection(sim):
    class Broken:
        name = "broken"

        def poll(self):
            return []

        def probe(self) -> bool:
            raise RuntimeError("boom")

    assert detect(1.0, [Broken(), Ec2Source(sim.url)]).name == "ec2"
