"""`runner demo` end to end: a spot notice, the emergency snapshot and exit 75, a resume on a new instance.

Real subprocesses: the demo starts `runner start` twice, each watching the
metadata simulator over HTTP.
"""

from __future__ import annotations

import json
import re
import subprocess

from helpers import PYTHON, subprocess_env
from runner import cli


def test_demo_shows_the_interruption_and_the_resume_on_a_new_instance(tmp_path):
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    proc = subprocess.run([PYTHON, "-m", "runner", "demo", "--bucket", str(tmp_path / "bucket"), "--steps", "80",
                           "--save-every-steps", "10", "--step-sleep", "0.04", "--no-reference"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    headers = [line for line in out.splitlines() if line.startswith("== ")]
    assert [h.split()[1] for h in headers if re.match(r"== \d/3", h)] == ["1/3", "2/3", "3/3"], out
    # The interruption: the simulator's notice, the supervisor's reaction, the emergency snapshot, exit 75.
    assert re.search(r"== EC2 reclaims instance 1: .*spot/instance-action", out), out
    assert re.search(r"runner: EC2 spot interruption: terminate at .*asking the child for an emergency snapshot", out)
    emergency = re.search(r"emergency snapshot (\S+) committed at step (\d+)", out)
    assert emergency, out
    step = emergency.group(2)
    assert "== instance 1 is gone: runner start exited 75 (preempted, resume elsewhere)" in out
    # The resume: a fresh supervisor finds that snapshot and the training continues from it.
    assert "runner: run demo-" in out and f"resuming from snapshot {emergency.group(1)} (step {step}, emergency)" in out
    assert f"voice: resuming at step {step}, 80 steps" in out
    assert "instance 2: runner start exited 0" in out and "finished at step 80" in out
    # The summary: the snapshot table, where it was interrupted, and the verdict.
    assert re.search(rf"{emergency.group(1)} .* {step} .* emergency .* yes .* yes", out), out  # valid, pinned
    assert f"resumed:      on instance 2 (empty disk) from step {step}" in out
    # (--no-reference keeps the test short; the comparison is the drill's, tested in test_drill.py.)
    assert "final state:  not compared (--no-reference)" in out
    assert "Traceback" not in out + proc.stderr
    # The cost report shows what spot saved: the simulated instance's example spot price, labelled as such,
    # against the on-demand price of its type.
    report = subprocess.run([PYTHON, "-m", "runner", "report", "--bucket", str(tmp_path / "bucket"), "--format", "json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert report.returncode == 0, report.stderr
    totals = json.loads(report.stdout)
    totals = totals[0] if isinstance(totals, list) else totals
    assert totals["savings_pct"] > 50, totals
    assert any("example spot price of the simulated g5.xlarge" in s for s in totals["price_sources"]), totals


def test_demo_bad_usage_is_exit_2_with_one_line(capsys, tmp_path):
    assert cli.main(["demo", "--bucket", str(tmp_path), "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["runner: error: --steps 3 is too few for the demo: use at least 10"]
