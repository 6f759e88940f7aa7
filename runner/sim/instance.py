"""One simulated instance: an empty scratch directory with one `runner start` in it, watched.

Owns: the `runner start` command line the drill and the demo use (EC2 notices
from a local metadata simulator), the instance's environment and folders,
following it to its end through the child's progress reports, delivering an
interruption when it reaches a step, and stopping it on the way out.

Why the progress report: the supervisor's control folder is created in
TMPDIR, which here is inside the scratch directory, so the child's
`progress.json` (runner.control: its step, at most every 0.2 s) can be read
from outside.  Interrupting "at step N" rather than "after S seconds" keeps
an interruption where it was planned on a loaded machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

FAULT_ENV = "RUNNER_FAULT_KILL_AT"  # read by runner.checkpoint.writer (not imported: it needs torch)
PROGRESS_FILE = "progress.json"  # the child's step report in its control folder (runner.control)

_POLL_S = 0.05  # how often an instance's progress and exit are checked
_STOP_WAIT_S = 60.0  # after our own SIGTERM at cleanup, before SIGKILL


def supervisor_argv(bucket: str, run_id: str, command: Sequence[str], imds_url: str, *,
                    storage_options: Mapping[str, Any] | None = None, save_every_steps: int | None = None,
                    keep_last: int | None = None, poll_interval_s: float = 0.5) -> list[str]:  # fmt: skip
    """`python -m runner start ... -- COMMAND`, watching the simulator at `imds_url`."""
    argv = [sys.executable, "-m", "runner", "start", "--bucket", bucket, "--run-id", run_id,
            "--notice-source", "ec2", "--imds-endpoint", imds_url, "--poll-interval", str(poll_interval_s)]
    for key, value in (storage_options or {}).items():
        argv += ["--storage-option", f"{key}={value}"]
    if save_every_steps is not None:
        argv += ["--save-every-steps", str(save_every_steps)]
    if keep_last is not None:
        argv += ["--keep-last", str(keep_last)]
    return [*argv, "--", *command]


def instance_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for an instance's supervisor: ours, without a leftover fault point."""
    env = dict(os.environ if base is None else base)
    env.pop(FAULT_ENV, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Instance:
    """A simulated machine: an empty scratch directory with one `runner start` in it.

    Its temporary folder (TMPDIR) is inside the scratch directory, so the
    supervisor's control folder, and with it the child's progress report,
    can be read from here.  `output` None inherits our stdout/stderr.
    """

    def __init__(self, argv: Sequence[str], scratch: Path, env: Mapping[str, str], output: IO[str] | None = None):
        self.scratch = scratch
        self.tmp = scratch / ".tmp"
        self.tmp.mkdir(parents=True)
        env = dict(env, TMPDIR=str(self.tmp))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(list(argv), cwd=scratch, env=env, stdout=output,
                                     stderr=subprocess.STDOUT if output is not None else None)  # fmt: skip

    def progress(self) -> int | None:
        """The highest step the training command has reported, or None before its first step."""
        best = None
        for path in self.tmp.glob(f"*/{PROGRESS_FILE}"):
            try:
                step = int(json.loads(path.read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            best = step if best is None else max(best, step)
        return best

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, wait_s: float = _STOP_WAIT_S) -> None:
        """On the way out (a timeout, an error, Ctrl-C): SIGTERM, which the supervisor turns into an
        emergency save and a clean stop; after `wait_s`, SIGKILL to it and to its child's process group."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            pass
        children = _children(self.proc.pid)  # each leads a process group of its own
        self.proc.kill()
        self.proc.wait()
        for pid in children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass

    def remove(self) -> None:
        """The instance is gone: nothing local survives."""
        shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass
class Watched:
    """What watching one instance to its end saw."""

    exit_code: int
    seconds: float
    first_step_s: float | None = None  # start -> first step past the resume point
    reached: int | None = None
    fired_step: int | None = None  # the step when the interruption was delivered
    fired_s: float | None = None
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, step)
    timed_out: bool = False


def watch(instance: Instance, resume_step: int = 0, fire_at: int | None = None,
          fire: Callable[[], None] | None = None, timeout_s: float | None = None) -> Watched:  # fmt: skip
    """Follow `instance` until it exits; call `fire()` once when it reports a step >= `fire_at`.

    After `timeout_s` the instance is stopped (`Instance.stop`) and the result says timed_out.
    """
    seen = Watched(exit_code=0, seconds=0.0)
    while True:
        code = instance.poll()
        seen.seconds = time.monotonic() - instance.started
        step = instance.progress()
        if step is not None and (seen.reached is None or step > seen.reached):
            seen.reached = step
            seen.timeline.append((seen.seconds, step))
            if seen.first_step_s is None and step > resume_step:
                seen.first_step_s = seen.seconds
        if code is not None:
            seen.exit_code = code
            return seen
        if fire is not None and fire_at is not None and seen.fired_s is None and step is not None and step >= fire_at:
            fire()
            seen.fired_s, seen.fired_step = time.monotonic() - instance.started, step
        if timeout_s is not None and seen.seconds > timeout_s:
            instance.stop(wait_s=10.0)
            seen.exit_code, seen.timed_out = instance.proc.returncode, True
            return seen
        time.sleep(_POLL_S)


def _children(pid: int) -> list[int]:
    """The pids of `pid`'s children (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in children.read_text().split()]
        except (OSError, ValueError):
            pass
    return found


def local_bucket(url: str) -> str:
    """A plain relative path made absolute: instances run in other directories."""
    return url if "://" in url else os.path.abspath(url)
