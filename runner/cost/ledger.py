"""The run's cost ledger: append-only events under `<run>/ledger/`, one object per event.

    <run>/ledger/<attempt id>/<seq, 6 digits>-<kind>.json

An attempt is one `runner start` (one supervisor process on one instance).
Its id is `<UTC start time to the microsecond>-<random>`, so attempts sort
by start time, and the sequence number orders its own events.  Every object
is created exclusively and never rewritten: two instances of one run (a
replacement started while the old one drains) write under different attempt
ids and can never clobber each other, and no object is read-modify-written.

Why the kind is in the key: a long attempt writes a heartbeat a minute, so a
40-hour run has thousands of objects.  A reader lists the keys and reads only
what it needs: every event but heartbeats, plus each attempt's last object
(the newest heartbeat is the end of an attempt that died without an `end`).

Kinds and their fields (all events also carry `v`, `kind`, `attempt`, `seq`,
`time`, a UNIX timestamp):

    start      instance {cloud, instance_id, instance_type, availability_zone,
               region, lifecycle}, price {usd_per_hour, source},
               on_demand {usd_per_hour, source}, step (the resume step),
               resume_snapshot, heartbeat_s, host
    heartbeat  step (the newest the child reported)
    snapshot   snapshot_id, step, reason, stall_s (training blocked),
               write_s (serialize + upload + commit)
    emergency  step, snapshot_id, latency_s (notice -> acknowledged), committed
    crash      step (reached), resume_step (what the restart resumes from), returncode
    end        reason (finished, preempted, crashed, lease-lost, ...), step, exit_code
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from runner.storage import StorageError, Store

log = logging.getLogger("runner.cost")

LEDGER = "ledger"
FORMAT_VERSION = 1
KINDS = ("start", "heartbeat", "snapshot", "emergency", "crash", "end")


def ledger_prefix(run_id: str) -> str:
    return f"{run_id}/{LEDGER}/"


def event_key(run_id: str, attempt: str, seq: int, kind: str) -> str:
    return f"{run_id}/{LEDGER}/{attempt}/{seq:06d}-{kind}.json"


def new_attempt_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S%f}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Event:
    kind: str
    attempt: str
    seq: int
    time: float
    data: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)

    def to_json(self) -> dict[str, Any]:
        return {"v": FORMAT_VERSION, "kind": self.kind, "attempt": self.attempt, "seq": self.seq, "time": self.time,
                **self.data}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Event":
        """Raises ValueError/KeyError/TypeError for a record that is not an event."""
        data = {k: v for k, v in raw.items() if k not in ("v", "kind", "attempt", "seq", "time")}
        return cls(kind=str(raw["kind"]), attempt=str(raw["attempt"]), seq=int(raw["seq"]), time=float(raw["time"]),
                   data=data)


class LedgerWriter:
    """Writes one attempt's events. Never raises for the store: a failed write is logged and skipped."""

    def __init__(self, store: Store, run_id: str, attempt: str | None = None):
        self.store = store
        self.run_id = run_id
        self.attempt = attempt or new_attempt_id()
        self._seq = 0  # 0 is the start event's
        self._lock = threading.Lock()
        self.failures = 0

    def write(self, kind: str, data: dict[str, Any], at: float | None = None, seq: int | None = None) -> Event:
        with self._lock:
            if seq is None:
                self._seq += 1
                seq = self._seq
        event = Event(kind, self.attempt, seq, time.time() if at is None else at, data)
        key = event_key(self.run_id, self.attempt, seq, kind)
        try:
            self.store.create_bytes(key, json.dumps(event.to_json(), sort_keys=True).encode())
        except StorageError as exc:
            self.failures += 1
            log.warning("cost ledger: could not write %s: %s", key, exc)
        return event


def key_parts(key: str) -> tuple[str, int, str] | None:
    """(attempt, seq, kind) of a ledger key, or None for a foreign object."""
    parts = key.split("/")
    if len(parts) < 4 or parts[-3] != LEDGER or not parts[-1].endswith(".json"):
        return None
    seq, _, kind = parts[-1][: -len(".json")].partition("-")
    if not seq.isdigit() or kind not in KINDS:
        return None
    return parts[-2], int(seq), kind


def read_events(store: Store, run_id: str) -> list[Event]:
    """The run's events, sorted by attempt then seq: all but heartbeats, and each attempt's last heartbeat.

    Unreadable records are skipped with a warning.  Raises StorageError when listing fails.
    """
    keys: dict[str, list[tuple[int, str, str]]] = {}
    for obj in store.list(ledger_prefix(run_id)):
        parts = key_parts(obj.key)
        if parts is not None:
            attempt, seq, kind = parts
            keys.setdefault(attempt, []).append((seq, kind, obj.key))
    events = []
    for attempt in sorted(keys):
        entries = sorted(keys[attempt])
        last_heartbeat = max((e for e in entries if e[1] == "heartbeat"), default=None)
        for seq, kind, key in entries:
            if kind == "heartbeat" and (seq, kind, key) != last_heartbeat:
                continue
            try:
                events.append(Event.from_json(json.loads(store.read_bytes(key))))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("cost ledger: skipping unreadable %s: %s", key, exc)
            except StorageError as exc:
                log.warning("cost ledger: cannot read %s: %s", key, exc)
    return events


def ledger_runs(store: Store) -> list[str]:
    """Runs under the store's root that have a ledger."""
    found = set()
    for obj in store.list(""):
        parts = obj.key.split("/")
        if len(parts) >= 4 and parts[1] == LEDGER:
            found.add(parts[0])
    return sorted(found)
