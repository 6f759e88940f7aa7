"""The ledger written by real supervised runs (a local folder, and moto's S3 with a simulated EC2 spot
instance), and `runner report` on it in every format.

Here the HTML is checked structurally (one self-contained document with the timeline and cost charts
as inline SVG and the totals table); test_cost_html_browser.py renders it in headless Chromium.
"""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from runner import cli
from runner.cost.ledger import read_events
from runner.sim.imds import ImdsSimulator
from runner.storage import Store, clear_caches
from supervisor_harness import RUN, start, supervisors  # noqa: F401  (supervisors: a fixture)

FAST = dict(heartbeat_s=0.5, cost_log_interval_s=1.0)


def _report(capsys, *args: str) -> str:
    capsys.readouterr()
    assert cli.main(["report", *args]) == 0
    return capsys.readouterr().out


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith(("#", "data:")):
                self.external.append(value)


def test_local_run_preempted_then_resumed_writes_a_ledger_and_reports(tmp_path, supervisors, capsys) -> None:
    bucket = str(tmp_path / "bucket")
    first = start(supervisors, tmp_path, bucket, ["--steps", "40", "--sleep", "0.05"], name="a",
                  price_per_hour=0.9, on_demand_price_per_hour=3.0, **FAST)
    first.wait_for(r"^step 17$")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 75
    assert re.search(r"cost at exit: \$[\d.]+ so far for the run .* steps/h; \$[\d.]+ per 1,000 steps", first.output)
    second = start(supervisors, tmp_path, bucket, ["--steps", "40", "--sleep", "0.05"], name="b",
                   price_per_hour=0.9, on_demand_price_per_hour=3.0, **FAST)
    assert second.finish() == 0

    clear_caches()
    events = read_events(Store(bucket), RUN)
    attempts = sorted({e.attempt for e in events})
    assert len(attempts) == 2
    kinds = [[e.kind for e in events if e.attempt == a] for a in attempts]
    assert kinds[0][0] == "start" and kinds[0][-1] == "end" and "emergency" in kinds[0] and "snapshot" in kinds[0]
    assert kinds[1][0] == "start" and kinds[1][-1] == "end"
    assert "heartbeat" in kinds[0] and "heartbeat" in kinds[1]  # the newest one of each is read back
    first_end = next(e for e in events if e.attempt == attempts[0] and e.kind == "end")
    second_start = next(e for e in events if e.attempt == attempts[1] and e.kind == "start")
    assert first_end.get("reason") == "preempted" and second_start.get("step") == first_end.get("step")
    emergency = next(e for e in events if e.kind == "emergency")
    assert emergency.get("committed") and 0 <= emergency.get("latency_s") < 10
    snaps = [e for e in events if e.kind == "snapshot"]
    assert all(e.get("stall_s") is not None and e.get("write_s") is not None for e in snaps)

    table = _report(capsys, "--bucket", bucket, "--run-id", RUN)
    for text in ("segments", "preempted", "finished", "override", "total cost", "on-demand equivalent", "goodput",
                 "cost per 1,000 steps"):
        assert text in table
    body = json.loads(_report(capsys, "--bucket", bucket, "--run-id", RUN, "--format", "json"))
    assert body["interruptions"] == 1 and body["status"] == "finished" and body["steps"] == 40
    assert len(body["segments"]) == 2 and body["lost_compute_seconds"] == 0  # the emergency save kept every step
    assert body["on_demand_cost_usd"] == pytest.approx(body["total_cost_usd"] * 3.0 / 0.9, rel=1e-3)
    assert body["savings_pct"] == pytest.approx(70.0, abs=0.1)
    assert body["checkpoint_stall_seconds"] > 0
    paid = sum(s["duration_seconds"] for s in body["segments"])
    assert body["total_cost_usd"] == pytest.approx(paid / 3600 * 0.9, rel=1e-3)
    rows = list(csv.DictReader(io.StringIO(_report(capsys, "--bucket", bucket, "--format", "csv"))))
    assert [r["end_reason"] for r in rows] == ["preempted", "finished"] and rows[0]["run_id"] == RUN
    out = tmp_path / "report.html"
    _report(capsys, "--bucket", bucket, "--format", "html", "--output", str(out))
    page = out.read_text()
    parser = _Tags()
    parser.feed(page)
    assert parser.tags.get("svg") == 2 and parser.tags.get("rect", 0) >= 2 and not parser.external
    assert 'id="timeline"' in page and 'id="cost-chart"' in page and 'class="on-demand"' in page
    # The page shows the table's total (both round the exact total; JSON's 6-decimal value may round otherwise).
    shown = re.search(r"total cost\W+\$([0-9.]+)", table)
    assert shown and float(shown.group(1)) == pytest.approx(body["total_cost_usd"], abs=1e-4), table
    assert f"${shown.group(1)}" in page and "interruptions" in page
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):
        ET.fromstring(svg)  # each chart is well-formed SVG


