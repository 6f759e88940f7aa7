"""The drill itself: a reference run, a plan, the interrupted run instance by instance, the comparison.

Owns the order of things and the accounting: which step each interruption
hit, what the instance committed on its way out, the step the next instance
resumed from, the steps redone and the time to resume.  Instances are in
runner/sim/instance.py, the comparison in compare.py, the report's shape in report.py.

Why interruptions are planned this way: K instants are drawn with
random.Random(seed), uniformly over the reference run's training time (from
its first step to its end, less the time a notice takes to be seen: a poll
interval and the progress report's period), and each becomes the step the
reference had reached then.  An instance is interrupted when it reports that
step (or at its first step, when it resumed past it).  A ``kill-upload``
becomes the first save at or after that step: the drill counts the saves the
instance will make (periodic ones land on multiples of the interval, read
off the reference run's snapshots; then the final one) and sets the writer's
fault point to that n-th save.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runner.checkpoint import layout
from runner.checkpoint.manifest import Reason
from runner.checkpoint.reader import CorruptSnapshotError, RunReader, newest_preferring_final as newest
from runner.sim.drill.compare import compare_final, final_snapshot
from runner.sim.instance import Instance, Watched, instance_env, local_bucket, supervisor_argv, watch
from runner.sim.drill.report import DrillReport, Interruption, RunResult
from runner.errors import ConfigError
from runner.storage import Store
from runner.supervisor.config import StartConfig

log = logging.getLogger("runner.sim.drill")

Kind = Literal["notice", "sigterm", "kill-upload"]
KINDS: tuple[Kind, ...] = ("notice", "sigterm", "kill-upload")


class DrillConfig(BaseModel):
    """`runner drill`'s settings, validated once (the CLI builds it)."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=1)
    command: list[str] = Field(min_length=1)
    interruptions: int = Field(default=3, ge=1, le=100)
    seed: int | None = None  # None: drawn at random, and reported
    kinds: tuple[Kind, ...] = Field(default=KINDS, min_length=1)
    run_prefix: str | None = None  # None: drill-<UTC time>-<random>
    storage_options: dict[str, Any] = Field(default_factory=dict)
    save_every_steps: int | None = Field(default=None, ge=1)  # passed to `runner start` when set
    ignore: tuple[str, ...] = ()  # components allowed to differ
    poll_interval_s: float = Field(default=0.5, gt=0, le=5)  # the supervisors' metadata polling
    # An interrupted attempt that runs longer than this is killed (default: 5x the reference + 60 s).
    attempt_timeout_s: float | None = Field(default=None, gt=0)

    @field_validator("run_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None and not layout.valid_run_id(f"{value}-interrupted"):
            raise ValueError("use letters, digits, '.', '_' and '-' (at most 116), starting with a letter or digit")
        return value


def parse_kinds(text: str) -> tuple[Kind, ...]:
    """`"notice,sigterm"` -> ("notice", "sigterm"); raises ConfigError for an unknown kind."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds:
        raise ConfigError(f"--kinds is empty: use some of {', '.join(KINDS)}")
    for kind in kinds:
        if kind not in KINDS:
            raise ConfigError(f"unknown interruption kind {kind!r}: use {', '.join(KINDS)} (comma-separated)")
    return tuple(dict.fromkeys(kinds))  # type: ignore[arg-type]


def _snapshot_ids(reader: RunReader) -> tuple[set[str], set[str]]:
    """(ids with a manifest, ids with data)."""
    manifests = set(reader.snapshot_ids())
    data = {layout.snapshot_id_from_data_key(reader.run_id, o.key)
            for o in reader.store.list(layout.data_prefix(reader.run_id))}  # fmt: skip
    return manifests, {d for d in data if d}


def save_interval(reader: RunReader) -> int | None:
    """The periodic save interval, read off a run's periodic snapshots (they land on its multiples)."""
    steps = [m.step for m in reader.valid_snapshots() if m.reason is Reason.PERIODIC and m.step > 0]
    return math.gcd(*steps) if steps else None


@dataclass(frozen=True)
class _Planned:
    kind: str
    step: int  # the step the reference run had reached at the drawn instant


class _Drill:
    def __init__(self, cfg: DrillConfig):
        self.cfg = cfg
        self.bucket = local_bucket(cfg.bucket)
        self.store = Store(self.bucket, cfg.storage_options)
        self.seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
        prefix = cfg.run_prefix or f"drill-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        self.ref_reader = RunReader(self.store, f"{prefix}-reference")
        self.reader = RunReader(self.store, f"{prefix}-interrupted")
        self.work = Path(".")  # set by run()
        self.report = DrillReport(bucket=self.bucket, command=list(cfg.command), seed=self.seed,
                                  reference=RunResult(self.ref_reader.run_id),
                                  interrupted=RunResult(self.reader.run_id))  # fmt: skip
        self._live: Instance | None = None
        self._count = 0

    # -- the whole drill ------------------------------------------------------

    def run(self) -> DrillReport:
        self.store.check()
        for reader in (self.ref_reader, self.reader):
            if reader.snapshot_ids():
                raise ConfigError(f"run {reader.run_id} already has snapshots in {self.bucket}: "
                                  "choose another --run-prefix")  # fmt: skip
        self.work = Path(tempfile.mkdtemp(prefix="runner-drill-"))
        log.info("drill: seed %d; runs %s and %s in %s; instance output in %s (kept if the drill fails)",
                 self.seed, self.ref_reader.run_id, self.reader.run_id, self.bucket, self.work)
        try:
            self._drill()
        finally:
            if self._live is not None:
                self._live.stop()
            if self.report.problems or not self.report.identical:
                self.report.logs = str(self.work)
            else:
                shutil.rmtree(self.work, ignore_errors=True)
        return self.report

    def _drill(self) -> None:
        reference = self._reference()
        if reference is None:
            return
        timeline, total = reference
        rng = random.Random(self.seed)
        plan = self._plan(rng, timeline, total)
        interval = save_interval(self.ref_reader) or self.cfg.save_every_steps
        if not self._interrupted(plan, interval, total):
            return
        self._compare()

    def _reference(self) -> tuple[list[tuple[float, int]], int] | None:
        log.info("drill: reference run %s, uninterrupted: %s", self.ref_reader.run_id, " ".join(self.cfg.command))
        seen = self._instance(self.ref_reader, "reference")
        result = self.report.reference
        result.attempts, result.seconds, result.first_step_seconds = 1, seen.seconds, seen.first_step_s
        if seen.exit_code == 2:  # bad usage or configuration: the command cannot start, a bad setting
            raise ConfigError(f"runner start refused to run it (exit 2){self._tail('reference', 1)}")
        if seen.exit_code != 0:
            self._problem(f"the reference run failed: runner start exited {seen.exit_code}{self._tail('reference')}")
            return None
        final = final_snapshot(self.ref_reader)
        if final is None:
            self._problem("the reference run ended without a final snapshot: the command must call "
                          "ckpt.save(step, final=True) when it finishes")  # fmt: skip
            return None
        result.final_snapshot, result.final_step = final.snapshot_id, final.step
        if not seen.timeline:
            self._problem("the command never reported a step: it must call ckpt.step(step) in its training loop "
                          "(runner.Checkpointer), which the drill uses to aim its interruptions")  # fmt: skip
            return None
        log.info("drill: reference finished at step %d in %.1f s (first step after %.1f s)", final.step,
                 seen.seconds, seen.first_step_s or 0.0)
        return seen.timeline, final.step

    def _plan(self, rng: random.Random, timeline: list[tuple[float, int]], total: int) -> list[_Planned]:
        kinds = [self.cfg.kinds[i % len(self.cfg.kinds)] for i in range(self.cfg.interruptions)]
        rng.shuffle(kinds)
        start, end = timeline[0][0], timeline[-1][0]
        # A notice takes up to a poll interval to be seen, and progress is reported every 0.2 s.
        lo = start + 0.05 * (end - start)
        hi = max(lo, end - (self.cfg.poll_interval_s + 1.0))
        instants = sorted(rng.uniform(lo, hi) for _ in kinds)
        plan = [_Planned(kind, min(max(1, _step_at(timeline, t)), total)) for kind, t in zip(kinds, instants)]
        log.info("drill: plan: %s", ", ".join(f"{p.kind} at step ~{p.step}" for p in plan))
        return plan

    def _interrupted(self, plan: list[_Planned], interval: int | None, total: int) -> bool:
        result = self.report.interrupted
        previous: Interruption | None = None
        for index, planned in enumerate(plan, 1):
            resume = newest(self.reader)
            resume_step = resume.step if resume else 0
            if resume is not None and resume.final:
                self.report.interruptions.append(Interruption(index, planned.kind, planned.step,
                                                              note="skipped: the run had already finished"))
                continue
            interruption, seen = self._interrupt(index, planned, resume_step, interval, total)
            self.report.interruptions.append(interruption)
            result.attempts += 1
            result.seconds += seen.seconds
            if previous is not None:
                previous.resume_seconds = seen.first_step_s
            expected = (0, 75, -signal.SIGKILL) if planned.kind == "kill-upload" else (0, 75)
            if seen.timed_out or seen.exit_code not in expected:
                self._problem(f"instance {self._count} ({planned.kind}) {self._ended(seen)}{self._tail(self._name())}")
                return False
            previous = interruption if interruption.happened else None
        if final_snapshot(self.reader) is None:
            log.info("drill: instance %d resumes %s and runs to the end", self._count + 1, self.reader.run_id)
            seen = self._instance(self.reader, f"instance-{self._count + 1}", resume_step=self._resume_step(),
                                  timeout=True)
            result.attempts += 1
            result.seconds += seen.seconds
            if previous is not None:
                previous.resume_seconds = seen.first_step_s
            if seen.timed_out or seen.exit_code != 0:
                self._problem(f"the last instance {self._ended(seen)}{self._tail(self._name())}")
                return False
        final = final_snapshot(self.reader)
        if final is None:
            self._problem(f"run {self.reader.run_id} has no final snapshot after its last instance")
            return False
        result.final_snapshot, result.final_step = final.snapshot_id, final.step
        return True

    def _interrupt(self, index: int, planned: _Planned, resume_step: int, interval: int | None,
                   total: int) -> tuple[Interruption, Watched]:  # fmt: skip
        target = max(planned.step, resume_step + 1)
        before_manifests, before_data = _snapshot_ids(self.reader)
        fault = None
        if planned.kind == "kill-upload":
            nth, target = _nth_save(resume_step, target, interval, total)
            fault = f"mid-data:{nth}"
        item = Interruption(index, planned.kind, target)
        log.info("drill: instance %d: %s at step %d (resuming from step %d)", self._count + 1, planned.kind,
                 target, resume_step)
        seen = self._instance(self.reader, f"instance-{self._count + 1}", resume_step=resume_step,
                              kind=planned.kind, fire_at=None if fault else target, fault=fault, timeout=True)
        item.exit_code = seen.exit_code
        manifests, data = _snapshot_ids(self.reader)
        new = [self.reader.status(sid) for sid in sorted(manifests - before_manifests)]
        torn = [layout.step_of(sid) for sid in (data - before_data) - manifests]
        emergency = [s.manifest for s in new if s.valid and s.manifest and s.manifest.reason is Reason.EMERGENCY]
        committed = [s.manifest.step for s in new if s.valid and s.manifest]
        if planned.kind == "kill-upload":
            item.happened = seen.exit_code == -signal.SIGKILL
            item.at_step = max(torn) if torn else None
            item.stop_seconds = 0.0 if item.happened else None
            if item.happened:
                item.note = f"its lease stays: the next start waits up to {_lease_ttl():.0f} s (--lease-ttl)"
            else:
                item.note = "did not happen: the command finished before that save"
        else:
            item.happened = seen.fired_s is not None and seen.exit_code == 75
            item.at_step = seen.fired_step
            if seen.fired_s is not None:
                item.stop_seconds = seen.seconds - seen.fired_s
            if not item.happened and seen.exit_code == 0:
                item.note = "did not happen: the run finished before the supervisor acted on it"
        if emergency:
            item.emergency_snapshot, item.emergency_step = emergency[-1].snapshot_id, emergency[-1].step
        elif item.happened and planned.kind != "kill-upload":
            item.note = "no emergency snapshot was committed; the previous one is the resume point"
        steps = [s for s in (seen.reached, *torn, *committed) if s is not None]
        item.reached_step = max(steps) if steps else None
        if item.happened:
            resume = newest(self.reader)
            item.resumed_from = resume.step if resume else 0
            if item.reached_step is not None:
                item.steps_lost = max(0, item.reached_step - item.resumed_from)
        log.info("drill: instance %d: %s", self._count, item.describe())
        return item, seen

    def _compare(self) -> None:
        ref, final = final_snapshot(self.ref_reader), final_snapshot(self.reader)
        assert ref is not None and final is not None
        if ref.step != final.step:
            self._problem(f"the runs ended at different steps: {ref.step} (reference) and {final.step}")
        try:
            self.report.components = compare_final(self.ref_reader, ref, self.reader, final, self.cfg.ignore)
        except CorruptSnapshotError as exc:
            self._problem(str(exc))

    # -- instances ------------------------------------------------------------

    def _name(self) -> str:
        return f"instance-{self._count}"

    def _instance(self, reader: RunReader, name: str, resume_step: int = 0, kind: str | None = None,
                  fire_at: int | None = None, fault: str | None = None, timeout: bool = False) -> Watched:
        from runner.sim.imds import ImdsSimulator

        if reader is self.reader:
            self._count += 1
        command = list(self.cfg.command)
        if fault is not None:
            command = [sys.executable, "-m", "runner.sim.drill.vanish", fault, "--", *command]
        limit = None
        if timeout:
            # After a kill-upload the next instance first waits out the vanished one's lease.
            limit = self.cfg.attempt_timeout_s or 5 * self.report.reference.seconds + 60 + _lease_ttl()
        with ImdsSimulator() as sim, open(self.work / f"{name}.log", "w") as output:
            argv = supervisor_argv(self.bucket, reader.run_id, command, sim.url,
                                   storage_options=self.cfg.storage_options,
                                   save_every_steps=self.cfg.save_every_steps,
                                   poll_interval_s=self.cfg.poll_interval_s)  # fmt: skip
            instance = self._live = Instance(argv, self.work / name, instance_env(), output)

            def fire() -> None:
                if kind == "notice":
                    sim.schedule_spot_notice(0)
                elif kind == "sigterm":
                    instance.proc.send_signal(signal.SIGTERM)

            try:
                seen = watch(instance, resume_step, fire_at, fire if kind else None, limit)
            finally:
                instance.stop()
                self._live = None
                instance.remove()
        return seen

    def _resume_step(self) -> int:
        resume = newest(self.reader)
        return resume.step if resume else 0

    def _tail(self, name: str, lines: int = 3) -> str:
        """"; last output: ..." from an instance's log: its last error line(s), else its last lines."""
        try:
            text = [t.strip() for t in (self.work / f"{name}.log").read_text(errors="replace").splitlines() if t.strip()]
        except OSError:
            return ""
        errors = [t for t in text if "error:" in t.lower()]
        last = " | ".join((errors or text)[-lines:])
        return f"; last output: {last}" if last else ""

    @staticmethod
    def _ended(seen: Watched) -> str:
        if seen.timed_out:
            return f"did not finish within {seen.seconds:.0f} s and was killed"
        return f"failed: runner start exited {seen.exit_code}"

    def _problem(self, message: str) -> None:
        """Something that makes the drill fail; the CLI prints the first as its error line."""
        self.report.problems.append(message)


def _lease_ttl() -> float:
    """The lease TTL the instances' `runner start` uses: RUNNER_LEASE_TTL (they inherit it) or its default."""
    try:
        return float(os.environ.get("RUNNER_LEASE_TTL", "") or StartConfig.model_fields["lease_ttl_s"].default)
    except ValueError:
        return float(StartConfig.model_fields["lease_ttl_s"].default)


def _step_at(timeline: list[tuple[float, int]], at: float) -> int:
    """The step the run had reported at `at` seconds."""
    step = timeline[0][1]
    for when, reached in timeline:
        if when > at:
            break
        step = reached
    return step


def _nth_save(resume_step: int, target: int, interval: int | None, total: int) -> tuple[int, int]:
    """(n, step): the n-th save of an instance resuming at `resume_step` is the first at or after `target`.

    Periodic saves land on multiples of the interval (the Checkpointer's rule);
    after the last one comes the final save at `total`.
    """
    if interval is None:
        return 1, total
    first = -(-max(target, resume_step + 1) // interval) * interval
    if first <= total:
        return first // interval - resume_step // interval, first
    return total // interval - resume_step // interval + 1, total


def run_drill(cfg: DrillConfig) -> DrillReport:
    """Run the drill; the report says whether the final states are identical.

    Raises ConfigError (the runs already exist), StorageError (the bucket).
    Failures of the command or the supervisor are in `report.problems`.
    """
    return _Drill(cfg).run()
