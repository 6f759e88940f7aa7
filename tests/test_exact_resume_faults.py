"""Exact resume when the store misbehaves: retries and lost replies must not move the training's RNG streams.

Each run is a real training process (`python -m tiny_training train`: a loss
drawing from python's `random`, numpy's global generator and torch's default
generator, dropout included) saving every 2 steps.  The S3 runs go through a
loopback proxy in front of moto that fails a seeded share of requests
(503 SlowDown, 500, reset connections, replies lost after the write was
applied); some are also killed with SIGKILL (each after it trained at least
one step) and restarted as fresh processes in empty folders.  Every one must
end with parameters, optimizer state and RNG streams bitwise equal to the
same run's on a local folder without faults.  Kill points come from
random.Random(KILL_SEED); set RUNNER_TEST_KILL_SEED to explore others.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flaky_proxy import FaultPlan, FlakyProxy
from helpers import PYTHON, ROOT, subprocess_env

STEPS = 24
SAVE_EVERY = 2
STEP_SLEEP = 0.02  # keeps a kill window open in every step
FAULTS = {"503": 0.04, "500": 0.03, "reset": 0.03, "lost-reply": 0.03}  # 13 % of requests fail
KILL_SEED = int(os.environ.get("RUNNER_TEST_KILL_SEED", "20261203"))
TIMEOUT = 180


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env(extra).items() if not k.startswith("RUNNER_")}
    env["PYTHONPATH"] = os.path.join(ROOT, "tests") + os.pathsep + env["PYTHONPATH"]
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(bucket: str, log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    cwd.mkdir()
    cmd = [PYTHON, "-m", "tiny_training", "train", "--bucket", bucket, "--run-id", "faults",
           "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--step-sleep", str(STEP_SLEEP),
           "--log", str(log)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _events(log: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _kill_after(proc: subprocess.Popen, log: Path, step: int, delay: float) -> None:
    """SIGKILL the run `delay` s after it logged a step >= `step` of its own (it trained at least one)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        steps = _steps_since_start(log)
        if steps and steps[-1] >= step:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return
        time.sleep(0.005)
    output = proc.stdout.read() if proc.poll() is not None else ""
    proc.kill()
    raise AssertionError(f"the run never reached step {step} (exit {proc.poll()})\n{output}")


def _steps_since_start(log: Path) -> list[int]:
    """The steps the newest process logged (after its own `restored` line)."""
    events = _events(log)
    starts = [i for i, e in enumerate(events) if e.get("event") == "restored"]
    if not starts:
        return []
    return [e["step"] for e in events[starts[-1]:] if e.get("event") == "step"]


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output}"


def _run(bucket: str, tmp: Path, env: dict[str, str], kills: int) -> dict:
    """Train to the end with `kills` SIGKILLs on the way; the finished record, and how each start went."""
    rng = random.Random(f"{KILL_SEED}-{kills}-{bucket.split(':')[0]}")
    log = tmp / "events.jsonl"
    for attempt in range(kills):
        proc = _start(bucket, log, tmp / f"attempt{attempt}", env)
        resumed_at = _wait_restored(log, attempt + 1)
        target = min(STEPS - 2, resumed_at + rng.randint(1, 2 * SAVE_EVERY + 1))
        _kill_after(proc, log, target, round(rng.uniform(0.0, STEP_SLEEP * 1.5), 4))
    _finish(_start(bucket, log, tmp / "final", env))
    events = _events(log)
    finished = [e for e in events if e.get("event") == "finished"]
    assert len(finished) == 1, events
    restored = [e for e in events if e.get("event") == "restored"]
    assert len(restored) == kills + 1
    assert all(r["verify"] is None for r in restored if r["snapshot"]), restored  # every resume deep-verified
    return {"finished": finished[0], "restored": restored}


def _wait_restored(log: Path, count: int) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        restored = [e for e in _events(log) if e.get("event") == "restored"]
        if len(restored) >= count:
            return restored[-1]["step"]
        time.sleep(0.01)
    raise AssertionError(f"no restore logged in {log}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The run without faults or kills, on a local folder."""
    tmp = tmp_path_factory.mktemp("reference")
    return _run(str(tmp / "bucket"), tmp, _env(), kills=0)["finished"]


@pytest.fixture
def faulty_s3(s3_bucket_url: str, s3_env: dict[str, str]):
    with FlakyProxy(s3_env["AWS_ENDPOINT_URL"], faults=FaultPlan(FAULTS, seed=KILL_SEED)) as proxy:
        yield proxy, _env({**s3_env, "AWS_ENDPOINT_URL": proxy.url})


def _assert_same(reference: dict, run: dict, what: str) -> None:
    got = run["finished"]
    assert got["step"] == reference["step"] == STEPS
    assert got["fingerprint"] == reference["fingerprint"], f"{what}: the final state differs (kill seed {KILL_SEED})"
    assert got["after_save"] == got["fingerprint"], f"{what}: the final save moved a random stream"


def test_a_run_through_failing_s3_ends_bitwise_equal_to_the_run_without_faults(
        reference: dict, faulty_s3, s3_bucket_url: str, tmp_path: Path) -> None:
    proxy, env = faulty_s3
    run = _run(s3_bucket_url, tmp_path, env, kills=0)
    _assert_same(reference, run, "a run through failing S3")
    assert min(proxy.counts[k] for k in FAULTS) >= 1, proxy.counts  # every kind of fault happened
    print(f"faults {dict(proxy.counts)} in {proxy.requests} requests")


def test_a_run_killed_twice_through_failing_s3_ends_bitwise_equal(
        reference: dict, faulty_s3, s3_bucket_url: str, tmp_path: Path) -> None:
    proxy, env = faulty_s3
    run = _run(s3_bucket_url, tmp_path, env, kills=2)
    _assert_same(reference, run, "a run killed twice through failing S3")
    assert sum(proxy.counts.values()) >= 5, proxy.counts
    starts = [round(r["seconds"], 2) for r in run["restored"]]
    print(f"faults {dict(proxy.counts)} in {proxy.requests} requests; Checkpointer start + restore: {starts} s")


def test_a_run_killed_twice_on_a_local_folder_ends_bitwise_equal(reference: dict, tmp_path: Path) -> None:
    run = _run(str(tmp_path / "bucket"), tmp_path, _env(), kills=2)
    _assert_same(reference, run, "a run killed twice on a local folder")
