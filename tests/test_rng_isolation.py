"""Saving and restoring never touch the training's global random streams, and a lost reply never un-commits.

Through a loopback proxy in front of moto that fails a seeded share of
requests (503 SlowDown, 500, reset connections, replies lost after the write
was applied), so that retries really happen on every path:
- a save/restore cycle leaves python's `random`, numpy's global generator and
  torch's default generator exactly where they were (any draw, on any thread,
  shows as a changed state; the module functions are also wrapped, so that a
  failure names who drew);
- an exclusive manifest create whose reply was lost counts as committed
  (return value, ack, commits line, retention);
- a manifest key that another writer took is reported as such, never as ours.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import threading
import traceback
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

import tiny_training
from flaky_proxy import FaultPlan
from runner import Checkpointer, control
from runner.checkpoint.writer import ConcurrentWriterError

ALL_FAULTS = {"503": 0.08, "500": 0.06, "reset": 0.06, "lost-reply": 0.06}
_DRAWING = ("random", "uniform", "randint", "randrange", "choice", "choices", "shuffle", "sample",
            "getrandbits", "gauss", "normalvariate", "seed", "setstate", "triangular", "expovariate")


def _streams() -> tuple[bytes, bytes, bytes]:
    return (pickle.dumps(random.getstate()), pickle.dumps(np.random.get_state(legacy=False)),
            torch.get_rng_state().numpy().tobytes())


@pytest.fixture
def draws(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of python's module-level `random` functions and numpy's global ones, with who made it."""
    seen: list[str] = []

    def wrap(module, name: str, label: str) -> None:
        original = getattr(module, name)

        def recording(*args, **kwargs):
            where = "".join(traceback.format_stack(limit=6)[:-1])
            seen.append(f"{label}.{name} on thread {threading.current_thread().name}:\n{where}")
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)

    for name in _DRAWING:
        wrap(random, name, "random")
    for name in ("rand", "randn", "random", "random_sample", "randint", "choice", "shuffle", "permutation",
                 "seed", "set_state", "uniform", "normal"):
        wrap(np.random, name, "numpy.random")
    return seen


def test_a_save_and_restore_through_failing_s3_leave_the_global_rng_streams_alone(
        s3_bucket_url: str, s3_proxy, draws: list[str]) -> None:
    proxy = s3_proxy(faults=FaultPlan(ALL_FAULTS, seed=16))
    parts = tiny_training.build(seed=3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)  # noqa: B018 (the calls are the point)
    draws.clear()
    before = _streams()

    ckpt = Checkpointer(s3_bucket_url, "guard", save_every_steps=1, keep_last=2, **parts.components())
    assert ckpt.restore() == 0
    for step in range(1, 6):  # periodic saves on the writer thread, retention after each
        ckpt.step(step)
    ckpt.save(6)
    ckpt.close()
    assert sum(proxy.counts.values()) >= 4, (proxy.counts, proxy.requests)
    assert not draws, "\n".join(draws)
    assert _streams() == before, "saving drew from a global random stream"

    fresh = tiny_training.build(seed=9)  # a new process: other weights, streams seeded elsewhere
    random.random(), np.random.rand(), torch.rand(1)  # noqa: B018
    draws.clear()
    with Checkpointer(s3_bucket_url, "guard", **fresh.components()) as again:
        assert again.restore() == 6
    others = [d for d in draws if "in restore_rng" not in d]  # putting the saved streams back is the point
    assert not others, "\n".join(others)
    assert len(draws) == 2, "\n".join(draws)  # random.setstate and numpy.random.set_state, once each
    assert _streams() == before, "restoring left the global random streams elsewhere than they were saved"
    assert tiny_training.digest(fresh.model) == tiny_training.digest(parts.model)
    print("faults injected:", dict(proxy.counts), "of", proxy.requests, "requests")


def _manifest_puts(method: str, path: str) -> bool:
    return method == "PUT" and "/manifests/" in path


def _first_manifest_put_of_each_key():
    """A FaultPlan filter: the first PUT of each manifest (its retry gets through, and finds the key taken)."""
    seen: set[str] = set()

    def only(method: str, path: str) -> bool:
        if not _manifest_puts(method, path) or path in seen:
            return False
        seen.add(path)
        return True

    return only


