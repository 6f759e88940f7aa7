"""The Hugging Face Trainer under runner, end to end on CPU: real `runner start`, real Trainer, real S3 (moto).

The training script (tests/transformers_train.py) is a 2-layer GPT-2 built
from a config on a synthetic dataset, with `RunnerCallback`.  It prints every
step's exact loss, so that a resumed run can be compared bit for bit with an
uninterrupted one (the reference, run once per module against a local bucket).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import PYTHON, ROOT, subprocess_env
from runner.checkpoint import Reason, RunReader
from runner.storage import Store, clear_caches
from supervisor_harness import Supervisor

pytest.importorskip("transformers")

SCRIPT = str(Path(ROOT) / "tests" / "transformers_train.py")
RUN = "hf"
STEPS, SAVE_STEPS = 30, 10
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _env(**runner_vars: str) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env(OFFLINE).items() if not k.startswith("RUNNER_")}
    env.update(runner_vars)
    return env


class RunnerStart(Supervisor):
    """`python -m runner start ... -- python transformers_train.py ...` in a fresh, empty folder."""

    def __init__(self, tmp_path: Path, name: str, flags: list[str], script_args: list[str]):
        cwd = tmp_path / name
        cwd.mkdir()
        cmd = [PYTHON, "-m", "runner", "start", *flags, "--", PYTHON, SCRIPT, *script_args]
        self._watch(subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True))


def _losses(output: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^loss (\d+) (\S+)$", output, re.M)}


def _train(cwd: Path, bucket: str, run_id: str, *args: str, **runner_vars: str) -> str:
    """The script without a supervisor (as a user runs it on a laptop); its output."""
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([PYTHON, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=_env(RUNNER_BUCKET=bucket, RUNNER_RUN_ID=run_id, **runner_vars))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _snapshots(bucket: str, run_id: str) -> list:
    clear_caches()
    return list(RunReader(Store(bucket), run_id).valid_snapshots())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted run: its exact losses, final parameters, bucket and local checkpoint folders."""
    root = tmp_path_factory.mktemp("reference")
    bucket = str(root / "bucket")
    out = _train(root / "work", bucket, "ref", "--steps", str(STEPS), "--save-steps", str(SAVE_STEPS),
                 RUNNER_KEEP_LAST="10")
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1)), out
    return {"losses": losses, "params": re.search(r"finished params (\w+)", out).group(1),
            "bucket": bucket, "out": root / "work" / "out"}


def test_spot_notice_mid_run_exit_75_fresh_machine_resumes_bitwise(tmp_path, s3_bucket_url, reference):
    from runner.cost.ledger import read_events
    from runner.sim.imds import ImdsSimulator

    flags = ["--bucket", s3_bucket_url, "--run-id", RUN, "--keep-last", "10", "--notice-source", "ec2",
             "--poll-interval", "0.5", "--offline-prices", "--grace-seconds", "30"]
    script_args = ["--steps", str(STEPS), "--save-steps", str(SAVE_STEPS), "--sleep", "0.15",
                   "--save-total-limit", "2"]
    started: list[RunnerStart] = []
    try:
        with ImdsSimulator() as sim:
            first = RunnerStart(tmp_path, "first", [*flags, "--imds-endpoint", sim.url], script_args)
            started.append(first)
            first.wait_for(r"^loss 11 ", timeout=90)
            deadline = sim.schedule_spot_notice(0)
            code = first.finish(timeout=deadline - time.time())
            assert code == 75, first.output
            sim.reset()
            match = re.search(r"emergency snapshot (\S+) committed at step (\d+), ([\d.]+) s after", first.output)
            assert match, first.output
            sid, step = match.group(1), int(match.group(2))
            newest = _snapshots(s3_bucket_url, RUN)[0]
            assert (newest.snapshot_id, newest.step, newest.reason) == (sid, step, Reason.EMERGENCY)
            assert 11 <= step < STEPS and newest.extra["folder"] == f"checkpoint-{step}"
            assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                    "trainer_state.json"} <= {f.path for f in newest.files}
            before = _losses(first.output)
            redone = max(before) - step  # steps the first machine computed that the snapshot does not hold
            assert 0 <= redone <= 1, (max(before), step)

            second = RunnerStart(tmp_path, "second", [*flags, "--imds-endpoint", sim.url], script_args)
            started.append(second)
            assert second.finish(timeout=120) == 0, second.output
    finally:
        for sup in started:
            sup.kill()
    assert f"child: resume from out/checkpoint-{step}" in second.output, second.output
    after = _losses(second.output)
    assert sorted(after) == list(range(step + 1, STEPS + 1)), second.output
    stitched = {**{k: v for k, v in before.items() if k <= step}, **after}
    assert stitched == reference["losses"]  # bit for bit, every step
    assert f"finished params {reference['params']}" in second.output
    final = _snapshots(s3_bucket_url, RUN)[0]
    assert final.reason is Reason.FINAL and final.step == STEPS
    events = read_events(Store(s3_bucket_url), RUN)
    emergency = [e for e in events if e.kind == "emergency"]
    assert len(emergency) == 1 and emergency[0].get("committed") and emergency[0].get("step") == step
    assert {e.get("reason") for e in events if e.kind == "snapshot"} >= {"periodic", "emergency", "final"}
    saves = json.loads(re.search(r"child: saves (.*)$", first.output, re.M).group(1))
    print(f"\nnotice -> emergency commit {match.group(3)} s; work redone after the interruption: {redone} step(s); "
          f"saves of the first machine: {saves}")


