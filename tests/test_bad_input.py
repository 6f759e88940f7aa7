"""Corrupt, forged and hostile bucket contents, and stores that cannot be used.

The bucket is not trusted.  For every way the newest snapshot can be damaged
or forged (torn or altered data, edited, foreign or future manifests, paths
that escape, a manifest passing for another snapshot, a pickle that would run
code, with a matching checksum since the attacker writes the manifest too),
`restore()` skips it with one warning that names it and falls back to the
previous valid snapshot, and nothing committed is lost.  Then the errors a
user meets when the store itself is wrong: each its own type, one line, fast.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import runner
import tiny_training as tiny
from flaky_proxy import FlakyProxy
from runner.checkpoint import layout
from runner.checkpoint.manifest import _digest
from runner.checkpoint.reader import RunReader
from runner.storage import (
    StorageError,
    Store,
    StoreAccessError,
    StoreNotFoundError,
    StoreUnreachableError,
    UnsupportedURLError,
    clear_caches,
)

RUN = "exp"


class Run:
    """A run with two committed snapshots (steps 5 and 10) and handles to damage the newer one."""

    def __init__(self, bucket: str):
        self.bucket = bucket
        self.store = Store(bucket)
        self.parts = tiny.build(seed=3)
        with runner.Checkpointer(bucket, RUN, save_every_steps=1000, keep_last=5, **self.parts.components()) as ckpt:
            for step in range(1, 11):
                tiny.train_step(self.parts)
                if step == 5:
                    self.older = ckpt.save(step).manifest
                    self.older_digest = tiny.digest(self.parts.model)
            self.newer = ckpt.save(10).manifest
        self.sid = self.newer.snapshot_id

    def data_key(self, file: str) -> str:
        return layout.data_key(RUN, self.sid, file)

    @property
    def manifest_key(self) -> str:
        return layout.manifest_key(RUN, self.sid)

    def raw_manifest(self) -> dict[str, Any]:
        return json.loads(self.store.read_bytes(self.manifest_key))

    def forge_manifest(self, edit: Callable[[dict[str, Any]], None]) -> None:
        """Rewrite the newer manifest as an attacker would: edited, then resealed so its own hash matches."""
        raw = self.raw_manifest()
        edit(raw)
        raw.pop("body_sha256", None)
        raw["body_sha256"] = _digest(raw)
        self.store.write_bytes(self.manifest_key, json.dumps(raw).encode())

    def objects_of_older(self) -> dict[str, bytes]:
        keys = [layout.manifest_key(RUN, self.older.snapshot_id)]
        keys += [o.key for o in self.store.list(layout.data_prefix(RUN, self.older.snapshot_id))]
        return {k: self.store.read_bytes(k) for k in keys}


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(str(tmp_path / "bucket"))


def _restore(run: Run, caplog: pytest.LogCaptureFixture) -> tuple[int, tiny.Parts, list[str], runner.Checkpointer]:
    """A fresh Checkpointer restores; returns its step, its parts, and the warnings it logged."""
    parts = tiny.build(seed=77)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runner"):
        ckpt = runner.Checkpointer(run.bucket, RUN, save_every_steps=1000, keep_last=1, **parts.components())
        step = ckpt.restore()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("runner")]
    return step, parts, warnings, ckpt


def _assert_fell_back(run: Run, caplog: pytest.LogCaptureFixture, *why: str) -> tuple[runner.Checkpointer, tiny.Parts]:
    before = run.objects_of_older()
    step, parts, warnings, ckpt = _restore(run, caplog)
    assert step == 5
    assert tiny.digest(parts.model) == run.older_digest
    assert len(warnings) == 1, warnings
    assert run.sid in warnings[0] and "\n" not in warnings[0], warnings[0]
    for text in why:
        assert text in warnings[0], warnings[0]
    assert run.objects_of_older() == before  # the good snapshot is untouched
    return ckpt, parts


# -- damaged data ------------------------------------------------------------------


def test_truncated_data_file(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    data = run.store.read_bytes(run.data_key("model.pt"))
    run.store.write_bytes(run.data_key("model.pt"), data[: len(data) // 2])
    _assert_fell_back(run, caplog, "model.pt", f"{len(data) // 2} bytes")[0].close()


def test_missing_data_file(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    run.store.delete([run.data_key("optimizer.pt")])
    _assert_fell_back(run, caplog, "optimizer.pt", "missing")[0].close()


def test_bit_flip_is_caught_by_the_checksum_and_the_run_goes_on(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    data = bytearray(run.store.read_bytes(run.data_key("model.pt")))
    data[len(data) // 2] ^= 0x10  # same size: only the checksum can tell
    run.store.write_bytes(run.data_key("model.pt"), bytes(data))
    ckpt, parts = _assert_fell_back(run, caplog, "model.pt", "checksum")
    # Training goes on from step 5; with keep_last=1 the damaged step-10 snapshot still sorts newest,
    # yet what is saved now must survive retention and be what the next start resumes.
    tiny.train_step(parts)
    saved = ckpt.save(6).manifest
    ckpt.close()
    step, _, warnings, again = _restore(run, caplog)
    again.close()
    assert step == 6 and len(warnings) == 1
    assert RunReader(run.store, RUN).verify(saved) is None


# -- forged manifests ------------------------------------------------------------------


def test_manifest_with_a_bad_hash(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    raw = run.raw_manifest()
    raw["step"] = 11  # edited without resealing
    run.store.write_bytes(run.manifest_key, json.dumps(raw).encode())
    _assert_fell_back(run, caplog, "hash")[0].close()


def test_malformed_json_manifest(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    run.store.write_bytes(run.manifest_key, run.store.read_bytes(run.manifest_key)[:40])
    _assert_fell_back(run, caplog, "not JSON")[0].close()


def test_foreign_json_manifest(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    run.store.write_bytes(run.manifest_key, json.dumps({"step": 10, "files": []}).encode())
    _assert_fell_back(run, caplog, "not a runner snapshot manifest")[0].close()


def test_unsupported_format_version(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    run.forge_manifest(lambda raw: raw.update(format_version=99))
    _assert_fell_back(run, caplog, "format_version 99", "upgrade")[0].close()


@pytest.mark.parametrize("path", ["../x", "/abs", "a/../../x", "..", "a\\..\\x"])
def test_manifest_path_that_escapes_its_snapshot(run: Run, caplog: pytest.LogCaptureFixture, path: str) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["files"][0]["path"] = path

    run.forge_manifest(edit)
    _assert_fell_back(run, caplog, "escapes")[0].close()


def test_manifest_naming_another_snapshot(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    # A valid, sealed manifest, but of the step-5 snapshot, under the step-10 key.
    run.store.write_bytes(run.manifest_key, run.store.read_bytes(layout.manifest_key(RUN, run.older.snapshot_id)))
    _assert_fell_back(run, caplog, run.older.snapshot_id)[0].close()


class _Exploit:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_runs_code_is_never_loaded(run: Run, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    sentinel = tmp_path / "SENTINEL"
    buffer = io.BytesIO()
    torch.save({"weight": _Exploit(f"touch {sentinel}")}, buffer)
    payload = buffer.getvalue()
    torch.load(io.BytesIO(payload), weights_only=False)  # the payload is armed: an unsafe load runs it
    assert sentinel.exists()
    sentinel.unlink()

    import hashlib

    run.store.write_bytes(run.data_key("model.pt"), payload)

    def edit(raw: dict[str, Any]) -> None:  # the attacker writes a manifest that matches
        entry = next(f for f in raw["files"] if f["path"] == "model.pt")
        entry.update(size=len(payload), sha256=hashlib.sha256(payload).hexdigest())

    run.forge_manifest(edit)
    assert RunReader(run.store, RUN).verify(RunReader(run.store, RUN).load_manifest(run.sid)) is None
    _assert_fell_back(run, caplog, "refusing to load")[0].close()
    assert not sentinel.exists()


@pytest.mark.parametrize("file,payload", [("model.pt", [1, 2, 3]), ("_rng.pt", {"python": 1})])
def test_a_file_of_the_wrong_kind_with_a_matching_checksum(
        run: Run, caplog: pytest.LogCaptureFixture, file: str, payload: Any) -> None:
    # Plain data, so it loads safely, but not what the component saved: skipped before anything is touched.
    import hashlib

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    run.store.write_bytes(run.data_key(file), data)

    def edit(raw: dict[str, Any]) -> None:
        entry = next(f for f in raw["files"] if f["path"] == file)
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())

    run.forge_manifest(edit)
    _assert_fell_back(run, caplog, "does not hold")[0].close()


def test_corruption_on_s3_falls_back_too(s3_bucket_url: str, caplog: pytest.LogCaptureFixture) -> None:
    run = Run(s3_bucket_url)
    data = bytearray(run.store.read_bytes(run.data_key("optimizer.pt")))
    data[-100] ^= 0x01
    run.store.write_bytes(run.data_key("optimizer.pt"), bytes(data))
    _assert_fell_back(run, caplog, "optimizer.pt", "checksum")[0].close()


def test_a_store_failing_during_restore_is_an_error_not_a_fresh_start(
        s3_bucket_url: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Data reads keep failing (503) after every retry: that says nothing about the snapshots.
    # Falling back to older ones, and finally to step 0, would silently throw the run away.
    Run(s3_bucket_url)  # two committed snapshots, whose data reads will fail

    def data_get(method: str, path: str) -> bool:
        return method == "GET" and "/data/" in path.split("?")[0]

    with FlakyProxy(s3_env["AWS_ENDPOINT_URL"], fail=data_get) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        clear_caches()
        parts = tiny.build(seed=77)
        before = tiny.digest(parts.model)
        fast = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
        ckpt = runner.Checkpointer(s3_bucket_url, RUN, storage_options=fast, **parts.components())
        with pytest.raises(StorageError) as info:
            ckpt.restore()
        ckpt.close()
    assert "\n" not in str(info.value)
    assert tiny.digest(parts.model) == before and ckpt.last_snapshot is None


# -- stores that cannot be used -------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


def test_unknown_url_scheme(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedURLError) as info:
        runner.Checkpointer("nosuchscheme://bucket/runs", RUN, model=torch.nn.Linear(1, 1))
    assert "nosuchscheme" in _one_line(info.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An endpoint whose connects time out: a listener whose accept queue is full drops every SYN."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield f"http://127.0.0.1:{port}"
    for sock in [*fillers, server]:
        sock.close()


@pytest.mark.parametrize("endpoint", ["closed-port", "unresolvable", "blackholed"])
def test_unreachable_endpoint_fails_fast(endpoint: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                         request: pytest.FixtureRequest) -> None:
    url = {"closed-port": lambda: f"http://127.0.0.1:{_closed_port()}",
           "unresolvable": lambda: "http://runner-test.invalid:9000",
           "blackholed": lambda: request.getfixturevalue("blackhole")}[endpoint]()
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    clear_caches()
    started = time.monotonic()
    with pytest.raises(StoreUnreachableError) as info:
        runner.Checkpointer("s3://some-bucket/runs", RUN, model=torch.nn.Linear(1, 1))
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"took {elapsed:.1f}s to give up"
    assert "AWS_ENDPOINT_URL" in _one_line(info.value)


def test_missing_credentials(tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("AWS_") and key != "AWS_ENDPOINT_URL":
            monkeypatch.delenv(key)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    clear_caches()
    started = time.monotonic()
    with pytest.raises(StoreAccessError) as info:
        runner.Checkpointer("s3://some-bucket/runs", RUN, model=torch.nn.Linear(1, 1))
    assert time.monotonic() - started < 15
    assert "credentials" in _one_line(info.value)


def test_nonexistent_bucket(s3_env: dict[str, str]) -> None:
    with pytest.raises(StoreNotFoundError) as info:
        runner.Checkpointer("s3://no-such-bucket-anywhere/runs", RUN, model=torch.nn.Linear(1, 1))
    assert "no-such-bucket-anywhere" in _one_line(info.value)
