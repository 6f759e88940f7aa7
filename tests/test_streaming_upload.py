"""Streaming uploads to S3 (runner/storage/upload.py) over real HTTP: moto's server, behind FlakyProxy where faults are needed.

What is checked: objects below, at and above the part size round-trip byte
for byte (one PutObject up to one part, a multipart upload above it); parts
leave while the serializer is still writing; a failed part or an exception in
the writing code aborts the upload and leaves nothing, not even an incomplete
multipart upload; a lost reply to CompleteMultipartUpload still commits, and
an upload aborted by someone else does not read as ours; a process SIGKILLed
mid-stream leaves the streamed object invisible (an incomplete multipart
upload, swept by `abort_stale_uploads`) and the next start restores the
snapshot before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import textwrap
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch

from conftest import s3_client
from flaky_proxy import FaultPlan, is_complete_multipart
from helpers import PYTHON, subprocess_env
from runner.checkpoint import layout, state
from runner.checkpoint.reader import RunReader
from runner.storage import RetryPolicy, StorageError, Store
from runner.storage.upload import PART_SIZE, multipart_etag

FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05)


def _bucket_and_root(url: str) -> tuple[str, str]:
    bucket, _, root = url[len("s3://"):].partition("/")
    return bucket, root


def _uploads_left(env: dict[str, str], bucket: str) -> list[str]:
    return [u["Key"] for u in s3_client(env).list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def _write(store: Store, key: str, data: bytes, piece: int = 1_000_003) -> None:
    with store.open_upload(key) as upload:
        for start in range(0, len(data), piece):
            upload.write(data[start:start + piece])


def _is_part(method: str, path: str) -> bool:
    return method == "PUT" and "partNumber=" in urllib.parse.urlsplit(path).query


def _is_create(method: str, path: str) -> bool:
    return method == "POST" and urllib.parse.urlsplit(path).query.startswith("uploads")


@pytest.mark.parametrize("size", [0, 1000, PART_SIZE, PART_SIZE + 1, 3 * PART_SIZE + PART_SIZE // 2])
def test_objects_below_at_and_above_the_part_size_round_trip(
        size: int, s3_bucket_url: str, s3_env: dict[str, str], s3_proxy) -> None:
    proxy = s3_proxy()
    store = Store(s3_bucket_url)
    data = os.urandom(size)
    _write(store, "r/data/obj.bin", data)
    assert store.read_bytes("r/data/obj.bin") == data
    assert store.size("r/data/obj.bin") == size
    parts = [line for line in proxy.log if _is_part(*line.split(" ", 1))]
    creates = [line for line in proxy.log if _is_create(*line.split(" ", 1))]
    if size <= PART_SIZE:  # one plain PUT
        assert parts == [] and creates == []
    else:
        assert len(creates) == 1 and len(parts) == -(-size // PART_SIZE)
    bucket, root = _bucket_and_root(s3_bucket_url)
    etag = s3_client(s3_env).head_object(Bucket=bucket, Key=f"{root}/r/data/obj.bin")["ETag"].strip('"')
    if size > PART_SIZE:  # the multipart ETag the lost-reply check composes from the parts' ETags
        digests = [hashlib.md5(data[i:i + PART_SIZE]).hexdigest() for i in range(0, size, PART_SIZE)]
        assert etag == multipart_etag(digests)
    else:
        assert etag == hashlib.md5(data).hexdigest()
    assert _uploads_left(s3_env, bucket) == []


def test_parts_leave_while_the_serializer_is_still_writing(s3_bucket_url: str, s3_env: dict[str, str], s3_proxy) -> None:
    first_part = threading.Event()

    def hold(method: str, path: str) -> None:
        if _is_part(method, path):
            first_part.set()

    s3_proxy(hold=hold)
    store = Store(s3_bucket_url)
    tensors = {f"t{i}": torch.full((2 * 2**20,), float(i)) for i in range(8)}  # 8 x 8 MiB
    upload = store.open_upload("r/data/model.pt")
    seen_mid_write: list[bool] = []

    class Gate:
        """Between torch.save and the upload: past two parts, wait until a part has reached the proxy."""

        def write(self, data) -> int:
            if upload.size > 2 * PART_SIZE and not seen_mid_write:
                seen_mid_write.append(first_part.wait(60))  # never set if parts waited for the serializer's end
            return upload.write(data)

        def flush(self) -> None:
            pass

    size, digest = state.serialize_into(tensors, Gate())
    assert seen_mid_write == [True]  # an UploadPart arrived while torch.save was still writing
    upload.commit()
    data = store.read_bytes("r/data/model.pt")
    assert len(data) == size and hashlib.sha256(data).hexdigest() == digest
    restored = state.deserialize(data)
    assert all(torch.equal(restored[k], v) for k, v in tensors.items())


def test_a_part_that_keeps_failing_aborts_the_upload(s3_bucket_url: str, s3_env: dict[str, str], s3_proxy) -> None:
    proxy = s3_proxy(fail=lambda method, path: _is_part(method, path) and re.search(r"[?&]partNumber=2(&|$)", path))
    store = Store(s3_bucket_url, retry=FAST_RETRY)
    with pytest.raises(StorageError) as failed:
        _write(store, "r/data/big.bin", os.urandom(3 * PART_SIZE + 5))
    assert "big.bin" in str(failed.value) and "\n" not in str(failed.value)
    assert proxy.counts["unavailable"] >= 2  # part 2 was tried again before giving up
    bucket, _ = _bucket_and_root(s3_bucket_url)
    assert _uploads_left(s3_env, bucket) == []  # aborted, not left for a sweep
    assert not store.exists("r/data/big.bin")


def test_an_exception_while_writing_aborts_the_upload(s3_bucket_url: str, s3_env: dict[str, str]) -> None:
    store = Store(s3_bucket_url)
    with pytest.raises(RuntimeError, match="serializer broke"):
        with store.open_upload("r/data/half.bin") as upload:
            upload.write(os.urandom(2 * PART_SIZE + 1))  # two parts out
            raise RuntimeError("serializer broke")
    bucket, _ = _bucket_and_root(s3_bucket_url)
    assert _uploads_left(s3_env, bucket) == []
    assert store.list("r/") == []


def _first_complete():
    done: list[str] = []

    def only(method: str, path: str) -> bool:
        if not is_complete_multipart(method, path) or done:
            return False
        done.append(path)
        return True

    return only


class _LostThenGone(FaultPlan):
    """The first complete is applied and its reply lost; its retry is answered NoSuchUpload (S3 once the id is gone)."""

    def __init__(self) -> None:
        super().__init__({})
        self.completes = 0

    def draw(self, method: str, path: str) -> str | None:
        if not is_complete_multipart(method, path):
            return None
        self.completes += 1
        return {1: "lost-reply", 2: "no-such-upload"}.get(self.completes)


@pytest.mark.parametrize("retry_answer", ["no-such-upload", "the object (moto)"])
def test_a_lost_reply_to_complete_multipart_upload_commits(
        retry_answer: str, s3_bucket_url: str, s3_env: dict[str, str], s3_proxy,
        caplog: pytest.LogCaptureFixture) -> None:
    plan = _LostThenGone() if retry_answer == "no-such-upload" else FaultPlan({"lost-reply": 1.0}, only=_first_complete())
    proxy = s3_proxy(faults=plan)
    caplog.set_level(logging.INFO, logger="runner")
    store = Store(s3_bucket_url)
    data = os.urandom(2 * PART_SIZE + 7)
    _write(store, "r/data/lost.bin", data)
    assert proxy.counts["lost-reply"] == 1
    completes = [line for line in proxy.log if is_complete_multipart(*line.split(" ", 1))]
    assert len(completes) == 2  # the complete, and its retry
    if retry_answer == "no-such-upload":
        assert proxy.counts["no-such-upload"] == 1
        assert "the reply to completing r/data/lost.bin was lost, but the object is ours" in caplog.text
    assert store.read_bytes("r/data/lost.bin") == data
    assert _uploads_left(s3_env, _bucket_and_root(s3_bucket_url)[0]) == []


def test_a_failed_complete_answered_200_is_retried(s3_bucket_url: str, s3_env: dict[str, str], s3_proxy) -> None:
    proxy = s3_proxy(faults=FaultPlan({"complete-fail": 1.0}, only=_first_complete()))
    store = Store(s3_bucket_url)
    data = os.urandom(PART_SIZE + 1)
    _write(store, "r/data/retried.bin", data)
    assert proxy.counts["complete-fail"] == 1
    assert store.read_bytes("r/data/retried.bin") == data


def test_an_upload_aborted_by_someone_else_is_not_taken_for_ours(
        s3_bucket_url: str, s3_env: dict[str, str], s3_proxy) -> None:
    bucket, _ = _bucket_and_root(s3_bucket_url)

    class SweptFirst(FaultPlan):
        """A sweep aborts the upload just before its complete, which S3 then answers NoSuchUpload."""

        def draw(self, method: str, path: str) -> str | None:
            if not is_complete_multipart(method, path):
                return None
            client = s3_client(s3_env)
            for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            return "no-such-upload"

    s3_proxy(faults=SweptFirst({}))
    store = Store(s3_bucket_url, retry=FAST_RETRY)
    with pytest.raises(StorageError, match="aborted before it completed"):
        _write(store, "r/data/swept.bin", os.urandom(PART_SIZE + 1))
    assert not store.exists("r/data/swept.bin")
    assert _uploads_left(s3_env, bucket) == []


_CHILD = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import runner
    torch.manual_seed(0)
    model = nn.Linear(2048, 2048)  # 16 MiB of weights: the model file is two parts
    ckpt = runner.Checkpointer(sys.argv[1], "exp", save_every_steps=1, async_save=False, model=model)
    ckpt.save(1)
    print("committed 1", flush=True)
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.save(2)  # SIGKILLed while its parts are in flight
    print("committed 2", flush=True)
""")


