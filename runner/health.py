"""The container's HEALTHCHECK: is a `runner start` supervisor alive in this container?

Owns one cheap question, answered from /proc with the standard library only
(no torch, no store, no network), because Docker runs it every 30 s for the
life of the container: is there a process whose command line is
`... runner start ...` and that is neither a zombie nor stopped?

Why not more: the supervisor's own loop already handles what a health check
could see (a hung child is stopped at a notice's deadline, crashes are
restarted, storage failures end the run with exit 1), and a training step may
legitimately take minutes, so "no progress for N seconds" would be a false
alarm.  What Docker cannot see by itself is a supervisor that was stopped
(SIGSTOP, a debugger) or that is gone while tini lingers; this catches both.

    python -m runner.health            exit 0 healthy, 1 not
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

DEAD_STATES = frozenset("ZXxTt")  # zombie, dead, stopped, traced


def _is_supervisor(argv: list[str]) -> bool:
    """`runner start ...` run as a script (argv[0], or argv[1] after the interpreter) or as `python -m runner`.

    Only the first words count: tini's own `tini -- runner start` is not it.
    """
    for i in (0, 1):
        if argv[i:i + 2] and os.path.basename(argv[i]) == "runner" and argv[i + 1:i + 2] == ["start"]:
            return True
    return argv[1:4] == ["-m", "runner", "start"]


def _state(stat: str) -> str:
    # /proc/PID/stat: "pid (comm) S ..."; comm may hold spaces and parentheses.
    return stat.rpartition(")")[2].split()[0]


def supervisors(proc: str = "/proc") -> list[tuple[int, str]]:
    """(pid, state letter) of every `runner start` process visible in `proc`."""
    found = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "cmdline"), "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            if not _is_supervisor(argv):
                continue
            with open(os.path.join(proc, name, "stat")) as f:
                found.append((int(name), _state(f.read())))
        except (OSError, IndexError):  # the process ended while we looked
            continue
    return found


def check(proc: str = "/proc") -> tuple[bool, str]:
    """(healthy, one line saying why)."""
    found = supervisors(proc)
    alive = [pid for pid, state in found if state not in DEAD_STATES]
    if alive:
        return True, f"runner start is running (pid {alive[0]})"
    if found:
        pid, state = found[0]
        return False, f"runner start (pid {pid}) is in state {state} (zombie or stopped)"
    return False, "no runner start process is running"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    proc = args[1] if len(args) == 2 and args[0] == "--proc" else "/proc"
    healthy, why = check(proc)
    print(f"runner: {why}", file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
