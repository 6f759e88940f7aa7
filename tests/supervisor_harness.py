"""A harness for supervisor tests: real `supervise()` processes, output collected line by line.

`CHILD` is a small real torch training script (CPU, a per-step sleep to keep
it preemptible) that uses `runner.Checkpointer.from_env`; its flags make it
crash, die by SIGKILL, hang, or leave an orphan at a chosen step.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import PYTHON, subprocess_env
from runner.checkpoint import RunReader
from runner.storage import Store, clear_caches

RUN = "sup"

CHILD = r'''
import argparse, os, signal, subprocess, sys, time
import torch
import runner

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=20)
p.add_argument("--sleep", type=float, default=0.05)
p.add_argument("--crash-at", type=int, default=0)       # exit 3 at this step ...
p.add_argument("--crash-once", default="")              # ... only if this marker file is absent
p.add_argument("--sigkill-at", type=int, default=0)     # die by SIGKILL at this step (once, with --crash-once)
p.add_argument("--hang-at", type=int, default=0)        # from this step on, ignore every request
p.add_argument("--orphan", action="store_true")         # leave an orphan that exits while we train
args = p.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
ckpt = runner.Checkpointer.from_env(model=model, optimizer=opt)
step = ckpt.restore()
print(f"child: start at step {step} resume={os.environ['RUNNER_RESUME']}", flush=True)
if args.orphan:
    subprocess.run(["sh", "-c", "sleep 0.3 & exit 0"], start_new_session=True)
while step < args.steps:
    x = torch.randn(32, 16)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    step += 1
    print(f"step {step}", flush=True)
    if step in (args.crash_at, args.sigkill_at):
        ckpt.wait()  # the periodic save in flight lands first: the tests count on it
    if step == args.crash_at and not (args.crash_once and os.path.exists(args.crash_once)):
        if args.crash_once:
            open(args.crash_once, "w").close()
        print("child: crashing", flush=True)
        os._exit(3)
    if step == args.sigkill_at and not (args.crash_once and os.path.exists(args.crash_once)):
        if args.crash_once:
            open(args.crash_once, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(args.sleep)
    if ckpt.step(step):
        print(f"child: stopping at step {step}", flush=True)
        break
    if step == args.hang_at:
        ckpt.wait()
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("child: hanging", flush=True)
        while True:
            time.sleep(3600)
else:
    ckpt.save(step, final=True)
    print("child: finished", flush=True)
ckpt.close()
'''

SUPERVISE = (
    "import json, sys\n"
    "from runner.supervisor.config import StartConfig\n"
    "from runner.supervisor.run import supervise\n"
    "sys.exit(supervise(StartConfig(**json.loads(sys.argv[1]))))\n"
)


class Supervisor:
    """A supervisor process; its output (and its child's) collected line by line."""

    def __init__(self, tmp_path: Path, bucket: str, child_args: list[str], name: str = "sup", **config):
        cwd = tmp_path / name
        cwd.mkdir()
        script = tmp_path / "train.py"
        if not script.exists():
            script.write_text(CHILD)
        settings = dict(bucket=bucket, run_id=RUN, command=[PYTHON, str(script), *child_args],
                        save_every_steps=5, keep_last=20, notice_source="none", grace_seconds=10,
                        restart_backoff_s=0.05)  # fmt: skip
        settings.update(config)
        env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
        env["PYTHONUNBUFFERED"] = "1"
        self._watch(subprocess.Popen([PYTHON, "-c", SUPERVISE, json.dumps(settings)], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip

    def _watch(self, proc: subprocess.Popen) -> None:
        """Collect `proc`'s output (a text pipe) line by line, on a thread; subclasses start other commands."""
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output}")
                self._cond.wait(min(left, 0.5))

    def finish(self, timeout: float = 60.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"supervisor still running after {timeout} s; output:\n{self.output}") from None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def supervisors():
    started: list[Supervisor] = []
    yield started
    for sup in started:
        sup.kill()


def start(supervisors: list, *args, **kwargs) -> Supervisor:
    sup = Supervisor(*args, **kwargs)
    supervisors.append(sup)
    return sup


def manifests(bucket: str) -> list:
    clear_caches()
    return list(RunReader(Store(bucket), RUN).valid_snapshots())


def finished(bucket: str) -> bool:
    """A final snapshot is among the newest step's (a periodic twin at the same step may sort first)."""
    snapshots = manifests(bucket)
    return any(m.final for m in snapshots if m.step == snapshots[0].step)
