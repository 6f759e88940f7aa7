"""Writing snapshots: data files first, then the manifest, exclusively.

Commit protocol (DESIGN.md 3.3): every snapshot gets a fresh prefix; each
component is serialized to its own immutable data file; the manifest, which
lists every file with size and SHA-256, is created last with an exclusive
write.  A kill anywhere before the manifest leaves only invisible data (swept
by retention once stale); a kill after it leaves a complete snapshot.

`BackgroundWriter` runs commits on one worker thread with at most one in
flight: the training loop pays for the host copy only.

Fault points: `RUNNER_FAULT_KILL_AT=<phase>` makes the process SIGKILL itself
at that phase of the next save (`before-data`, `mid-data`, `before-manifest`,
`after-manifest`); `<phase>:<n>` only in the n-th save of the process (1 is
the first), so that a run can commit snapshots before it dies.  `runner drill`
and the kill-9 tests use it to kill at an exact phase; it is read once per
phase, so it costs nothing otherwise.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import os
import platform
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from runner.checkpoint import layout, state
from runner.checkpoint.manifest import FileEntry, Manifest, Reason
from runner.storage import Store

FAULT_ENV = "RUNNER_FAULT_KILL_AT"
PHASES = ("before-data", "mid-data", "before-manifest", "after-manifest")


@dataclass
class PendingSnapshot:
    """A captured state waiting to be written."""

    step: int
    reason: Reason
    components: dict[str, Any]  # name -> host-memory state
    epoch: int = 0
    parent: str | None = None
    forked_from: str | None = None
    world_size: int = 1
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    capture_seconds: float = 0.0


@dataclass(frozen=True)
class RawFile:
    """Already-serialized bytes for one component, written as `path` unchanged (used by `runner fork`)."""

    path: str
    data: bytes


@dataclass(frozen=True)
class CommitResult:
    manifest: Manifest
    capture_seconds: float  # the training stall for the host copy
    write_seconds: float  # serialize + upload + manifest, off the training loop when async


def versions() -> dict[str, str]:
    from runner import __version__

    return {"runner": __version__, "torch": torch.__version__, "python": platform.python_version()}


_saves = itertools.count(1)  # saves started by this process, for `<phase>:<n>`


def _fault(phase: str, save_number: int) -> None:
    want, _, nth = os.environ.get(FAULT_ENV, "").partition(":")
    if want == phase and nth in ("", str(save_number)):
        os.kill(os.getpid(), signal.SIGKILL)


def component_file(name: str) -> str:
    return f"{name}.pt"


def _file_of(name: str, payload: Any) -> tuple[str, bytes]:
    """(file name, bytes) for one component: raw bytes keep their name, state is serialized."""
    if isinstance(payload, RawFile):
        return payload.path, payload.data
    if isinstance(payload, bytes):
        return name, payload
    return component_file(name), state.serialize(payload)


def write_snapshot(store: Store, run_id: str, pending: PendingSnapshot,
                   fence: Callable[[], None] | None = None) -> CommitResult:
    """Write one snapshot and commit it; nothing partial is ever visible.

    `fence`, when given, is called after the data and before the manifest: it
    raises (lease.LeaseLostError) when this writer may no longer commit.
    Raises StorageError.
    """
    started = time.perf_counter()
    sid = layout.new_snapshot_id(pending.step)
    save_number = next(_saves)
    files: list[FileEntry] = []
    _fault("before-data", save_number)
    for index, (name, payload) in enumerate(sorted(pending.components.items())):
        if index == 1:
            _fault("mid-data", save_number)
        path, data = _file_of(name, payload)
        store.write_bytes(layout.data_key(run_id, sid, path), data)
        files.append(FileEntry(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest(), component=name))
    _fault("before-manifest", save_number)
    if fence is not None:
        fence()
    manifest = Manifest(
        run_id=run_id,
        snapshot_id=sid,
        step=pending.step,
        epoch=pending.epoch,
        reason=pending.reason,
        created_at=dt.datetime.now(dt.timezone.utc),
        parent=pending.parent,
        forked_from=pending.forked_from,
        world_size=pending.world_size,
        versions=versions(),
        files=files,
        metrics=pending.metrics,
        extra=pending.extra,
    ).sealed()
    store.create_bytes(layout.manifest_key(run_id, sid), manifest.to_bytes())
    _fault("after-manifest", save_number)
    return CommitResult(manifest, pending.capture_seconds, time.perf_counter() - started)


class BackgroundWriter:
    """One worker thread, at most one commit in flight."""

    def __init__(self, commit: Callable[[PendingSnapshot], CommitResult]):
        self._commit = commit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner-writer")
        self._inflight: Future[CommitResult] | None = None
        self._lock = threading.Lock()

    def submit(self, pending: PendingSnapshot) -> Future[CommitResult]:
        """Queue a commit after waiting for the one in flight (whose error is re-raised)."""
        self.wait()
        with self._lock:
            self._inflight = self._pool.submit(self._commit, pending)
            return self._inflight

    def wait(self) -> CommitResult | None:
        """Block until nothing is in flight; re-raise the in-flight commit's error."""
        with self._lock:
            inflight, self._inflight = self._inflight, None
        return inflight.result() if inflight is not None else None

    def busy(self) -> bool:
        with self._lock:
            return self._inflight is not None and not self._inflight.done()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
