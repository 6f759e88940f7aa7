"""Writing snapshots: data files first, then the manifest, exclusively.

Commit protocol (DESIGN.md 3.3): every snapshot gets a fresh prefix; each
component is serialized to its own immutable data file; the manifest, which
lists every file with size and SHA-256, is created last with an exclusive
write.  A kill anywhere before the manifest leaves only invisible data (swept
by retention once stale); a kill after it leaves a complete snapshot.

`BackgroundWriter` runs commits on one worker thread with at most one in
flight: the training loop pays for the host copy only.

How a snapshot's data is written: the writer thread serializes one component
after another, each hashed as it is streamed into the store's upload for its
key (`state.serialize_into` into `Store.open_upload`): on S3 the bytes leave
as multipart parts while serialization goes on, no spool file; on a local
store they go into the key's `.tmp-` sibling.  Nothing is visible yet.  Each
finished upload is handed to a few publishing threads (`Upload.commit`:
the last parts and CompleteMultipartUpload, or an fsync and a rename), so the
next component is serialized while the previous ones are published.  The
first file is published before any other is handed over, so a kill at
`mid-data` leaves exactly one data file, as when files were written one by one
(a later component's parts may already be out then: an incomplete multipart
upload, which no listing shows).
When the data is written (or has failed), the capture's host memory is handed
back (`PendingSnapshot.release`) for the next capture to copy into.

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

from runner.control import lease
from runner.checkpoint import layout, state
from runner.checkpoint.manifest import FORMAT_VERSION, SHARDED_FORMAT_VERSION, FileEntry, Manifest, Reason
from runner.storage import ObjectExistsError, Store, Upload

FAULT_ENV = "RUNNER_FAULT_KILL_AT"
PHASES = ("before-data", "mid-data", "before-manifest", "after-manifest")

# Data files published at once while the writer thread serializes the next component.
# Local stores too: an fsync of the previous file overlaps the next serialization.
# (On S3 the parts of all of them share the store's PARTS_IN_FLIGHT, storage/upload.py.)
_PUBLISH_THREADS = 4


class ConcurrentWriterError(lease.LeaseLostError):
    """Another writer created the manifest of this writer's fresh snapshot id: it is fenced, nothing committed."""


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
    sharded: bool = False  # the data files are a sharded snapshot's (kept by `runner fork`)
    # Called once the components are no longer needed (data written, or failed):
    # hands the capture's host memory back for reuse (state.HostBuffers).
    release: Callable[[], None] | None = None
    _sealed: bool = field(default=False, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def upgrade(self, reason: Reason, epoch: int | None = None, metrics: dict[str, float] | None = None) -> bool:
        """Change what the manifest will say while it is not being written yet; False once it is.

        A final save at the step of a periodic one in flight turns that one
        final instead of writing the same state twice.
        """
        with self._lock:
            if self._sealed:
                return False
            self.reason = reason
            if epoch is not None:
                self.epoch = int(epoch)
            if metrics:
                self.metrics = {k: float(v) for k, v in metrics.items()}
            return True

    def seal(self) -> None:
        """The manifest is being written from this pending snapshot: no more upgrades."""
        with self._lock:
            self._sealed = True


@dataclass(frozen=True)
class RawFile:
    """Already-serialized bytes, written as `path` unchanged (used by `runner fork`).

    `component` names the file's component when it differs from its key in
    PendingSnapshot.components: a sharded snapshot has one `_shard` per rank.
    """

    path: str
    data: bytes
    component: str = ""


@dataclass(frozen=True)
class CommitResult:
    manifest: Manifest
    capture_seconds: float  # the training stall for the host copy
    write_seconds: float  # serialize + upload + manifest, off the training loop when async


def versions() -> dict[str, str]:
    from runner import __version__

    return {"runner": __version__, "torch": torch.__version__, "python": platform.python_version()}


_saves = itertools.count(1)  # saves started by this process, for `<phase>:<n>`


def next_save_number() -> int:
    return next(_saves)


def fault(phase: str, save_number: int) -> None:
    """SIGKILL this process when RUNNER_FAULT_KILL_AT names `phase` (and this save number, if given)."""
    want, _, nth = os.environ.get(FAULT_ENV, "").partition(":")
    if want == phase and nth in ("", str(save_number)):
        os.kill(os.getpid(), signal.SIGKILL)


def component_file(name: str) -> str:
    return f"{name}.pt"


@dataclass
class _DataFile:
    """One component ready to publish: its manifest entry and how to publish it."""

    entry: FileEntry
    key: str
    data: bytes | None = None  # raw bytes, written as they are
    upload: Upload | None = None  # or a finished upload, published by its commit

    def publish(self, store: Store) -> None:
        if self.upload is None:
            store.write_bytes(self.key, self.data or b"")
        else:
            self.upload.commit()  # aborts itself on failure

    def discard(self) -> None:
        """Publish nothing of it (a no-op once published)."""
        if self.upload is not None:
            self.upload.abort()


def _prepare(store: Store, run_id: str, sid: str, name: str, payload: Any) -> _DataFile:
    """Serialize one component (raw bytes keep their name); nothing is visible yet."""
    if isinstance(payload, (RawFile, bytes)):
        raw = payload if isinstance(payload, RawFile) else RawFile(name, payload)
        path, data = raw.path, raw.data
        entry = FileEntry(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                          component=raw.component or name)
        return _DataFile(entry, layout.data_key(run_id, sid, path), data=data)
    path = component_file(name)
    key = layout.data_key(run_id, sid, path)
    upload = store.open_upload(key)
    try:
        size, digest = state.serialize_into(payload, upload)
        upload.finish()
    except BaseException:
        upload.abort()
        raise
    return _DataFile(FileEntry(path=path, size=size, sha256=digest, component=name), key, upload=upload)


def _write_data(store: Store, run_id: str, sid: str, pending: PendingSnapshot, save_number: int) -> list[FileEntry]:
    """Serialize and publish every component; returns their manifest entries, in name order."""
    jobs: list[tuple[_DataFile, Future[None]]] = []
    pool = ThreadPoolExecutor(max_workers=_PUBLISH_THREADS, thread_name_prefix="runner-publish")
    # A new store's exclusive-create probe (two PUTs and a DELETE of an invisible .tmp- key, once per
    # store) runs beside the data instead of in sequence before the manifest create.
    probe = pool.submit(store.prepare_create, layout.manifest_key(run_id, sid))
    try:
        for index, (name, payload) in enumerate(sorted(pending.components.items())):
            data = _prepare(store, run_id, sid, name, payload)
            try:
                if index == 1:
                    jobs[0][1].result()  # the first file is out before the others start
                    fault("mid-data", save_number)
                jobs.append((data, pool.submit(data.publish, store)))
            except BaseException:
                data.discard()
                raise
        for _, future in jobs:
            future.result()
        probe.result()
    except BaseException:
        for data, future in jobs:  # a failed save: publish no more (what is out stays invisible)
            if future.cancel():
                data.discard()
        raise
    finally:
        pool.shutdown(wait=True)  # nothing is publishing once this returns or raises
    return [data.entry for data, _ in jobs]


def write_snapshot(store: Store, run_id: str, pending: PendingSnapshot,
                   fence: Callable[[], None] | None = None) -> CommitResult:
    """Write one snapshot and commit it; nothing partial is ever visible.

    `fence`, when given, is called after the data and before the manifest: it
    raises (lease.LeaseLostError) when this writer may no longer commit.
    Raises StorageError.
    """
    started = time.perf_counter()
    sid = layout.new_snapshot_id(pending.step)
    save_number = next_save_number()
    try:
        fault("before-data", save_number)
        files = _write_data(store, run_id, sid, pending, save_number)
    finally:
        if pending.release is not None:
            pending.release()
    fault("before-manifest", save_number)
    if fence is not None:
        fence()
    pending.seal()
    manifest = manifest_for(run_id, sid, pending, files)
    create_manifest(store, run_id, manifest.to_bytes(), sid)
    fault("after-manifest", save_number)
    return CommitResult(manifest, pending.capture_seconds, time.perf_counter() - started)


def create_manifest(store: Store, run_id: str, body: bytes, sid: str) -> None:
    """Commit: create the manifest exclusively.

    A create whose reply was lost reads back as ours (`Store.create_bytes`) and
    is committed like any other.  A manifest with other bytes at our fresh key
    can only be another writer's: that is reported, never taken for ours.
    """
    try:
        store.create_bytes(layout.manifest_key(run_id, sid), body)
    except ObjectExistsError as exc:
        raise ConcurrentWriterError(
            f"run {run_id}: the manifest of snapshot {sid} was created by another writer; not committed "
            "(is a second instance writing this run?)") from exc


def manifest_for(run_id: str, sid: str, pending: PendingSnapshot, files: list[FileEntry],
                 sharded: bool = False) -> Manifest:
    """The sealed manifest of a snapshot whose data files are all written."""
    return Manifest(
        format_version=SHARDED_FORMAT_VERSION if sharded or pending.sharded else FORMAT_VERSION,
        layout="sharded" if sharded or pending.sharded else "single",
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


class BackgroundWriter:
    """One worker thread, at most one commit in flight."""

    def __init__(self, commit: Callable[[PendingSnapshot], CommitResult]):
        self._commit = commit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner-writer")
        self._inflight: Future[CommitResult] | None = None
        self._pending: PendingSnapshot | None = None
        self._lock = threading.Lock()

    def submit(self, pending: PendingSnapshot,
               commit: Callable[[PendingSnapshot], CommitResult] | None = None) -> Future[CommitResult]:
        """Queue a commit (by `commit`, default the writer's) after waiting for the one in flight (its error is re-raised)."""
        self.wait()
        with self._lock:
            self._pending = pending
            self._inflight = self._pool.submit(commit or self._commit, pending)
            return self._inflight

    def pending(self) -> PendingSnapshot | None:
        """The snapshot submitted and not yet waited for (committing, or committed), if any."""
        with self._lock:
            return self._pending if self._inflight is not None else None

    def wait(self) -> CommitResult | None:
        """Block until nothing is in flight; re-raise the in-flight commit's error."""
        with self._lock:
            inflight, self._inflight, self._pending = self._inflight, None, None
        return inflight.result() if inflight is not None else None

    def busy(self) -> bool:
        with self._lock:
            return self._inflight is not None and not self._inflight.done()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