def test_a_lost_reply_to_the_manifest_create_still_commits(
        s3_bucket_url: str, s3_proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    proxy = s3_proxy(faults=FaultPlan({"lost-reply": 1.0}, only=_first_manifest_put_of_each_key()))
    control_dir = tmp_path / "control"
    monkeypatch.setenv(control.ENV_CONTROL_DIR, str(control_dir))
    supervisor = control.SupervisorChannel(str(control_dir))
    parts = tiny_training.build(seed=5)
    caplog.set_level(logging.INFO, logger="runner")
    ckpt = Checkpointer(s3_bucket_url, "lost", save_every_steps=1, keep_last=1, **parts.components())
    for step in (1, 2):  # periodic, in the background
        tiny_training.train_step(parts)
        assert ckpt.step(step) is False
    periodic = ckpt.wait()
    assert periodic is not None and periodic.manifest.step == 2

    request = supervisor.request(control.STOP)
    tiny_training.train_step(parts)
    assert ckpt.step(3) is True  # the emergency snapshot is committed: stop
    ack = supervisor.ack(request)
    assert ack is not None and ack["step"] == 3 and ack["snapshot_id"] == ckpt.last_snapshot.snapshot_id
    ckpt.close()

    assert proxy.counts["lost-reply"] == 3  # every manifest's reply was lost
    assert "failed" not in caplog.text, caplog.text
    commits, _ = supervisor.commits()
    assert [c["step"] for c in commits] == [1, 2, 3]
    valid = [m.step for m in ckpt.reader.valid_snapshots()]
    assert valid == [3], valid  # retention ran after each commit (keep_last=1): each counted as committed
    with Checkpointer(s3_bucket_url, "lost", **tiny_training.build(seed=6).components()) as again:
        assert again.restore() == 3


def test_a_manifest_key_taken_by_another_writer_is_reported_not_taken_for_ours(
        s3_bucket_url: str, s3_env: dict[str, str], s3_proxy, caplog: pytest.LogCaptureFixture) -> None:
    moto = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    bucket = s3_bucket_url.split("/")[2]
    theirs = b'{"someone": "else"}'

    def race(method: str, path: str, body: bytes) -> None:
        if _manifest_puts(method, path):  # another writer gets there first
            moto.put_object(Bucket=bucket, Key=path.split("/", 2)[2].split("?")[0], Body=theirs)

    proxy = s3_proxy(before_forward=race, faults=FaultPlan({"lost-reply": 1.0}, only=_first_manifest_put_of_each_key()))
    parts = tiny_training.build(seed=5)
    ckpt = Checkpointer(s3_bucket_url, "raced", **parts.components())
    with pytest.raises(ConcurrentWriterError, match="created by another writer"):
        ckpt.save(1)
    assert ckpt.last_snapshot is None
    keys = [o["Key"] for o in moto.list_objects_v2(Bucket=bucket, Prefix="runs/raced/manifests/")["Contents"]]
    assert len(keys) == 1 and moto.get_object(Bucket=bucket, Key=keys[0])["Body"].read() == theirs
    assert proxy.counts["lost-reply"] == 1

    caplog.set_level(logging.ERROR, logger="runner")
    ckpt2 = Checkpointer(s3_bucket_url, "raced", save_every_steps=1, async_save=False, **parts.components())
    assert ckpt2.step(1) is True  # in the training loop: fenced, stop committing
    assert "created by another writer" in caplog.text
    ckpt2.close()
    ckpt.close()


def test_the_request_retries_are_ours_not_botocores(s3_bucket_url: str, s3_proxy) -> None:
    # botocore's own retry modes draw their jitter from the global stream; a
    # user's retry count still applies, to our retries.
    from runner.storage import Store

    proxy = s3_proxy(fail_first=2)
    store = Store(s3_bucket_url, {"config_kwargs": {"retries": {"total_max_attempts": 3}}})
    store.write_bytes("r/a", b"payload")
    assert proxy.requests == 3  # two 503s retried within the one request
    assert store.fs.s3.meta.config.retries["total_max_attempts"] == 1
    assert json.loads(json.dumps(store.read_bytes("r/a").decode())) == "payload"
