"""Exact resume: a run interrupted and restarted ends bitwise equal to a straight run.

Every run is a real `python -m runner.examples.voice` process, interrupted
with SIGKILL (nothing saved on the way out) or the stop signal (an emergency
snapshot); every restart is a fresh process in a fresh, empty working
directory, so nothing survives but the bucket. Interruption points come from
random.Random(KILL_SEED); the plan is printed and the seed is in every
failure message (set RUNNER_TEST_KILL_SEED to explore other points).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import PYTHON, subprocess_env
from runner.control import STOP_SIGNAL
from runner.examples import voice

STEPS = 40
SAVE_EVERY = 3  # not a divisor of STEPS, so the end is reached between saves
STEP_SLEEP = 0.01  # keeps the kill window open; a step is ~30 ms with it
# One thread: fast to start, and least disturbed by other work on the machine.
THREADS = "1"
KILL_SEED = int(os.environ.get("RUNNER_TEST_KILL_SEED", "20240611"))
PROCESS_TIMEOUT = 120
PROGRESS = re.compile(r"^step (\d+)/")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # The test machine's own RUNNER_* settings must not leak into the runs.
    env = {k: v for k, v in subprocess_env(extra).items() if not k.startswith("RUNNER_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _voice_cmd(bucket: str, fingerprint: Path) -> list[str]:
    return [
        PYTHON, "-m", "runner.examples.voice",
        "--bucket", bucket, "--run-id", "exact",
        "--steps", str(STEPS), "--save-every-steps", str(SAVE_EVERY),
        "--step-sleep", str(STEP_SLEEP), "--log-every", "1", "--threads", THREADS,
        "--fingerprint-out", str(fingerprint),
    ]  # fmt: skip


def _fresh_cwd(tmp_path: Path, name: str) -> Path:
    cwd = tmp_path / name
    cwd.mkdir()
    return cwd


def _run_to_end(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _run_and_interrupt(cmd: list[str], cwd: Path, env: dict[str, str], at: Interruption) -> str:
    """Start the run and send `at.signal` `at.delay` s after it reports step >= `at.step`.

    The delay lets the signal land anywhere in a step: in the math, the
    sleep, or a save in flight. Returns the run's output.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(PROCESS_TIMEOUT, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            match = PROGRESS.match(line)
            if match and int(match.group(1)) >= at.step:
                time.sleep(at.delay)
                os.kill(proc.pid, at.signal)
                break
        if at.signal != signal.SIGKILL:
            lines.extend(proc.stdout)  # it saves, says so, and exits on its own
        proc.wait(timeout=PROCESS_TIMEOUT)
    finally:
        watchdog.cancel()
        proc.stdout.close()
    output = "".join(lines)
    expected = -signal.SIGKILL if at.signal == signal.SIGKILL else 0
    assert proc.returncode == expected, f"{at} went wrong (exit {proc.returncode}); kill seed {KILL_SEED}\n{output}"
    if at.signal == STOP_SIGNAL:
        assert "preemption requested" in output, output
    return output


@dataclass(frozen=True)
class Interruption:
    step: int
    delay: float
    signal: signal.Signals


def _plan(rng: random.Random, signals: list[signal.Signals]) -> list[Interruption]:
    """Increasing steps, each well before the end, with a delay inside one step.

    The first comes after the second periodic save started, which is after
    the first one was committed, so every plan exercises a real resume.
    """
    steps = sorted(rng.sample(range(2 * SAVE_EVERY + 1, STEPS - 4), len(signals)))
    return [Interruption(step, round(rng.uniform(0.0, 0.03), 4), sig) for step, sig in zip(steps, signals)]


def _interrupted_run(tmp_path: Path, bucket: str, env: dict[str, str], signals: list[signal.Signals]) -> dict:
    plan = _plan(random.Random(f"{KILL_SEED}-{len(signals)}-{bucket.split(':')[0]}"), signals)
    print(f"kill seed {KILL_SEED}: {plan}")
    fingerprint = tmp_path / "fingerprint.json"
    log = []
    for attempt, at in enumerate(plan):
        cwd = _fresh_cwd(tmp_path, f"attempt{attempt}")
        log.append(_run_and_interrupt(_voice_cmd(bucket, fingerprint), cwd, env, at))
    log.append(_run_to_end(_voice_cmd(bucket, fingerprint), _fresh_cwd(tmp_path, "final"), env))
    assert "resuming at step" in log[1], "\n---\n".join(log)
    result = json.loads(fingerprint.read_text())
    result["_log"] = "\n---\n".join(log)
    return result


def _assert_same(straight: dict, resumed: dict, what: str) -> None:
    keys = ("step", "params_sha256", "optimizer_sha256", "loss")
    assert {k: resumed[k] for k in keys} == {k: straight[k] for k in keys}, (
        f"{what} differs from the straight run (kill seed {KILL_SEED})\n{resumed['_log']}"
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run, once per module (its result does not depend on the store)."""
    tmp = tmp_path_factory.mktemp("straight")
    fingerprint = tmp / "straight.json"
    _run_to_end(_voice_cmd(str(tmp / "bucket"), fingerprint), _fresh_cwd(tmp, "cwd"), _env())
    return json.loads(fingerprint.read_text())


def test_killed_twice_and_stopped_once_on_a_local_folder_ends_bitwise_identical(
    tmp_path: Path, straight: dict
) -> None:
    # The stop request (what the supervisor sends on a spot notice) makes an
    # emergency snapshot between two periodic ones; resuming from it must be
    # just as exact.
    signals = [signal.SIGKILL, STOP_SIGNAL, signal.SIGKILL]
    resumed = _interrupted_run(tmp_path, str(tmp_path / "bucket"), _env(), signals)
    _assert_same(straight, resumed, "a run killed, stopped, and killed again")


def test_killed_twice_in_a_row_on_s3_ends_bitwise_identical(
    tmp_path: Path, straight: dict, s3_bucket_url: str, s3_env: dict[str, str]
) -> None:
    resumed = _interrupted_run(tmp_path, s3_bucket_url, _env(s3_env), [signal.SIGKILL, signal.SIGKILL])
    _assert_same(straight, resumed, "a run on S3 killed twice")


@pytest.fixture
def torch_globals():
    """In-process runs pin threads and determinism; give the test session its settings back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_saving_does_not_change_the_trained_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_globals: None
) -> None:
    # Periodic saves must not draw from any RNG or touch the training state.
    for key in [k for k in os.environ if k.startswith("RUNNER_")]:
        monkeypatch.delenv(key)
    common = ["--steps", "24", "--log-every", "0", "--threads", THREADS]
    assert voice.main([*common, "--no-checkpoint", "--fingerprint-out", str(tmp_path / "plain.json")]) == 0
    saved = ["--bucket", str(tmp_path / "bucket"), "--save-every-steps", "3"]
    assert voice.main([*common, *saved, "--fingerprint-out", str(tmp_path / "saved.json")]) == 0
    assert json.loads((tmp_path / "saved.json").read_text()) == json.loads((tmp_path / "plain.json").read_text())
