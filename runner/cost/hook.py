"""The supervisor's side of the cost ledger: one `CostHook` per `runner start`.

Owns: the attempt's start record (instance facts and prices, looked up in a
background thread so the child starts at once), the run's interruptions so
far (for an automatic checkpoint interval: interruptions.py), a heartbeat about every
`heartbeat_s` (so a hard kill leaves the last heartbeat as the end), the
snapshots the child reports, emergency saves, crashes, the end record, and
the live "cost so far" log line (periodically and at exit).

The supervisor calls a handful of methods; none of them raises: the ledger
is bookkeeping, and a store or price failure is logged, never fatal.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from runner.cost import pricing
from runner.cost.interruptions import History, interruption_history
from runner.cost.ledger import LedgerWriter, read_events
from runner.cost.pricing import UNKNOWN, Price
from runner.cost.render import duration
from runner.storage import Store

log = logging.getLogger("runner.supervisor")

_TICK_S = 2.0  # how often the thread collects the child's commits; heartbeats are rarer
_FACTS_WAIT_S = 5.0
_END_JOIN_S = 3.0  # how long to wait for the notice source to be known (auto-detection)


class CostHook:
    """Writes one attempt's ledger. `start()` once, then any of the record calls, then `end()` once."""

    def __init__(self, store: Store, run_id: str, *, heartbeat_s: float = 60.0, log_every_s: float = 300.0,
                 price_per_hour: float | None = None, on_demand_price_per_hour: float | None = None,
                 price_lookup: bool = True, price_label: str | None = None, source: Callable[[], Any] | None = None):
        self.writer = LedgerWriter(store, run_id)
        self.store, self.run_id = store, run_id
        self.heartbeat_s = heartbeat_s
        self.log_every_s = log_every_s
        self._overrides = (price_per_hour, on_demand_price_per_hour)
        self._price_label = price_label
        self._lookup = price_lookup
        self._source = source or (lambda: None)
        self._progress: Callable[[], Any] = lambda: None
        self._channel: Callable[[], Any] = lambda: None
        self._offsets: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = threading.Event()  # the start record is written (or given up on)
        self._thread: threading.Thread | None = None
        self.started_at = 0.0
        self.start_step = 0
        self.step = 0
        self.price: Price = UNKNOWN
        self.prior_cost = 0.0
        self.ended = False
        self._history: History | None = None

    # -- the supervisor's calls ---------------------------------------------------

    def start(self, resume_step: int, resume_snapshot: str | None, *, progress: Callable[[], Any],
              channel: Callable[[], Any]) -> "CostHook":
        """Begin the attempt: `progress()` gives the child's step, `channel()` its SupervisorChannel (or None)."""
        self.started_at = time.time()
        self.start_step = self.step = resume_step
        self._resume_snapshot = resume_snapshot
        self._progress, self._channel = progress, channel
        self._thread = threading.Thread(target=self._run, name="runner-cost", daemon=True)
        self._thread.start()
        return self

    def interruptions(self) -> tuple[int, float] | None:
        """(interruptions, seconds) of the run so far, this attempt's time included; None when unreadable.

        The ledger is read on the first call only (earlier attempts do not change).
        """
        if self._history is None:
            try:
                self._history = interruption_history(self.store, self.run_id, exclude={self.writer.attempt})
            except Exception as exc:  # bookkeeping: the child falls back to its prior
                log.warning("cost ledger: cannot count the run's interruptions (%s); the checkpoint interval "
                            "uses its prior", exc)
                return None
            log.info("run %s: %d interruption(s) in %.1f h over %d earlier attempt(s) on the ledger", self.run_id,
                     self._history.interruptions, self._history.exposure_s / 3600, self._history.attempts)
        elapsed = max(0.0, time.time() - self.started_at) if self.started_at else 0.0
        return self._history.interruptions, self._history.exposure_s + elapsed

    def drain(self, channel: Any) -> None:
        """Record the snapshots a child reported; call before its control folder is removed."""
        if channel is None:
            return
        with self._lock:
            key = str(channel.dir)
            commits, self._offsets[key] = channel.commits(self._offsets.get(key, 0))
        for c in commits:
            try:
                self.step = max(self.step, int(c.get("step") or 0))
                fields = {k: c.get(k) for k in ("snapshot_id", "step", "reason", "stall_s", "write_s")}
                self.writer.write("snapshot", fields, at=float(c.get("time") or time.time()))
            except (TypeError, ValueError):
                continue

    def emergency(self, latency_s: float | None, step: int | None, snapshot_id: str | None, committed: bool) -> None:
        self._safely(lambda: self.writer.write("emergency", {"latency_s": latency_s, "step": step,
                                                              "snapshot_id": snapshot_id, "committed": committed}))

    def crash(self, step: int | None, resume_step: int, returncode: int | None) -> None:
        """A child crashed and will be restarted from `resume_step` within this attempt."""
        self._safely(lambda: self.writer.write("crash", {"step": step, "resume_step": resume_step,
                                                          "returncode": returncode}))

    def end(self, reason: str, exit_code: int, step: int | None) -> None:
        """The attempt ends: stop heartbeats, write the end record, log the cost line."""
        if self.ended:
            return
        self.ended = True
        self._stop.set()
        if self._thread is not None:
            # Bounded: a price look-up still hanging must not hold up an exit under a spot notice;
            # the start record (seq 0) then lands after the end, which readers sort out by seq.
            self._thread.join(timeout=_END_JOIN_S)
        self._safely(lambda: self.drain(self._channel()))
        if step is not None:
            self.step = max(self.step, step)
        self._safely(lambda: self.writer.write("end", {"reason": reason, "exit_code": exit_code, "step": self.step}))
        self._safely(lambda: self.log_line(final=True))

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._write_start()
        finally:
            self._started.set()
        last_beat = last_line = time.monotonic()
        while not self._stop.wait(min(_TICK_S, self.heartbeat_s)):
            self._safely(lambda: self.drain(self._channel()))
            now = time.monotonic()
            if now - last_beat >= self.heartbeat_s:
                last_beat = now
                self._safely(self._heartbeat)
            if now - last_line >= self.log_every_s:
                last_line = now
                self._safely(self.log_line)

    def _write_start(self) -> None:
        facts = self._safely(self._facts)
        price, on_demand = self._safely(lambda: pricing.start_prices(
            facts, price_override=self._overrides[0], on_demand_override=self._overrides[1], lookup=self._lookup,
            at=self.started_at, price_label=self._price_label)) or (UNKNOWN, UNKNOWN)
        self.price = price
        instance = {k: getattr(facts, k, None) for k in ("cloud", "instance_id", "instance_type",
                                                         "availability_zone", "region", "lifecycle")}
        self._safely(lambda: self.writer.write("start", {
            "instance": instance, "price": price.to_json(), "on_demand": on_demand.to_json(),
            "step": self.start_step, "resume_snapshot": self._resume_snapshot, "heartbeat_s": self.heartbeat_s,
            "host": socket.gethostname()}, at=self.started_at, seq=0))
        self.prior_cost = self._safely(self._prior_cost) or 0.0
        if price.usd_per_hour is None:
            log.info("cost: price per hour unknown (set --price-per-hour); the ledger records time and steps")
        else:
            log.info("cost: $%.4f/h (%s)", price.usd_per_hour, price.source)

    def _facts(self) -> Any:
        until = time.monotonic() + _FACTS_WAIT_S
        source = self._source()
        while source is None and time.monotonic() < until and not self._stop.is_set():
            time.sleep(0.1)
            source = self._source()
        read = getattr(source, "instance_facts", None)
        return read() if read is not None else None

    def _prior_cost(self) -> float:
        """What the run's earlier attempts cost (as the report computes it, without price look-ups)."""
        from runner.cost.report import build_report

        events = [e for e in read_events(self.store, self.run_id) if e.attempt != self.writer.attempt]
        return build_report(self.run_id, events, now=self.started_at).total_cost_usd if events else 0.0

    def _heartbeat(self) -> None:
        step = self._progress()
        if step is not None:
            self.step = max(self.step, int(step))
        self.writer.write("heartbeat", {"step": self.step})

    # -- the live line -----------------------------------------------------------------

    def log_line(self, final: bool = False) -> None:
        step = self._progress()
        if step is not None:
            self.step = max(self.step, int(step))
        hours = max(0.0, time.time() - self.started_at) / 3600.0
        steps = max(0, self.step - self.start_step)
        rate = steps / hours if hours > 0 else 0.0
        usd = self.price.usd_per_hour
        if usd is None:
            log.info("cost%s: price unknown; %s on this instance, %d steps (%.0f steps/h)",
                     " at exit" if final else "", duration(hours * 3600), steps, rate)
            return
        cost = usd * hours
        per_k = f"${cost / steps * 1000:.4f}" if steps else "-"
        log.info("cost%s: $%.4f so far for the run ($%.4f on this instance, %s at $%.4f/h); %.0f steps/h; "
                 "%s per 1,000 steps", " at exit" if final else "", self.prior_cost + cost, cost,
                 duration(hours * 3600), usd, rate, per_k)

    @staticmethod
    def _safely(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # bookkeeping must never take the supervisor down
            log.warning("cost ledger: %s", exc)
            log.debug("cost ledger failure", exc_info=True)
            return None


class NoCostHook:
    """What the supervisor holds before the attempt starts: every call does nothing."""

    def drain(self, channel: Any) -> None: ...
    def interruptions(self) -> None: ...
    def emergency(self, *args: Any, **kwargs: Any) -> None: ...
    def crash(self, *args: Any, **kwargs: Any) -> None: ...
    def end(self, *args: Any, **kwargs: Any) -> None: ...
