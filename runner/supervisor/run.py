"""`supervise(config) -> int`: the loop behind `runner start`.

Owns the order of things: open the store; stop at once if the run is
finished; start the child from the newest valid snapshot; react to its exit
(finished, crash -> restart policy) and to notices (termination ->
emergency snapshot, then stop; rebalance -> proactive snapshot); end with
one status and its exit code (status.py).  Processes live in child.py,
rules in policy.py, event sources in watchers.py, every wait in
waiting.py, what a notice does to a running child in stopping.py, the
endings that need no process handling in endings.py.

The main thread blocks on one event queue (waiting.Events: notices,
SIGCHLD, or a timeout it chose), so an idle supervisor costs nothing; it
polls only while it waits for an acknowledgement (every 0.1 s, for
seconds) or for a proactive save (every 0.5 s).

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
   says why).  Steps 1-4 are stopping.py.

In a multi-node torchrun job (launch.py) each machine has its own
supervisor.  A notice reaches one of them; the ranks agree at the next step
boundary (checkpoint/checkpointer.py), every rank saves the same step, and
the job ends everywhere.  The supervisors that asked for nothing learn from
the child's peer-stopped.json that the job stopped for a peer, and exit 76
(PEER_STOPPED) instead of taking the job's exit 0 for the end of training.
The run lease is not taken there: torchrun's rendezvous admits one job of
`--nnodes` machines, and every machine's supervisor holds the run at once.

In directory-sync mode (--sync-dir, syncdir/) the child knows nothing of
us: DIR is restored before the first start, synced in the background while
the child runs and once more when it ends; a termination lets the files in
flight settle, commits DIR, then stops the child with --sync-signal.  The
hooks are the `_sync_*` methods at the end of the class (and
stopping.py's `_sync_preempt`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future

from runner.checkpoint.manifest import Manifest
from runner.control import AUTO
from runner.checkpoint.reader import RunReader
from runner.control.lease import ENV_LEASE_GENERATION
from runner.cost.hook import CostHook, NoCostHook
from runner.notices import Notice, NoticeKind
from runner.rendezvous import RendezvousUnavailable, rendezvous_id
from runner.storage import StorageError, Store
from runner.supervisor import endings, logs, scale_down
from runner.supervisor.child import Child, ChildExit, ChildStartError, Reaper, become_subreaper, child_env, new_control_dir
from runner.supervisor.config import StartConfig
from runner.supervisor.endings import describe, step_of
from runner.supervisor.launch import child_command, multi_node
from runner.supervisor.leasing import LEASE_LOST, LeaseKeeper
from runner.supervisor.policy import CrashTracker, RestartPolicy, StopPlan
from runner.supervisor.status import RunStatus
from runner.supervisor.stopping import Stopping
from runner.supervisor.syncdir import DirSync, SyncDirError
from runner.supervisor.waiting import Events, is_termination
from runner.supervisor.watchers import CloudWatcher, NoticeSourceError, SignalWatcher, plan_source

log = logging.getLogger("runner.supervisor")

_IDLE_WAKE_S = 30.0  # a safety net only: every event wakes the loop by itself
_SAVE_POLL_S = 0.5


def supervise(config: StartConfig) -> int:
    """Run `config.command` under supervision until it finishes, fails for good, or is preempted.

    Returns the exit code (status.py: 0, 1, 2, 75 or 76).  Call from the main
    thread of a process of its own: it installs signal handlers, and it
    becomes a child subreaper that reaps every descendant.  Errors a user
    can cause are logged as one line and turned into an exit code; nothing
    is raised for them.
    """
    with logs.to_stderr():
        supervisor = Supervisor(config)
        status = supervisor.run()
        code = int(status.exit_code)
        log.info("exit %d (%s): crashes %d, restarts %d, preemptions %d, proactive saves %d", code, status.value,
                 supervisor.tracker.crashes, supervisor.tracker.restarts, supervisor.preemptions,
                 supervisor.proactive_saves)
        scale_down.after_run(config.scale_down_group, status in (RunStatus.FINISHED, RunStatus.ALREADY_FINISHED))
        return code


class Supervisor(Stopping):
    """One `runner start`: counters, the current child, and the loop (the termination path: stopping.py)."""

    def __init__(self, config: StartConfig):
        self.config = config
        self.events = Events(reap=lambda: self.reaper.reap(self.child))  # every wait: waiting.py
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
        self._peer_stop: dict | None = None  # the last child stopped for another node's notice (control/protocol.py)
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
        signals = SignalWatcher(cfg.grace_seconds, self.events.queue).install()
        try:
            try:
                store = Store(cfg.bucket, cfg.storage_options)
                store.check()
                self.reader = RunReader(store, cfg.run_id)
                if multi_node(cfg):
                    log.info("run %s: one of up to %d nodes; the rendezvous admits one job, so no run lease is taken",
                             cfg.run_id, cfg.max_nodes)
                else:
                    self.lease = LeaseKeeper(store, cfg.run_id, self.events.queue, ttl_s=cfg.lease_ttl_s)
                    with self.events.holding():  # a rebalance meanwhile is for the child, once it runs
                        notice = self.lease.acquire(self.events.sleep)
                    if notice is not None:
                        log.warning("%s while waiting for the run's lease; nothing to save", notice.detail)
                        return RunStatus.PREEMPTED_UNSAVED
                newest = endings.newest(self.reader)  # read after the lease: the previous holder may have committed more
            except StorageError as exc:
                return endings.storage_failed(exc, at_start=True)
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
                return endings.storage_failed(exc, at_start=True)
            self.reaper = Reaper(reap_all=become_subreaper())
            cloud = CloudWatcher(planned, cfg.poll_interval_s, self.events.queue).start()
            self._start_cost(store, newest, cloud)
            try:
                return self._loop(newest)
            except StorageError as exc:
                return endings.storage_failed(exc, at_start=False)
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
            notice = self.events.termination_pending()
            if notice is not None:
                return self._unsaved(notice, "before the child started", resume)
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
            newest = endings.newest(self.reader)
            if self._peer_stop is not None and not (newest is not None and newest.final):
                return endings.peer_stopped(self._peer_stop, outcome, newest)
            if outcome.returncode == 0 or (newest is not None and newest.final):
                return endings.finished(self.config.run_id, outcome, newest)
            log.error("child %s", outcome.describe())
            decision = self.tracker.record_crash(step_of(resume), step_of(newest))
            if not decision.restart:
                log.error("%s", decision.reason)
                return decision.status or RunStatus.FAILED
            self.cost.crash(self._last_progress, step_of(newest), outcome.returncode)
            log.info("restart %d/%d in %.1f s, from %s", self.tracker.restarts, self.config.max_restarts,
                     decision.delay_s, describe(newest))
            stopped = self._backoff(decision.delay_s, newest)
            if stopped is not None:
                return stopped
            resume = newest

    # -- waiting while no child runs (every wait is waiting.Events.wait) -------------

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
        notice = self.events.wait(done=answer.done, poll_s=0.2)  # a rebalance is kept for the child
        if notice is not None:
            return self._unsaved(notice, f"while asking the rendezvous store at {cfg.rdzv_endpoint}", resume)
        try:
            return answer.result()
        except RendezvousUnavailable as exc:
            log.error("%s", exc)
            return RunStatus.FAILED

    def _backoff(self, delay_s: float, resume: Manifest | None) -> RunStatus | None:
        self.status = RunStatus.BACKOFF

        def heard(notice: Notice) -> bool:
            if not is_termination(notice):
                log.info("%s during the restart backoff: the newest snapshot is current already", notice.detail)
            return is_termination(notice)

        notice = self.events.sleep(delay_s, on_notice=heard)
        return None if notice is None else self._unsaved(notice, "during the restart backoff", resume)

    def _unsaved(self, notice: Notice, when: str, resume: Manifest | None) -> RunStatus:
        """A termination while no child runs: nothing to save, stop now."""
        self.preemptions += 1
        log.warning("%s %s: no child is running, nothing to save; the next start resumes from %s",
                    notice.detail, when, describe(resume))
        return RunStatus.PREEMPTED_UNSAVED

    # -- one child ----------------------------------------------------------------

    def _start_child(self, resume: Manifest | None, rdzv_id: str | None = None) -> Child:
        cfg = self.config
        control_dir = new_control_dir()
        auto = cfg.save_every_steps == AUTO and cfg.interruption_mtbf_s is None  # the ledger's rate is wanted
        env = child_env(os.environ, bucket=cfg.bucket, run_id=cfg.run_id, save_every_steps=cfg.save_every_steps,
                        keep_last=cfg.keep_last, storage_options=cfg.storage_options,
                        resume=resume.snapshot_id if resume else "none", control_dir=control_dir,
                        interruption_mtbf_s=cfg.interruption_mtbf_s,
                        observed_interruptions=self.cost.interruptions() if auto else None)  # fmt: skip
        if self.lease is not None and self.lease.generation is not None:
            env[ENV_LEASE_GENERATION] = str(self.lease.generation)
        if resume is not None:
            log.info("run %s: resuming from %s", cfg.run_id, describe(resume))
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
            event = self.events.next(_SAVE_POLL_S if self._pending_save else _IDLE_WAKE_S)
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
        self.cost.start(step_of(newest), newest.snapshot_id if newest else None, progress=progress,
                        channel=lambda: self.child.channel if self.child is not None else None)

    # -- directory-sync mode (the logic is in syncdir/) ------------------------------

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
