"""The image's entrypoint as PID 1 of a fresh PID namespace, stopped the way `docker stop` stops it.

A container is a PID namespace whose first process is the entrypoint: the
Dockerfile's `tini -- runner start ...`, or `runner start` itself when the
image is run with `--entrypoint` or without an init.  PID 1 is special: the
kernel drops signals it has no handler for, every orphan of the namespace
re-parents to it, and when it exits the kernel SIGKILLs whatever is left.
These tests build that with `unshare --pid --fork --mount-proc` (root
only), send SIGTERM to the namespace's PID 1 from outside, as `docker stop`
does, and check what the image promises: an emergency snapshot committed,
exit 75, orphans reaped while the run goes on (no zombies), and the
command's own children -- one in its process group that ignores SIGTERM,
one in a session of its own -- gone afterwards.

The namespace is watched from the host's side: its processes are those
whose /proc/PID/ns/pid is the namespace init's, and /proc/PID/status's
NSpid line maps the pids the command prints (namespace pids) to host pids.

Without root or unshare these tests skip; with CI=true they fail instead,
since CI runs as root with tini installed (.ci/run) and must exercise them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import PYTHON, subprocess_env
from supervisor_harness import Supervisor
from runner.checkpoint import RunReader
from runner.storage import Store, clear_caches

RUN = "pid1"

# A real (tiny) torch training under Checkpointer.from_env that forks the
# kinds of descendants real jobs have: a worker in its process group that
# ignores SIGTERM (a data loader worker would be killed with the group), a
# daemon in a session of its own (outside the group: only the namespace's
# end removes it), and orphans that exit while training goes on.
CHILD = r'''
import os, signal, subprocess, sys, time
import torch
import runner

torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
ckpt = runner.Checkpointer.from_env(model=model, optimizer=opt)
step = ckpt.restore()
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
worker = subprocess.Popen([sys.executable, "-c", stubborn])
daemon = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
print(f"child: pid {os.getpid()} worker {worker.pid} daemon {daemon.pid}", flush=True)
# The shell exits at once; its `sleep` is orphaned (to the nearest subreaper, or PID 1) and dies soon after.
orphan = subprocess.run(["sh", "-c", "sleep 0.3 & echo $!"], capture_output=True, text=True).stdout.strip()
print(f"child: orphan {orphan}", flush=True)
while True:
    x = torch.randn(16, 8)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    step += 1
    print(f"step {step}", flush=True)
    time.sleep(0.02)
    if ckpt.step(step):
        print(f"child: stopping at step {step}", flush=True)
        break
ckpt.close()
'''


def _require(condition: bool, reason: str) -> None:
    """Skip on a developer's machine; fail in CI (CI=true), where these must run."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and CI=true requires the PID 1 tests to run (.ci/run installs tini)")
    pytest.skip(f"{reason}; in CI (CI=true) this is a failure")


def _unshare() -> str:
    _require(os.geteuid() == 0, "the PID 1 tests need root (unshare --pid)")
    unshare = shutil.which("unshare")
    _require(unshare is not None, "unshare (util-linux) is not installed")
    probe = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "sh", "-c", "exit 7"],
                           capture_output=True, text=True, timeout=30)
    _require(probe.returncode == 7, f"unshare --pid --fork --mount-proc does not work here: {probe.stderr.strip()}")
    return unshare


def _tini() -> str:
    tini = shutil.which("tini")
    _require(tini is not None, "tini is not installed (Debian: apt-get install tini); the image has it")
    return tini


def _ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _members(ns: str) -> dict[int, tuple[int, str]]:
    """host pid -> (namespace pid, state) of every process in the PID namespace `ns`."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _ns(int(entry)) != ns:
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        out[int(entry)] = (int(fields["NSpid"].split()[-1]), fields["State"].split()[0])
    return out


class _Entrypoint(Supervisor):
    """`unshare --pid --fork --mount-proc ENTRYPOINT...`, its output collected line by line."""

    def __init__(self, argv: list[str], cwd: Path):
        env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
        env["PYTHONUNBUFFERED"] = "1"
        cwd.mkdir()
        self._watch(subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True))

    def init_pid(self) -> int:
        """Host pid of the namespace's PID 1: the process unshare forked."""
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                children = []
            if children:
                return int(children[0])
            time.sleep(0.02)
        raise AssertionError(f"unshare started no child; output:\n{self.output}")


