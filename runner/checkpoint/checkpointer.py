"""`runner.Checkpointer`: the facade a training script uses (DESIGN.md 3.2).

It wires the parts and keeps little state of its own: settings -> store;
`restore()` asks the reader for the newest valid snapshot and loads it;
`step()` polls the control channel and decides when to save; saving captures
the state to host memory here (the only stall) and hands it to the
background writer, which commits it and then applies retention.

Why it is long: this is the public facade (DESIGN.md 3.2), and the save
decision, the hand-off to the writer, the ranks' agreement on a step and
restore all read and update the same few fields; the pieces it delegates
to (writer, reader, state, sharded/, retention) already live beside it.
Splitting restore and the distributed step agreement out is the next
step (docs/architecture.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch

from runner import control
from runner.control import lease
from runner.checkpoint import interval, layout, retention, state
from runner.checkpoint.manifest import Manifest, Reason
from runner.checkpoint.reader import CorruptSnapshotError, RunReader
from runner.checkpoint.settings import CheckpointSettings, observed_interruptions_from_env
from runner.checkpoint.writer import BackgroundWriter, CommitResult, PendingSnapshot, write_snapshot
from runner.errors import ConfigError, SnapshotNotFoundError, StateMismatchError
from runner.storage import StorageError, Store

log = logging.getLogger("runner.checkpoint")


class Checkpointer:
    """Saves and restores the whole training state of one run.

    Components are passed by keyword: any object with `state_dict()` and
    `load_state_dict()` (modules, optimizers, schedulers, GradScaler, data
    loaders, your own).  RNG streams are captured automatically.  `extra` is a
    dict of JSON-able values, saved with each snapshot and updated in place
    on restore.  `save_every_steps` is a number of steps or "auto" (chosen
    from the measured save cost and the interruption rate, see
    runner/checkpoint/interval.py; `interruption_mtbf_s` sets that rate).

    Raises ConfigError on bad settings, StorageError when the bucket is unusable.
    """

    def __init__(self, bucket: str | None = None, run_id: str | None = None, *,
                 save_every_steps: int | str | None = None, keep_last: int | None = None,
                 storage_options: dict[str, Any] | None = None, resume: str | None = None,
                 async_save: bool | None = None, strict: bool | None = None, keep_host_copy: bool | None = None,
                 interruption_mtbf_s: float | None = None,
                 map_location: Any = "cpu", extra: dict[str, Any] | None = None,
                 _settings: CheckpointSettings | None = None, **components: Any):
        if _settings is None:
            _settings = _build(CheckpointSettings, bucket=bucket, run_id=run_id,
                               save_every_steps=save_every_steps, keep_last=keep_last,
                               storage_options=storage_options, resume=resume,
                               async_save=async_save, strict=strict, keep_host_copy=keep_host_copy,
                               interruption_mtbf_s=interruption_mtbf_s, control_dir=_env_control_dir(),
                               observed_interruptions=observed_interruptions_from_env())
        self.settings = _settings
        self.components = _check_components(components)
        self.extra = extra if extra is not None else {}
        self.map_location = map_location
        self.store = Store(self.settings.bucket, self.settings.storage_options)
        self.store.check()
        self.reader = RunReader(self.store, self.settings.run_id)
        self.policy = retention.KeepLastN(self.settings.keep_last)
        self.channel = control.ChildChannel(self.settings.control_dir)
        control.install_signal_handlers()
        # In a torch.distributed job every rank saves the same step, sharded (checkpoint/sharded/).
        self._group = _job_group()
        # One process per machine reports progress and commits to the supervisor (torchrun's local rank 0).
        self._reports = os.environ.get("LOCAL_RANK", "0") == "0"
        self._stopped = False  # an agreed stop was saved: every rank stops
        self._writer = BackgroundWriter(self._commit)
        # The last capture's memory, lent to the writer while it writes and copied
        # into by the next capture: a 3-4x shorter stall, for one host copy of the state kept.
        self._host_buffers = _host_buffers(self.settings.keep_host_copy)
        self.epoch = 0
        self.metrics: dict[str, float] = {}
        self.finished = False
        self.last_snapshot: Manifest | None = None  # newest committed or restored
        self.last_commit: CommitResult | None = None
        self.load_reports: dict[str, state.LoadReport] = {}
        self._last_saved_step: int | None = None
        self._superseded: Manifest | None = None  # a same-step periodic snapshot the final save replaces
        # save_every_steps="auto": the interval in force, fed with step times and save costs (interval.py).
        self.auto_interval = _auto_interval(self.settings)

    @classmethod
    def from_env(cls, **kwargs: Any) -> "Checkpointer":
        """Settings from RUNNER_* (what `runner start` passes); keywords override."""
        names = set(CheckpointSettings.model_fields)
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        settings = _build(CheckpointSettings.from_env, **overrides)
        return cls(_settings=settings, **kwargs)

    @property
    def run_id(self) -> str:
        return self.settings.run_id

    # -- restore -----------------------------------------------------------

    def restore(self, snapshot: str | None = None) -> int:
        """Load the newest valid snapshot (or `snapshot`); returns the step to continue from.

        Returns 0 on a fresh run.  Corrupt or unsafe snapshots are skipped with
        a warning.  Raises StateMismatchError when a module's structure changed
        (and strict), SnapshotNotFoundError for a named snapshot that is unusable,
        StorageError when the store fails (after retries) while reading.
        """
        target = snapshot or self.settings.resume
        if target == "none":
            return 0
        named = snapshot is not None
        leader = self._group is None or self._group.is_coordinator
        candidates = self._candidates(target, named) if leader else iter(())
        while (manifest := self._next_candidate(candidates)) is not None:
            problem = self._load(manifest)
            if problem is None:
                return manifest.step
            # Not StorageError: a store that keeps failing says nothing about this snapshot,
            # and falling back (to step 0 at the end) would silently discard the run.
            if named:
                raise SnapshotNotFoundError(f"snapshot {manifest.snapshot_id} is unusable: {problem}")
            log.warning("snapshot %s (step %d) is unusable (%s); trying the previous one",
                        manifest.snapshot_id, manifest.step, problem)
        if named:
            raise SnapshotNotFoundError(f"no valid snapshot {snapshot} in run {self.run_id}")
        log.info("run %s: no snapshot yet, starting fresh", self.run_id)
        return 0

    def _next_candidate(self, candidates) -> Manifest | None:
        """The next snapshot to try; in a job, rank 0's choice on every rank (all must load the same one)."""
        if self._group is None:
            return next(candidates, None)
        choice: tuple[str, Any] = ("end", None)
        if self._group.is_coordinator:
            try:
                manifest = next(candidates, None)
                choice = ("try", manifest.snapshot_id) if manifest is not None else ("end", None)
            except Exception as exc:  # the other ranks wait for an answer: give them the error
                choice = ("raise", exc)
        kind, value = self._group.broadcast(choice)
        if kind == "raise":
            raise value
        return self.reader.load_manifest(value) if kind == "try" else None

    def _load(self, manifest: Manifest) -> str | None:
        """Load one snapshot, either layout; None when loaded, else why not (agreed by every rank)."""
        problem = None
        try:
            if manifest.sharded:
                from runner.checkpoint import sharded

                group = self._group or sharded.Group(local=True)
                sharded.load(self.reader, manifest, group, self.components, self.settings.strict)
                self._adopt(manifest)
            else:
                self._apply(manifest, self._read_states(manifest))
        except (CorruptSnapshotError, state.UnsafeDataError) as exc:
            problem = str(exc)
        if self._group is not None and self._group.agree(int(problem is not None)) and problem is None:
            problem = "another rank could not load it"
        return problem

    def _candidates(self, target: str, named: bool):
        if target != "latest":
            status = self.reader.status(target)
            if status.valid:
                yield status.manifest
            elif named:
                raise SnapshotNotFoundError(f"snapshot {target} of run {self.run_id}: {status.problem}")
            else:
                log.warning("resume snapshot %s is not usable (%s); using the newest valid one", target, status.problem)
        yield from self.reader.valid_snapshots()

    def _read_states(self, manifest: Manifest) -> dict[str, Any]:
        """Verify and deserialize every registered component (and RNG) before touching any."""
        entries = []
        for name in [*self.components, state.RNG_COMPONENT]:
            entry = manifest.file(name)
            if entry is None:
                if name == state.RNG_COMPONENT or not self.settings.strict:
                    log.warning("snapshot %s has no component %r; it keeps its current state", manifest.snapshot_id, name)
                    continue
                saved = ", ".join(f.component for f in manifest.files if f.component != state.RNG_COMPONENT)
                raise StateMismatchError(
                    f"snapshot {manifest.snapshot_id} has no component {name!r} (it has: {saved}); "
                    "pass strict=False to start that component from its initialization")
            entries.append(entry)
        states: dict[str, Any] = {}
        for entry, data in self.reader.read_files(manifest, entries):  # fetched ahead, checked, in order
            states[entry.component] = state.deserialize(data, self.map_location)
            del data
            state.check_kind(entry.component, self.components.get(entry.component), states[entry.component])
        return states

    def _apply(self, manifest: Manifest, states: dict[str, Any]) -> None:
        for name, value in states.items():
            obj = self.components.get(name)
            report = state.load_into(name, obj, value, self.settings.strict)
            if not report.clean:
                log.warning("component %r restored non-strictly; left at initialization: %s", name, report.describe())
            self.load_reports[name] = report
        self._adopt(manifest)

    def _adopt(self, manifest: Manifest) -> None:
        """Take the restored snapshot's step, epoch, metrics and extras."""
        self.extra.clear()
        self.extra.update(manifest.extra)
        self.epoch, self.metrics = manifest.epoch, dict(manifest.metrics)
        self.finished = manifest.final
        self.last_snapshot = manifest
        self._last_saved_step = manifest.step
        log.info("run %s: restored snapshot %s (step %d, epoch %d)", self.run_id, manifest.snapshot_id,
                 manifest.step, manifest.epoch)

    # -- the training loop's hook -------------------------------------------

    def step(self, step: int, *, epoch: int | None = None, metrics: dict[str, float] | None = None) -> bool:
        """Call once per training step. Saves when due; True means: stop now (preempted).

        A periodic save that fails is logged and retried at the next interval;
        training goes on.  An emergency save that fails raises StorageError.
        When another instance has taken the run over (a newer lease), nothing
        more is committed and True is returned.
        """
        try:
            return self._step(step, epoch, metrics)
        except lease.LeaseLostError as exc:
            log.error("%s; stopping", exc)
            return True

    def _step(self, step: int, epoch: int | None, metrics: dict[str, float] | None) -> bool:
        if self.auto_interval is not None:
            self.auto_interval.tick()
        if self._reports:
            self.channel.progress(step)
        request = self.channel.poll()
        if self._group is not None:
            return self._step_agreed(step, epoch, metrics, request)
        if request is not None:
            reason = Reason.EMERGENCY if request.action == control.STOP else Reason.MANUAL
            result = self.save(step, epoch=epoch, metrics=metrics, reason=reason)
            self.channel.ack(request, result.manifest.snapshot_id, step)
            return request.action == control.STOP
        if control.preemption_requested():
            return True  # already answered with an emergency snapshot: just stop
        if self._due(step):
            self._periodic(self._save_async, step, epoch, metrics)
        return False

    def _step_agreed(self, step: int, epoch: int | None, metrics: dict[str, float] | None,
                     request: control.Request | None) -> bool:
        """A job's step boundary: one tiny all-reduce, so that every rank saves (and stops) at the same step.

        A notice reaches the ranks of one machine; the vote carries it to
        every rank of every machine.  After an agreed stop, the ranks that had
        no request of their own tell their supervisor that the job stopped
        for a peer (control.ChildChannel.peer_stopped).
        """
        if self._stopped:
            return True
        stop = (request is not None and request.action == control.STOP) or control.preemption_requested()
        # An automatic interval is measured on each rank: rank 0's decision is the job's, carried by the vote.
        periodic = self._due(step) and (self.auto_interval is None or self._group.is_coordinator)
        agreed = self._group.agree(_STOP if stop else _SAVE if request is not None else _PERIODIC if periodic else _GO)
        if agreed in (_GO, _PERIODIC):
            if agreed == _PERIODIC:
                save = self._save_sharded_async if self.settings.async_save else self._save_periodic_now
                self._periodic(save, step, epoch, metrics)
            return False
        result = self.save(step, epoch=epoch, metrics=metrics,
                           reason=Reason.EMERGENCY if agreed == _STOP else Reason.MANUAL)
        request = request or self.channel.poll()  # a signal that reached this rank during the save
        if request is not None:
            self.channel.ack(request, result.manifest.snapshot_id, step)
        elif agreed == _STOP:
            self.channel.peer_stopped(result.manifest.snapshot_id, step)
        self._stopped = agreed == _STOP
        return self._stopped

    def _save_periodic_now(self, step: int, epoch: int | None, metrics: dict[str, float] | None) -> None:
        try:
            self.save(step, epoch=epoch, metrics=metrics, reason=Reason.PERIODIC)
        except StorageError as exc:  # every rank gets the same error: all go on
            log.warning("periodic save at step %d failed (%s); training goes on", step, exc)

    def _due(self, step: int) -> bool:
        every = self.settings.save_every_steps
        if self.auto_interval is not None:  # "auto": the interval changes, so it counts from the last save
            return self.auto_interval.due(step, self._last_saved_step)
        # Periodic saves land on multiples of the interval, whatever emergency
        # saves or resumes happened in between, so a run's snapshots line up.
        return step // every > (self._last_saved_step or 0) // every

    def _periodic(self, save: Any, step: int, epoch: int | None, metrics: dict[str, float] | None) -> None:
        """Make a periodic save; with an automatic interval, its stall (all the time it took here) is measured."""
        started = time.perf_counter()
        save(step, epoch, metrics)
        if self.auto_interval is not None:
            self.auto_interval.saved(time.perf_counter() - started)

    def _save_async(self, step: int, epoch: int | None, metrics: dict[str, float] | None) -> None:
        try:
            self._writer.wait()
        except StorageError as exc:
            log.warning("the previous periodic save failed (%s); training goes on, next try at step %d", exc, step)
        pending = self._capture(step, epoch, metrics, Reason.PERIODIC)
        if self.settings.async_save:
            self._writer.submit(pending)
        else:
            self._commit(pending)

    def save(self, step: int, *, epoch: int | None = None, metrics: dict[str, float] | None = None,
             final: bool = False, reason: Reason | str | None = None, pin: bool = False) -> CommitResult:
        """Save now and wait until committed. `final=True` marks the run finished.

        A final save at the step of the periodic save just made writes one
        snapshot, not two: the periodic one, still in flight, is committed as
        final; one already committed is removed once the final one is.
        """
        chosen = Reason.FINAL if final else Reason(reason or Reason.MANUAL)
        if self.auto_interval is not None:
            self.auto_interval.interrupted()  # this step's time is not a training step's
        result = self._finish_inflight(step, epoch, metrics) if final and self._group is None else None
        if result is None:
            try:
                self._writer.wait()
            except StorageError as exc:
                log.warning("the previous periodic save failed (%s); saving again now", exc)
            # Removed by _committed, before retention counts it as one of the snapshots kept.
            self._superseded = self._same_step_periodic(step) if final else None
            if self._group is not None:
                result = self._commit_sharded(step, epoch, metrics, chosen)
            else:
                result = self._commit(self._capture(step, epoch, metrics, chosen))
            self._superseded = None
        if pin and (self._group is None or self._group.is_coordinator):
            self.pin(result.manifest.snapshot_id)
        if final:
            self.finished = True
        return result

    def _finish_inflight(self, step: int, epoch: int | None, metrics: dict[str, float] | None) -> CommitResult | None:
        """Commit the periodic save of `step` still in flight as the final one; None when there is none (or it failed)."""
        pending = self._writer.pending()
        if pending is None or pending.step != step or not pending.upgrade(Reason.FINAL, epoch, metrics):
            return None
        if epoch is not None:
            self.epoch = int(epoch)
        try:
            return self._writer.wait()
        except StorageError as exc:
            log.warning("the periodic save at step %d, made final, failed (%s); saving again now", step, exc)
            return None

    def _same_step_periodic(self, step: int) -> Manifest | None:
        """The periodic snapshot this process committed at `step`, which a final save there supersedes."""
        last = self.last_commit.manifest if self.last_commit else None
        return last if last is not None and last.step == step and last.reason is Reason.PERIODIC else None

    def _drop_superseded(self, manifest: Manifest) -> None:
        """Remove a snapshot of the same step as the one just committed (manifest first), unless pinned."""
        try:
            if manifest.snapshot_id not in self.reader.pinned():
                retention.apply(self.reader, retention.GcPlan([manifest], [], []))
        except StorageError as exc:
            log.warning("could not remove snapshot %s, superseded by the final one: %s", manifest.snapshot_id, exc)

    def pin(self, snapshot_id: str) -> None:
        """Keep a snapshot out of rotation (see `runner pin`)."""
        self.store.write_bytes(layout.pin_key(self.run_id, snapshot_id), b"")

    def _capture(self, step: int, epoch: int | None, metrics: dict[str, float] | None, reason: Reason) -> PendingSnapshot:
        _check_json(self.extra)
        started = time.perf_counter()
        components = state.capture(self.components, self._host_buffers)
        self._last_saved_step = step
        return self._pending(step, epoch, metrics, reason, components, time.perf_counter() - started)

    def _pending(self, step: int, epoch: int | None, metrics: dict[str, float] | None, reason: Reason,
                 components: dict[str, Any], capture_seconds: float) -> PendingSnapshot:
        if epoch is not None:
            self.epoch = int(epoch)
        if metrics:
            self.metrics = {k: float(v) for k, v in metrics.items()}
        parent = self.last_snapshot.snapshot_id if self.last_snapshot else None
        return PendingSnapshot(step=step, reason=reason, components=components, epoch=self.epoch,
                               parent=parent, world_size=_world_size(), metrics=dict(self.metrics),
                               extra=json.loads(json.dumps(self.extra)), capture_seconds=capture_seconds,
                               sharded=self._group is not None, release=self._releaser(components))

    def _releaser(self, components: dict[str, Any]):
        buffers = self._host_buffers
        return (lambda: buffers.give_back(components)) if buffers is not None else None

    def _commit(self, pending: PendingSnapshot) -> CommitResult:
        """Write, then apply retention (only after this commit succeeded)."""
        background = pending.reason is Reason.PERIODIC and self.settings.async_save  # before an upgrade to final
        result = write_snapshot(self.store, self.run_id, pending, fence=self._fence)
        blocking = not background
        self._committed(result, blocking)
        return result

    def _save_sharded_async(self, step: int, epoch: int | None, metrics: dict[str, float] | None) -> None:
        """Every rank: spool this step's shards (the stall), then publish and commit on the writer thread."""
        try:
            self._writer.wait()  # every rank gets the same outcome of the commit in flight
        except StorageError as exc:
            log.warning("the previous periodic save failed (%s); training goes on, next try at step %d", exc, step)
        pending, spooled, save_number = self._spool(step, epoch, metrics, Reason.PERIODIC)
        self._writer.submit(pending, commit=lambda p: self._commit_spooled(spooled, p, save_number, blocking=False))

    def _commit_sharded(self, step: int, epoch: int | None, metrics: dict[str, float] | None,
                        reason: Reason) -> CommitResult:
        """Every rank: save this step's shards; rank 0 commits (checkpoint/sharded/). Blocks training."""
        pending, spooled, save_number = self._spool(step, epoch, metrics, reason)
        return self._commit_spooled(spooled, pending, save_number, blocking=True)

    def _spool(self, step: int, epoch: int | None, metrics: dict[str, float] | None, reason: Reason) -> tuple:
        from runner.checkpoint import sharded
        from runner.checkpoint.writer import next_save_number

        _check_json(self.extra)
        started = time.perf_counter()
        self._last_saved_step = step  # a failed periodic save is tried again at the next interval
        pending = self._pending(step, epoch, metrics, reason, components={}, capture_seconds=0.0)
        save_number = next_save_number()
        spooled = sharded.spool(self._group, self.components, step, save_number)
        pending.capture_seconds = time.perf_counter() - started
        return pending, spooled, save_number

    def _commit_spooled(self, spooled: Any, pending: PendingSnapshot, save_number: int,
                        blocking: bool) -> CommitResult:
        from runner.checkpoint import sharded

        started = time.perf_counter()
        manifest = sharded.commit(self.store, self.run_id, self._group, spooled, pending, save_number,
                                  fence=self._fence)
        result = CommitResult(manifest, pending.capture_seconds, write_seconds=time.perf_counter() - started)
        self._committed(result, blocking, leader=self._group.is_coordinator)
        return result

    def _committed(self, result: CommitResult, blocking: bool, leader: bool = True) -> None:
        """Record a commit, report it to the supervisor, and apply retention (the leader only)."""
        manifest = result.manifest
        self.last_snapshot = manifest
        self.last_commit = result
        if self.auto_interval is not None and not blocking and manifest.reason is Reason.PERIODIC:
            self.auto_interval.committed(result.write_seconds)
        self._last_saved_step = manifest.step
        log.info("run %s: committed snapshot %s (step %d, %s) in %.2fs", self.run_id, manifest.snapshot_id,
                 manifest.step, manifest.reason.value, result.write_seconds)
        if self._reports:
            self.channel.committed(manifest.snapshot_id, manifest.step, manifest.reason.value,
                                   stall_s=result.capture_seconds + (result.write_seconds if blocking else 0.0),
                                   write_s=result.write_seconds)  # for the cost ledger
        if not leader:
            return
        if self._superseded is not None and manifest.reason is Reason.FINAL:
            self._drop_superseded(self._superseded)
        try:
            retention.apply(self.reader, retention.plan(self.reader, self.policy,
                                                        protect={manifest.snapshot_id}))
        except StorageError as exc:
            log.warning("retention skipped: %s", exc)

    def _fence(self) -> None:
        """Refuse to commit once another instance holds a newer lease on the run (see runner.control.lease)."""
        lease.fence(self.store, self.run_id)

    def wait(self) -> CommitResult | None:
        """Block until the periodic save in flight (if any) is committed."""
        return self._writer.wait()

    def close(self) -> None:
        """Wait for the save in flight and release the writer thread (and the host copy kept for reuse)."""
        try:
            self._writer.close()
        finally:
            if self._host_buffers is not None:
                self._host_buffers.take()
            if self._group is not None:
                self._group.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def preemption_requested() -> bool:
    """True once the supervisor (or a user's SIGUSR1) asked the process to save and stop."""
    return control.preemption_requested()


