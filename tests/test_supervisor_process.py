"""The supervisor as a process: reaping, signal dispositions, user errors, notices with no child.

Plain shell commands as children (no torch), so these run in about a second
each; the training scenarios are in test_supervisor_scenarios.py.
"""

from __future__ import annotations

import os
import signal
import time

from supervisor_harness import Supervisor, supervisors  # noqa: F401  (supervisors: a fixture)

SIGUSR1_BIT = 1 << (signal.SIGUSR1 - 1)
SIGUSR2_BIT = 1 << (signal.SIGUSR2 - 1)


def _children_of(pid: int) -> dict[int, str]:
    """pid -> state of every process whose parent is `pid`."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out[int(entry)] = fields[0]
    return out


def _status_field(pid: int, name: str) -> str:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(name + ":"):
            return line.split()[1]
    raise KeyError(name)


def test_orphans_are_reaped_and_request_signals_start_ignored(tmp_path, supervisors):  # noqa: F811
    # The inner sh exits at once, so its `sleep 0.2` is orphaned onto the
    # supervisor (a subreaper), dies, and must not stay a zombie.
    script = "sh -c 'sleep 0.2 & exit 0'; echo ready; sleep 2; exit 0"
    sup = Supervisor(tmp_path, str(tmp_path / "bucket"), [], command=["sh", "-c", script])
    supervisors.append(sup)
    sup.wait_for(r"^ready$")
    child = int(sup.wait_for(r"started child pid (\d+)").group(1))
    ignored = int(_status_field(child, "SigIgn"), 16)
    assert ignored & SIGUSR1_BIT and ignored & SIGUSR2_BIT
    assert os.getpgid(child) == child  # its own process group
    time.sleep(0.8)
    states = _children_of(sup.proc.pid)
    assert "Z" not in states.values(), states
    assert sup.finish() == 0, sup.output
    assert "exited 0 without a final snapshot" in sup.output


def test_a_command_that_does_not_exist_is_a_one_line_usage_error(tmp_path, supervisors):  # noqa: F811
    sup = Supervisor(tmp_path, str(tmp_path / "bucket"), [], command=["/nonexistent/train"])
    supervisors.append(sup)
    assert sup.finish() == 2, sup.output
    assert "runner: error: cannot start '/nonexistent/train'" in sup.output
    assert "Traceback" not in sup.output


def test_an_unknown_bucket_scheme_is_a_usage_error(tmp_path, supervisors):  # noqa: F811
    sup = Supervisor(tmp_path, "nosuchscheme://x/runs", [], command=["true"])
    supervisors.append(sup)
    assert sup.finish() == 2, sup.output
    assert "Traceback" not in sup.output and "started child" not in sup.output


def test_sigint_during_the_restart_backoff_exits_75_at_once(tmp_path, supervisors):  # noqa: F811
    sup = Supervisor(tmp_path, str(tmp_path / "bucket"), [], command=["sh", "-c", "exit 1"],
                     restart_backoff_s=60)  # fmt: skip
    supervisors.append(sup)
    sup.wait_for(r"restart 1/3 in 60.0 s")
    sup.proc.send_signal(signal.SIGINT)
    assert sup.finish(timeout=10) == 75, sup.output
    assert "received SIGINT during the restart backoff" in sup.output
