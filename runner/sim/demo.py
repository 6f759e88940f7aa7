"""`runner demo`: the example voice model through a spot interruption, on a simulated EC2 instance.

Owns the demo's story and its narration; the machinery is the drill's
(runner.sim.instance: an "instance" is an empty scratch directory with one
`runner start` in it, watched through the child's progress reports).

1. Instance 1 runs `runner start ... -- python -m runner.examples.voice`,
   with the supervisor watching a local EC2 metadata simulator for spot
   notices (`--notice-source ec2 --imds-endpoint <simulator>`).
2. Part-way (40 % of the steps), the simulator starts answering
   `spot/instance-action` with a termination in 120 s, as EC2 does.  The
   supervisor sees it at its next poll, the training commits an emergency
   snapshot at its next step, and `runner start` exits 75 ("preempted,
   resume elsewhere").  The instance's directory is deleted.
3. Instance 2, a fresh supervisor in a fresh empty directory with the same
   command line, finds the newest valid snapshot in the bucket and finishes
   the run (exit 0).
4. For comparison, the same training runs once without interruption (run
   `<run>-reference`, its output hidden), and the two final snapshots are
   compared file by file.
5. The summary: the run's snapshots (`runner ls`), where it was
   interrupted, the emergency snapshot, the steps redone, and the verdict.

The output of the supervisor ("runner: ...") and of the training ("step
..."/"voice: ...") is shown as it happens, between "== ..." stage headers.
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import IO

from runner import ops
from runner.checkpoint.manifest import Manifest
from runner.checkpoint.reader import CorruptSnapshotError, RunReader, newest_preferring_final as newest
from runner.errors import ConfigError
from runner.sim.drill.compare import compare_final, final_snapshot
from runner.sim.imds import ImdsSimulator
from runner.sim.instance import Instance, Watched, instance_env, local_bucket, supervisor_argv, watch
from runner.storage import Store

NOTICE_AT = 0.4  # of the steps
POLL_INTERVAL_S = 1.0  # how often the supervisors poll the simulator (AWS advises 5 s; runner's default is 2 s)
# Instance 1's steps after the notice last at least this long, so that its supervisor sees the notice while
# the training still runs: a short demo on a fast machine otherwise finishes before the next poll.
NOTICE_WINDOW_S = 4 * POLL_INTERVAL_S
PREEMPTED = 75


@dataclass(frozen=True)
class DemoConfig:
    bucket: str = "runner-bucket"
    steps: int = 300
    save_every_steps: int | None = None  # None: steps / 6
    step_sleep: float = 0.0
    reference: bool = True


def _say(text: str = "") -> None:
    print(text, flush=True)


def _stage(text: str) -> None:
    print(f"\n== {text}", flush=True)


class _Failed(Exception):
    """A stage did not go as the demo expects; the message says what happened."""


ShowSnapshots = Callable[[str, Sequence[ops.SnapshotRow]], None]  # the `runner ls` table, from cli/


def run(cfg: DemoConfig, show_snapshots: ShowSnapshots, error: Callable[[str], None]) -> int:
    """Run the demo; 0 when every stage went as described, 1 otherwise (the reason goes to `error`).

    The CLI hands in how a table and an error line look (cli/terminal.py),
    so that this module does not import the command line that imports it.
    Raises ConfigError for bad settings, StorageError when the bucket cannot be used.
    """
    if cfg.steps < 10:
        raise ConfigError(f"--steps {cfg.steps} is too few for the demo: use at least 10")
    if cfg.save_every_steps is not None and cfg.save_every_steps < 1:
        raise ConfigError("--save-every-steps must be at least 1")
    if cfg.step_sleep < 0:
        raise ConfigError("--step-sleep must be >= 0")
    bucket = local_bucket(cfg.bucket)
    store = Store(bucket)
    store.check()
    run_id = f"demo-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    reader, ref_reader = RunReader(store, run_id), RunReader(store, f"{run_id}-reference")
    save_every = cfg.save_every_steps or max(1, cfg.steps // 6)
    command = [sys.executable, "-m", "runner.examples.voice", "--steps", str(cfg.steps),
               "--log-every", str(max(1, cfg.steps // 10))]  # fmt: skip
    demo = _Demo(bucket, run_id, reader, ref_reader, save_every, command, cfg.step_sleep)
    demo.show_snapshots = show_snapshots
    with tempfile.TemporaryDirectory(prefix="runner-demo-") as work:
        demo.work = Path(work)
        try:
            demo.story(cfg)
        except _Failed as exc:
            error(f"demo: {exc}")
            return 1
    return 0


class _Demo:
    def __init__(self, bucket: str, run_id: str, reader: RunReader, ref_reader: RunReader, save_every: int,
                 command: list[str], step_sleep: float):
        self.bucket, self.run_id, self.reader, self.ref_reader = bucket, run_id, reader, ref_reader
        self.save_every, self.base_command, self.step_sleep = save_every, command, step_sleep
        self.work = Path(".")
        self.show_snapshots: ShowSnapshots = lambda run_id, rows: None

    def story(self, cfg: DemoConfig) -> None:
        _say("== runner demo: the example voice model on a simulated EC2 spot instance")
        _say(f"   run {self.run_id} in {self.bucket}: {cfg.steps} steps, a periodic snapshot every "
             f"{self.save_every} steps")
        stages = 4 if cfg.reference else 3
        first, notice, emergency = self._interrupted(cfg, stages)
        second, final = self._resumed(stages, emergency)
        differ, components = self._reference(stages, final) if cfg.reference else (None, [])
        _stage(f"{stages}/{stages}  summary of run {self.run_id}")
        self.show_snapshots(self.run_id, ops.snapshot_rows(self.reader))
        lost = (notice.reached or 0) - emergency.step
        stop_s = first.seconds - (first.fired_s or 0.0)
        _say(f"   steps:        {final.step}, on 2 instances")
        _say(f"   interrupted:  an EC2 spot notice issued at step {first.fired_step} on instance 1; the training "
             f"committed emergency snapshot {emergency.snapshot_id} at step {emergency.step} and stopped; "
             f"runner start exited 75 {stop_s:.1f} s after the notice")
        _say(f"   resumed:      on instance 2 (empty disk) from step {emergency.step}, first step "
             f"{_secs(second.first_step_s)} after it started; {max(0, lost)} step(s) redone")
        if differ is None:
            _say("   final state:  not compared (--no-reference)")
        elif differ:
            raise _Failed("the final state differs from the uninterrupted run's: "
                          + "; ".join(f"{c.component}: {c.detail}" for c in differ))
        else:
            names = ", ".join(c.component for c in components)
            _say(f"   final state:  bitwise identical to the uninterrupted run ({len(components)} files: {names})")

    def _interrupted(self, cfg: DemoConfig, stages: int) -> tuple[Watched, Watched, Manifest]:
        """Stage 1: instance 1 trains until the spot notice, commits an emergency snapshot and exits 75."""
        _stage(f"1/{stages}  instance 1 starts the training under the supervisor")
        notice_step = max(1, int(cfg.steps * NOTICE_AT))
        first, notice = self._instance("instance-1", self.reader, notice_step=notice_step)
        if notice is None:
            raise _Failed(f"the training ended (exit {first.exit_code}) before the spot notice could be sent")
        if first.exit_code != PREEMPTED:
            raise _Failed(f"instance 1's runner start exited {first.exit_code}, not {PREEMPTED} (preempted)")
        emergency = newest(self.reader)
        if emergency is None or emergency.reason.value != "emergency":
            raise _Failed("instance 1 stopped without committing an emergency snapshot")
        stop_s = first.seconds - (first.fired_s or 0.0)
        _stage(f"instance 1 is gone: runner start exited {first.exit_code} (preempted, resume elsewhere) "
               f"{stop_s:.1f} s after the notice")
        _say(f"   emergency snapshot {emergency.snapshot_id}: step {emergency.step}")
        ops.pin(self.reader, emergency.snapshot_id)
        _say("   pinned it (runner pin), so that retention keeps it for the summary; the instance's disk is deleted")
        return first, notice, emergency

    def _resumed(self, stages: int, emergency: Manifest) -> tuple[Watched, Manifest]:
        """Stage 2: a fresh instance with an empty disk resumes from the emergency snapshot and finishes."""
        _stage(f"2/{stages}  instance 2: a new machine with an empty disk runs the same command")
        second, _ = self._instance("instance-2", self.reader, resume_step=emergency.step)
        final = final_snapshot(self.reader)
        if second.exit_code != 0 or final is None:
            raise _Failed(f"instance 2's runner start exited {second.exit_code} without finishing the run")
        _stage(f"instance 2: runner start exited 0; run {self.run_id} finished at step {final.step}")
        return second, final

    def _reference(self, stages: int, final: Manifest) -> tuple[list, list]:
        """Stage 3: the same training uninterrupted; (the components that differ, all components)."""
        _stage(f"3/{stages}  for comparison: the same training, uninterrupted (run {self.ref_reader.run_id}, "
               "output hidden)")
        ref, _ = self._instance("reference", self.ref_reader, quiet=True)
        ref_final = final_snapshot(self.ref_reader)
        if ref.exit_code != 0 or ref_final is None:
            raise _Failed(f"the reference run's runner start exited {ref.exit_code}{self._tail('reference')}")
        _say(f"   finished at step {ref_final.step} in {ref.seconds:.1f} s")
        try:
            components = compare_final(self.ref_reader, ref_final, self.reader, final)
        except CorruptSnapshotError as exc:
            raise _Failed(str(exc)) from None
        return [c for c in components if not c.identical], components

    @staticmethod
    def _env(sim: ImdsSimulator) -> dict[str, str]:
        """The supervisor's environment: the simulated instance is charged an example spot price, so labelled."""
        identity = sim.identity
        return dict(instance_env(), RUNNER_PRICE_PER_HOUR=str(identity.example_spot_price),
                    RUNNER_PRICE_LABEL=f"example spot price of the simulated {identity.instance_type}, not a quote")

    def _instance(self, name: str, reader: RunReader, notice_step: int | None = None, resume_step: int = 0,
                  quiet: bool = False) -> tuple[Watched, Watched | None]:
        """Run one instance to its end; the second value is set when the spot notice was sent."""
        command = self._command(notice_step)
        with ImdsSimulator() as sim:
            argv = supervisor_argv(self.bucket, reader.run_id, command, sim.url,
                                   save_every_steps=self.save_every, poll_interval_s=POLL_INTERVAL_S)
            if not quiet:
                _say(f"   EC2 metadata simulator at {sim.url}: no spot notice yet (404)")
                _say(f"   $ runner start --bucket {self.bucket} --run-id {reader.run_id} --notice-source ec2 "
                     f"--imds-endpoint {sim.url} --save-every-steps {self.save_every} -- "
                     f"python -m runner.examples.voice {' '.join(command[3:])}")
            # Shown: the supervisor's log and the training's output in one stream, in order.
            log = open(self.work / f"{name}.log", "w") if quiet else None
            sys.stdout.flush()
            instance = Instance(argv, self.work / name, self._env(sim), output=log or _stdout())
            sent: list[bool] = []

            def notice() -> None:
                deadline = sim.schedule_spot_notice(0)
                left = deadline - dt.datetime.now(dt.timezone.utc).timestamp()
                _stage(f"EC2 reclaims instance 1: the simulator now answers spot/instance-action with "
                       f"'terminate' in {left:.0f} s (the training is at step {instance.progress()})")
                sent.append(True)

            try:
                seen = watch(instance, resume_step, notice_step, notice if notice_step else None)
            finally:
                instance.stop()
                instance.remove()
                if log is not None:
                    log.close()
        return seen, (seen if sent else None)

    def _command(self, notice_step: int | None) -> list[str]:
        """The training command; the instance that gets the notice keeps training through NOTICE_WINDOW_S."""
        steps = int(self.base_command[self.base_command.index("--steps") + 1])
        sleep = self.step_sleep
        if notice_step is not None:
            sleep = max(sleep, round(NOTICE_WINDOW_S / max(1, steps - notice_step), 3))
        return self.base_command + (["--step-sleep", str(sleep)] if sleep else [])

    def _tail(self, name: str) -> str:
        try:
            lines = (self.work / f"{name}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f"; last output: {' | '.join(lines[-3:])}" if lines else ""


def _stdout() -> IO[str] | None:
    """Our stdout for the instances' output (their stderr too, so that the story reads in order);
    None (inherit both) when it is not a real file, as under a test's capture."""
    try:
        sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return sys.stdout


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"

