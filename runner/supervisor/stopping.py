"""The notices while a child runs: a termination (emergency snapshot, then stop) and a rebalance (proactive snapshot).

Owns what run.py's module note lists as steps 1-4: ask the child for an
emergency snapshot (control file + SIGUSR1 to its process group), wait for
the acknowledgement until the deadline minus a reserve (policy.StopPlan),
let the child exit, then SIGTERM, then SIGKILL; then decide from the store
whether a snapshot was committed.  In --sync-dir mode the files in flight
settle, DIR is committed, and the child gets --sync-signal instead.  A
rebalance recommendation asks for one proactive snapshot (file only: the
child polls it at step boundaries) and training goes on.

Why a mixin of `Supervisor` and not a class of its own: every step reads and
updates the supervisor's state (its child, its counters, its status, the
cost ledger, the sync), and passing all of it back and forth would hide the
order of things, which is the point of this module.  It uses the attributes
`Supervisor.__init__` sets and its `_end_child`.
"""

from __future__ import annotations

import logging
import signal
import time

from runner import control
from runner.checkpoint.manifest import Manifest, Reason
from runner.notices import Notice
from runner.storage import StorageError
from runner.supervisor import endings
from runner.supervisor.child import Child
from runner.supervisor.policy import StopPlan
from runner.supervisor.status import RunStatus
from runner.supervisor.waiting import is_termination

log = logging.getLogger("runner.supervisor")

_ACK_POLL_S = 0.1
_MIN_NOTICE_S = 1.0  # a deadline already past still gets this long to save


