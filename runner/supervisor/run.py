"""`supervise(config) -> int`: the loop behind `runner start`.

Owns the order of things: open the store; stop at once if the run is
finished; start the child from the newest valid snapshot; react to its exit
(finished, crash -> restart policy) and to notices (termination ->
emergency snapshot, then stop; rebalance -> proactive snapshot); end with
one status and its exit code (status.py).  Processes live in child.py,
rules in policy.py, event sources in watchers.py.

The main thread blocks on one event queue (notices, SIGCHLD, or a timeout it
chose), so an idle supervisor costs nothing; it polls only while it waits
for an acknowledgement (every 0.1 s, for seconds) or for a proactive save
(every 0.5 s).

How a termination is handled, against the deadline the notice gives (a
bare SIGTERM/SIGINT/SIGHUP: now + --grace-seconds):
1. request "stop" through the control file and SIGUSR1 to the child's
   process group (every torchrun worker gets it);
2. wait for the acknowledgement until the deadline minus a reserve
   (policy.StopPlan: a quarter of the time left, between 0.5 and 5 s);
3. let the child exit by itself, then SIGTERM its group, then SIGKILL;
4. the snapshot counts as committed when the acknowledged manifest is valid
   in the store with reason emergency (or, if the ack was lost, when the
   newest valid snapshot is a new emergency one); exit 75 either way, with a
   loud warning and the steps lost when nothing was committed (status.py
   says why).

In a multi-node torchrun job (launch.py) each machine has its own
supervisor.  A notice reaches one of them; the ranks agree at the next step
boundary (checkpoint/checkpointer.py), every rank saves the same step, and
the job ends everywhere.  The supervisors that asked for nothing learn from
the child's peer-stopped.json that the job stopped for a peer, and exit 76
(PEER_STOPPED) instead of taking the job's exit 0 for the end of training.
The run lease is not taken there: torchrun's rendezvous admits one job of
`--nnodes` machines, and every machine's supervisor holds the run at once.

In directory-sync mode (--sync-dir, syncdir.py) the child knows nothing of
us: DIR is restored before the first start, synced in the background while
the child runs and once more when it ends; a termination lets the files in
flight settle, commits DIR, then stops the child with --sync-signal.  The
hooks are the `_sync_*` methods at the end of the class.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager

from runner import control
from runner.control.lease import ENV_LEASE_GENERATION
from runner.checkpoint.manifest import Manifest, Reason
from runner.checkpoint.reader import RunReader
from runner.cost.hook import CostHook, NoCostHook
from runner.notices import Notice, NoticeKind
from runner.rendezvous import RendezvousUnavailable, rendezvous_id
from runner.storage import StorageError, Store, UnsupportedURLError
from runner.supervisor.child import Child, ChildExit, ChildStartError, Reaper, become_subreaper, child_env, new_control_dir
from runner.supervisor.config import StartConfig
from runner.supervisor.leasing import LEASE_LOST, LeaseKeeper
from runner.supervisor.launch import child_command, multi_node
from runner.supervisor import scale_down
from runner.supervisor.policy import CrashTracker, RestartPolicy, StopPlan
from runner.supervisor.status import RunStatus
from runner.supervisor.syncdir import DirSync, SyncDirError
from runner.supervisor.watchers import CHILD_EVENT, CloudWatcher, NoticeSourceError, SignalWatcher, plan_source

log = logging.getLogger("runner.supervisor")

_IDLE_WAKE_S = 30.0  # a safety net only: every event wakes the loop by itself
_ACK_POLL_S = 0.1
_SAVE_POLL_S = 0.5
_MIN_NOTICE_S = 1.0  # a deadline already past still gets this long to save


def supervise(config: StartConfig) -> int:
    """Run `config.command` under supervision until it finishes, fails for good, or is preempted.

    Returns the exit code (status.py: 0, 1, 2, 75 or 76).  Call from the main
    thread of a process of its own: it installs signal handlers, and it
    becomes a child subreaper that reaps every descendant.  Errors a user
    can cause are logged as one line and turned into an exit code; nothing
    is raised for them.
    """
    with _logging():
        supervisor = Supervisor(config)
        status = supervisor.run()
        code = int(status.exit_code)
        log.info("exit %d (%s): crashes %d, restarts %d, preemptions %d, proactive saves %d", code, status.value,
                 supervisor.tracker.crashes, supervisor.tracker.restarts, supervisor.preemptions,
                 supervisor.proactive_saves)
        scale_down.after_run(config.scale_down_group, status in (RunStatus.FINISHED, RunStatus.ALREADY_FINISHED))
        return code


class Supervisor:
    """One `runner start`: counters, the current child, and the loop."""

    def __init__(self, config: StartConfig):
        self.config = config
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.tracker = CrashTracker(RestartPolicy(
            max_restarts=config.max_restarts, backoff_base_s=config.restart_backoff_s,
            crash_loop_limit=config.crash_loop_limit))  # fmt: skip
        self.status = RunStatus.STARTING
        self.preemptions = 0
        self.proactive_saves = 0
        self.child: Child | None = None
        self.reader: RunReader | None = None
        self.reaper = Reaper(reap_all=False)
        self._resume: Manifest | None = None  # what the current attempt resumed from
        self._last_progress: int | None = None  # the step the last child reported
        self._pending_save: tuple[str, Notice] | None = None
        self._plan: StopPlan | None = None
        self._ack_at: float | None = None  # epoch time the emergency ack was seen
        self._peer_stop: dict | None = None  # the last child stopped for another node's notice (control.py)
        self.sync: DirSync | None = None  # directory-sync mode
        self.lease: LeaseKeeper | None = None
        self.cost: CostHook | NoCostHook = NoCostHook()  # the cost ledger (runner/cost/hook.py)

    # -- the whole run ------------------------------------------------------------

    def run(self) -> RunStatus:
        self.status = self._run()
        self.cost.end(self.status.value, int(self.status.exit_code), self._last_progress)
        return self.status

    def _run(self) -> RunStatus:
        cfg = self.config
        try:
            planned = plan_source(cfg.notice_source, cfg.imds_endpoint)
        except NoticeSourceError as exc:
            log.error("%s", exc)
            return RunStatus.CONFIG_ERROR
        # Signals first: a SIGTERM while the store is slow to answer is a
        # preemption (75), not a death by signal.
        signals = SignalWatcher(cfg.grace_seconds, self.events).install()
        try:
            try:
                store = Store(cfg.bucket, cfg.storage_options)
                store.check()
                self.reader = RunReader(store, cfg.run_id)
                if multi_node(cfg):
                    log.info("run %s: one of up to %d nodes; the rendezvous admits one job, so no run lease is taken",
                             cfg.run_id, cfg.max_nodes)
                else:
                    self.lease = LeaseKeeper(store, cfg.run_id, self.events, ttl_s=cfg.lease_ttl_s)
                    notice = self.lease.acquire(self._next_event)
                    if notice is not None:
                        log.warning("%s while waiting for the run's lease; nothing to save", notice.detail)
                        return RunStatus.PREEMPTED_UNSAVED
                newest = self._newest()  # read after the lease: the previous holder may have committed more
            except StorageError as exc:
                return self._storage_failed(exc, at_start=True)
            if newest is not None and newest.final:
                log.info("run %s is already finished (final snapshot %s at step %d); nothing to do",
                         cfg.run_id, newest.snapshot_id, newest.step)
                return RunStatus.ALREADY_FINISHED
            try:
                self._sync_restore(store)
            except SyncDirError as exc:
                log.error("%s", exc)
                return RunStatus.CONFIG_ERROR
            except StorageError as exc:
                return self._storage_failed(exc, at_start=True)
            self.reaper = Reaper(reap_all=become_subreaper())
            cloud = CloudWatcher(planned, cfg.poll_interval_s, self.events).start()
            self._start_cost(store, newest, cloud)
            try:
                return self._loop(newest)
            except StorageError as exc:
                return self._storage_failed(exc, at_start=False)
            finally:
                if self.sync is not None:
                    self.sync.stop()
                self._kill_leftover_child()
                cloud.stop()
        finally:
            if self.lease is not None:
                self.lease.release()
            signals.uninstall()

    def _loop(self, resume: Manifest | None) -> RunStatus:
        while True:
            stopped = self._termination_before_start(resume)
            if stopped is not None:
                return stopped
            rdzv_id = self._ask_rendezvous(resume)
            if isinstance(rdzv_id, RunStatus):
                return rdzv_id
            try:
                child = self._start_child(resume, rdzv_id)
            except ChildStartError as exc:
                log.error("%s; check the command after --", exc)
                return RunStatus.CONFIG_ERROR
            if self.sync is not None:
                self.sync.start()
            outcome = self._watch(child)
            if isinstance(outcome, RunStatus):
                return outcome
            if self.lease is not None and not self.lease.still_ours():
                log.error("run %s: lease lost while the child ran; it %s", self.config.run_id, outcome.describe())
                return RunStatus.LEASE_LOST
            self._sync_after_exit(outcome)
            newest = self._newest()
            if self._peer_stop is not None and not (newest is not None and newest.final):
                return self._peer_stopped(outcome, newest)
            if outcome.returncode == 0 or (newest is not None and newest.final):
                return self._finished(outcome, newest)
            log.error("child %s", outcome.describe())
            decision = self.tracker.record_crash(self._step(resume), self._step(newest))
            if not decision.restart:
                log.error("%s", decision.reason)
                return decision.status or RunStatus.FAILED
            self.cost.crash(self._last_progress, self._step(newest), outcome.returncode)
            log.info("restart %d/%d in %.1f s, from %s", self.tracker.restarts, self.config.max_restarts,
                     decision.delay_s, _describe(newest))
            stopped = self._backoff(decision.delay_s, newest)
            if stopped is not None:
                return stopped
            resume = newest

    # -- one child ----------------------------------------------------------------

    def _ask_rendezvous(self, resume: Manifest | None) -> str | RunStatus | None:
        """The next start's rendezvous id (multi-node), or how the run ends while the store is being asked.

        Asked in a thread: a store that does not answer holds the caller in
        C++ for up to a minute, and a notice meanwhile must still stop us.
        """
        cfg = self.config
        if cfg.rdzv_endpoint is None:
            return None
        answer: Future[str] = Future()

        def ask() -> None:
            try:
                answer.set_result(rendezvous_id(cfg.rdzv_endpoint, cfg.run_id))  # type: ignore[arg-type]
            except BaseException as exc:  # handed to the main thread
                answer.set_exception(exc)

        threading.Thread(target=ask, name="runner-rendezvous", daemon=True).start()
        deferred: list[object] = []
        try:
            while not answer.done():
                event = self._next_event(0.2)
                if isinstance(event, Notice) and event.kind is NoticeKind.TERMINATION:
                    self.preemptions += 1
                    log.warning("%s while asking the rendezvous store at %s: no child is running, nothing to "
                                "save; the next start resumes from %s", event.detail, cfg.rdzv_endpoint,
                                _describe(resume))
                    return RunStatus.PREEMPTED_UNSAVED
                if event is not None:
                    deferred.append(event)  # a rebalance: asked of the child once it runs
        finally:
            for event in deferred:
                self.events.put(event)
        try:
            return answer.result()
        except RendezvousUnavailable as exc:
            log.error("%s", exc)
            return RunStatus.FAILED

    def _start_child(self, resume: Manifest | None, rdzv_id: str | None = None) -> Child:
        cfg = self.config
        control_dir = new_control_dir()
        env = child_env(os.environ, bucket=cfg.bucket, run_id=cfg.run_id, save_every_steps=cfg.save_every_steps,
                        keep_last=cfg.keep_last, storage_options=cfg.storage_options,
                        resume=resume.snapshot_id if resume else "none", control_dir=control_dir)  # fmt: skip
        if self.lease is not None and self.lease.generation is not None:
            env[ENV_LEASE_GENERATION] = str(self.lease.generation)
        if resume is not None:
            log.info("run %s: resuming from %s", cfg.run_id, _describe(resume))
        else:
            log.info("run %s: no snapshot yet, starting fresh", cfg.run_id)
        try:
            command = child_command(cfg, rdzv_id)
            child = Child.start(command, env, control_dir)
        except ChildStartError:
            os.rmdir(control_dir)
            raise
        self.child, self._resume, self._last_progress, self._peer_stop = child, resume, None, None
        log.info("started child pid %d: %s", child.pid, " ".join(command))
        self.status = RunStatus.RUNNING
        return child

    def _watch(self, child: Child) -> ChildExit | RunStatus:
        """Until the child exits (its ChildExit) or a termination was handled (a terminal status)."""
        while True:
            self.reaper.reap(child)
            if child.exit is not None:
                self._check_pending_save(child)
                self._end_child(child)
                return child.exit
            self._check_pending_save(child)
            event = self._next_event(_SAVE_POLL_S if self._pending_save else _IDLE_WAKE_S)
            if event == LEASE_LOST:
                return self._lease_lost(child)
            if isinstance(event, Notice):
                if event.kind is NoticeKind.TERMINATION:
                    return self._preempt(child, event)
                self._rebalance(child, event)

    def _end_child(self, child: Child) -> None:
        progress = child.channel.progress()
        if progress is not None:
            self._last_progress = progress
        self.cost.drain(child.channel)  # before cleanup removes the control folder
        self._peer_stop = child.channel.peer_stopped()
        child.kill_stragglers()
        child.cleanup()
        self._pending_save = None
        self.child = None

    def _lease_lost(self, child: Child) -> RunStatus:
        """Another instance owns the run now: stop at once; the child's commits are fenced anyway."""
        log.error("run %s: lease lost; stopping child pid %d without a snapshot", self.config.run_id, child.pid)
        self._kill_leftover_child()
        return RunStatus.LEASE_LOST

    def _kill_leftover_child(self) -> None:
        """On the way out (also after a supervisor bug): leave nothing running."""
        child = self.child
        if child is None or child.exit is not None:
            return
        log.warning("stopping child pid %d on exit", child.pid)
        child.signal_group(signal.SIGTERM)
        if not self._wait_exit(child, time.monotonic() + 3.0):
            child.signal_group(signal.SIGKILL)
            self._wait_exit(child, time.monotonic() + 3.0)
        self._end_child(child)

    # -- notices --------------------------------------------------------------------

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
        self.preemptions += 1
        self.status = RunStatus.SAVING
        self._pending_save = None
        now = time.monotonic()
        left = notice.seconds_left()
        left = self.config.grace_seconds if left is None else max(_MIN_NOTICE_S, left)
        self._plan = StopPlan.for_deadline(now, now + left)
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

    def _wait_ack(self, child: Child, request_id: str) -> dict | None:
        while True:
            self.reaper.reap(child)
            ack = child.channel.ack(request_id)
            if ack is not None or child.exit is not None:
                return ack
            assert self._plan is not None
            left = self._plan.ack_by - time.monotonic()
            if left <= 0:
                return None
            self._tighten(self._next_event(min(_ACK_POLL_S, left)))

    def _tighten(self, event: object) -> None:
        """A second termination with an earlier deadline moves ours forward."""
        if not (isinstance(event, Notice) and event.kind is NoticeKind.TERMINATION and self._plan):
            return
        left = event.seconds_left()
        if left is None:
            return
        deadline = time.monotonic() + max(_MIN_NOTICE_S, left)
        if deadline < self._plan.deadline:
            log.info("%s: the deadline moves forward to %.0f s from now", event.detail, left)
            self._plan = StopPlan.for_deadline(time.monotonic(), deadline)

    def _stop_child(self, child: Child) -> None:
        assert self._plan is not None
        if self._wait_exit(child, self._plan.exit_by(time.monotonic())):
            return
        log.info("child pid %d still running; SIGTERM to its process group", child.pid)
        child.signal_group(signal.SIGTERM)
        if self._wait_exit(child, self._plan.kill_at(time.monotonic())):
            return
        log.warning("child pid %d still running; SIGKILL to its process group", child.pid)
        child.signal_group(signal.SIGKILL)
        if not self._wait_exit(child, time.monotonic() + 5.0):
            log.warning("child pid %d did not die after SIGKILL (stuck in the kernel?)", child.pid)

    def _preempted(self, ack: dict | None, notice: Notice) -> RunStatus:
        committed = self._committed(ack)
        if committed is not None and committed.final:
            log.info("the child finished while stopping (final snapshot %s at step %d)",
                     committed.snapshot_id, committed.step)
            return RunStatus.FINISHED
        if committed is not None:
            took = (self._ack_at or committed.created_at.timestamp()) - notice.received_at
            log.info("emergency snapshot %s committed at step %d, %.1f s after the notice; preempted, "
                     "the next start resumes from it", committed.snapshot_id, committed.step, took)
            return RunStatus.PREEMPTED
        newest = self._newest_or_none()
        if newest is not None and newest.final:
            log.info("the child finished while stopping (final snapshot %s at step %d)", newest.snapshot_id,
                     newest.step)
            return RunStatus.FINISHED
        reached = self._last_progress
        resume_step = self._step(newest)
        lost = f"; the child had reached step {reached}, so {reached - resume_step} step(s) are lost" \
            if reached is not None and reached >= resume_step else ""  # fmt: skip
        log.warning("NO EMERGENCY SNAPSHOT was committed before the deadline; the next start resumes from %s%s",
                    _describe(newest), lost)
        return RunStatus.PREEMPTED_UNSAVED

    def _committed(self, ack: dict | None) -> Manifest | None:
        """The emergency snapshot of this attempt, if one is valid in the store."""
        assert self.reader is not None
        try:
            if ack is not None and ack.get("snapshot_id"):
                status = self.reader.status(str(ack["snapshot_id"]))
                if status.valid and status.manifest is not None:
                    if status.manifest.reason in (Reason.EMERGENCY, Reason.FINAL):
                        return status.manifest
                    log.warning("acknowledged snapshot %s is a %s snapshot, not an emergency one",
                                status.snapshot_id, status.manifest.reason.value)
                else:
                    log.warning("acknowledged snapshot %s is not valid in the store: %s",
                                status.snapshot_id, status.problem)
            newest = self.reader.newest_valid()
        except StorageError as exc:
            log.warning("cannot check the emergency snapshot in the store: %s", exc)
            return None
        before = self._resume.snapshot_id if self._resume else None
        if newest is not None and newest.reason is Reason.EMERGENCY and newest.snapshot_id != before \
                and newest.step >= self._step(self._resume):  # fmt: skip
            if ack is None:
                log.info("no acknowledgement, but emergency snapshot %s is committed", newest.snapshot_id)
            return newest
        return None

    # -- waiting ----------------------------------------------------------------------

    def _next_event(self, timeout: float) -> object:
        """The next event, or None after `timeout` seconds; SIGCHLD reaps on the way."""
        try:
            event = self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if event == CHILD_EVENT:
            self.reaper.reap(self.child)
            return None
        return event

    def _wait_exit(self, child: Child, until: float) -> bool:
        while True:
            self.reaper.reap(child)
            if child.exit is not None:
                return True
            left = until - time.monotonic()
            if left <= 0:
                return False
            event = self._next_event(min(left, 1.0))
            if isinstance(event, Notice):
                self._tighten(event)
                if self._plan is not None:
                    until = min(until, self._plan.deadline)

    def _backoff(self, delay_s: float, resume: Manifest | None) -> RunStatus | None:
        self.status = RunStatus.BACKOFF
        until = time.monotonic() + delay_s
        while (left := until - time.monotonic()) > 0:
            event = self._next_event(left)
            self.reaper.reap(None)
            if isinstance(event, Notice) and event.kind is NoticeKind.TERMINATION:
                self.preemptions += 1
                log.warning("%s during the restart backoff: no child is running, nothing to save; "
                            "the next start resumes from %s", event.detail, _describe(resume))
                return RunStatus.PREEMPTED_UNSAVED
            if isinstance(event, Notice):
                log.info("%s during the restart backoff: the newest snapshot is current already", event.detail)
        return None

    def _termination_before_start(self, resume: Manifest | None) -> RunStatus | None:
        """A termination that came while no child ran (at start): nothing to save, stop now."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return None
            if isinstance(event, Notice) and event.kind is NoticeKind.TERMINATION:
                self.preemptions += 1
                log.warning("%s before the child started: nothing to save; the next start resumes from %s",
                            event.detail, _describe(resume))
                return RunStatus.PREEMPTED_UNSAVED
            if isinstance(event, Notice):
                self.events.put(event)  # a rebalance: the child will be asked once it runs
                return None

    # -- endings ----------------------------------------------------------------------

    def _finished(self, outcome: ChildExit, newest: Manifest | None) -> RunStatus:
        if newest is not None and newest.final:
            if outcome.returncode != 0:
                log.warning("child %s after committing its final snapshot; the run is finished",
                            outcome.describe())
            log.info("run %s finished: final snapshot %s at step %d", self.config.run_id, newest.snapshot_id,
                     newest.step)
        else:
            log.warning("the child exited 0 without a final snapshot (newest: %s); treating the run as finished. "
                        "Call ckpt.save(step, final=True) at the end of training", _describe(newest))
        return RunStatus.FINISHED

    def _peer_stopped(self, outcome: ChildExit, newest: Manifest | None) -> RunStatus:
        """The job stopped for another node's notice: say which snapshot holds it; the caller exits 76."""
        assert self._peer_stop is not None
        said = str(self._peer_stop.get("snapshot_id"))
        if newest is not None and newest.snapshot_id == said:
            log.info("another node was preempted: the job committed snapshot %s at step %d and stopped (child %s); "
                     "start again here to rejoin the group", said, newest.step, outcome.describe())
        else:
            log.warning("another node was preempted and the job stopped (child %s), but snapshot %s is not the "
                        "newest valid one; the next start resumes from %s", outcome.describe(), said,
                        _describe(newest))
        return RunStatus.PEER_STOPPED

    def _storage_failed(self, exc: StorageError, at_start: bool) -> RunStatus:
        log.error("%s", exc)
        if at_start and isinstance(exc, UnsupportedURLError):
            return RunStatus.CONFIG_ERROR
        return RunStatus.STORAGE_FAILED

    # -- store ------------------------------------------------------------------------

    def _newest(self) -> Manifest | None:
        """The newest valid snapshot, a final one winning a tie at the same step; raises StorageError.

        The tie is real: a script's last `ckpt.step(n)` may save periodically
        and its `ckpt.save(n, final=True)` follows within the same second, and
        snapshot ids order such twins by their random suffix.
        """
        assert self.reader is not None
        newest: Manifest | None = None
        for manifest in self.reader.valid_snapshots():
            if newest is not None and manifest.step != newest.step:
                break
            if newest is None or manifest.final:
                newest = manifest
            if manifest.final:
                break
        return newest

    def _newest_or_none(self) -> Manifest | None:
        try:
            return self._newest()
        except StorageError as exc:
            log.warning("cannot list the snapshots: %s", exc)
            return None

    @staticmethod
    def _step(manifest: Manifest | None) -> int:
        return manifest.step if manifest is not None else 0

    # -- the cost ledger (the logic is in runner/cost/hook.py) -------------------------

    def _start_cost(self, store: Store, newest: Manifest | None, cloud: CloudWatcher) -> None:
        cfg = self.config

        def progress() -> int | None:
            child = self.child
            step = child.channel.progress() if child is not None else None
            if step is None and self.sync is not None:
                step = self.sync.step  # a --sync-dir child reports nothing: the step its files reached
            return step if step is not None else self._last_progress

        self.cost = CostHook(store, cfg.run_id, heartbeat_s=cfg.heartbeat_s, log_every_s=cfg.cost_log_interval_s,
                             price_per_hour=cfg.price_per_hour, price_label=cfg.price_label,
                             on_demand_price_per_hour=cfg.on_demand_price_per_hour,
                             price_lookup=cfg.price_lookup, source=lambda: cloud.source)
        self.cost.start(self._step(newest), newest.snapshot_id if newest else None, progress=progress,
                        channel=lambda: self.child.channel if self.child is not None else None)

    # -- directory-sync mode (the logic is in syncdir.py) ------------------------------

    def _sync_restore(self, store: Store) -> None:
        """Before the first start: DIR from the newest intact sync snapshot. Raises SyncDirError, StorageError."""
        cfg = self.config
        if cfg.sync_dir is None:
            return
        self.sync = DirSync(store, cfg.run_id, cfg.sync_dir, keep_last=cfg.keep_last, settle_s=cfg.sync_settle_s,
                            scan_s=cfg.sync_scan_s, interval_s=cfg.sync_interval_s,
                            step_from=cfg.sync_step_from)  # fmt: skip
        if self.sync.restore() is None:
            log.info("run %s: no sync snapshot to restore; %s starts as it is", cfg.run_id, self.sync.dir)

    def _sync_after_exit(self, outcome: ChildExit) -> None:
        """The child ended by itself: sync what it left (a final snapshot after exit 0)."""
        if self.sync is None:
            return
        try:
            self.sync.after_exit(clean=outcome.returncode == 0)
        except StorageError as exc:
            log.warning("the sync after the child ended failed: %s", exc)
        self._sync_progress()

    def _sync_progress(self) -> None:
        """A --sync-dir child reports no step: the step its files reached stands in (the cost ledger's end)."""
        if self.sync is not None and self.sync.step is not None:
            self._last_progress = max(self._last_progress or 0, self.sync.step)

    def _sync_preempt(self, child: Child, notice: Notice) -> RunStatus:
        """A termination in sync mode: files in flight settle (until the plan's ack time), DIR is committed,
        then the child gets --sync-signal, and SIGKILL if it is still there at the plan's kill time."""
        assert self.sync is not None
        self.preemptions += 1
        self.status = RunStatus.SAVING
        now = time.monotonic()
        left = notice.seconds_left()
        left = self.config.grace_seconds if left is None else max(_MIN_NOTICE_S, left)
        self._plan = StopPlan.for_deadline(now, now + left)
        log.info("%s: %.0f s left; syncing %s, then stopping the child", notice.detail, left, self.sync.dir)

        def alive() -> bool:
            self.reaper.reap(child)
            return child.exit is None

        try:
            held = self.sync.final_sync(until=lambda: self._plan.ack_by,  # type: ignore[union-attr]
                                        wait=lambda s: self._tighten(self._next_event(s)), alive=alive)
        except StorageError as exc:
            log.warning("the last sync failed: %s", exc)
            held = None
        self._sync_progress()
        self.status = RunStatus.STOPPING
        if alive():
            log.info("%s to the child's process group", self.config.sync_signal)
            child.signal_group(self.config.sync_signal_number)
            if not self._wait_exit(child, self._plan.kill_at(time.monotonic())):
                log.warning("child pid %d still running; SIGKILL to its process group", child.pid)
                child.signal_group(signal.SIGKILL)
                self._wait_exit(child, time.monotonic() + 5.0)
        self._end_child(child)
        if held is None:
            log.warning("NO SYNC SNAPSHOT holds %s; the next start resumes from %s", self.sync.dir,
                        _describe(self._newest_or_none()))
            return RunStatus.PREEMPTED_UNSAVED
        took = time.time() - notice.received_at
        log.info("sync snapshot %s holds %s (step %d), %.1f s after the notice; preempted, the next start "
                 "restores it", held.snapshot_id, self.sync.dir, held.step, took)
        return RunStatus.PREEMPTED


def _describe(manifest: Manifest | None) -> str:
    if manifest is None:
        return "the start (no snapshot)"
    return f"snapshot {manifest.snapshot_id} (step {manifest.step}, {manifest.reason.value})"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "runner: "
        if record.levelno >= logging.ERROR:
            prefix += "error: "
        elif record.levelno >= logging.WARNING:
            prefix += "warning: "
        return prefix + record.getMessage()


@contextmanager
def _logging() -> Iterator[None]:
    """One line per event on stderr, "runner: ...", unless the caller set up logging for `runner`."""
    root = logging.getLogger("runner")
    if root.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    level, propagate = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        root.propagate = propagate