def test_corrupt_newest_snapshot_falls_back_to_the_previous_one_and_resumes_exactly(tmp_path, reference, caplog):
    from runner.integrations.transformers import restore_checkpoint

    bucket = str(tmp_path / "bucket")
    shutil.copytree(reference["bucket"], bucket)
    newest = _snapshots(bucket, "ref")[0]
    assert newest.step == STEPS and newest.reason is Reason.FINAL
    weights = Path(bucket) / "ref" / "data" / newest.snapshot_id / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = bytes(b ^ 0xFF for b in data[-10:])  # same size: only the checksum can tell
    weights.write_bytes(bytes(data))
    work = tmp_path / "work"
    torn = work / "out" / f"checkpoint-{STEPS}"  # a local folder the bucket never vouched for
    torn.mkdir(parents=True)
    (torn / "trainer_state.json").write_text("{")

    with caplog.at_level(logging.WARNING, logger="runner.integrations"):
        path = restore_checkpoint(work / "out", bucket=bucket, run_id="ref", resume="latest")
    previous = f"checkpoint-{STEPS - SAVE_STEPS}"
    assert path == str(work / "out" / previous)
    assert f"{newest.snapshot_id} (step {STEPS}) is unusable (model.safetensors does not match its checksum)" \
        in caplog.text  # fmt: skip
    assert sorted(p.name for p in (work / "out").iterdir()) == [".runner-set-aside", previous]
    original = reference["out"] / previous
    for f in original.iterdir():
        assert (Path(path) / f.name).read_bytes() == f.read_bytes(), f.name

    out = _train(work, bucket, "ref", "--steps", str(STEPS), "--save-steps", str(SAVE_STEPS))
    assert f"child: resume from out/{previous}" in out
    resumed = _losses(out)
    assert resumed == {k: v for k, v in reference["losses"].items() if k > STEPS - SAVE_STEPS}
    assert f"finished params {reference['params']}" in out


def test_retention_keeps_the_newest_k_and_pinned_snapshots_save_total_limit_1_safe(tmp_path, s3_bucket_url):
    from runner import cli

    keep = {"RUNNER_KEEP_LAST": "2"}
    work = tmp_path / "work"
    work.mkdir()
    args = ["--steps", "12", "--save-steps", "3", "--save-total-limit", "1"]
    # Stopped by hand with SIGUSR1 (no supervisor): an emergency snapshot at the next step.
    child = subprocess.Popen([PYTHON, SCRIPT, *args, "--sleep", "0.2"], cwd=work, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env=_env(RUNNER_BUCKET=s3_bucket_url, RUNNER_RUN_ID=RUN, **keep))
    lines = []
    for line in child.stdout:
        lines.append(line)
        if line.startswith("loss 5 "):
            child.send_signal(signal.SIGUSR1)
    assert child.wait(30) == 0, "".join(lines)
    stopped = int(re.search(r"child: stopped at step (\d+)", "".join(lines)).group(1))
    first = _snapshots(s3_bucket_url, RUN)
    assert [(m.step, m.reason) for m in first] == [(stopped, Reason.EMERGENCY), (3, Reason.PERIODIC)]
    assert cli.main(["pin", "--bucket", s3_bucket_url, "--run-id", RUN, first[1].snapshot_id]) == 0

    out = _train(work, s3_bucket_url, RUN, *args, **keep)
    assert f"resume from out/checkpoint-{stopped}" in out and "NOT committed" not in out
    kept = [(m.step, m.reason) for m in _snapshots(s3_bucket_url, RUN)]
    assert kept == [(12, Reason.FINAL), (9, Reason.PERIODIC), (3, Reason.PERIODIC)]  # newest 2 + the pinned one
    clear_caches()
    left = {o.key.split("/")[2] for o in Store(s3_bucket_url).list(f"{RUN}/data/")}
    assert len(left) == 3  # deleted snapshots leave no data behind


def test_bad_settings_are_one_clear_config_error(monkeypatch, tmp_path):
    from runner.errors import ConfigError
    from runner.integrations.transformers import RunnerCallback

    monkeypatch.delenv("RUNNER_BUCKET", raising=False)
    with pytest.raises(ConfigError, match=r"^invalid bucket: .*set RUNNER_BUCKET, or pass bucket=\.\.\.\)$"):
        RunnerCallback.from_env()
    with pytest.raises(ConfigError, match=r"^invalid keep_last: "):
        RunnerCallback.from_env(bucket=str(tmp_path), keep_last=0)
