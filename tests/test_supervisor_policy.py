"""The supervisor's rules on their own: statuses and exit codes, restart policy, stop deadlines, exit naming."""

from __future__ import annotations

import signal

import pytest

from runner.supervisor.child import ChildExit
from runner.supervisor.policy import CrashTracker, RestartPolicy, StopPlan
from runner.supervisor.status import ExitCode, RunStatus


def test_every_terminal_status_has_the_documented_exit_code():
    codes = {s: s.exit_code for s in RunStatus if s.is_terminal()}
    assert codes == {
        RunStatus.FINISHED: 0, RunStatus.ALREADY_FINISHED: 0,
        RunStatus.PREEMPTED: 75, RunStatus.PREEMPTED_UNSAVED: 75, RunStatus.LEASE_LOST: 75,
        RunStatus.FAILED: 1, RunStatus.CRASH_LOOP: 1, RunStatus.STORAGE_FAILED: 1,
        RunStatus.CONFIG_ERROR: 2, RunStatus.PEER_STOPPED: 76,
    }  # fmt: skip
    assert (ExitCode.PREEMPTED, ExitCode.PEER_STOPPED) == (75, 76)


@pytest.mark.parametrize("status", [RunStatus.STARTING, RunStatus.RUNNING, RunStatus.SAVING,
                                    RunStatus.STOPPING, RunStatus.BACKOFF])  # fmt: skip
def test_live_statuses_have_no_exit_code(status):
    assert not status.is_terminal()
    with pytest.raises(ValueError):
        status.exit_code


def test_backoff_doubles_per_stalled_crash_and_is_capped():
    policy = RestartPolicy(backoff_base_s=1.0, backoff_max_s=5.0)
    assert [policy.delay(k) for k in range(0, 6)] == [1.0, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_three_crashes_without_progress_are_a_crash_loop_at_that_step():
    tracker = CrashTracker(RestartPolicy(max_restarts=10))
    assert tracker.record_crash(resumed_from=0, newest_after=100).restart  # progress
    assert tracker.record_crash(resumed_from=100, newest_after=100).restart
    assert tracker.record_crash(resumed_from=100, newest_after=100).restart
    decision = tracker.record_crash(resumed_from=100, newest_after=100)
    assert not decision.restart and decision.status is RunStatus.CRASH_LOOP
    assert "crash loop at step 100" in decision.reason


def test_progress_resets_the_stall_count_and_the_backoff():
    tracker = CrashTracker(RestartPolicy(max_restarts=10, backoff_base_s=1.0))
    assert tracker.record_crash(0, 0).delay_s == 1.0
    assert tracker.record_crash(0, 0).delay_s == 2.0
    decision = tracker.record_crash(0, 50)
    assert decision.restart and decision.delay_s == 1.0 and tracker.stalled == 0


def test_restarts_are_bounded_by_max_restarts():
    tracker = CrashTracker(RestartPolicy(max_restarts=2))
    assert tracker.record_crash(0, 10).restart
    assert tracker.record_crash(10, 20).restart
    decision = tracker.record_crash(20, 30)
    assert not decision.restart and decision.status is RunStatus.FAILED
    assert "giving up after 2 restart(s)" in decision.reason and "step 30" in decision.reason


def test_no_restart_at_all_with_max_restarts_0():
    decision = CrashTracker(RestartPolicy(max_restarts=0)).record_crash(0, 5)
    assert decision.status is RunStatus.FAILED


@pytest.mark.parametrize("left", [2.0, 10.0, 30.0, 120.0])
def test_an_emergency_stop_ends_before_the_deadline(left):
    plan = StopPlan.for_deadline(0.0, left)
    exit_by = plan.exit_by(plan.ack_by)
    kill_at = plan.kill_at(exit_by)
    assert 0 < plan.ack_by < exit_by < kill_at < left
    assert left - plan.ack_by <= 5.0  # most of the window is for the save


def test_an_early_ack_does_not_wait_long_for_the_child_to_exit():
    plan = StopPlan.for_deadline(0.0, 120.0)
    assert plan.exit_by(1.0) == 11.0


@pytest.mark.parametrize("code, text", [
    (-9, "killed by SIGKILL (likely out of memory"),
    (137, "exited 137 (SIGKILL) (likely out of memory"),
    (-15, "killed by SIGTERM"),
    (3, "exited with code 3"),
    (143, "exited with code 143 (probably SIGTERM)"),
])  # fmt: skip
def test_child_exits_are_named(code, text):
    assert text in ChildExit(code).describe()
    assert ChildExit(code).likely_oom == (ChildExit(code).signal == signal.SIGKILL)
