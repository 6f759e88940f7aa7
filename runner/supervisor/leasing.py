"""The supervisor's side of the run lease (runner/control/lease.py): one trainer per run.

With CapacityRebalance an Auto Scaling group starts the replacement while the
old instance is still draining, so two supervisors for one run are normal.
`LeaseKeeper` takes the lease before anything else (waiting, and saying who
holds it, while another instance does), renews it from a thread, and puts
`LEASE_LOST` on the supervisor's event queue when it is fenced off or cannot
renew before its lease would expire.  The child gets the generation in
`RUNNER_LEASE_GENERATION`, and its Checkpointer refuses to commit once a
newer one exists, so a stale holder commits nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from runner.control import lease
from runner.notices import Notice
from runner.storage import StorageError, Store

log = logging.getLogger("runner.supervisor")

LEASE_LOST = "lease-lost"


class LeaseKeeper:
    def __init__(self, store: Store, run_id: str, events: queue.SimpleQueue, ttl_s: float = lease.DEFAULT_TTL_S,
                 poll_s: float = 2.0):
        self.lease = lease.Lease(store, run_id, ttl_s=ttl_s)
        self.events = events
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int | None:
        return self.lease.generation

    def acquire(self, sleep: Callable[[float], Notice | None]) -> Notice | None:
        """Wait until the lease is ours; a termination notice while waiting is returned instead.

        `sleep(seconds)` is the supervisor's wait (waiting.Events.sleep inside
        `holding()`): it returns the termination that ended it, if one did.
        Raises StorageError.
        """
        told: tuple[str, int] | None = None
        while True:
            holder = self.lease.try_acquire()
            if holder is None:
                self._start_renewing()
                return None
            if told != (holder.holder, holder.generation):
                told = (holder.holder, holder.generation)
                log.info("run %s is held by %s; waiting until it exits or its lease expires",
                         self.lease.run_id, holder.describe(time.time()))
            notice = sleep(self.poll_s)
            if notice is not None:
                return notice

    def still_ours(self) -> bool:
        """False once a newer generation exists (a child that stopped may have been fenced). Raises StorageError."""
        generation = self.lease.generation
        return generation is not None and lease.is_current(self.lease.store, self.lease.run_id, generation)

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="runner-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        every = self.lease.ttl_s / 3
        while not self._stop.wait(every):
            try:
                self.lease.renew()
            except lease.LeaseLostError as exc:
                log.error("%s", exc)
                self.events.put(LEASE_LOST)
                return
            except StorageError as exc:
                record = self.lease.record
                left = (record.expires_at - time.time()) if record else 0.0
                log.warning("could not renew the run lease (%s); %.0f s left on it", exc, left)
                if left < every:  # stop ourselves before another instance may take over
                    self.events.put(LEASE_LOST)
                    return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.lease.release()
        except StorageError as exc:
            log.warning("could not release the run lease (%s); the next instance waits for it to expire", exc)
