"""Restart policy: when a crashed child is started again, after how long, and when to give up.

Owns: exponential backoff, the restart budget (`--max-restarts`), crash-loop
detection, and the deadlines of an emergency stop.  Pure logic, no
processes, so each rule is small and testable on its own.

Why progress is measured in committed snapshots: a restart resumes from the
newest valid snapshot, so a child that crashes at step N+50 every time with
snapshots every 100 steps redoes the same 50 steps forever, whatever it
printed.  "No progress" therefore means the newest valid step after a crash
is not past the step that attempt resumed from.  Preemptions never reach
this policy: they end the supervisor with 75 and are counted apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.supervisor.status import RunStatus


@dataclass(frozen=True)
class RestartPolicy:
    """`max_restarts` restarts in all; backoff base * 2**k, capped; give up after a stall."""

    max_restarts: int = 3
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    crash_loop_limit: int = 3  # consecutive crashes without progress

    def delay(self, stalled: int) -> float:
        """Wait before the next start, after `stalled` consecutive crashes without progress."""
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** max(0, stalled - 1))


@dataclass(frozen=True)
class Decision:
    restart: bool
    delay_s: float = 0.0
    status: RunStatus | None = None  # the terminal status when not restarting
    reason: str = ""


@dataclass
class CrashTracker:
    """Counts crashes and restarts of one supervisor process and decides what comes next."""

    policy: RestartPolicy
    crashes: int = 0
    restarts: int = 0
    stalled: int = 0  # consecutive crashes that did not advance the newest valid step
    history: list[tuple[int, int]] = field(default_factory=list)  # (resumed from, newest after)

    def record_crash(self, resumed_from: int, newest_after: int) -> Decision:
        """A crash of an attempt that resumed from `resumed_from` (0: fresh); the newest valid step is now `newest_after`."""
        self.crashes += 1
        self.history.append((resumed_from, newest_after))
        self.stalled = 0 if newest_after > resumed_from else self.stalled + 1
        if self.stalled >= self.policy.crash_loop_limit:
            return Decision(False, status=RunStatus.CRASH_LOOP, reason=(
                f"crash loop at step {newest_after}: {self.stalled} crashes in a row without a snapshot "
                f"past step {newest_after}; fix the error above, then start again"))  # fmt: skip
        if self.restarts >= self.policy.max_restarts:
            return Decision(False, status=RunStatus.FAILED, reason=(
                f"giving up after {self.restarts} restart(s) (--max-restarts {self.policy.max_restarts}); "
                f"the run can resume from step {newest_after}"))  # fmt: skip
        self.restarts += 1
        return Decision(True, delay_s=self.policy.delay(self.stalled))


@dataclass(frozen=True)
class StopPlan:
    """The deadlines of an emergency stop, as monotonic times.

    Until `ack_by`: wait for the emergency snapshot's acknowledgement.  Then
    (or from the ack on) until `exit_by`: let the child exit by itself.  Then
    SIGTERM to its group, and SIGKILL at `kill_at`.  All of it ends before
    the deadline, minus a reserve that grows with the time given (at most
    5 s, a quarter of a short grace).
    """

    deadline: float
    ack_by: float
    reserve: float

    @classmethod
    def for_deadline(cls, now: float, deadline: float) -> "StopPlan":
        left = max(0.0, deadline - now)
        reserve = min(5.0, max(0.5, left * 0.25))
        return cls(deadline=deadline, ack_by=max(now, deadline - reserve), reserve=reserve)

    def exit_by(self, now: float) -> float:
        """Until when to let the child exit by itself, from `now` (the ack, or `ack_by`)."""
        return max(now, min(now + 10.0, self.deadline - self.reserve / 2))

    def kill_at(self, now: float) -> float:
        """When SIGTERM (sent `now`) is followed by SIGKILL."""
        return max(now + 0.2, min(now + 3.0, self.deadline - self.reserve / 4))