def test_sigkill_mid_stream_leaves_nothing_visible_and_the_next_start_restores_the_previous(
        s3_bucket_url: str, s3_env: dict[str, str], s3_proxy, tmp_path: Path) -> None:
    from torch import nn

    import runner

    child: list[subprocess.Popen] = []
    killed = threading.Event()

    def kill_at_first_part_of_step_2(method: str, path: str) -> None:
        if _is_part(method, path) and "/data/000000000002-" in path and not killed.is_set():
            killed.set()
            child[0].send_signal(signal.SIGKILL)  # the writer is mid-stream: this part is in flight

    proxy = s3_proxy(hold=kill_at_first_part_of_step_2)
    env = subprocess_env({"AWS_ENDPOINT_URL": proxy.url})
    child.append(subprocess.Popen([PYTHON, "-c", _CHILD, s3_bucket_url], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out, err = child[0].communicate(timeout=180)
    assert killed.is_set() and child[0].returncode == -signal.SIGKILL, (out, err)
    assert out.splitlines() == ["committed 1"]

    store = Store(s3_bucket_url)
    reader = RunReader(store, "exp")
    assert [layout.step_of(sid) for sid in reader.snapshot_ids()] == [1]
    visible = [o.key for o in store.list("exp/data/")]
    # The streamed file of step 2 is not visible (its _rng.pt, published first, may be: data without a manifest).
    assert not [key for key in visible if "/000000000002-" in key and key.endswith("/model.pt")], visible
    bucket, _ = _bucket_and_root(s3_bucket_url)
    assert len(_uploads_left(s3_env, bucket)) == 1  # the torn upload: invisible until swept
    assert store.abort_stale_uploads("exp/", older_than_s=0) == 1
    assert _uploads_left(s3_env, bucket) == []

    torch.manual_seed(0)
    expected = nn.Linear(2048, 2048)
    fresh = nn.Linear(2048, 2048)
    with runner.Checkpointer(s3_bucket_url, "exp", model=fresh) as again:
        assert again.restore() == 1
    assert torch.equal(fresh.weight, expected.weight) and torch.equal(fresh.bias, expected.bias)


def test_retried_parts_never_touch_the_global_random_streams(s3_bucket_url: str, s3_env: dict[str, str], s3_proxy) -> None:
    import random

    import numpy as np

    faults = FaultPlan({"503": 0.2, "500": 0.1, "reset": 0.1}, seed=3, only=lambda method, path: _is_part(method, path))
    proxy = s3_proxy(faults=faults)
    store = Store(s3_bucket_url, retry=RetryPolicy(base_delay=0.01, max_delay=0.05))
    data = os.urandom(4 * PART_SIZE + 11)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    _write(store, "r/data/retried.bin", data)
    assert sum(proxy.counts.values()) >= 1  # some part was sent again
    assert random.getstate() == before[0]
    assert (np.random.get_state()[1] == before[1]).all() and torch.equal(torch.get_rng_state(), before[2])
    assert store.read_bytes("r/data/retried.bin") == data
