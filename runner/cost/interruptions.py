"""How often this run was interrupted, read off its cost ledger: for `save_every_steps="auto"`.

`runner start` counts this before it starts the child and passes it on
(RUNNER_OBSERVED_INTERRUPTIONS); the child's runner/checkpoint/interval.py
blends it with its prior into the MTBF of the Young/Daly interval.

What counts (one per attempt at most):
- an attempt with an `emergency` event (a termination notice reached it),
- an attempt that ended `preempted` or `preempted-unsaved`,
- an attempt with no `end` whose newest event is older than three
  heartbeats: it vanished, which on a spot instance is a reclaim whose notice
  did not reach us (or a hard kill: work was lost just the same).
Not counted: finished, crashed or failed attempts (a crash restarts in the
same attempt), `lease-lost` (another instance took over; not a reclaim),
`peer-stopped` (the peer node's own attempt counts its notice), and an
attempt still running.

Exposure is the time covered by the attempts, each from its `start` to its
`end` (or its newest event), overlaps counted once: the wall-clock time the
run was training somewhere, so that the nodes of a multi-node job, which
all hold the run at once, give the job's interruption rate.

Why only the newest attempts and not `read_events`: a 40-hour run holds
thousands of ledger objects (a snapshot event per save).  The kind is in
each key, so this lists the keys once and reads two objects per attempt
(its start and its end or newest event), for the newest `MAX_ATTEMPTS`
attempts: the recent past is the rate that matters.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from runner.cost.ledger import Event, key_parts, ledger_prefix
from runner.cost.report import DEFAULT_HEARTBEAT_S, STALE_HEARTBEATS
from runner.storage import StorageError, Store

log = logging.getLogger("runner.cost")

MAX_ATTEMPTS = 50
PREEMPTED = ("preempted", "preempted-unsaved")


@dataclass(frozen=True)
class History:
    interruptions: int
    exposure_s: float
    attempts: int


@dataclass
class _Attempt:
    keys: dict[int, tuple[str, str]]  # seq -> (kind, key)

    def first(self, kind: str) -> str | None:
        return next((key for _, (k, key) in sorted(self.keys.items()) if k == kind), None)


def interruption_history(store: Store, run_id: str, *, now: float | None = None,
                         exclude: frozenset[str] | set[str] = frozenset()) -> History:
    """The run's interruptions and the time its attempts covered (`exclude`: attempt ids, e.g. our own).

    Unreadable records are skipped.  Raises StorageError when listing fails.
    """
    now = time.time() if now is None else now
    attempts: dict[str, _Attempt] = {}
    for obj in store.list(ledger_prefix(run_id)):
        parts = key_parts(obj.key)
        if parts is not None and parts[0] not in exclude:
            attempts.setdefault(parts[0], _Attempt({})).keys[parts[1]] = (parts[2], obj.key)
    spans: list[tuple[float, float]] = []
    interruptions = 0
    for attempt_id in sorted(attempts)[-MAX_ATTEMPTS:]:  # ids sort by start time
        found = _read_attempt(store, attempts[attempt_id], now)
        if found is not None:
            start, end, interrupted = found
            spans.append((start, end))
            interruptions += interrupted
    return History(interruptions, _covered(spans), len(spans))


def _read_attempt(store: Store, attempt: _Attempt, now: float) -> tuple[float, float, bool] | None:
    """(start, end, interrupted) of one attempt; None when its records cannot be read."""
    start_key = attempt.first("start")
    end_key = attempt.first("end")
    last_key = end_key or attempt.keys[max(attempt.keys)][1]
    start = _read(store, start_key) if start_key else None
    last = _read(store, last_key)
    if last is None:
        return None
    begin = start.time if start is not None else last.time
    emergency = attempt.first("emergency") is not None
    if end_key is not None:
        return begin, last.time, emergency or str(last.get("reason")) in PREEMPTED
    heartbeat_s = float((start.get("heartbeat_s") if start is not None else None) or DEFAULT_HEARTBEAT_S)
    vanished = now - last.time > STALE_HEARTBEATS * heartbeat_s
    return begin, last.time, emergency or vanished


def _read(store: Store, key: str) -> Event | None:
    try:
        return Event.from_json(json.loads(store.read_bytes(key)))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("cost ledger: skipping unreadable %s: %s", key, exc)
    except StorageError as exc:
        log.warning("cost ledger: cannot read %s: %s", key, exc)
    return None


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total
