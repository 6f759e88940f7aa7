"""`runner drill`: real supervisors, real signals, the metadata simulator over HTTP, CPU torch.

The drill on the example voice model, with one interruption of each kind,
must find the final state bitwise identical and exit 0; on a command that
draws from an unsaved, freshly seeded generator it must find a difference and
exit 1; bad usage is exit 2 with one line.  The planning and comparison
helpers are checked directly.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import PYTHON, subprocess_env
from runner import cli
from runner.sim.drill.compare import first_difference
from runner.sim.drill.run import _nth_save
from runner.checkpoint import layout
from runner.checkpoint.reader import RunReader
from runner.storage import Store

TIMEOUT = 240

NONDETERMINISTIC = r'''
import os, random, time, numpy, torch, runner
torch.manual_seed(0); random.seed(0); numpy.random.seed(0)
torch.set_num_threads(1)
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
# The bug the drill is for: a data generator seeded afresh on every start and not given to the Checkpointer.
data = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
ckpt = runner.Checkpointer.from_env(model=model, optimizer=opt)
step = ckpt.restore()
while step < 30:
    x = torch.randn(16, 8, generator=data)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    step += 1
    time.sleep(0.04)
    if ckpt.step(step):
        break
else:
    ckpt.save(step, final=True)
ckpt.close()
'''


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["TMPDIR"] = str(tmp_path)  # the drill's kept output lands in the test's folder
    # A vanished instance's lease holds the run until it expires: short here, so the next instance waits ~6 s.
    env["RUNNER_LEASE_TTL"] = "6"
    return env


def _drill(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([PYTHON, "-m", "runner", "drill", "--json", *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc, report


def test_drill_on_the_example_finds_identical_state_after_a_notice_a_sigterm_and_a_kill_mid_upload(tmp_path):
    bucket = str(tmp_path / "bucket")
    proc, report = _drill(
        tmp_path, "--bucket", bucket, "--interruptions", "3", "--seed", "11", "--run-prefix", "ex", "--",
        PYTHON, "-m", "runner.examples.voice", "--steps", "60", "--save-every-steps", "10", "--step-sleep", "0.03",
        "--log-every", "0",
    )  # fmt: skip
    why = f"\n{json.dumps(report, indent=1)}\n{proc.stderr}"
    assert proc.returncode == 0, why
    assert report["identical"] is True and report["problems"] == [], why
    assert report["seed"] == 11
    items = {i["kind"]: i for i in report["interruptions"]}
    assert set(items) == {"notice", "sigterm", "kill-upload"}, why
    assert all(i["happened"] for i in report["interruptions"]), why
    for kind in ("notice", "sigterm"):
        item = items[kind]
        assert item["exit_code"] == 75, why  # preempted after an emergency snapshot
        assert item["emergency_step"] is not None and item["emergency_step"] >= item["at_step"], why
        assert item["resumed_from"] == item["emergency_step"] and item["steps_lost"] == 0, why
        assert item["stop_seconds"] is not None and item["stop_seconds"] < 30, why
    kill = items["kill-upload"]
    assert kill["exit_code"] == -9, why  # the supervisor died with its child: the instance vanished
    assert kill["emergency_snapshot"] is None, why
    assert kill["at_step"] is not None and kill["at_step"] % 10 == 0, why  # a periodic save, torn mid-upload
    assert kill["resumed_from"] < kill["at_step"], why
    assert kill["steps_lost"] == kill["reached_step"] - kill["resumed_from"] >= 1, why
    assert all(i["resume_seconds"] is not None for i in report["interruptions"]), why
    assert "lease" in kill["note"], why
    assert report["interrupted"]["attempts"] == 4 and report["interrupted"]["final_step"] == 60, why
    assert report["reference"]["final_step"] == 60, why
    results = {c["component"]: c["result"] for c in report["components"]}
    assert set(results) == {"gpt", "sovits", "optimizer", "scheduler", "data", "_rng"}, why
    assert set(results.values()) == {"same-bytes"}, why
    # The torn upload is still in the bucket: data without a manifest, never chosen.
    reader = RunReader(Store(bucket), "ex-interrupted")
    torn = {layout.snapshot_id_from_data_key(reader.run_id, o.key) for o in reader.store.list(layout.data_prefix(reader.run_id))}
    torn -= set(reader.snapshot_ids())
    assert any(layout.step_of(sid) == kill["at_step"] for sid in torn if sid), why


def test_drill_reports_a_command_that_does_not_resume_exactly_and_exits_1(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(NONDETERMINISTIC)
    proc, report = _drill(tmp_path, "--bucket", str(tmp_path / "bucket"), "--interruptions", "1", "--kinds", "sigterm",
                          "--seed", "3", "--", PYTHON, str(script))  # fmt: skip
    why = f"\n{json.dumps(report, indent=1)}\n{proc.stderr}"
    assert proc.returncode == 1, why
    assert report["identical"] is False and report["problems"] == [], why
    assert report["interruptions"][0]["happened"] and report["interruptions"][0]["exit_code"] == 75, why
    results = {c["component"]: c for c in report["components"]}
    assert results["model"]["result"] == "different", why
    assert "values differ" in results["model"]["detail"], why
    assert results["_rng"]["result"] == "same-bytes", why  # the global streams were seeded and restored
    assert report["logs"] and Path(report["logs"]).is_dir(), why  # kept for a look at what happened
    assert Path(report["logs"], "reference.log").is_file(), why
    assert proc.stderr.strip().splitlines()[-1] == \
        f"runner: error: the final states differ (model); the instances' output is kept in {report['logs']}"


def test_a_command_that_cannot_start_is_bad_usage(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "runner", "drill", "--bucket", str(tmp_path / "bucket"), "--",
                           str(tmp_path / "no-such-train.sh")], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("runner: error: runner start refused to run it (exit 2); "
                                                     "last output: runner: error: cannot start"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--bucket", "B"], "no training command"),
    (["--bucket", "B", "--kinds", "notice,meteor", "--", "true"], "unknown interruption kind 'meteor'"),
    (["--bucket", "B", "--interruptions", "0", "--", "true"], "invalid --interruptions"),
    (["--bucket", "B", "--run-prefix", "../x", "--", "true"], "invalid --run-prefix"),
    (["--bucket", "B", "--seed", "soon", "--", "true"], "invalid int value"),
    (["--bucket", "nope://x", "--", "true"], "cannot open 'nope://x'"),
])  # fmt: skip
def test_bad_usage_is_exit_2_with_one_line(tmp_path, capsys, args, message):
    args = [str(tmp_path / "bucket") if a == "B" else a for a in args]
    assert cli.main(["drill", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(message in line for line in err), err
    assert not any("Traceback" in line for line in err)
    assert len([line for line in err if line.startswith("runner: error:")]) == 1 or "usage:" in err[0]


def test_a_prefix_whose_runs_exist_is_refused(tmp_path, capsys):
    bucket = tmp_path / "bucket"
    manifests = bucket / "old-reference" / layout.MANIFESTS
    manifests.mkdir(parents=True)
    (manifests / "000000000001-20250101T000000-abcdef.json").write_text("{}")
    assert cli.main(["drill", "--bucket", str(bucket), "--run-prefix", "old", "--", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"runner: error: run old-reference already has snapshots in {bucket}: choose another --run-prefix"]


def test_the_kill_upload_aims_at_the_first_save_at_or_after_the_planned_step():
    # (resume, target, interval, total) -> (n-th save of that instance, its step)
    assert _nth_save(0, 4, 10, 60) == (1, 10)
    assert _nth_save(0, 10, 10, 60) == (1, 10)
    assert _nth_save(23, 24, 10, 60) == (1, 30)  # resumed from an emergency snapshot between saves
    assert _nth_save(20, 35, 10, 60) == (2, 40)
    assert _nth_save(50, 58, 10, 60) == (1, 60)  # the periodic save at 60 (the final one would be 2nd)
    assert _nth_save(60, 61, 10, 60) == (1, 60)  # after the last periodic save: the final one
    assert _nth_save(50, 58, 10, 57) == (1, 57)  # only the final save is left
    assert _nth_save(0, 5, None, 60) == (1, 60)  # no periodic saves: the final one


def test_values_are_compared_bitwise():
    nan = torch.tensor([float("nan"), 1.0])
    assert first_difference({"w": nan}, {"w": nan.clone()}) is None  # NaN == NaN, bit for bit
    assert first_difference({"w": torch.tensor([0.0])}, {"w": torch.tensor([-0.0])}) == "w: values differ"
    assert first_difference({"a": [1, 2.0]}, {"a": [1, 2.0000001]}).startswith("a[1]: ")
    assert "keys differ" in first_difference({"a": 1}, {"b": 1})
    assert first_difference(torch.zeros(2), torch.zeros(2, dtype=torch.float64)) == \
        "the top level: torch.float32[2] vs torch.float64[2]"
    assert first_difference(math.pi, math.pi) is None