def _wait_until(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def entrypoints():
    started: list[_Entrypoint] = []
    yield started
    for e in started:
        if e.proc.poll() is None:
            e.proc.kill()  # unshare's child (PID 1) gets SIGKILL with it: --kill-child below
            e.proc.wait()


@pytest.mark.parametrize("init", ["tini", "runner"])
def test_docker_stop_of_the_entrypoint_as_pid_1_commits_an_emergency_snapshot_and_leaves_nothing(
        init, tmp_path, entrypoints):
    unshare = _unshare()
    bucket = str(tmp_path / "bucket")
    script = tmp_path / "train.py"
    script.write_text(CHILD)
    start = [PYTHON, "-m", "runner", "start", "--bucket", bucket, "--run-id", RUN, "--notice-source", "none",
             "--grace-seconds", "30", "--save-every-steps", "1000", "--", PYTHON, str(script)]
    # The Dockerfile's ENTRYPOINT is `tini -- runner start`: no -s (PID 1 needs no subreaper) and no -g.
    entry = [_tini(), "--", *start] if init == "tini" else start
    argv = [unshare, "--pid", "--fork", "--mount-proc", "--kill-child", *entry]
    run = _Entrypoint(argv, tmp_path / "instance")
    entrypoints.append(run)
    init_pid = run.init_pid()
    ns = _ns(init_pid)
    assert ns is not None and ns != _ns(os.getpid()), "PID 1 is in a namespace of its own"

    found = run.wait_for(r"^child: pid (\d+) worker (\d+) daemon (\d+)$", timeout=60)
    orphan = int(run.wait_for(r"^child: orphan (\d+)$", timeout=60).group(1))
    run.wait_for(r"^step 10$", timeout=60)
    members = _members(ns)
    by_ns_pid = {ns_pid: host for host, (ns_pid, _) in members.items()}
    assert by_ns_pid.get(1) == init_pid, members
    descendants = [by_ns_pid[int(found.group(i))] for i in (1, 2, 3)]  # child, worker, daemon (host pids)
    assert all(p in members for p in descendants), (found.group(0), members)

    # The orphaned `sleep 0.3` re-parented to runner (a subreaper under tini, PID 1 without it):
    # once it has exited it must be reaped, not linger as a zombie.
    def orphan_gone() -> bool:
        return all(ns_pid != orphan for ns_pid, _ in _members(ns).values())

    assert _wait_until(orphan_gone, 5), f"orphan {orphan} not reaped: {_members(ns)}"
    # Zombies show up for the moment between a death and its SIGCHLD being handled; none may stay.
    no_zombies = _wait_until(lambda: all(state != "Z" for _, state in _members(ns).values()), 3)
    assert no_zombies, f"zombies left in the namespace: {_members(ns)}"

    os.kill(init_pid, signal.SIGTERM)  # docker stop: SIGTERM to the container's PID 1
    code = run.finish()
    assert code == 75, run.output
    assert "Traceback" not in run.output, run.output

    # PID 1 has exited, so the namespace is gone: nothing of it may be left on the host.
    assert _wait_until(lambda: not _members(ns), 5), f"left behind: {_members(ns)}"
    assert all(_ns(p) != ns for p in descendants)

    clear_caches()
    snapshots = list(RunReader(Store(bucket), RUN).valid_snapshots())
    assert snapshots and snapshots[0].reason.value == "emergency", (snapshots, run.output)
    stopped = int(run.wait_for(r"^child: stopping at step (\d+)$", timeout=60).group(1))
    assert snapshots[0].step == stopped, run.output