def _build(factory: Any, **values: Any) -> CheckpointSettings:
    from pydantic import ValidationError

    values = {k: v for k, v in values.items() if v is not None}
    if not values.get("bucket") and factory is CheckpointSettings:
        raise ConfigError("no bucket: pass bucket=... or set RUNNER_BUCKET")
    try:
        return factory(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        hint = " (set RUNNER_BUCKET or pass bucket=...)" if field == "bucket" else ""
        raise ConfigError(f"invalid {field}: {first['msg']}{hint}") from None


def _env_control_dir() -> str | None:
    return os.environ.get(control.ENV_CONTROL_DIR) or None


def _check_components(components: dict[str, Any]) -> dict[str, Any]:
    for name, obj in components.items():
        if name.startswith("_") or not layout.valid_run_id(name):
            raise ConfigError(f"component name {name!r} is not allowed: use letters, digits, '.', '_', '-'")
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise ConfigError(f"component {name!r} has no state_dict()/load_state_dict(); put plain values in extra=")
    return components


def _check_json(extra: dict[str, Any]) -> None:
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"extra= must hold JSON-able values only: {exc}") from None


_GO, _PERIODIC, _SAVE, _STOP = 0, 1, 2, 3  # a rank's vote at a step boundary; the largest wins


def _auto_interval(settings: CheckpointSettings) -> interval.AutoInterval | None:
    if settings.save_every_steps != control.AUTO:
        return None
    mtbf = interval.estimate_mtbf(settings.interruption_mtbf_s, settings.observed_interruptions)
    return interval.AutoInterval(mtbf)


def _job_group() -> Any:
    """The job's ranks (sharded.Group) in a torch.distributed job, else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from runner.checkpoint import sharded

    return sharded.Group()


def _host_buffers(keep: bool | None) -> state.HostBuffers | None:
    """The kept host copy: always (True), never (False), or up to a share of physical memory (None)."""
    if keep is False:
        return None
    return state.HostBuffers(None if keep else state.host_copy_limit())


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
