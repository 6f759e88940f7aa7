"""The training command as a child process: start, signal, reap, describe its end.

Owns: the child's environment (what `Checkpointer.from_env` reads, see
`runner.control`), its own process group, its control folder, delivering
signals to the whole group, reaping (the child and, when we are PID 1 or a
subreaper, every orphan that lands on us), and naming how it ended.

Why these choices:
- A process group of its own (`start_new_session=True`): a signal sent to the
  group reaches every process of the command -- all torchrun workers, data
  loader workers, a wrapper script's children -- and a Ctrl-C on the
  terminal reaches only the supervisor, which decides what it means.
- SIGUSR1/SIGUSR2 are started *ignored* in the child.  Their default action
  is to terminate, so a request that arrives while the child is still
  importing torch would kill it, and torchrun's agent (which has no handler)
  would die and orphan its workers.  An ignored disposition survives exec,
  so the command and all its descendants ignore them until a Checkpointer
  installs its handlers.  (A bash wrapper cannot `trap` a signal ignored at
  entry; the control file reaches such children instead.)
- The supervisor becomes a child subreaper on Linux (or is PID 1 in a
  container), so orphans re-parent to it and it reaps them; it then collects
  every status with `waitpid(-1)` itself and hands the child's to `Child`.
  Otherwise it waits for its own child only and leaves other processes of
  this interpreter alone.
- stdout/stderr are inherited: the child's output goes where ours goes, with
  no copy loop that could stall the child when the supervisor is busy.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runner import control

log = logging.getLogger("runner.supervisor")

_PR_SET_CHILD_SUBREAPER = 36
_REQUEST_SIGNALS = (control.STOP_SIGNAL, control.SAVE_SIGNAL)


class ChildStartError(OSError):
    """The command could not be started at all (not found, not executable)."""


@dataclass(frozen=True)
class ChildExit:
    """How the child ended, in Popen's convention: negative = killed by that signal."""

    returncode: int

    @property
    def signal(self) -> signal.Signals | None:
        """The signal that ended it, directly or as a shell's 128+N exit code."""
        code = self.returncode
        if code < 0:
            number = -code
        elif 128 < code < 128 + 65:
            number = code - 128
        else:
            return None
        try:
            return signal.Signals(number)
        except ValueError:
            return None

    @property
    def likely_oom(self) -> bool:
        """SIGKILL from outside the supervisor: on a training box almost always the OOM killer."""
        return self.signal == signal.SIGKILL

    def describe(self) -> str:
        sig = self.signal
        if self.likely_oom:
            how = "killed by SIGKILL" if self.returncode < 0 else f"exited {self.returncode} (SIGKILL)"
            return f"{how} (likely out of memory: check `dmesg` for the OOM killer, lower the batch size)"
        if sig is not None and self.returncode < 0:
            return f"killed by {sig.name}"
        if sig is not None:
            return f"exited with code {self.returncode} (probably {sig.name})"
        return f"exited with code {self.returncode}"


def child_env(
    base: Mapping[str, str],
    *,
    bucket: str,
    run_id: str,
    save_every_steps: int | str,
    keep_last: int,
    storage_options: Mapping[str, Any],
    resume: str,
    control_dir: str,
    interruption_mtbf_s: float | None = None,
    observed_interruptions: tuple[int, float] | None = None,
) -> dict[str, str]:
    """`base` plus the RUNNER_* variables the child's Checkpointer reads.

    `interruption_mtbf_s` and `observed_interruptions` (count, seconds on the
    run's ledger) are for an automatic interval; each is left out when None.
    """
    env = dict(base)
    env.pop(control.ENV_OBSERVED_INTERRUPTIONS, None)  # only ever this start's count
    if interruption_mtbf_s is not None:
        env[control.ENV_INTERRUPTION_MTBF] = repr(float(interruption_mtbf_s))
    if observed_interruptions is not None:
        env[control.ENV_OBSERVED_INTERRUPTIONS] = control.encode_interruptions(*observed_interruptions)
    env.update({
        control.ENV_BUCKET: bucket,
        control.ENV_RUN_ID: run_id,
        control.ENV_SAVE_EVERY_STEPS: str(save_every_steps),
        control.ENV_KEEP_LAST: str(keep_last),
        control.ENV_STORAGE_OPTIONS: json.dumps(dict(storage_options)),
        control.ENV_RESUME: resume,
        control.ENV_CONTROL_DIR: control_dir,
    })  # fmt: skip
    return env


class Child:
    """One run of the training command, in its own process group.

    Statuses are collected by a `Reaper` (`Reaper.reap()`), never by Popen's
    own wait, so that a supervisor reaping orphans cannot steal them.
    """

    def __init__(self, proc: subprocess.Popen, control_dir: str, command: Sequence[str]):
        self._proc = proc
        self.pid = proc.pid
        self.control_dir = control_dir
        self.command = list(command)
        self.channel = control.SupervisorChannel(control_dir)
        self._exit: ChildExit | None = None

    @classmethod
    def start(cls, command: Sequence[str], env: Mapping[str, str], control_dir: str) -> "Child":
        """Start `command`; raises ChildStartError when it cannot be executed."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _REQUEST_SIGNALS}
        try:
            proc = subprocess.Popen(list(command), env=dict(env), start_new_session=True, close_fds=True)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise ChildStartError(f"cannot start {command[0]!r}: {exc.strerror or exc}") from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        return cls(proc, control_dir, command)

    # -- state --------------------------------------------------------------------

    @property
    def exit(self) -> ChildExit | None:
        """How it ended, once reaped; None while it runs."""
        return self._exit

    def _set_status(self, wait_status: int) -> None:
        code = os.waitstatus_to_exitcode(wait_status)
        self._proc.returncode = code  # Popen must not wait for a pid we reaped
        self._exit = ChildExit(code)

    # -- signals ------------------------------------------------------------------

    def signal_group(self, sig: int) -> bool:
        """Send `sig` to every process of the child's group; False when none is left."""
        try:
            os.killpg(self.pid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:  # a member changed its credentials; reach the leader at least
            if self._exit is None:
                try:
                    os.kill(self.pid, sig)
                    return True
                except OSError:
                    pass
            return False

    def kill_stragglers(self) -> bool:
        """After the child ended: SIGKILL what is left of its group (data loader workers, …)."""
        return self.signal_group(signal.SIGKILL)

    def cleanup(self) -> None:
        shutil.rmtree(self.control_dir, ignore_errors=True)


def new_control_dir() -> str:
    """A fresh, private folder for one child's requests and acks."""
    return tempfile.mkdtemp(prefix="runner-control-")


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux); True when we reap them.

    PID 1 reaps orphans by definition; elsewhere PR_SET_CHILD_SUBREAPER does it.
    """
    if os.getpid() == 1:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Reaper:
    """Collects exit statuses: of every descendant that lands on us, or of our child only."""

    def __init__(self, reap_all: bool):
        self.reap_all = reap_all
        self.orphans_reaped = 0

    def reap(self, child: Child | None) -> None:
        """Non-blocking; call on SIGCHLD and now and then."""
        if not self.reap_all:
            if child is not None and child.exit is None:
                self._reap_pid(child)
            return
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if child is not None and pid == child.pid:
                child._set_status(status)
            else:
                self.orphans_reaped += 1
                log.debug("reaped orphan pid %d (%s)", pid, ChildExit(os.waitstatus_to_exitcode(status)).describe())

    @staticmethod
    def _reap_pid(child: Child) -> None:
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:  # somebody else reaped it; its status is lost
            child._exit = ChildExit(255)
            return
        if pid == child.pid:
            child._set_status(status)