class Stopping:
    """The notice half of `Supervisor` (see the module note)."""

    def _rebalance(self, child: Child, notice: Notice) -> None:
        if self.sync is not None:
            log.info("%s: syncing %s at the next scan; training goes on", notice.detail, self.config.sync_dir)
            self.sync.request()
            return
        if self._pending_save is not None:
            log.info("%s: a proactive snapshot is already in flight", notice.detail)
            return
        # The file alone: the child polls it at step boundaries, as it would
        # check a SIGUSR2 flag, and one request must not yield two snapshots.
        request_id = child.channel.request(control.SAVE)
        self._pending_save = (request_id, notice)
        log.info("%s: asked the child for a proactive snapshot; training goes on", notice.detail)

    def _check_pending_save(self, child: Child) -> None:
        if self._pending_save is None:
            return
        request_id, notice = self._pending_save
        ack = child.channel.ack(request_id)
        if ack is None:
            return
        self._pending_save = None
        self.proactive_saves += 1
        log.info("proactive snapshot %s committed at step %s in %.1f s", ack.get("snapshot_id"), ack.get("step"),
                 time.time() - notice.received_at)

    def _preempt(self, child: Child, notice: Notice) -> RunStatus:
        if self.sync is not None:
            return self._sync_preempt(child, notice)
        left = self._begin_stop(notice)
        self._pending_save = None
        log.info("%s: %.0f s left; asking the child for an emergency snapshot", notice.detail, left)
        request_id = child.channel.request(control.STOP)
        child.signal_group(control.STOP_SIGNAL)
        ack = self._wait_ack(child, request_id)
        self.status = RunStatus.STOPPING
        if ack is not None:
            self._ack_at = time.time()
            log.info("emergency snapshot %s acknowledged (step %s) %.1f s after the notice",
                     ack.get("snapshot_id"), ack.get("step"), self._ack_at - notice.received_at)
        elif child.exit is None:
            log.warning("no emergency snapshot acknowledged after %.1f s; stopping the child",
                        time.time() - notice.received_at)
        self._stop_child(child)
        if ack is None:
            ack = child.channel.ack(request_id)  # written just before it ended
        self._end_child(child)
        status = self._preempted(ack, notice)
        self.cost.emergency(self._ack_at - notice.received_at if ack is not None and self._ack_at else None,
                            ack.get("step") if ack else None, ack.get("snapshot_id") if ack else None,
                            committed=status is not RunStatus.PREEMPTED_UNSAVED)
        return status

    def _begin_stop(self, notice: Notice) -> float:
        """Count the preemption and plan the stop against the notice's deadline; the seconds left."""
        self.preemptions += 1
        self.status = RunStatus.SAVING
        now = time.monotonic()
        left = notice.seconds_left()
        left = self.config.grace_seconds if left is None else max(_MIN_NOTICE_S, left)
        self._plan = StopPlan.for_deadline(now, now + left)
        return left

    def _wait_ack(self, child: Child, request_id: str) -> dict | None:
        acks: list[dict] = []

        def acked() -> bool:
            ack = child.channel.ack(request_id)
            if ack is not None:
                acks.append(ack)
            return ack is not None or child.exit is not None

        self.events.wait(until=lambda: self._plan.ack_by, done=acked, poll_s=_ACK_POLL_S,  # type: ignore[union-attr]
                         on_notice=self._tighten)
        return acks[0] if acks else None

    def _tighten(self, event: Notice) -> bool:
        """A second termination with an earlier deadline moves ours forward; the wait goes on (False)."""
        left = event.seconds_left() if is_termination(event) and self._plan else None
        if left is None:
            return False
        deadline = time.monotonic() + max(_MIN_NOTICE_S, left)
        if deadline < self._plan.deadline:  # type: ignore[union-attr]
            log.info("%s: the deadline moves forward to %.0f s from now", event.detail, left)
            self._plan = StopPlan.for_deadline(time.monotonic(), deadline)
        return False

    def _wait_exit(self, child: Child, until: float) -> bool:
        """Whether the child exited by `until`, or by the plan's deadline once a notice moved it earlier."""
        limit = [until]

        def heard(notice: Notice) -> bool:
            self._tighten(notice)
            if self._plan is not None:
                limit[0] = min(limit[0], self._plan.deadline)
            return False

        self.events.wait(until=lambda: limit[0], done=lambda: child.exit is not None, poll_s=1.0, on_notice=heard)
        return child.exit is not None

    def _stop_child(self, child: Child) -> None:
        assert self._plan is not None
        if self._wait_exit(child, self._plan.exit_by(time.monotonic())):
            return
        log.info("child pid %d still running; SIGTERM to its process group", child.pid)
        child.signal_group(signal.SIGTERM)
        if self._wait_exit(child, self._plan.kill_at(time.monotonic())):
            return
        self._kill(child)

    def _kill(self, child: Child) -> None:
        log.warning("child pid %d still running; SIGKILL to its process group", child.pid)
        child.signal_group(signal.SIGKILL)
        if not self._wait_exit(child, time.monotonic() + 5.0):
            log.warning("child pid %d did not die after SIGKILL (stuck in the kernel?)", child.pid)

    def _preempted(self, ack: dict | None, notice: Notice) -> RunStatus:
        committed = self._committed(ack)
        if committed is not None and not committed.final:
            took = (self._ack_at or committed.created_at.timestamp()) - notice.received_at
            log.info("emergency snapshot %s committed at step %d, %.1f s after the notice; preempted, "
                     "the next start resumes from it", committed.snapshot_id, committed.step, took)
            return RunStatus.PREEMPTED
        final = committed or endings.newest_or_none(self.reader)  # type: ignore[arg-type]
        if final is not None and final.final:
            log.info("the child finished while stopping (final snapshot %s at step %d)", final.snapshot_id,
                     final.step)
            return RunStatus.FINISHED
        reached, resume_step = self._last_progress, endings.step_of(final)
        lost = f"; the child had reached step {reached}, so {reached - resume_step} step(s) are lost" \
            if reached is not None and reached >= resume_step else ""  # fmt: skip
        log.warning("NO EMERGENCY SNAPSHOT was committed before the deadline; the next start resumes from %s%s",
                    endings.describe(final), lost)
        return RunStatus.PREEMPTED_UNSAVED

    def _committed(self, ack: dict | None) -> Manifest | None:
        """The emergency snapshot of this attempt, if one is valid in the store."""
        assert self.reader is not None
        try:
            acked = self._acked(ack)
            if acked is not None:
                return acked
            newest = self.reader.newest_valid()
        except StorageError as exc:
            log.warning("cannot check the emergency snapshot in the store: %s", exc)
            return None
        before = self._resume.snapshot_id if self._resume else None
        if newest is not None and newest.reason is Reason.EMERGENCY and newest.snapshot_id != before \
                and newest.step >= endings.step_of(self._resume):  # fmt: skip
            if ack is None:
                log.info("no acknowledgement, but emergency snapshot %s is committed", newest.snapshot_id)
            return newest
        return None

    def _acked(self, ack: dict | None) -> Manifest | None:
        """The acknowledged snapshot, when it is a valid emergency (or final) one. Raises StorageError."""
        if ack is None or not ack.get("snapshot_id"):
            return None
        status = self.reader.status(str(ack["snapshot_id"]))  # type: ignore[union-attr]
        if not (status.valid and status.manifest is not None):
            log.warning("acknowledged snapshot %s is not valid in the store: %s", status.snapshot_id, status.problem)
            return None
        if status.manifest.reason in (Reason.EMERGENCY, Reason.FINAL):
            return status.manifest
        log.warning("acknowledged snapshot %s is a %s snapshot, not an emergency one", status.snapshot_id,
                    status.manifest.reason.value)
        return None

    def _sync_wait(self, seconds: float) -> None:
        """The last sync's pause between scans: any notice ends it early (an earlier deadline is read at once)."""
        self.events.sleep(seconds, on_notice=lambda notice: self._tighten(notice) or True)

    def _sync_preempt(self, child: Child, notice: Notice) -> RunStatus:
        """A termination in sync mode: files in flight settle (until the plan's ack time), DIR is committed,
        then the child gets --sync-signal, and SIGKILL if it is still there at the plan's kill time."""
        assert self.sync is not None
        left = self._begin_stop(notice)
        log.info("%s: %.0f s left; syncing %s, then stopping the child", notice.detail, left, self.sync.dir)

        def alive() -> bool:
            self.reaper.reap(child)
            return child.exit is None

        try:
            held = self.sync.final_sync(until=lambda: self._plan.ack_by,  # type: ignore[union-attr]
                                        wait=self._sync_wait, alive=alive)
        except StorageError as exc:
            log.warning("the last sync failed: %s", exc)
            held = None
        self._sync_progress()
        self.status = RunStatus.STOPPING
        if alive():
            log.info("%s to the child's process group", self.config.sync_signal)
            child.signal_group(self.config.sync_signal_number)
            if not self._wait_exit(child, self._plan.kill_at(time.monotonic())):
                self._kill(child)
        self._end_child(child)
        if held is None:
            log.warning("NO SYNC SNAPSHOT holds %s; the next start resumes from %s", self.sync.dir,
                        endings.describe(endings.newest_or_none(self.reader)))  # type: ignore[arg-type]
            return RunStatus.PREEMPTED_UNSAVED
        log.info("sync snapshot %s holds %s (step %d), %.1f s after the notice; preempted, the next start "
                 "restores it", held.snapshot_id, self.sync.dir, held.step, time.time() - notice.received_at)
        return RunStatus.PREEMPTED
