"""The supervisor's run status and the exit codes of `runner start` (DESIGN.md 3.1).

Owns: every state one supervisor process can be in, which of them end the
process, and the exit code each terminal state maps to.  Nothing else in the
supervisor decides an exit code.

Exit codes:
    0   FINISHED, ALREADY_FINISHED       the training is done
    75  PREEMPTED, PREEMPTED_UNSAVED,    the machine is going away, or another
        LEASE_LOST                       instance took the run over; resume elsewhere
    76  PEER_STOPPED                     multi-node: another node was preempted; the
                                         job saved and stopped; this machine is fine,
                                         start again here to rejoin the group
    1   FAILED, CRASH_LOOP, STORAGE_FAILED   failed for good
    2   CONFIG_ERROR                     bad usage or configuration

Why a preemption without a committed emergency snapshot still exits 75: the
instance is going away either way, and the newest valid snapshot (an older
one) is still a correct resume point, so "resume elsewhere" is the true
instruction for whatever restarts us.  Exiting 1 would tell an orchestrator
that the run failed for good, which it did not.  The difference is logged
loudly (PREEMPTED_UNSAVED, with the steps lost) rather than encoded in the
exit code.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    FINISHED = 0
    FAILED = 1
    USAGE = 2
    PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: "try again later"
    PEER_STOPPED = 76  # not from sysexits.h (76 is EX_PROTOCOL there): the next free code


class RunStatus(enum.Enum):
    """Where one supervisor process stands; each member says when it is entered."""

    # supervise() was called: opening the store, finding the resume point.
    STARTING = "starting"
    # A child is alive and training (also while a proactive save is in flight).
    RUNNING = "running"
    # A termination notice arrived: the child was asked for an emergency
    # snapshot and the supervisor waits for its acknowledgement.
    SAVING = "saving"
    # The ack came (or the deadline drew near): the child is being stopped
    # (its own exit, then SIGTERM, then SIGKILL to its process group).
    STOPPING = "stopping"
    # The child crashed; waiting out the backoff before restarting it.
    BACKOFF = "backoff"

    # -- terminal ---------------------------------------------------------------
    # The child exited 0 (a final snapshot is expected, but not required).
    FINISHED = "finished"
    # At start the newest valid snapshot was already final; no child was started.
    ALREADY_FINISHED = "already-finished"
    # Preempted after the child committed an emergency snapshot.
    PREEMPTED = "preempted"
    # Preempted, but no emergency snapshot was committed in time (or no child
    # was running): the previous valid snapshot stays the resume point.
    PREEMPTED_UNSAVED = "preempted-unsaved"
    # Another instance holds a newer lease on the run (or ours could not be
    # renewed in time): the child was stopped without committing anything.
    LEASE_LOST = "lease-lost"
    # Multi-node: the job stopped, after a committed snapshot, because another
    # node's supervisor got a termination notice (control/protocol.py, peer-stopped.json).
    PEER_STOPPED = "peer-stopped"
    # The child kept crashing and --max-restarts is used up.
    FAILED = "failed"
    # The child crashed repeatedly without the newest valid step advancing.
    CRASH_LOOP = "crash-loop"
    # The store failed or refused (missing bucket, wrong credentials,
    # unreachable endpoint) where the supervisor cannot go on without it;
    # exit 1, as for every other command (see `runner --help`).
    STORAGE_FAILED = "storage-failed"
    # Bad configuration: a bucket URL no backend serves, a command that
    # cannot be started, an invalid notice source or endpoint.
    CONFIG_ERROR = "config-error"

    def is_terminal(self) -> bool:
        return self in _EXIT_CODES

    @property
    def exit_code(self) -> ExitCode:
        """The process exit code of a terminal status; ValueError for a live one."""
        try:
            return _EXIT_CODES[self]
        except KeyError:
            raise ValueError(f"status {self.value} is not terminal") from None


_EXIT_CODES: dict[RunStatus, ExitCode] = {
    RunStatus.FINISHED: ExitCode.FINISHED,
    RunStatus.ALREADY_FINISHED: ExitCode.FINISHED,
    RunStatus.PREEMPTED: ExitCode.PREEMPTED,
    RunStatus.PREEMPTED_UNSAVED: ExitCode.PREEMPTED,
    RunStatus.LEASE_LOST: ExitCode.PREEMPTED,
    RunStatus.PEER_STOPPED: ExitCode.PEER_STOPPED,
    RunStatus.FAILED: ExitCode.FAILED,
    RunStatus.CRASH_LOOP: ExitCode.FAILED,
    RunStatus.STORAGE_FAILED: ExitCode.FAILED,
    RunStatus.CONFIG_ERROR: ExitCode.USAGE,
}
