"""A run's cost report: a pure function of its ledger events, its snapshots and prices.

No I/O here: `collect()` in this module's caller (operations or the CLI)
reads the ledger and the manifests and may look prices up; `build_report()`
only computes, so every number can be checked by hand against a constructed
ledger (tests/test_cost_report.py).

Definitions (per segment = one attempt = one `runner start` on one instance):
- duration: start to the `end` event; without one, to the newest event
  (the last heartbeat: the instance vanished), or to `now` while the newest
  event is younger than three heartbeats (the run is still going).
- cost: the price schedule integrated over the duration (the price recorded
  at start, or the spot price history when one was looked up).
- lost work: after an interruption (preempted, lease lost, vanished, a crash)
  the steps between where the next start resumed and the step the segment
  had reached are done twice; they cost time at the segment's own step rate.
  With no next start yet, the resume point is the newest snapshot known.
  Overlapping segments (a replacement that started while the old instance
  still ran) are both paid for, and the old one's steps past the new one's
  resume step are lost work.
- checkpoint stall: the seconds training was blocked by saves (the host copy
  of an async save; the whole save when it was synchronous).
- goodput: (paid time - lost - stall) / paid time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from runner.cost.ledger import Event
from runner.cost.pricing import SRC_UNKNOWN, integrate

INTERRUPTED = ("preempted", "preempted-unsaved", "lease-lost", "vanished")
FAILED = ("failed", "crash-loop", "storage-failed", "crashed")
STALE_HEARTBEATS = 3.0  # a silent attempt is gone after this many heartbeat intervals
DEFAULT_HEARTBEAT_S = 60.0


@dataclass
class SnapshotMark:
    time: float
    step: int
    reason: str
    stall_s: float = 0.0
    write_s: float | None = None
    snapshot_id: str = ""


@dataclass
class Segment:
    attempt: str
    cloud: str | None
    instance_id: str | None
    instance_type: str | None
    region: str | None
    availability_zone: str | None
    lifecycle: str | None
    start: float
    end: float
    end_reason: str
    start_step: int
    end_step: int
    usd_per_hour: float | None  # the average over the segment
    price_source: str
    on_demand_usd_per_hour: float | None
    on_demand_source: str
    cost_usd: float
    on_demand_cost_usd: float
    crashes: int = 0
    redone_in_attempt: int = 0  # steps redone after crashes inside this attempt
    stall_seconds: float = 0.0
    emergency_latency_s: float | None = None
    lost_steps: int = 0
    lost_seconds: float = 0.0
    lost_cost_usd: float = 0.0
    schedule: list[tuple[float, float]] = field(default_factory=list)

    @property
    def duration_seconds(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def steps(self) -> int:
        return max(0, self.end_step - self.start_step)

    @property
    def step_rate(self) -> float:
        """Steps executed per second (redone ones included)."""
        done = self.steps + self.redone_in_attempt
        return done / self.duration_seconds if self.duration_seconds > 0 and done > 0 else 0.0

    def cost_between(self, a: float, b: float) -> float:
        lo, hi = max(a, self.start), min(b, self.end)
        return integrate(self.schedule, lo, hi) if hi > lo else 0.0

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "schedule"}
        out.update(start=_iso(self.start), end=_iso(self.end), duration_seconds=round(self.duration_seconds, 3),
                   steps=self.steps, cost_usd=round(self.cost_usd, 6),
                   on_demand_cost_usd=round(self.on_demand_cost_usd, 6), lost_seconds=round(self.lost_seconds, 3),
                   lost_cost_usd=round(self.lost_cost_usd, 6))
        return out


@dataclass
class Report:
    run_id: str
    status: str  # finished, running, interrupted, failed, empty
    generated_at: float
    segments: list[Segment]
    snapshots: list[SnapshotMark]
    paid_seconds: float
    total_cost_usd: float
    on_demand_cost_usd: float
    savings_usd: float
    savings_pct: float | None
    interruptions: int
    crashes: int
    lost_steps: int
    lost_compute_seconds: float
    lost_cost_usd: float
    checkpoint_stall_seconds: float
    checkpoint_stall_cost_usd: float
    goodput: float | None
    steps: int
    cost_per_1000_steps_usd: float | None
    unpriced_seconds: float
    price_sources: list[str]

    @property
    def paid_hours(self) -> float:
        return self.paid_seconds / 3600.0

    def curve(self) -> list[tuple[float, float, float]]:
        """(time, cumulative cost, cumulative on-demand cost) at every segment boundary and price change."""
        if not self.segments:
            return []
        times = sorted({t for s in self.segments for t in (s.start, s.end, *(p for p, _ in s.schedule))
                        if self.segments[0].start <= t <= max(x.end for x in self.segments)} |
                       {min(s.start for s in self.segments)})
        out = []
        for t in times:
            cost = sum(s.cost_between(s.start, t) for s in self.segments)
            od = sum(_od_between(s, s.start, t) for s in self.segments)
            out.append((t, cost, od))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "generated_at": _iso(self.generated_at),
            "paid_hours": round(self.paid_hours, 6),
            "paid_seconds": round(self.paid_seconds, 3),
            "total_cost_usd": round(self.total_cost_usd, 6),
            "on_demand_cost_usd": round(self.on_demand_cost_usd, 6),
            "savings_usd": round(self.savings_usd, 6),
            "savings_pct": None if self.savings_pct is None else round(self.savings_pct, 3),
            "interruptions": self.interruptions,
            "crashes": self.crashes,
            "lost_steps": self.lost_steps,
            "lost_compute_seconds": round(self.lost_compute_seconds, 3),
            "lost_cost_usd": round(self.lost_cost_usd, 6),
            "checkpoint_stall_seconds": round(self.checkpoint_stall_seconds, 3),
            "checkpoint_stall_cost_usd": round(self.checkpoint_stall_cost_usd, 6),
            "goodput": None if self.goodput is None else round(self.goodput, 6),
            "steps": self.steps,
            "cost_per_1000_steps_usd": None if self.cost_per_1000_steps_usd is None
            else round(self.cost_per_1000_steps_usd, 6),
            "unpriced_seconds": round(self.unpriced_seconds, 3),
            "price_sources": self.price_sources,
            "segments": [s.to_json() for s in self.segments],
            "snapshots": [{"time": _iso(m.time), "step": m.step, "reason": m.reason, "stall_seconds": m.stall_s,
                           "write_seconds": m.write_s, "snapshot_id": m.snapshot_id} for m in self.snapshots],
        }


def _od_between(s: Segment, a: float, b: float) -> float:
    lo, hi = max(a, s.start), min(b, s.end)
    if hi <= lo:
        return 0.0
    if s.on_demand_usd_per_hour is None:
        return s.cost_between(lo, hi)  # unknown on-demand price: no savings claimed
    return (hi - lo) * s.on_demand_usd_per_hour / 3600.0


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- building ------------------------------------------------------------------------


def build_report(run_id: str, events: Iterable[Event], *, now: float,
                 snapshots: Sequence[Any] = (), schedules: dict[str, list[tuple[float, float]]] | None = None,
                 schedule_source: dict[str, str] | None = None, price_override: float | None = None,
                 on_demand_override: float | None = None) -> Report:
    """The report for one run.

    `events`: the run's ledger (ledger.read_events).  `snapshots`: manifests
    (anything with `created_at`, `step`, `reason`, `snapshot_id`) that add
    resume points the ledger lacks.  `schedules`: per attempt, a price
    history [(effective from, usd/h)] that replaces the price recorded at
    start (with `schedule_source` naming where it came from).  `now`: UNIX
    time, for runs still going.  `price_override` / `on_demand_override`:
    USD per hour for every segment, in place of the recorded prices
    (`runner report --price-per-hour`), labelled as set at report time.
    """
    by_attempt: dict[str, list[Event]] = {}
    for event in events:
        by_attempt.setdefault(event.attempt, []).append(event)
    schedules = schedules or {}
    schedule_source = schedule_source or {}
    overrides = (price_override, on_demand_override)
    segments = [_segment(attempt, sorted(evs, key=lambda e: (e.seq, e.time)), now, schedules.get(attempt),
                         schedule_source.get(attempt), overrides) for attempt, evs in by_attempt.items()]
    segments.sort(key=lambda s: (s.start, s.attempt))
    marks = _marks(by_attempt, snapshots)
    _lost_work(segments, marks)
    return _totals(run_id, segments, marks, now)


def _segment(attempt: str, events: list[Event], now: float, schedule: list[tuple[float, float]] | None,
             schedule_source: str | None, overrides: tuple[float | None, float | None] = (None, None)) -> Segment:
    from runner.cost.pricing import Price, override

    start_ev = next((e for e in events if e.kind == "start"), None)
    end_ev = next((e for e in events if e.kind == "end"), None)
    info = (start_ev.get("instance") if start_ev else None) or {}
    price = Price.from_json(start_ev.get("price") if start_ev else None)
    od = Price.from_json(start_ev.get("on_demand") if start_ev else None)
    if overrides[0] is not None:
        price, schedule = override(overrides[0], "runner report --price-per-hour"), None
    if overrides[1] is not None:
        od = override(overrides[1], "runner report --on-demand-price-per-hour")
    start = start_ev.time if start_ev else min(e.time for e in events)
    last = max(e.time for e in events)
    heartbeat_s = float((start_ev.get("heartbeat_s") if start_ev else None) or DEFAULT_HEARTBEAT_S)
    if end_ev is not None:
        end, reason = end_ev.time, str(end_ev.get("reason") or "ended")
    elif now - last <= STALE_HEARTBEATS * heartbeat_s:
        end, reason = max(now, last), "running"
    else:
        end, reason = last, "vanished"
    start_step = int((start_ev.get("step") if start_ev else None) or 0)
    steps_seen = [int(e.get("step")) for e in events if isinstance(e.get("step"), (int, float))]
    end_step = int(end_ev.get("step")) if end_ev is not None and end_ev.get("step") is not None \
        else max([start_step, *steps_seen])
    if schedule:
        source = schedule_source or "price history"
    elif price.usd_per_hour is not None:
        schedule, source = [(start, price.usd_per_hour)], price.source
    else:
        schedule, source = [], SRC_UNKNOWN
    cost = integrate(schedule, start, end)
    hours = (end - start) / 3600.0
    crashes = [e for e in events if e.kind == "crash"]
    redone = sum(max(0, int(e.get("step") or 0) - int(e.get("resume_step") or 0)) for e in crashes)
    emergency = [e for e in events if e.kind == "emergency" and e.get("latency_s") is not None]
    seg = Segment(
        attempt=attempt, cloud=info.get("cloud"), instance_id=info.get("instance_id"),
        instance_type=info.get("instance_type"), region=info.get("region"),
        availability_zone=info.get("availability_zone"), lifecycle=info.get("lifecycle"),
        start=start, end=end, end_reason=reason, start_step=start_step, end_step=end_step,
        usd_per_hour=(cost / hours if hours > 0 else (schedule[0][1] if schedule else None)) if schedule else None,
        price_source=source, on_demand_usd_per_hour=od.usd_per_hour, on_demand_source=od.source,
        cost_usd=cost, on_demand_cost_usd=0.0, crashes=len(crashes), redone_in_attempt=redone,
        stall_seconds=sum(float(e.get("stall_s") or 0.0) for e in events if e.kind == "snapshot"),
        emergency_latency_s=max(float(e.get("latency_s")) for e in emergency) if emergency else None,
        schedule=sorted(schedule))
    seg.on_demand_cost_usd = _od_between(seg, seg.start, seg.end)
    # Steps redone after crashes inside the attempt are lost work too.
    if redone and seg.step_rate > 0:
        seg.lost_steps = redone
        seg.lost_seconds = min(seg.duration_seconds, redone / seg.step_rate)
    return seg


def _marks(by_attempt: dict[str, list[Event]], snapshots: Sequence[Any]) -> list[SnapshotMark]:
    marks: dict[str, SnapshotMark] = {}
    for events in by_attempt.values():
        for e in events:
            if e.kind == "snapshot":
                sid = str(e.get("snapshot_id") or f"{e.attempt}-{e.seq}")
                marks[sid] = SnapshotMark(e.time, int(e.get("step") or 0), str(e.get("reason") or ""),
                                          float(e.get("stall_s") or 0.0), e.get("write_s"), sid)
    for m in snapshots:
        sid = str(getattr(m, "snapshot_id", ""))
        if sid and sid not in marks:
            reason = getattr(m, "reason", "")
            marks[sid] = SnapshotMark(m.created_at.timestamp(), int(m.step), str(getattr(reason, "value", reason)),
                                      snapshot_id=sid)
    return sorted(marks.values(), key=lambda m: (m.time, m.step))


def _lost_work(segments: list[Segment], marks: list[SnapshotMark]) -> None:
    for i, seg in enumerate(segments):
        if seg.end_reason not in INTERRUPTED + FAILED:
            continue
        later = segments[i + 1:]
        # What was committed by the end is kept, even when the next segment to start began earlier (a
        # multi-node job's nodes start together: the first "later" one is a peer, not the resume).
        kept = max((m.step for m in marks if m.time <= seg.end + 1.0 and m.step <= seg.end_step), default=0)
        resumed = max(later[0].start_step, kept) if later else kept
        lost = max(0, seg.end_step - max(resumed, 0))
        if lost and seg.step_rate > 0:
            seg.lost_steps += lost
            seg.lost_seconds = min(seg.duration_seconds, seg.lost_seconds + lost / seg.step_rate)
    for seg in segments:
        seg.lost_cost_usd = seg.lost_seconds * seg.cost_usd / seg.duration_seconds if seg.duration_seconds else 0.0


def _totals(run_id: str, segments: list[Segment], marks: list[SnapshotMark], now: float) -> Report:
    paid = sum(s.duration_seconds for s in segments)
    cost = sum(s.cost_usd for s in segments)
    od = sum(s.on_demand_cost_usd for s in segments)
    lost_s = sum(s.lost_seconds for s in segments)
    stall_s = sum(s.stall_seconds for s in segments)
    stall_cost = sum(s.stall_seconds * s.cost_usd / s.duration_seconds for s in segments if s.duration_seconds)
    if segments:
        first = segments[0].start_step
        reached = max(s.end_step for s in segments)
        unrecovered = segments[-1].lost_steps - segments[-1].redone_in_attempt \
            if segments[-1].end_reason in INTERRUPTED + FAILED else 0  # fmt: skip
        steps = max(0, reached - first - max(0, unrecovered))
    else:
        steps = 0
    reasons = [s.end_reason for s in segments]
    if not segments:
        status = "empty"
    elif any(r in ("finished", "already-finished") for r in reasons):
        status = "finished"
    elif reasons[-1] == "running" or "running" in reasons:
        status = "running"
    elif reasons[-1] in FAILED:
        status = "failed"
    else:
        status = "interrupted"
    sources = sorted({f"paid: {s.price_source}" for s in segments}) + \
        sorted({f"on-demand: {s.on_demand_source}" for s in segments})
    return Report(
        run_id=run_id, status=status, generated_at=now, segments=segments, snapshots=marks,
        paid_seconds=paid, total_cost_usd=cost, on_demand_cost_usd=od, savings_usd=od - cost,
        savings_pct=(od - cost) / od * 100.0 if od > 0 else None,
        interruptions=sum(r in INTERRUPTED for r in reasons),
        crashes=sum(s.crashes for s in segments) + sum(r in FAILED for r in reasons),  # restarts + final ones
        lost_steps=sum(s.lost_steps for s in segments), lost_compute_seconds=lost_s,
        lost_cost_usd=sum(s.lost_cost_usd for s in segments), checkpoint_stall_seconds=stall_s,
        checkpoint_stall_cost_usd=stall_cost, goodput=max(0.0, (paid - lost_s - stall_s) / paid) if paid > 0 else None,
        steps=steps, cost_per_1000_steps_usd=cost / steps * 1000.0 if steps > 0 and cost > 0 else None,
        unpriced_seconds=sum(s.duration_seconds for s in segments if not s.schedule),
        price_sources=sources)
