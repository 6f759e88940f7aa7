"""Checkpoint behaviour: what a snapshot holds, how it comes back, what is kept.

Real torch training on CPU (tiny_training: Linear + Dropout, Adam, StepLR, a
disabled GradScaler, a user object), real stores, real subprocesses and a
real SIGUSR1.  Restores go into freshly built (differently initialized)
objects, so a passing comparison means the state really came from the bucket.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import runner
import tiny_training as tiny
from helpers import PYTHON, ROOT, subprocess_env
from runner import control
from runner.checkpoint import layout, retention
from runner.checkpoint.manifest import Reason
from runner.checkpoint.reader import RunReader
from runner.checkpoint.state import StateMismatchError
from runner.storage import Store


def _ckpt(bucket: str, run_id: str = "exp", **kwargs: Any) -> runner.Checkpointer:
    kwargs.setdefault("save_every_steps", 1000)
    return runner.Checkpointer(bucket, run_id, **kwargs)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Deep, bitwise equality of two state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _snapshot_of(parts: tiny.Parts) -> dict[str, Any]:
    import copy

    return {name: copy.deepcopy(obj.state_dict()) for name, obj in parts.components().items()}


def _draws() -> tuple[float, list[float], list[float]]:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


# -- restore --------------------------------------------------------------------


def test_restore_on_an_empty_bucket_returns_zero(tmp_path: Path) -> None:
    parts = tiny.build()
    before = tiny.digest(parts.model)
    ckpt = _ckpt(str(tmp_path / "bucket"), **parts.components())
    assert ckpt.restore() == 0
    assert ckpt.last_snapshot is None and not ckpt.finished
    assert tiny.digest(parts.model) == before
    ckpt.close()


def test_round_trip_restores_every_component_and_rng(bucket_url: str) -> None:
    a = tiny.build(seed=0)
    ckpt = _ckpt(bucket_url, extra={"data_position": 48}, **a.components())
    for _ in range(5):
        tiny.train_step(a)
    ckpt.save(5, epoch=2, metrics={"loss": 0.25})
    ckpt.close()
    saved = _snapshot_of(a)
    draws = _draws()
    continued = [tiny.train_step(a) for _ in range(3)]  # dropout and data draw from the RNG too

    b = tiny.build(seed=99)  # different initial weights
    assert tiny.digest(b.model) != tiny.digest(a.model)
    random.seed(1)  # scramble every stream
    np.random.seed(1)
    torch.manual_seed(1)
    extra: dict[str, Any] = {"stale": True}
    ckpt_b = _ckpt(bucket_url, extra=extra, **b.components())
    assert ckpt_b.restore() == 5
    assert_same(saved, _snapshot_of(b))
    assert b.scheduler.get_last_lr() == [0.05 * 0.5 ** 2]  # StepLR(2): stepped 5 times
    assert b.counter.samples_seen == 80
    assert (ckpt_b.epoch, ckpt_b.metrics) == (2, {"loss": 0.25})
    assert extra == {"data_position": 48} and ckpt_b.extra is extra  # updated in place
    assert _draws() == draws
    assert [tiny.train_step(b) for _ in range(3)] == continued
    assert_same(_snapshot_of(a), _snapshot_of(b))  # the resumed run goes on bit for bit
    ckpt_b.close()


def test_a_component_can_be_restored_alone(tmp_path: Path) -> None:
    bucket = str(tmp_path / "bucket")
    gpt, sovits = nn.Linear(3, 4), nn.Linear(4, 2)
    with _ckpt(bucket, gpt=gpt, sovits=sovits) as ckpt:
        ckpt.save(7)
    fresh = nn.Linear(4, 2)
    with _ckpt(bucket, sovits=fresh) as alone:
        assert alone.restore() == 7
    assert_same(sovits.state_dict(), fresh.state_dict())


# -- structure changes ----------------------------------------------------------


class _Old(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        self.dropped = nn.Linear(2, 2)


class _New(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)  # unchanged
        self.head = nn.Linear(8, 3)  # reshaped
        self.added = nn.Linear(3, 3)  # new


def test_strict_restore_names_every_mismatched_key(tmp_path: Path) -> None:
    bucket = str(tmp_path / "bucket")
    with _ckpt(bucket, model=_Old()) as ckpt:
        ckpt.save(3)
    new = _New()
    before = tiny.digest(new)
    with _ckpt(bucket, model=new) as ckpt, pytest.raises(StateMismatchError) as info:
        ckpt.restore()
    message = str(info.value)
    assert "\n" not in message and "strict=False" in message
    assert "missing: added.bias, added.weight" in message
    assert "unexpected: dropped.bias, dropped.weight" in message
    assert "shape-mismatched: head.bias (2,)->(3,), head.weight (2, 8)->(3, 8)" in message
    assert tiny.digest(new) == before  # nothing half-loaded


def test_non_strict_restore_loads_what_matches_and_reports_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bucket = str(tmp_path / "bucket")
    old = _Old()
    with _ckpt(bucket, model=old) as ckpt:
        ckpt.save(3)
    new = _New()
    head_before = new.head.weight.clone()
    with caplog.at_level(logging.WARNING), _ckpt(bucket, strict=False, model=new) as ckpt:
        assert ckpt.restore() == 3
    assert torch.equal(new.encoder.weight, old.encoder.weight)
    assert torch.equal(new.head.weight, head_before)  # left at its initialization
    report = ckpt.load_reports["model"]
    assert report.missing == ["added.bias", "added.weight"]
    assert report.unexpected == ["dropped.bias", "dropped.weight"]
    assert [m.split(" ")[0] for m in report.mismatched] == ["head.bias", "head.weight"]
    assert any("non-strictly" in r.getMessage() and "added.weight" in r.getMessage() for r in caplog.records)


def test_a_component_added_to_a_run_is_a_structure_change_not_corruption(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Every snapshot lacks it: skipping them all would silently restart the run from step 0.
    bucket = str(tmp_path / "bucket")
    model = nn.Linear(3, 3)
    with _ckpt(bucket, model=model) as ckpt:
        ckpt.save(8)
    with _ckpt(bucket, model=nn.Linear(3, 3), ema=nn.Linear(3, 3)) as ckpt, pytest.raises(StateMismatchError) as info:
        ckpt.restore()
    assert "'ema'" in str(info.value) and "strict=False" in str(info.value)
    fresh = nn.Linear(3, 3)
    with caplog.at_level(logging.WARNING), _ckpt(bucket, strict=False, model=fresh, ema=nn.Linear(3, 3)) as ckpt:
        assert ckpt.restore() == 8
    assert torch.equal(fresh.weight, model.weight)
    assert any("'ema'" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


# -- retention ------------------------------------------------------------------


def _manifest_steps(store: Store, run_id: str = "exp") -> list[int]:
    return sorted(layout.step_of(sid) for sid in RunReader(store, run_id).snapshot_ids())


def _data_steps(store: Store, run_id: str = "exp") -> list[int]:
    sids = {layout.snapshot_id_from_data_key(run_id, o.key) for o in store.list(layout.data_prefix(run_id))}
    return sorted(layout.step_of(s) for s in sids if s)


def test_retention_keeps_the_newest_k_and_pinned(tmp_path: Path) -> None:
    bucket = str(tmp_path / "bucket")
    parts = tiny.build()
    with _ckpt(bucket, keep_last=2, **parts.components()) as ckpt:
        for step in range(1, 6):
            tiny.train_step(parts)
            ckpt.save(step, pin=step == 2)
    store = Store(bucket)
    assert _manifest_steps(store) == [2, 4, 5]
    assert _data_steps(store) == [2, 4, 5]  # deleted snapshots leave no data behind
    reader = RunReader(store, "exp")
    assert all(reader.verify(m) is None for m in reader.valid_snapshots())


def test_the_reader_fetches_each_manifest_once_yet_sees_every_change(bucket_url: str) -> None:
    with _ckpt(bucket_url, keep_last=10, **tiny.build().components()) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step)
    store = Store(bucket_url)
    reader = RunReader(store, "exp")
    fetched: list[str] = []
    real_read = store.read_bytes
    store.read_bytes = lambda key: fetched.append(key) or real_read(key)  # type: ignore[method-assign]
    assert [s.valid for s in reader.statuses()] == [True, True, True]
    assert len(fetched) == 3
    assert [s.valid for s in reader.statuses()] == [True, True, True]
    assert len(fetched) == 3  # manifests are immutable: parsed once
    newest, middle, oldest = reader.snapshot_ids()
    store.delete([layout.manifest_key("exp", newest)])  # a manifest that vanishes is gone at the next listing
    store.write_bytes(layout.manifest_key("exp", middle), b"{}")  # one rewritten (out of protocol) is read again
    statuses = list(reader.statuses())
    assert [s.snapshot_id for s in statuses] == [middle, oldest]
    assert not statuses[0].valid and "bad manifest" in str(statuses[0].problem)
    assert statuses[1].valid and fetched[3:] == [layout.manifest_key("exp", middle)]


def test_retention_never_deletes_the_newest_valid_snapshot(tmp_path: Path) -> None:
    bucket = str(tmp_path / "bucket")
    store = Store(bucket)
    parts = tiny.build()
    with _ckpt(bucket, keep_last=1, **parts.components()) as ckpt:
        ckpt.save(1)
        # Something newer that does not count: an unreadable manifest with a higher step.
        store.write_bytes(layout.manifest_key("exp", layout.new_snapshot_id(99)), b"{not json")
        ckpt.save(2)
    reader = RunReader(store, "exp")
    assert [m.step for m in reader.valid_snapshots()] == [2]
    assert _manifest_steps(store) == [2, 99]  # the invalid one is left for an operator to judge
    assert retention.KeepLastN(0).to_delete(list(reader.valid_snapshots()), set()) == []


def test_a_rolled_back_run_keeps_what_it_just_saved(tmp_path: Path) -> None:
    # Resuming an older snapshot (rolling back a bad change) while newer-step ones remain:
    # retention must not delete the snapshot it has just committed.
    bucket = str(tmp_path / "bucket")
    parts = tiny.build()
    with _ckpt(bucket, keep_last=3, **parts.components()) as ckpt:
        ids = [ckpt.save(step).manifest.snapshot_id for step in (10, 20, 30)]
    with _ckpt(bucket, keep_last=2, resume=ids[0], **parts.components()) as ckpt:
        assert ckpt.restore() == 10
        kept = ckpt.save(11).manifest.snapshot_id
    reader = RunReader(Store(bucket), "exp")
    assert kept in reader.snapshot_ids()
    assert reader.verify(reader.load_manifest(kept)) is None


# -- saving -----------------------------------------------------------------------


def test_periodic_save_is_async_and_commits(tmp_path: Path) -> None:
    bucket = str(tmp_path / "bucket")
    parts = tiny.build(hidden=1024, width=1024)  # ~4 MiB of weights, ~12 MiB with Adam's moments
    tiny.train_step(parts)
    ckpt = runner.Checkpointer(bucket, "exp", save_every_steps=2, **parts.components())
    assert ckpt.step(1) is False
    assert RunReader(ckpt.store, "exp").snapshot_ids() == []
    started = time.perf_counter()
    assert ckpt.step(2) is False
    stall = time.perf_counter() - started
    in_flight = ckpt._writer.busy()
    result = ckpt.wait()
    assert result is not None and result.manifest.step == 2 and result.manifest.reason is Reason.PERIODIC
    assert in_flight, "step() waited for the upload"
    assert stall < result.write_seconds, (stall, result.write_seconds)
    assert RunReader(ckpt.store, "exp").newest_valid().snapshot_id == result.manifest.snapshot_id
    ckpt.close()


def _saved_model(reader: RunReader, snapshot_id: str) -> dict[str, Any]:
    manifest = reader.load_manifest(snapshot_id)
    return runner.checkpoint.state.deserialize(reader.read_file(manifest, manifest.file("model")))


def test_a_capture_never_reuses_memory_lent_to_a_write_in_flight() -> None:
    from runner.checkpoint import state

    model = nn.Linear(64, 64)
    buffers = state.HostBuffers()
    first = state.capture({"model": model}, buffers)
    before = first["model"]["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    second = state.capture({"model": model}, buffers)  # the first is still out: fresh memory
    assert torch.equal(first["model"]["weight"], before)
    assert second["model"]["weight"].data_ptr() != first["model"]["weight"].data_ptr()
    buffers.give_back(first)  # written: its memory may now be reused
    with torch.no_grad():
        model.weight.add_(1.0)
    third = state.capture({"model": model}, buffers)
    assert third["model"]["weight"].data_ptr() == first["model"]["weight"].data_ptr()
    assert torch.equal(third["model"]["weight"], model.weight.detach())
    assert torch.equal(second["model"]["weight"], before + 1.0)


def test_reused_capture_buffers_never_alter_a_snapshot_being_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each periodic save's data is held up; the loop updates the parameters meanwhile and saves again
    # (periodic, then synchronous), copying into the memory of the save before. Each snapshot must
    # hold the values of its own step.
    from runner.checkpoint import state

    bucket = str(tmp_path / "bucket")
    parts = tiny.build(hidden=256, width=256)
    tiny.train_step(parts)
    gates = {1: threading.Event(), 2: threading.Event()}
    real_write_file, real_take = Store.write_file, state.HostBuffers.take
    reused: list[bool] = []

    def gated_write_file(self: Store, key: str, local_path: str) -> None:
        gate = gates.get(layout.step_of(key.split("/")[2]))  # <run>/data/<snapshot id>/<file>
        if gate is not None:
            gate.wait(10)
        real_write_file(self, key, local_path)

    def recorded_take(self: state.HostBuffers) -> Any:
        taken = real_take(self)
        reused.append(taken is not None)
        return taken

    monkeypatch.setattr(Store, "write_file", gated_write_file)
    monkeypatch.setattr(state.HostBuffers, "take", recorded_take)
    ckpt = runner.Checkpointer(bucket, "exp", save_every_steps=1, **parts.components())
    expected: dict[int, dict[str, torch.Tensor]] = {}
    for step in (1, 2):
        expected[step] = {k: v.clone() for k, v in parts.model.state_dict().items()}
        assert ckpt.step(step) is False
        assert ckpt._writer.busy()
        tiny.train_step(parts)  # mutates the live parameters while the write is in flight
        threading.Timer(0.2, gates[step].set).start()  # the next save waits for it
    expected[3] = {k: v.clone() for k, v in parts.model.state_dict().items()}
    ckpt.save(3)
    assert reused == [False, True, True]  # the second and third captures copied into earlier memory
    ckpt.close()
    reader = RunReader(Store(bucket), "exp")
    saved = {layout.step_of(sid): _saved_model(reader, sid) for sid in reader.snapshot_ids()}
    assert sorted(saved) == [1, 2, 3]
    for step, values in expected.items():
        assert_same(saved[step], values, f"step {step}")
    assert not any(torch.equal(expected[1][k], expected[2][k]) for k in expected[1] if k.endswith("weight"))


def test_a_save_whose_upload_fails_commits_nothing_and_leaves_no_spool(
        bucket_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from runner.storage import StorageError

    parts = tiny.build()
    ckpt = _ckpt(bucket_url, **parts.components())
    ckpt.save(1)
    real_open_upload = Store.open_upload

    def optimizer_fails(self: Store, key: str):
        upload = real_open_upload(self, key)  # a real upload (S3: parts already sent) whose commit fails
        if key.endswith("/optimizer.pt"):
            def fail() -> None:
                upload.abort()
                raise StorageError("the upload failed")
            upload.commit = fail
        return upload

    monkeypatch.setattr(Store, "open_upload", optimizer_fails)
    with pytest.raises(StorageError):
        ckpt.save(2)
    monkeypatch.setattr(Store, "open_upload", real_open_upload)
    spools = [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"runner-spool-{os.getpid()}-")]
    assert spools == []
    if not bucket_url.startswith(("s3:", "memory:")):
        assert [n for _, _, names in os.walk(bucket_url) for n in names if n.startswith(".tmp-")] == []
    reader = RunReader(ckpt.store, "exp")
    assert [m.step for m in reader.valid_snapshots()] == [1]
    tiny.train_step(parts)
    ckpt.save(3)  # the failed save's memory came back: copied into, and written whole
    ckpt.close()
    fresh = tiny.build(seed=1)
    with _ckpt(bucket_url, **fresh.components()) as again:
        assert again.restore() == 3
    assert_same(fresh.model.state_dict(), parts.model.state_dict(), "model")
    assert_same(fresh.optimizer.state_dict(), parts.optimizer.state_dict(), "optimizer")


def test_final_snapshot_marks_the_run_finished(tmp_path: Path) -> None:
    bucket = str(tmp_path / "bucket")
    parts = tiny.build()
    with _ckpt(bucket, **parts.components()) as ckpt:
        ckpt.save(4, final=True)
        assert ckpt.finished
    with _ckpt(bucket, **tiny.build().components()) as again:
        assert again.restore() == 4
        assert again.finished and again.last_snapshot.reason is Reason.FINAL


def test_control_file_stop_saves_an_emergency_snapshot_and_acks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    control_dir = tmp_path / "control"
    monkeypatch.setenv(control.ENV_CONTROL_DIR, str(control_dir))
    supervisor = control.SupervisorChannel(str(control_dir))
    parts = tiny.build()
    with _ckpt(str(tmp_path / "bucket"), **parts.components()) as ckpt:
        tiny.train_step(parts)
        assert ckpt.step(1) is False
        request_id = supervisor.request(control.STOP)
        requested, step = time.monotonic(), 1
        while True:  # the file is polled at step boundaries, at most every poll interval
            tiny.train_step(parts)
            step += 1
            if ckpt.step(step):
                break
            assert time.monotonic() - requested < 2, "the request was never seen"
            time.sleep(0.01)
        assert runner.preemption_requested()
        ack = supervisor.ack(request_id)
        assert ack is not None and ack["id"] == request_id and ack["step"] == step
        snapshot = ckpt.last_snapshot
        assert snapshot is not None and ack["snapshot_id"] == snapshot.snapshot_id
        assert snapshot.reason is Reason.EMERGENCY
        assert RunReader(ckpt.store, "exp").newest_valid().snapshot_id == ack["snapshot_id"]


# -- other processes --------------------------------------------------------------


def _tiny_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}  # the machine's own
    env["PYTHONPATH"] = os.path.join(ROOT, "tests") + os.pathsep + env["PYTHONPATH"]
    env.update(extra or {})
    return env


def _events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_fresh_process_in_an_empty_folder_resumes_from_s3(
        tmp_path: Path, s3_bucket_url: str, s3_env: dict[str, str]) -> None:
    parts = tiny.build(seed=1234)  # what the child builds, so only the bucket can make them equal
    with _ckpt(s3_bucket_url, run_id="tiny", **parts.components()) as ckpt:
        for step in range(1, 4):
            tiny.train_step(parts)
        ckpt.save(3)
    expected = tiny.digest(parts.model)
    empty, log = tmp_path / "elsewhere", tmp_path / "events.jsonl"
    empty.mkdir()
    proc = subprocess.run([PYTHON, "-m", "tiny_training", "train", "--bucket", s3_bucket_url, "--run-id", "tiny",
                           "--steps", "3", "--log", str(log)],
                          cwd=empty, env=_tiny_env(s3_env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    restored = _events(log)[0]
    assert restored["event"] == "restored" and restored["step"] == 3
    assert restored["digest"] == expected and restored["verify"] is None
    assert list(empty.iterdir()) == []  # it needed nothing on local disk


def test_sigusr1_makes_a_process_save_an_emergency_snapshot_and_stop(tmp_path: Path) -> None:
    bucket, log, control_dir = tmp_path / "bucket", tmp_path / "events.jsonl", tmp_path / "control"
    control.SupervisorChannel(str(control_dir))  # creates the folder, as `runner start` does
    env = _tiny_env({control.ENV_CONTROL_DIR: str(control_dir)})
    proc = subprocess.Popen([PYTHON, "-m", "tiny_training", "train", "--bucket", str(bucket), "--steps", "100000",
                             "--save-every", "1000", "--step-sleep", "0.01", "--log", str(log)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(e["event"] == "step" and e["step"] >= 5 for e in _events(log)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    stopped = [e for e in _events(log) if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "emergency"
    ack = control.SupervisorChannel(str(control_dir)).ack(control.SIGNAL_REQUEST_ID)
    assert ack is not None and ack["snapshot_id"] == stopped[0]["snapshot"] and ack["step"] == stopped[0]["step"]
    newest = RunReader(Store(str(bucket)), "tiny").newest_valid()
    assert newest is not None and newest.snapshot_id == ack["snapshot_id"] and newest.reason is Reason.EMERGENCY


def test_a_final_save_at_the_step_of_a_periodic_one_wins(tmp_path: Path) -> None:
    # The loop's last step is often due for a periodic save, and save(final=True) follows at once,
    # at the same step and within the same second: the final snapshot must be the one restored.
    bucket = str(tmp_path / "bucket")
    parts = tiny.build()
    for attempt in range(16):  # a coin flip per attempt when ids of one step and second sort at random
        run_id = f"run{attempt}"
        with runner.Checkpointer(bucket, run_id, save_every_steps=4, keep_last=1, **parts.components()) as ckpt:
            for step in range(1, 5):
                ckpt.step(step)
            final = ckpt.save(4, final=True).manifest
        with _ckpt(bucket, run_id, **tiny.build().components()) as again:
            assert again.restore() == 4
            restored = again.last_snapshot.snapshot_id
            assert again.finished, f"attempt {attempt}: restored {restored}, not {final.snapshot_id}"


def test_after_an_emergency_snapshot_later_steps_stop_without_saving_again(tmp_path, monkeypatch):
    """A loop that keeps calling step() after True gets True again, and no second snapshot."""
    import os
    import signal

    import torch

    import runner
    from runner import control

    control.install_signal_handlers()
    monkeypatch.delenv(control.ENV_CONTROL_DIR, raising=False)
    ckpt = runner.Checkpointer(str(tmp_path / "b"), run_id="r", save_every_steps=1000, model=torch.nn.Linear(2, 2))
    os.kill(os.getpid(), signal.SIGUSR1)
    assert ckpt.step(5) is True
    assert ckpt.step(6) is True
    assert len(ckpt.reader.snapshot_ids()) == 1
    ckpt.close()


def test_an_ack_into_a_missing_control_dir_does_not_crash_training(tmp_path, monkeypatch):
    import os
    import signal

    import torch

    import runner
    from runner import control

    gone = tmp_path / "control"
    monkeypatch.setenv(control.ENV_CONTROL_DIR, str(gone))
    control.install_signal_handlers()
    ckpt = runner.Checkpointer(str(tmp_path / "b"), run_id="r", model=torch.nn.Linear(2, 2))
    os.kill(os.getpid(), signal.SIGUSR1)
    assert ckpt.step(3) is True
    assert (gone / "ack-signal.json").exists()
    assert len(ckpt.reader.snapshot_ids()) == 1
    ckpt.close()


def test_keep_host_copy_off_still_saves_and_restores(tmp_path):
    import torch

    import runner

    model = torch.nn.Linear(3, 3)
    ckpt = runner.Checkpointer(str(tmp_path / "b"), run_id="r", save_every_steps=1, keep_host_copy=False, model=model)
    assert ckpt._host_buffers is None
    ckpt.step(1)
    ckpt.wait()
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.step(2)
    ckpt.close()
    fresh = torch.nn.Linear(3, 3)
    assert runner.Checkpointer(str(tmp_path / "b"), run_id="r", model=fresh).restore() == 2
    assert torch.equal(fresh.weight, model.weight)
