"""One writer per run: a lease in the bucket, fenced by a generation number.

Why this shape: object stores give us exclusive create (`If-None-Match: *`)
but no compare-and-swap we can count on everywhere, so every holder gets its
own key, `<run>/lease/<generation>.json`, created exclusively with the next
generation number.  Only the creator of a generation ever writes its key
again (to renew or release it), so renewal needs no conditional write.  The
generation only grows; the holder of the highest one is the writer.

- acquire: read the highest generation; if there is none, or it was released
  or has expired, create the next one exclusively.  Losing that race means
  someone else won.
- renew: the holder rewrites its own key with a later expiry; if a higher
  generation exists it has been fenced off and must stop.
- fence: before committing a snapshot the training process checks that no
  higher generation exists (`is_current`), so a stale holder commits nothing.
  A window remains between that check and the manifest write; the taker
  waits for the old lease to expire first, and a holder that cannot renew
  stops itself before its lease expires, which closes it in practice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass

from runner.storage import ObjectExistsError, ObjectNotFoundError, Store

log = logging.getLogger("runner.lease")

ENV_LEASE_GENERATION = "RUNNER_LEASE_GENERATION"
DEFAULT_TTL_S = 60.0


def lease_prefix(run_id: str) -> str:
    return f"{run_id}/lease/"


def lease_key(run_id: str, generation: int) -> str:
    return f"{run_id}/lease/{generation:012d}.json"


@dataclass(frozen=True)
class LeaseRecord:
    generation: int
    holder: str
    acquired_at: float
    expires_at: float
    released: bool = False

    def free(self, now: float) -> bool:
        return self.released or now >= self.expires_at

    def describe(self, now: float) -> str:
        state = "released" if self.released else f"expires in {max(0.0, self.expires_at - now):.0f} s"
        return f"{self.holder} (generation {self.generation}, {state})"


class LeaseLostError(RuntimeError):
    """Another instance holds a newer generation of this run's lease."""


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def generations(store: Store, run_id: str) -> list[int]:
    out = []
    for obj in store.list(lease_prefix(run_id)):
        name = obj.key.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isdigit():
            out.append(int(name[:-5]))
    return sorted(out)


def read(store: Store, run_id: str, generation: int) -> LeaseRecord | None:
    try:
        raw = json.loads(store.read_bytes(lease_key(run_id, generation)))
        return LeaseRecord(**raw)
    except ObjectNotFoundError:
        return None
    except (ValueError, TypeError):
        # A garbled record cannot prove anyone holds the run: treat it as expired.
        return LeaseRecord(generation, "unknown", 0.0, 0.0)


def current(store: Store, run_id: str) -> LeaseRecord | None:
    gens = generations(store, run_id)
    return read(store, run_id, gens[-1]) if gens else None


def is_current(store: Store, run_id: str, generation: int) -> bool:
    """Fencing check: True while no higher generation exists."""
    gens = generations(store, run_id)
    return not gens or gens[-1] <= generation


def fence(store: Store, run_id: str) -> None:
    """The training process's check before a commit: raises LeaseLostError once the lease its
    supervisor passed down (RUNNER_LEASE_GENERATION) is no longer the newest.  Without one, a no-op."""
    generation = os.environ.get(ENV_LEASE_GENERATION)
    if generation and not is_current(store, run_id, int(generation)):
        raise LeaseLostError(
            f"run {run_id}: another instance took over (lease generation {generation} is stale); not committing")


class Lease:
    """This instance's claim on a run."""

    def __init__(self, store: Store, run_id: str, ttl_s: float = DEFAULT_TTL_S, holder: str | None = None):
        self.store, self.run_id, self.ttl_s = store, run_id, ttl_s
        self.holder = holder or default_holder()
        self.record: LeaseRecord | None = None

    @property
    def generation(self) -> int | None:
        return self.record.generation if self.record else None

    def try_acquire(self, now: float | None = None) -> LeaseRecord | None:
        """Take the lease if it is free; returns None (and who holds it) otherwise."""
        now = time.time() if now is None else now
        top = current(self.store, self.run_id)
        if top is not None and not top.free(now):
            if top.holder != self.holder:
                return top
            self.record = top  # ours already (a restart of the same holder)
            return None
        record = LeaseRecord(generation=(top.generation + 1) if top else 1, holder=self.holder,
                             acquired_at=now, expires_at=now + self.ttl_s)
        try:
            self.store.create_bytes(lease_key(self.run_id, record.generation), _encode(record))
        except ObjectExistsError:
            return current(self.store, self.run_id)  # someone else won the race
        self.record = record
        log.info("run %s: lease acquired (generation %d)", self.run_id, record.generation)
        return None

    def acquire(self, wait: bool = True, poll_s: float = 2.0, on_wait=None) -> LeaseRecord:
        """Block until the lease is ours. `on_wait(holder_record)` is called when someone else holds it."""
        while True:
            holder = self.try_acquire()
            if holder is None:
                return self.record  # type: ignore[return-value]
            if on_wait:
                on_wait(holder)
            if not wait:
                raise LeaseLostError(f"run {self.run_id} is held by {holder.describe(time.time())}")
            time.sleep(poll_s)

    def renew(self, now: float | None = None) -> None:
        """Extend our lease. Raises LeaseLostError when fenced off by a newer generation."""
        assert self.record is not None, "renew() before acquire()"
        now = time.time() if now is None else now
        if not is_current(self.store, self.run_id, self.record.generation):
            raise LeaseLostError(f"run {self.run_id}: a newer holder took the lease from generation {self.record.generation}")
        self.record = LeaseRecord(**{**asdict(self.record), "expires_at": now + self.ttl_s})
        self.store.write_bytes(lease_key(self.run_id, self.record.generation), _encode(self.record))

    def release(self) -> None:
        """Let the next instance take over at once."""
        if self.record is None:
            return
        if is_current(self.store, self.run_id, self.record.generation):
            self.record = LeaseRecord(**{**asdict(self.record), "released": True, "expires_at": time.time()})
            self.store.write_bytes(lease_key(self.run_id, self.record.generation), _encode(self.record))
        self.record = None


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(asdict(record)).encode()
