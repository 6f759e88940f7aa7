"""The supervisor end to end: real supervisor processes, real training children, real signals.

Each test starts `supervise()` in its own Python process (as `runner start`
would), with a small torch training script (supervisor_harness.CHILD, CPU, a
per-step sleep to keep it preemptible) as the command, against a local folder or
moto's S3 server.  Notices are real: SIGTERM to the supervisor, or EC2 spot
and rebalance notices from the IMDSv2 simulator over loopback HTTP.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from runner.checkpoint import Reason
from supervisor_harness import finished, manifests, start, supervisors  # noqa: F401  (supervisors: a fixture)


def _sigterm_then_resume(tmp_path: Path, bucket: str, supervisors: list, check_finished: bool) -> None:
    """SIGTERM mid-training -> emergency snapshot and 75; a fresh start resumes and finishes."""
    first = start(supervisors, tmp_path, bucket, [], name="first")
    first.wait_for(r"^step 8$")
    sent = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    code = first.finish()
    took = time.monotonic() - sent
    assert code == 75, first.output
    newest = manifests(bucket)[0]
    assert newest.reason is Reason.EMERGENCY and 8 <= newest.step < 20
    match = re.search(r"emergency snapshot (\S+) committed at step (\d+), ([\d.]+) s after the notice", first.output)
    assert match and match.group(1) == newest.snapshot_id and int(match.group(2)) == newest.step, first.output
    assert took < 10, f"SIGTERM to exit took {took:.1f} s"
    print(f"SIGTERM -> committed in {match.group(3)} s, -> exit 75 in {took:.2f} s ({bucket.split(':')[0]})")

    second = start(supervisors, tmp_path, bucket, [], name="second")
    assert second.finish() == 0, second.output
    assert f"child: start at step {newest.step} resume={newest.snapshot_id}" in second.output
    assert finished(bucket)
    if not check_finished:
        return
    third = start(supervisors, tmp_path, bucket, [], name="third")
    assert third.finish() == 0, third.output
    assert "already finished" in third.output and "started child" not in third.output


def test_sigterm_commits_an_emergency_snapshot_a_fresh_start_resumes_a_finished_run_stays_done(tmp_path, supervisors):
    _sigterm_then_resume(tmp_path, str(tmp_path / "bucket"), supervisors, check_finished=True)


def test_sigterm_on_s3(tmp_path, supervisors, s3_bucket_url):
    _sigterm_then_resume(tmp_path, s3_bucket_url, supervisors, check_finished=False)


def test_child_that_ignores_the_request_is_killed_within_the_grace(tmp_path, supervisors):
    bucket = str(tmp_path / "bucket")
    sup = start(supervisors, tmp_path, bucket, ["--hang-at", "7", "--sleep", "0.25"], grace_seconds=4)
    sup.wait_for(r"^child: hanging$")
    sent = time.monotonic()
    sup.proc.send_signal(signal.SIGTERM)
    code = sup.finish()
    took = time.monotonic() - sent
    assert code == 75, sup.output
    assert took < 5.0, f"stopping took {took:.1f} s with a 4 s grace"
    assert "SIGKILL to its process group" in sup.output
    newest = manifests(bucket)[0]
    assert newest.reason is Reason.PERIODIC and newest.step == 5
    assert re.search(rf"NO EMERGENCY SNAPSHOT.*{newest.snapshot_id} \(step 5.*reached step 7, so 2 step", sup.output), \
        sup.output  # fmt: skip


def test_sigkill_is_named_likely_oom_and_the_restart_resumes_and_finishes(tmp_path, supervisors):
    bucket = str(tmp_path / "bucket")
    marker = tmp_path / "killed-once"
    sup = start(supervisors, tmp_path, bucket, ["--steps", "14", "--sigkill-at", "12", "--crash-once", str(marker),
                                                "--orphan"])  # fmt: skip
    assert sup.finish() == 0, sup.output
    out = sup.output
    assert "child killed by SIGKILL (likely out of memory" in out
    assert re.search(r"restart 1/3 in [\d.]+ s, from snapshot \S+ \(step 10", out), out
    assert "child: start at step 10" in out and "child: finished" in out
    assert finished(bucket)


def test_crash_loop_stops_early_and_names_the_step(tmp_path, supervisors):
    bucket = str(tmp_path / "bucket")
    sup = start(supervisors, tmp_path, bucket, ["--crash-at", "7"], max_restarts=10, crash_loop_limit=2)
    assert sup.finish() == 1, sup.output
    out = sup.output
    # The first attempt saves step 5 and crashes at 7 (progress); the next two do not get past 5.
    assert out.count("child: crashing") == 3, out
    assert out.count("child exited with code 3") == 3, out
    assert "crash loop at step 5" in out
    assert "restart 2/10" in out and "restart 3/10" not in out


def test_ec2_spot_notice_through_the_simulator(tmp_path, supervisors):
    from runner.sim.imds import ImdsSimulator

    bucket = str(tmp_path / "bucket")
    with ImdsSimulator() as sim:
        sup = start(supervisors, tmp_path, bucket, ["--steps", "400"], notice_source="ec2",
                    imds_endpoint=sim.url, poll_interval_s=0.5)  # fmt: skip
        sup.wait_for(r"watching ec2 notices")
        sup.wait_for(r"^step 6$")
        scheduled = time.monotonic()
        deadline = sim.schedule_spot_notice(0)
        code = sup.finish(timeout=deadline - time.time())
        took = time.monotonic() - scheduled
    assert code == 75, sup.output
    assert took < 10, f"notice to exit took {took:.1f} s"
    assert "EC2 spot interruption: terminate" in sup.output
    assert manifests(bucket)[0].reason is Reason.EMERGENCY


def test_rebalance_saves_proactively_and_training_goes_on(tmp_path, supervisors):
    from runner.sim.imds import ImdsSimulator

    bucket = str(tmp_path / "bucket")
    with ImdsSimulator() as sim:
        sup = start(supervisors, tmp_path, bucket, ["--steps", "30"], notice_source="ec2",
                    imds_endpoint=sim.url, poll_interval_s=0.5, save_every_steps=1000)  # fmt: skip
        sup.wait_for(r"^step 4$")
        sim.schedule_rebalance(0)
        match = sup.wait_for(r"proactive snapshot (\S+) committed at step (\d+)")
        code = sup.finish()
    assert code == 0, sup.output
    reasons = {m.snapshot_id: m.reason for m in manifests(bucket)}
    assert reasons[match.group(1)] is Reason.MANUAL
    assert sorted(r.value for r in reasons.values()) == ["final", "manual"]
    # The notice stays visible and is polled again and again: one event, one snapshot.
    assert len(re.findall(r"proactive snapshot \S+ committed", sup.output)) == 1
