"""The one notice type and the one source interface every notice source speaks.

A *notice* is "this machine is going away (or may soon)": a spot interruption,
a rebalance recommendation, a SIGTERM from the container runtime.  Every
source (`ec2`, `alibaba`, `gcp`, the signal helper, the null source) turns its
own wire format into `Notice` so that the supervisor handles one type only.

Why ids are hashes: cloud spot notices carry no identifier, and a source that
is polled every couple of seconds sees the same notice on every poll.  As in
aws-node-termination-handler, the id is a hash of what the cloud said (source,
kind and the raw payload), so the same notice always gets the same id and
`Deduper` can drop the repeats while a *changed* notice (a new time) passes.
"""

from __future__ import annotations

import enum
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

# AWS advises polling the spot notice every 5 s and aws-node-termination-handler
# polls every 2 s; with a 120 s notice (30 s on GCP) every second spent not
# knowing is a second less for the emergency save, so poll at least this often.
RECOMMENDED_POLL_INTERVAL_S = 2.0


class NoticeKind(enum.Enum):
    """What the supervisor must do about a notice."""

    # The machine will be taken away: save an emergency checkpoint, then stop.
    TERMINATION = "termination"
    # The machine is at elevated risk: save proactively, training goes on.
    REBALANCE = "rebalance"


def notice_id(source: str, kind: NoticeKind, payload: str) -> str:
    """The dedupe id of a notice: a short hash of who said what."""
    digest = hashlib.sha256(f"{source}\0{kind.value}\0{payload}".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Notice:
    """One preemption notice, whatever its source.

    `deadline` is absolute (epoch seconds) when the source gives one, None when
    it does not (a rebalance recommendation has none).  `id` is the dedupe key,
    see `notice_id`.  `received_at` is when this process learned of it (epoch
    seconds); it is not part of equality so that a repeat compares equal.
    """

    kind: NoticeKind
    source: str
    deadline: float | None
    detail: str
    id: str
    received_at: float = field(default_factory=time.time, compare=False)

    @classmethod
    def create(
        cls, kind: NoticeKind, source: str, payload: str, deadline: float | None, detail: str
    ) -> Notice:
        """Build a notice whose id is derived from `payload` (the raw answer)."""
        return cls(kind, source, deadline, detail, notice_id(source, kind, payload))

    def seconds_left(self, now: float | None = None) -> float | None:
        """Seconds until the deadline (negative when past), or None without one."""
        if self.deadline is None:
            return None
        return self.deadline - (time.time() if now is None else now)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, for the ledger and the control channel."""
        return {
            "kind": self.kind.value,
            "source": self.source,
            "deadline": self.deadline,
            "detail": self.detail,
            "id": self.id,
            "received_at": self.received_at,
        }


@runtime_checkable
class NoticeSource(Protocol):
    """What the supervisor needs from a notice source.

    `poll()` is non-blocking in the sense that matters to a watcher loop: at
    most one short HTTP round, never an exception for network trouble (it logs
    and returns []).  `probe()` answers "is this cloud's metadata service here",
    within the source's short timeout, and never raises either.
    """

    name: str

    def poll(self) -> list[Notice]: ...

    def probe(self) -> bool: ...


class NullSource:
    """The source for `none`, and what `detect()` falls back to off-cloud."""

    name = "none"
    poll_interval = RECOMMENDED_POLL_INTERVAL_S

    def poll(self) -> list[Notice]:
        return []

    def probe(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "NullSource()"


class Deduper:
    """Passes each notice id once; thread-safe.

    Memory is bounded (`max_ids`, oldest forgotten first) because a supervisor
    may run for days; a notice forgotten after thousands of newer ones would
    only be acted on again, which is the safe direction.
    """

    def __init__(self, max_ids: int = 4096) -> None:
        if max_ids < 1:
            raise ValueError(f"max_ids must be >= 1, got {max_ids}")
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._max_ids = max_ids
        self._lock = threading.Lock()

    def is_new(self, notice: Notice) -> bool:
        """True the first time this notice's id is offered, False after."""
        with self._lock:
            if notice.id in self._seen:
                return False
            self._seen[notice.id] = None
            if len(self._seen) > self._max_ids:
                self._seen.popitem(last=False)
            return True

    def filter(self, notices: Iterable[Notice]) -> list[Notice]:
        """The notices not seen before, in order."""
        return [n for n in notices if self.is_new(n)]


def parse_utc_timestamp(text: str) -> float:
    """Epoch seconds from an ISO-8601 time such as ``2026-11-25T14:00:00Z``.

    A time without an offset is taken as UTC, which is what EC2 and Alibaba
    document.  Raises ValueError when `text` is not such a time.
    """
    text = text.strip()
    # datetime.fromisoformat() learned the "Z" suffix only in Python 3.11.
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def format_utc_timestamp(epoch: float) -> str:
    """``2026-11-25T14:00:00Z`` for an epoch time (whole seconds, as clouds write it)."""
    return datetime.fromtimestamp(int(epoch), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
