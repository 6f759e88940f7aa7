"""The cost report's numbers, checked by hand against constructed ledgers (runner/cost/report.py)."""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

import pytest

from runner.cost.ledger import Event, LedgerWriter, read_events
from runner.cost.report import build_report
from runner.storage import Store

T0 = 1_700_000_000.0  # any fixed instant


class Ledger:
    """Events for build_report, written as a supervisor would."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._seq: dict[str, int] = {}

    def add(self, attempt: str, kind: str, t: float, **data) -> "Ledger":
        seq = 0 if kind == "start" else self._seq.get(attempt, 0) + 1
        if kind != "start":
            self._seq[attempt] = seq
        self.events.append(Event(kind, attempt, seq, T0 + t, data))
        return self

    def start(self, attempt: str, t: float, step: int, usd: float | None = 1.0, od: float | None = 4.0,
              heartbeat_s: float = 60.0, **instance) -> "Ledger":
        return self.add(attempt, "start", t, step=step, heartbeat_s=heartbeat_s,
                        instance={"cloud": "ec2", "instance_id": f"i-{attempt}", "instance_type": "g5.xlarge",
                                  "lifecycle": "spot", **instance},
                        price={"usd_per_hour": usd, "source": "override"},
                        on_demand={"usd_per_hour": od, "source": "override"})


def test_interruption_resume_lost_work_stall_and_savings() -> None:
    # A: 0..3600 s at $1/h, steps 0 -> 1000, newest snapshot at 900, preempted without an emergency save.
    # B: resumes at 900, 3600..5400 s at $2/h, finishes at 1400.  On-demand $4/h for both.
    ledger = (Ledger()
              .start("a", 0, 0, usd=1.0)
              .add("a", "snapshot", 3240, step=900, reason="periodic", stall_s=2.0, write_s=5.0, snapshot_id="s900")
              .add("a", "heartbeat", 3590, step=1000)
              .add("a", "end", 3600, reason="preempted-unsaved", step=1000, exit_code=75)
              .start("b", 3600, 900, usd=2.0)
              .add("b", "snapshot", 5400, step=1400, reason="final", stall_s=1.0, write_s=1.0, snapshot_id="s1400")
              .add("b", "end", 5400, reason="finished", step=1400, exit_code=0))
    r = build_report("run", ledger.events, now=T0 + 10_000)
    assert r.status == "finished"
    assert r.paid_seconds == pytest.approx(5400)
    assert r.total_cost_usd == pytest.approx(1.0 + 1.0)
    assert r.on_demand_cost_usd == pytest.approx(1.5 * 4.0)
    assert r.savings_usd == pytest.approx(4.0)
    assert r.savings_pct == pytest.approx(4.0 / 6.0 * 100)
    assert r.interruptions == 1
    # 100 steps redone at A's rate of 1000 steps / 3600 s = 360 s, at $1/h.
    assert r.lost_steps == 100
    assert r.lost_compute_seconds == pytest.approx(360)
    assert r.lost_cost_usd == pytest.approx(0.1)
    assert r.checkpoint_stall_seconds == pytest.approx(3.0)
    assert r.checkpoint_stall_cost_usd == pytest.approx(2.0 / 3600 * 1.0 + 1.0 / 3600 * 2.0)
    assert r.goodput == pytest.approx((5400 - 360 - 3) / 5400)
    assert r.steps == 1400
    assert r.cost_per_1000_steps_usd == pytest.approx(2.0 / 1400 * 1000)
    a, b = r.segments
    assert (a.end_reason, a.steps, a.lost_steps) == ("preempted-unsaved", 1000, 100)
    assert (b.end_reason, b.steps) == ("finished", 500)
    assert b.usd_per_hour == pytest.approx(2.0)
    body = r.to_json()
    for name in ("total_cost_usd", "on_demand_cost_usd", "savings_usd", "savings_pct", "interruptions",
                 "lost_compute_seconds", "lost_cost_usd", "checkpoint_stall_seconds", "goodput", "segments"):
        assert name in body
    json.dumps(body)


def test_segment_without_end_ends_at_its_last_heartbeat_and_loses_work_since_the_newest_snapshot() -> None:
    ledger = (Ledger()
              .start("a", 0, 0, usd=3.0)
              .add("a", "snapshot", 1500, step=400, reason="periodic", stall_s=0.0, snapshot_id="s400")
              .add("a", "heartbeat", 1800, step=500))
    r = build_report("run", ledger.events, now=T0 + 100_000)
    (seg,) = r.segments
    assert (seg.end_reason, seg.end, seg.end_step) == ("vanished", T0 + 1800, 500)
    assert r.status == "interrupted" and r.interruptions == 1
    assert r.total_cost_usd == pytest.approx(0.5 * 3.0)
    # 100 steps past the snapshot at step 400, at 500 steps / 1800 s: 360 s, at $3/h = $0.30.
    assert r.lost_compute_seconds == pytest.approx(360)
    assert r.lost_cost_usd == pytest.approx(0.3)
    assert r.steps == 400  # the lost steps are not kept progress


def test_overlapping_segments_from_a_split_start_are_both_paid_and_the_old_ones_extra_steps_are_lost() -> None:
    # A runs 0..2000 s (0 -> 400 steps, 0.2 steps/s) but a replacement B started at 1000 s from step 200
    # took the run over; A ends lease-lost.  B runs 1000..3000 s to step 600.  Both at $1.8/h.
    ledger = (Ledger()
              .start("a", 0, 0, usd=1.8, od=None)
              .add("a", "end", 2000, reason="lease-lost", step=400, exit_code=75)
              .start("b", 1000, 200, usd=1.8, od=None)
              .add("b", "end", 3000, reason="finished", step=600, exit_code=0))
    r = build_report("run", ledger.events, now=T0 + 9999)
    assert r.paid_seconds == pytest.approx(4000)
    assert r.total_cost_usd == pytest.approx(4000 / 3600 * 1.8)
    assert r.on_demand_cost_usd == pytest.approx(r.total_cost_usd)  # unknown on-demand price: no savings claimed
    assert r.savings_usd == pytest.approx(0.0)
    assert r.lost_steps == 200
    assert r.lost_compute_seconds == pytest.approx(1000)
    assert r.lost_cost_usd == pytest.approx(1000 / 3600 * 1.8)
    assert r.goodput == pytest.approx(3000 / 4000)
    assert r.steps == 600
    # The cumulative curve counts both instances while they overlap.
    curve = {t - T0: c for t, c, _ in r.curve()}
    assert curve[2000] == pytest.approx((2000 + 1000) / 3600 * 1.8)


def test_a_multi_node_reclaim_is_one_interruption_and_its_emergency_snapshot_loses_nothing() -> None:
    # Nodes a and b start together; a is reclaimed at 1000 s after the job's emergency snapshot at step 200
    # (each node's ledger records it); b ends peer-stopped.  Both start again at 1100 s from step 200.
    ledger = Ledger()
    for node, offset in (("a", 0.0), ("b", 0.5)):  # the segment after a's is its peer b's, not the resume
        ledger.start(f"{node}1", offset, 0, usd=1.0, od=4.0)
        ledger.add(f"{node}1", "snapshot", 999, step=200, reason="emergency", stall_s=1.0, snapshot_id="s200")
    ledger.add("a1", "end", 1000, reason="preempted", step=200, exit_code=75)
    ledger.add("b1", "end", 1000, reason="peer-stopped", step=200, exit_code=76)
    for node in ("a", "b"):
        ledger.start(f"{node}2", 1100, 200, usd=1.0, od=4.0)
        ledger.add(f"{node}2", "end", 2100, reason="finished", step=400, exit_code=0)
    r = build_report("run", ledger.events, now=T0 + 9999)
    assert (r.interruptions, r.lost_steps, r.lost_compute_seconds, r.steps) == (1, 0, 0, 400)
    assert r.paid_seconds == pytest.approx(1000 + 999.5 + 2 * 1000)


def test_a_price_change_mid_segment_is_integrated_not_sampled() -> None:
    ledger = (Ledger()
              .start("a", 0, 0, usd=1.0, od=5.0)
              .add("a", "end", 3600, reason="finished", step=100, exit_code=0))
    history = [(T0 + 1800, 3.0), (T0 - 600, 1.0), (T0 + 7200, 9.0)]  # unsorted; the last one is after the end
    r = build_report("run", ledger.events, now=T0 + 9999, schedules={"a": history},
                     schedule_source={"a": "ec2-spot-price-history"})
    (seg,) = r.segments
    assert seg.cost_usd == pytest.approx(0.5 * 1.0 + 0.5 * 3.0)
    assert seg.usd_per_hour == pytest.approx(2.0)
    assert seg.price_source == "ec2-spot-price-history"
    assert r.savings_usd == pytest.approx(5.0 - 2.0)
    assert "paid: ec2-spot-price-history" in r.price_sources


def test_a_run_still_going_is_charged_until_now() -> None:
    ledger = (Ledger()
              .start("a", 0, 0, usd=1.2, heartbeat_s=60)
              .add("a", "snapshot", 1000, step=50, reason="periodic", stall_s=0.5, snapshot_id="s50")
              .add("a", "heartbeat", 1170, step=58))
    r = build_report("run", ledger.events, now=T0 + 1200)
    (seg,) = r.segments
    assert (seg.end_reason, seg.end, r.status) == ("running", T0 + 1200, "running")
    assert r.total_cost_usd == pytest.approx(1200 / 3600 * 1.2)
    assert r.interruptions == 0 and r.lost_steps == 0
    assert r.steps == 58
    assert r.goodput == pytest.approx((1200 - 0.5) / 1200)


def test_crashes_inside_an_attempt_count_as_lost_work() -> None:
    # 0..1000 s, 0 -> 300 steps; a crash at step 120 restarted from the snapshot at 100: 320 steps executed.
    ledger = (Ledger()
              .start("a", 0, 0, usd=3.6)
              .add("a", "crash", 400, step=120, resume_step=100, returncode=3)
              .add("a", "end", 1000, reason="finished", step=300, exit_code=0))
    r = build_report("run", ledger.events, now=T0 + 5000)
    assert r.crashes == 1 and r.interruptions == 0
    assert r.lost_steps == 20
    assert r.lost_compute_seconds == pytest.approx(20 / (320 / 1000))
    assert r.lost_cost_usd == pytest.approx(r.lost_compute_seconds / 3600 * 3.6)


def test_manifests_supply_resume_points_the_ledger_lacks() -> None:
    ledger = Ledger().start("a", 0, 0, usd=1.0).add("a", "end", 100, reason="preempted-unsaved", step=50)
    manifest = SimpleNamespace(snapshot_id="m40", step=40, reason="periodic",
                               created_at=dt.datetime.fromtimestamp(T0 + 80, dt.timezone.utc))
    r = build_report("run", ledger.events, now=T0 + 10_000, snapshots=[manifest])
    assert r.lost_steps == 10
    assert [m.step for m in r.snapshots] == [40]


def test_unknown_price_is_reported_as_unpriced_time() -> None:
    ledger = Ledger().start("a", 0, 0, usd=None, od=None).add("a", "end", 720, reason="finished", step=10)
    r = build_report("run", ledger.events, now=T0 + 10_000)
    assert r.total_cost_usd == 0 and r.unpriced_seconds == pytest.approx(720)
    assert r.segments[0].price_source == "unknown"
    assert r.cost_per_1000_steps_usd is None


def test_ledger_objects_are_created_once_and_readers_skip_all_but_the_last_heartbeat(tmp_path) -> None:
    store = Store(str(tmp_path / "bucket"))
    writer = LedgerWriter(store, "run1")
    writer.write("start", {"step": 0}, seq=0)
    for step in (1, 2, 3):
        writer.write("heartbeat", {"step": step})
    writer.write("snapshot", {"step": 3, "snapshot_id": "x"})
    writer.write("start", {"step": 99}, seq=0)  # a second start under the same key is refused, logged, not raised
    assert writer.failures == 1
    keys = [o.key for o in store.list("run1/ledger/")]
    assert keys == [f"run1/ledger/{writer.attempt}/{name}" for name in (
        "000000-start.json", "000001-heartbeat.json", "000002-heartbeat.json", "000003-heartbeat.json",
        "000004-snapshot.json")]
    events = read_events(store, "run1")
    assert [(e.kind, e.get("step")) for e in events] == [("start", 0), ("heartbeat", 3), ("snapshot", 3)]


def test_report_time_prices_replace_a_ledger_recorded_without_any() -> None:
    # `runner report --price-per-hour 0.9 --on-demand-price-per-hour 3.0` for a run started without prices.
    ledger = Ledger().start("a", 0, 0, usd=None, od=None).add("a", "end", 7200, reason="finished", step=100)
    r = build_report("run", ledger.events, now=T0 + 10_000, price_override=0.9, on_demand_override=3.0)
    seg = r.segments[0]
    assert r.total_cost_usd == pytest.approx(1.8) and r.on_demand_cost_usd == pytest.approx(6.0)
    assert r.savings_pct == pytest.approx(70.0) and r.unpriced_seconds == 0
    assert seg.price_source == "override: runner report --price-per-hour"
    assert seg.on_demand_source == "override: runner report --on-demand-price-per-hour"


def test_a_report_time_price_wins_over_a_recorded_one_and_the_on_demand_price_stays() -> None:
    ledger = Ledger().start("a", 0, 0, usd=1.0, od=4.0).add("a", "end", 3600, reason="finished", step=10)
    r = build_report("run", ledger.events, now=T0 + 10_000, price_override=2.0)
    assert r.total_cost_usd == pytest.approx(2.0) and r.on_demand_cost_usd == pytest.approx(4.0)