def test_s3_run_on_a_simulated_spot_instance_records_facts_and_prices(tmp_path, supervisors, s3_bucket_url,
                                                                      capsys) -> None:
    with ImdsSimulator() as sim:
        sup = start(supervisors, tmp_path, s3_bucket_url, ["--steps", "400", "--sleep", "0.02"],
                    notice_source="ec2", imds_endpoint=sim.url, poll_interval_s=0.2, **FAST)
        sup.wait_for(r"^step 12$")
        sim.schedule_spot_notice()
        assert sup.finish() == 75
    assert re.search(r"cost: \$[\d.]+/h \(ec2-spot-price-history\)", sup.output), sup.output
    clear_caches()
    events = read_events(Store(s3_bucket_url), RUN)
    start_ev = next(e for e in events if e.kind == "start")
    assert start_ev.get("instance") == {"cloud": "ec2", "instance_id": "i-0123456789abcdef0",
                                        "instance_type": "g5.xlarge", "availability_zone": "us-east-1a",
                                        "region": "us-east-1", "lifecycle": "spot"}
    assert start_ev.get("price")["source"] == "ec2-spot-price-history"
    assert start_ev.get("on_demand")["source"] in ("aws-pricing-api",) or \
        start_ev.get("on_demand")["source"].startswith("bundled-table")  # moto has no Pricing API
    assert any(e.kind == "emergency" and e.get("committed") for e in events)
    body = json.loads(_report(capsys, "--bucket", s3_bucket_url, "--run-id", RUN, "--format", "json"))
    (seg,) = body["segments"]
    assert (seg["instance_type"], seg["lifecycle"], seg["end_reason"]) == ("g5.xlarge", "spot", "preempted")
    assert seg["price_source"] == "ec2-spot-price-history" and body["interruptions"] == 1
    assert body["on_demand_cost_usd"] > body["total_cost_usd"]
    table = _report(capsys, "--bucket", s3_bucket_url)
    assert "g5.xlarge" in table and "i-0123456789abcdef0" in table


def test_price_flags_read_their_environment_defaults(monkeypatch) -> None:
    monkeypatch.setenv("RUNNER_PRICE_PER_HOUR", "0.5")
    monkeypatch.setenv("RUNNER_ON_DEMAND_PRICE_PER_HOUR", "2.25")
    args = cli.build_parser().parse_args(["start", "--bucket", "b", "--heartbeat", "30", "--", "true"])
    assert (args.price_per_hour, args.on_demand_price_per_hour, args.heartbeat_s) == (0.5, 2.25, 30.0)


def test_report_errors_are_one_line_with_exit_codes(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", "--bucket", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run under" in err and "Traceback" not in err
    assert cli.main(["report", "--bucket", str(tmp_path / "empty"), "--run-id", "nope"]) == 1
    assert "run nope has no cost ledger" in capsys.readouterr().err
    assert cli.main(["report", "--bucket", str(tmp_path), "--format", "pdf"]) == 2


def test_a_hard_killed_instance_ends_at_its_last_heartbeat(tmp_path, supervisors) -> None:
    import os
    import time

    from runner.cost.collect import report_runs

    bucket = str(tmp_path / "bucket")
    sup = start(supervisors, tmp_path, bucket, ["--steps", "400", "--sleep", "0.05"], price_per_hour=3.6, **FAST)
    child_pid = int(sup.wait_for(r"started child pid (\d+)").group(1))
    sup.wait_for(r"^step 25$")
    time.sleep(1.2)  # a heartbeat or two past step 25
    sup.proc.kill()  # the instance vanishes: supervisor and child die at once, nothing is written after
    os.kill(child_pid, signal.SIGKILL)
    sup.finish()
    killed_at = time.time()
    clear_caches()
    store = Store(bucket)
    (now,) = report_runs(store, RUN, lookup=False, now=killed_at)
    assert now.status == "running" and now.segments[0].end_reason == "running"  # within three heartbeats
    (later,) = report_runs(store, RUN, lookup=False, now=killed_at + 3600)
    (seg,) = later.segments
    assert later.status == "interrupted" and later.interruptions == 1 and seg.end_reason == "vanished"
    assert seg.end <= killed_at and seg.end_step >= 25
    assert later.total_cost_usd == pytest.approx(seg.duration_seconds / 3600 * 3.6)
    # Steps past the newest periodic snapshot (every 5 steps) are lost work.
    assert later.lost_steps == seg.end_step - max(m.step for m in later.snapshots if m.step <= seg.end_step)
