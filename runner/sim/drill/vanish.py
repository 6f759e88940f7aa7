"""`python -m runner.sim.drill.vanish PHASE[:N] -- COMMAND`: the whole instance dies in the middle of an upload.

Owns the ``kill-upload`` interruption's mechanics.  It sits between the
supervisor and the training command and runs the command with the writer's
fault point ``RUNNER_FAULT_KILL_AT=PHASE[:N]`` (runner.checkpoint.writer:
the process SIGKILLs itself at that phase of its n-th save).  When the
command dies by SIGKILL, this process SIGKILLs the supervisor at once, then
its own process group: supervisor and training die at the same instant, as
when a machine vanishes.

Why not let the supervisor see the death: a child that dies alone is a
crash, which the supervisor restarts on the same machine (its restart policy
is tested on its own); the drill proves the worst case, where nothing local
survives and a fresh supervisor on a new machine must find the newest
*valid* snapshot and ignore the torn one.  Killing the supervisor from
outside "right after" the child dies would race with its restart.

Signals meant for the command (the supervisor's SIGUSR1 and SIGTERM go to
the process group) reach the command directly; this process only waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

FAULT_ENV = "RUNNER_FAULT_KILL_AT"  # runner.checkpoint.writer.FAULT_ENV (not imported: it needs torch)


def main(argv: list[str]) -> int:
    """Run the command with the fault point; returns its exit code (unless the instance vanished)."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m runner.sim.drill.vanish PHASE[:N] -- COMMAND...", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)  # a handler, not SIG_IGN: the command must not inherit it
    env = dict(os.environ)
    env[FAULT_ENV] = argv[0]
    try:
        proc = subprocess.Popen(argv[2:], env=env)
    except OSError as exc:
        print(f"runner: error: cannot start {argv[2]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    code = proc.wait()
    if code == -signal.SIGKILL:
        os.kill(os.getppid(), signal.SIGKILL)
        os.killpg(0, signal.SIGKILL)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
