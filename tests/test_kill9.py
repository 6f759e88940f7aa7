"""Kill -9 anywhere: a save interrupted by SIGKILL never yields a snapshot that is chosen.

Two suites, each on a local folder and on moto S3:
- at every phase of a save (`RUNNER_FAULT_KILL_AT=<phase>:2`: the second
  save of the process kills it), the next start restores the newest
  *committed* snapshot, never the torn one;
- SIGKILLs from outside after seeded random delays, run after run, each
  next start restoring a snapshot that passes a deep verify, holds exactly
  the state of its step, and is not older than any save known committed.

Every run is a real process killed by a real SIGKILL.  They are forked from
a forkserver that has imported torch once (`tiny_training`), so a fresh
process costs milliseconds instead of seconds; each sets its own
environment and working folder, and shares nothing with the killed one but
the bucket.  The seed is printed and in every failure message; set
RUNNER_TEST_KILL9_SEED to explore other kill points.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import tiny_training as tiny
from helpers import ROOT
from runner.checkpoint import layout
from runner.checkpoint.reader import RunReader
from runner.checkpoint.writer import FAULT_ENV, PHASES
from runner.storage import Store

SEED = int(os.environ.get("RUNNER_TEST_KILL9_SEED", "20250611"))
PROCESS_TIMEOUT = 60


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.BaseContext:
    """A forkserver with torch, runner and s3fs imported, started now.

    The server finds `tiny_training` through PYTHONPATH (it does not apply the
    parent's sys.path before preloading), and a failed preload is silent.
    """
    from multiprocessing import forkserver as server

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "tiny_training", "runner.checkpoint", "runner.storage", "s3fs",
                                "aiobotocore.session", "aiohttp"])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]
    try:
        server.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return ctx


@pytest.fixture(params=["local", "s3"])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "bucket")
    return request.getfixturevalue("s3_bucket_url")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment (with the moto settings when in use), minus the machine's RUNNER_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), ROOT, env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def _events(log: Path, pid: int | None = None) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    events = [json.loads(line) for line in log.read_text().splitlines() if line]
    if pid is None:
        return events
    out, mine = [], False
    for e in events:  # a run's events start with its "restored" record, which names its pid
        if e["event"] == "restored":
            mine = e["pid"] == pid
        if mine:
            out.append(e)
    return out


def _fresh_dir(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.mkdir()
    return str(path)


def _restore_in_fresh_process(ctx, bucket: str, run_id: str, tmp_path: Path, name: str) -> dict[str, Any]:
    log = tmp_path / f"{name}.jsonl"
    p = ctx.Process(target=tiny.restore_only, args=(bucket, run_id, str(log)),
                    kwargs={"env": _env(), "cwd": _fresh_dir(tmp_path, name)})
    p.start()
    p.join(PROCESS_TIMEOUT)
    assert p.exitcode == 0, f"the restoring process failed ({p.exitcode})"
    [restored] = _events(log)
    return restored


# -- a kill at every phase of a save ---------------------------------------------


@pytest.mark.parametrize("phase", PHASES)
def test_kill_at_each_phase_of_a_save_restores_the_newest_committed(
        forkserver, bucket: str, phase: str, tmp_path: Path) -> None:
    log = tmp_path / "killed.jsonl"
    # Saves at steps 5 and 10; the second one dies at `phase`.
    p = forkserver.Process(target=tiny.train, args=(bucket, "k9", 30, 5, str(log)),
                           kwargs={"env": _env({FAULT_ENV: f"{phase}:2"}), "cwd": _fresh_dir(tmp_path, "killed")})
    p.start()
    p.join(PROCESS_TIMEOUT)
    assert p.exitcode == -signal.SIGKILL, f"expected death by SIGKILL at {phase}, got exit {p.exitcode}"
    digests = {e["step"]: e["digest"] for e in _events(log) if e["event"] == "step"}
    assert max(digests) >= 10 and "finished" not in [e["event"] for e in _events(log)]

    restored = _restore_in_fresh_process(forkserver, bucket, "k9", tmp_path, "restorer")
    expected = 10 if phase == "after-manifest" else 5
    assert restored["step"] == expected, f"killed at {phase}"
    assert restored["verify"] is None
    assert restored["digest"] == digests[expected]  # the model as it was when that save began

    # What the killed save left: nothing (before-data), invisible data without a manifest, or a whole snapshot.
    store = Store(bucket)
    reader = RunReader(store, "k9")
    assert sorted(m.step for m in reader.valid_snapshots()) == ([5, 10] if expected == 10 else [5])
    data_sids = {layout.snapshot_id_from_data_key("k9", o.key) for o in store.list(layout.data_prefix("k9"))}
    torn = {s for s in data_sids if layout.step_of(s) == 10} - set(reader.snapshot_ids())
    assert bool(torn) is (phase in ("mid-data", "before-manifest")), (phase, torn)


# -- kills from outside, at random moments ----------------------------------------


def test_random_sigkills_never_cost_a_committed_snapshot(forkserver, bucket: str, tmp_path: Path) -> None:
    runs = 30 if bucket.startswith("/") else 20  # a save on moto takes longer
    print(f"kill-9 seed: {SEED} (RUNNER_TEST_KILL9_SEED)")
    rng = random.Random(f"{SEED}-{bucket.split(':')[0]}")
    log = tmp_path / "runs.jsonl"
    env = _env()
    started: set[int] = {0}
    newest_committed = 0
    history: list[int] = []  # the step each fresh start restored
    for run in range(runs + 1):
        last = run == runs
        async_save, delay = rng.random() < 0.5, rng.uniform(0.0, 0.4)
        where = f"seed {SEED}, run {run}, async={async_save}, delay {delay:.3f}s"
        if last:
            p = forkserver.Process(target=tiny.restore_only, args=(bucket, "rk", str(log)),
                                   kwargs={"env": env, "cwd": _fresh_dir(tmp_path, f"run{run}")})
        else:
            p = forkserver.Process(target=tiny.save_forever,
                                   args=(bucket, "rk", str(log), env, _fresh_dir(tmp_path, f"run{run}"), async_save))
        p.start()
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while not _events(log, p.pid) and p.exitcode is None:  # wait for its restore
            assert time.monotonic() < deadline, where
            time.sleep(0.005)
        if not last:
            time.sleep(delay)
            os.kill(p.pid, signal.SIGKILL)
        p.join(PROCESS_TIMEOUT)
        assert p.exitcode == (0 if last else -signal.SIGKILL), f"{where}: exit {p.exitcode}"

        events = _events(log, p.pid)
        restored = events[0]
        assert restored["event"] == "restored", where
        step = restored["step"]
        assert restored["verify"] is None, f"{where}: restored a snapshot that fails a deep verify"
        assert restored.get("marker_ok", True) and restored.get("extra_ok", True), \
            f"{where}: the restored state is not the state of step {step}"
        assert step >= newest_committed, f"{where}: restored {step}, but {newest_committed} was committed"
        assert step in started, f"{where}: restored step {step}, which no run ever saved"
        started |= {e["step"] for e in events if e["event"] == "started"}
        newest_committed = max([step] + [e["step"] for e in events if e["event"] == "committed"])
        history.append(step)

    print(f"{runs} kills; steps restored: {history}")
    assert newest_committed > 0, f"seed {SEED}: no save ever committed; the kills came too early"
    reader = RunReader(Store(bucket), "rk")
    steps = [m.step for m in reader.valid_snapshots()]
    assert len(steps) == len(set(steps)), f"seed {SEED}: two committed snapshots of one step: {steps}"
