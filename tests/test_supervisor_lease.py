"""Two supervisors on one run (a replacement started while the old instance drains): one writer."""

from __future__ import annotations

import signal

from supervisor_harness import finished, manifests, start, supervisors  # noqa: F401 (fixture)

from runner.checkpoint.manifest import Reason


def test_second_supervisor_waits_then_takes_over_after_the_first_is_preempted(tmp_path, supervisors):  # noqa: F811
    bucket = str(tmp_path / "bucket")
    first = start(supervisors, tmp_path, bucket, ["--steps", "40", "--sleep", "0.1"], name="first")
    first.wait_for(r"^step 3$")
    second = start(supervisors, tmp_path, bucket, ["--steps", "40", "--sleep", "0.02"], name="second")
    second.wait_for(r"is held by .*generation 1.*waiting until it exits or its lease expires")
    first.wait_for(r"^step 12$")
    assert "started child" not in second.output  # exactly one trains

    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 75, first.output
    emergency = manifests(bucket)[0]
    assert emergency.reason is Reason.EMERGENCY

    assert second.finish() == 0, second.output
    assert f"child: start at step {emergency.step} resume={emergency.snapshot_id}" in second.output
    assert finished(bucket)
    # every snapshot of the run descends from the previous one: no stale holder forked the history
    chain = {m.snapshot_id: m.parent for m in manifests(bucket)}
    newest = manifests(bucket)[0]
    assert newest.parent in chain or newest.parent is None


def test_a_termination_while_waiting_for_the_lease_exits_75_without_training(tmp_path, supervisors):  # noqa: F811
    bucket = str(tmp_path / "bucket")
    first = start(supervisors, tmp_path, bucket, ["--steps", "200", "--sleep", "0.1"], name="first")
    first.wait_for(r"^step 2$")
    second = start(supervisors, tmp_path, bucket, [], name="second")
    second.wait_for(r"waiting until it exits or its lease expires")
    second.proc.send_signal(signal.SIGTERM)
    assert second.finish() == 75, second.output
    assert "started child" not in second.output
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 75, first.output


def test_a_holder_whose_lease_was_taken_stops_without_committing(tmp_path, supervisors):  # noqa: F811
    from runner.control import lease
    from runner.storage import Store

    bucket = str(tmp_path / "bucket")
    sup = start(supervisors, tmp_path, bucket, ["--steps", "400", "--sleep", "0.05"], name="first", lease_ttl_s=3)
    sup.wait_for(r"^step 3$")
    store = Store(bucket)
    # Another instance forcibly takes generation 2 (as after an expiry it did not notice).
    store.create_bytes(lease.lease_key("sup", 2), b'{"generation": 2, "holder": "other", "acquired_at": 0, '
                                                  b'"expires_at": 9999999999}')
    taken = len(manifests(bucket))
    assert sup.finish(timeout=30) == 75, sup.output
    assert "lease lost" in sup.output
    # A commit that passed its fencing check just before the takeover may land; nothing after it.
    assert len(manifests(bucket)) <= taken + 1, sup.output
    assert "another instance took over" in sup.output or "stopping child" in sup.output
