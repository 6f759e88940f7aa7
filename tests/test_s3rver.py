"""The supervisor on s3rver, a second S3 implementation (the storage contract on it is in test_storage_contract.py).

s3rver ignores `If-None-Match: *` on PutObject, so a run's lease and
manifests would lose their exclusivity there.  `runner start` must refuse
such a store with one line and exit 1 before the child starts; with the
operator's explicit `--storage-option exclusive_creates=unchecked` (one
writer per run, their promise) the kill/resume path works on it as on
moto: a child killed by SIGKILL mid-run is restarted from the newest
committed snapshot and finishes, and a SIGTERM'd run resumed by a second
start picks up its emergency snapshot.
"""

from __future__ import annotations

import re
import signal
import subprocess

from helpers import PYTHON, subprocess_env
from runner.checkpoint import RunReader
from runner.storage import Store, clear_caches
from supervisor_harness import RUN, finished, manifests, start, supervisors  # noqa: F401  (supervisors: a fixture)

UNCHECKED = {"exclusive_creates": "unchecked"}


def test_runner_start_refuses_a_store_without_conditional_writes_in_one_line(s3rver_bucket_url, tmp_path):
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    marker = tmp_path / "child-ran"
    proc = subprocess.run([PYTHON, "-m", "runner", "start", "--bucket", s3rver_bucket_url, "--run-id", "r",
                           "--notice-source", "none", "--", "touch", str(marker)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "exclusive creates" in line]
    assert len(lines) == 1 and "exclusive_creates=unchecked" in lines[0], proc.stderr
    assert not marker.exists(), "the child must not start on a store that cannot keep a lease exclusive"

    bad = subprocess.run([PYTHON, "-m", "runner", "start", "--bucket", s3rver_bucket_url, "--storage-option",
                          "exclusive_creates=maybe", "--notice-source", "none", "--", "true"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    assert "check or unchecked" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_sigkill_then_restart_resumes_from_the_newest_committed_snapshot_on_s3rver(
        s3rver_bucket_url, tmp_path, supervisors):  # noqa: F811
    bucket = s3rver_bucket_url
    marker = tmp_path / "killed-once"
    sup = start(supervisors, tmp_path, bucket, ["--steps", "14", "--sigkill-at", "12", "--crash-once", str(marker)],
                storage_options=UNCHECKED)
    assert sup.finish() == 0, sup.output
    out = sup.output
    assert "child killed by SIGKILL" in out, out
    assert re.search(r"restart 1/3 in [\d.]+ s, from snapshot \S+ \(step 10", out), out
    assert "child: start at step 10" in out and "child: finished" in out
    assert finished(bucket)
    clear_caches()
    reader = RunReader(Store(bucket), RUN)
    newest = next(iter(reader.valid_snapshots()))
    assert newest.step == 14 and reader.verify(newest) is None


def test_a_sigtermed_run_resumes_from_its_emergency_snapshot_on_s3rver(
        s3rver_bucket_url, tmp_path, supervisors):  # noqa: F811
    bucket = s3rver_bucket_url
    first = start(supervisors, tmp_path, bucket, ["--steps", "400"], name="first", save_every_steps=1000,
                  storage_options=UNCHECKED)
    first.wait_for(r"^step 8$")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 75, first.output
    stopped = int(first.wait_for(r"child: stopping at step (\d+)").group(1))
    [emergency] = manifests(bucket)
    assert emergency.reason.value == "emergency" and emergency.step == stopped

    second = start(supervisors, tmp_path, bucket, ["--steps", str(stopped + 3)], name="second",
                   storage_options=UNCHECKED)
    assert second.finish() == 0, second.output
    assert f"child: start at step {stopped} resume=" in second.output, second.output
    assert finished(bucket)
