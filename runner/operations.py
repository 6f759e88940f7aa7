"""What the operator commands do to a bucket: ls, verify, gc, pin, fork (DESIGN.md 3.1).

Owns the logic behind `runner ls / verify / gc / pin / fork`, as plain
functions over a `Store` and a `RunReader` that return plain dataclasses.
Nothing here parses arguments, prints or imports rich: `cli.py` parses and
wires, `terminal.py` renders.  Long reads report bytes to a `Progress`.

Why gc reads a snapshot before deleting: retention's plan trusts the shallow
check (manifest, presence and size of every file).  A bit-flipped newest
snapshot passes it, and deleting the older ones would then leave no good
snapshot at all.  So before anything is deleted, the kept snapshots are read
in full, newest first, until one proves intact; if none does, gc refuses.

Why fork copies bytes rather than state: the snapshot is read and checked
against its SHA-256, then written unchanged (same file names, same
components) under a fresh snapshot id with a new manifest.  Nothing is
deserialized, so forking never runs code and works for snapshots of any
shape, sync-dir ones included.  The writer (and so torch) is imported only
by fork, so the read-only commands start fast.

Raises (every public function): ConfigError for malformed input,
SnapshotNotFoundError for a snapshot or run that is not there, RefusedError
when the bucket's state makes the operation unsafe, StorageError from the
store.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from runner.checkpoint import layout, retention
from runner.checkpoint.manifest import Manifest, Reason
from runner.checkpoint.reader import CorruptSnapshotError, RunReader, SnapshotStatus
from runner.errors import ConfigError, SnapshotNotFoundError
from runner.storage import Store, StoreNotFoundError

if TYPE_CHECKING:
    from runner.checkpoint.writer import RawFile

log = logging.getLogger("runner.operations")

LATEST = "latest"


class RefusedError(RuntimeError):
    """The bucket's state makes the operation unsafe or impossible; nothing was changed."""


class Progress(Protocol):
    """Where long operations report the bytes they have read."""

    def begin(self, description: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...


class NoProgress:
    def begin(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


# -- opening ----------------------------------------------------------------


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """A store for `url` that is known to exist. Raises StorageError (UnsupportedURLError, StoreNotFoundError, ...)."""
    store = Store(url, storage_options)
    if not store.is_local:
        store.check()
    elif not store.exists(""):  # do not create a folder for a mistyped path
        raise StoreNotFoundError(f"{url} does not exist: fix --bucket")
    return store


def open_run(store: Store, run_id: str) -> RunReader:
    check_run_id(run_id)
    return RunReader(store, run_id)


def check_run_id(run_id: str) -> None:
    if not layout.valid_run_id(run_id):
        raise ConfigError(f"run id {run_id!r} is not valid: use letters, digits, '.', '_' and '-' (at most 128)")


def check_snapshot_id(snapshot_id: str) -> None:
    if snapshot_id != LATEST and not layout.valid_snapshot_id(snapshot_id):
        raise ConfigError(
            f"{snapshot_id!r} is not a snapshot id (like 000000000100-20250101T120000-a1b2c3) or 'latest'"
        )


def _where(reader: RunReader) -> str:
    return f"run {reader.run_id!r} in {reader.store.url}"


# -- ls ---------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotRow:
    """One snapshot as `runner ls` shows it (shallow check only)."""

    snapshot_id: str
    step: int
    epoch: int | None
    reason: str | None
    created_at: dt.datetime | None
    size_bytes: int | None
    files: int | None
    valid: bool
    problem: str | None
    pinned: bool
    final: bool
    parent: str | None
    forked_from: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "snapshot_id": self.snapshot_id,
            "step": self.step,
            "epoch": self.epoch,
            "reason": self.reason,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "size_bytes": self.size_bytes,
            "files": self.files,
            "valid": self.valid,
            "problem": self.problem,
            "pinned": self.pinned,
            "final": self.final,
            "parent": self.parent,
            "forked_from": self.forked_from,
        }


def _row(status: SnapshotStatus, pinned: bool) -> SnapshotRow:
    m = status.manifest
    return SnapshotRow(
        snapshot_id=status.snapshot_id,
        step=m.step if m else layout.step_of(status.snapshot_id),
        epoch=m.epoch if m else None,
        reason=m.reason.value if m else None,
        created_at=m.created_at if m else None,
        size_bytes=m.total_bytes if m else None,
        files=len(m.files) if m else None,
        valid=status.valid,
        problem=status.problem,
        pinned=pinned,
        final=bool(m and m.final),
        parent=m.parent if m else None,
        forked_from=m.forked_from if m else None,
    )


def snapshot_rows(reader: RunReader) -> list[SnapshotRow]:
    """Every snapshot of the run, newest first."""
    pinned = reader.pinned()
    return [_row(st, st.snapshot_id in pinned) for st in reader.statuses()]


@dataclass(frozen=True)
class RunSummary:
    """One run as `runner ls` without --run-id shows it."""

    run_id: str
    snapshots: int
    valid: int
    pinned: int
    newest_step: int | None  # of the newest valid snapshot
    newest_snapshot_id: str | None
    newest_created_at: dt.datetime | None
    final: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "snapshots": self.snapshots,
            "valid": self.valid,
            "pinned": self.pinned,
            "newest_step": self.newest_step,
            "newest_snapshot_id": self.newest_snapshot_id,
            "newest_created_at": self.newest_created_at.isoformat() if self.newest_created_at else None,
            "final": self.final,
        }


def run_ids(store: Store) -> list[str]:
    """Every run under the store's root: a folder holding manifests or snapshot data."""
    found = set()
    for obj in store.list(""):
        parts = obj.key.split("/")
        if len(parts) >= 3 and parts[1] in (layout.MANIFESTS, layout.DATA) and layout.valid_run_id(parts[0]):
            found.add(parts[0])
    return sorted(found)


def summarize_run(reader: RunReader) -> RunSummary:
    rows = snapshot_rows(reader)
    newest = next((r for r in rows if r.valid), None)
    return RunSummary(
        run_id=reader.run_id,
        snapshots=len(rows),
        valid=sum(r.valid for r in rows),
        pinned=sum(r.pinned for r in rows),
        newest_step=newest.step if newest else None,
        newest_snapshot_id=newest.snapshot_id if newest else None,
        newest_created_at=newest.created_at if newest else None,
        final=bool(newest and newest.final),
    )


def list_runs(store: Store) -> list[RunSummary]:
    return [summarize_run(RunReader(store, run)) for run in run_ids(store)]


# -- verify -----------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    snapshot_id: str
    step: int
    size_bytes: int
    problems: list[str]

    @property
    def valid(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"snapshot_id": self.snapshot_id, "step": self.step, "size_bytes": self.size_bytes,
                "valid": self.valid, "problems": list(self.problems)}


def select_snapshots(reader: RunReader, snapshot: str | None = None) -> list[SnapshotStatus]:
    """The snapshots `snapshot` names (an id, "latest", or None for all), newest first.

    Raises ConfigError for a malformed id, SnapshotNotFoundError when there is none.
    """
    if snapshot is not None:
        check_snapshot_id(snapshot)
    statuses = list(reader.statuses())
    if not statuses:
        raise SnapshotNotFoundError(f"{_where(reader)} has no snapshots: check --run-id (runner ls lists the runs)")
    if snapshot is None:
        return statuses
    if snapshot == LATEST:
        valid = [s for s in statuses if s.valid]
        if not valid:
            raise SnapshotNotFoundError(f"{_where(reader)} has no valid snapshot")
        return valid[:1]
    chosen = [s for s in statuses if s.snapshot_id == snapshot]
    if not chosen:
        raise SnapshotNotFoundError(
            f"no snapshot {snapshot} in {_where(reader)}: runner ls --run-id {reader.run_id} lists them"
        )
    return chosen


def verify(reader: RunReader, statuses: list[SnapshotStatus], progress: Progress | None = None) -> list[VerifyResult]:
    """Deep check: read every byte of every file and compare with the manifest's SHA-256."""
    progress = progress or NoProgress()
    progress.begin(f"verifying {reader.run_id}", sum(s.manifest.total_bytes for s in statuses if s.manifest))
    return [_verify_one(reader, st, progress) for st in statuses]


def _verify_one(reader: RunReader, status: SnapshotStatus, progress: Progress) -> VerifyResult:
    manifest = status.manifest
    if manifest is None:
        return VerifyResult(status.snapshot_id, layout.step_of(status.snapshot_id), 0, [str(status.problem)])
    problems = []
    for entry in manifest.files:  # every file, so that each bad one is named
        try:
            reader.read_file(manifest, entry)
        except CorruptSnapshotError as exc:
            problems.append(str(exc))
        progress.advance(entry.size)
    return VerifyResult(status.snapshot_id, manifest.step, manifest.total_bytes, problems)


# -- gc ---------------------------------------------------------------------


@dataclass(frozen=True)
class GcReport:
    run_id: str
    dry_run: bool
    deleted: list[Manifest]  # snapshots deleted (or that would be)
    orphans: list[str]  # data prefixes without a manifest, deleted (or that would be)
    invalid: dict[str, str]  # snapshot id -> problem; left alone for an operator to judge
    kept: list[str]  # valid snapshots kept, newest first
    pinned: list[str]
    aborted_uploads: int | None  # None in a dry run
    objects_deleted: int

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "deleted": [{"snapshot_id": m.snapshot_id, "step": m.step, "size_bytes": m.total_bytes}
                        for m in self.deleted],
            "orphans": list(self.orphans),
            "invalid": [{"snapshot_id": k, "problem": v} for k, v in self.invalid.items()],
            "kept": list(self.kept),
            "pinned": list(self.pinned),
            "aborted_uploads": self.aborted_uploads,
            "objects_deleted": self.objects_deleted,
        }


def gc(reader: RunReader, keep_last: int, orphan_age_s: float = retention.DEFAULT_ORPHAN_AGE_S,
       dry_run: bool = False, progress: Progress | None = None) -> GcReport:
    """Apply retention (keep the newest `keep_last` valid snapshots and pinned ones), sweep
    orphaned data and stale multipart uploads older than `orphan_age_s`.

    Raises RefusedError when no snapshot that would be kept reads back intact.
    """
    if keep_last < 1:
        raise ConfigError(f"--keep-last must be at least 1, not {keep_last}")
    if orphan_age_s < 0:
        raise ConfigError(f"--orphan-age must not be negative, not {orphan_age_s}")
    statuses = list(reader.statuses())
    plan = retention.plan(reader, retention.KeepLastN(keep_last), orphan_age_s)
    doomed = {m.snapshot_id for m in plan.snapshots}
    kept = [s for s in statuses if s.valid and s.snapshot_id not in doomed]
    if doomed:
        _require_intact_survivor(reader, kept, progress or NoProgress())
    deleted = aborted = None
    if not dry_run:
        deleted = retention.apply(reader, plan)
        aborted = reader.store.abort_stale_uploads(f"{reader.run_id}/", orphan_age_s)
    return GcReport(
        run_id=reader.run_id,
        dry_run=dry_run,
        deleted=list(plan.snapshots),
        orphans=list(plan.orphans),
        invalid={s.snapshot_id: str(s.problem) for s in statuses if not s.valid},
        kept=[s.snapshot_id for s in kept],
        pinned=sorted(reader.pinned(), reverse=True),
        aborted_uploads=aborted,
        objects_deleted=deleted or 0,
    )


def _require_intact_survivor(reader: RunReader, kept: list[SnapshotStatus], progress: Progress) -> None:
    for status in kept:
        result = verify(reader, [status], progress)[0]
        if result.valid:
            return
        log.warning("kept snapshot %s is corrupt: %s", status.snapshot_id, "; ".join(result.problems))
    raise RefusedError(
        f"no snapshot that gc would keep in {_where(reader)} reads back intact, so nothing was deleted: "
        "run `runner verify` and pin a good snapshot"
    )


# -- pin --------------------------------------------------------------------


@dataclass(frozen=True)
class PinResult:
    snapshot_id: str
    pinned: bool  # the state now
    changed: bool

    def to_json(self) -> dict[str, Any]:
        return {"snapshot_id": self.snapshot_id, "pinned": self.pinned, "changed": self.changed}


def pin(reader: RunReader, snapshot: str) -> PinResult:
    """Keep a valid snapshot (an id or "latest") out of rotation."""
    status = select_snapshots(reader, snapshot)[0]
    if not status.valid:
        raise RefusedError(f"snapshot {status.snapshot_id} is not valid ({status.problem}); only a valid one can be pinned")
    already = status.snapshot_id in reader.pinned()
    if not already:
        reader.store.write_bytes(layout.pin_key(reader.run_id, status.snapshot_id), b"")
    return PinResult(status.snapshot_id, True, not already)


def unpin(reader: RunReader, snapshot: str) -> PinResult:
    """Let a snapshot rotate out again. A pin whose snapshot is gone can be removed too."""
    check_snapshot_id(snapshot)
    pinned = reader.pinned()
    sid = snapshot if snapshot != LATEST else select_snapshots(reader, LATEST)[0].snapshot_id
    if sid not in pinned:
        select_snapshots(reader, sid)  # raises SnapshotNotFoundError for an unknown id
        return PinResult(sid, False, False)
    reader.store.delete([layout.pin_key(reader.run_id, sid)])
    return PinResult(sid, False, True)


# -- fork -------------------------------------------------------------------


def parse_source(spec: str) -> tuple[str, str | None]:
    """`RUN[@SNAPSHOT]` -> (run, snapshot or None). Raises ConfigError."""
    run, _, snapshot = spec.partition("@")
    check_run_id(run)
    if snapshot:
        check_snapshot_id(snapshot)
    return run, snapshot or None


def fork(store: Store, source_run: str, source_snapshot: str | None, new_run: str,
         progress: Progress | None = None) -> Manifest:
    """Copy a snapshot (default: the newest valid one that reads back intact) into `new_run`.

    The copy gets a fresh snapshot id, the source's step, epoch, metrics and
    extras, reason "manual" (so a fork of a finished run can train on),
    parent None and forked_from "RUN@SNAPSHOT".  Raises RefusedError when
    `new_run` already has snapshots.
    """
    check_run_id(source_run)
    check_run_id(new_run)
    if new_run == source_run:
        raise ConfigError("--to must name a new run, not the one forked from")
    target = RunReader(store, new_run)
    if target.snapshot_ids():
        raise RefusedError(f"{_where(target)} already has snapshots: fork into a new run id")
    source = RunReader(store, source_run)
    progress = progress or NoProgress()
    for manifest in _fork_candidates(source, source_snapshot):
        try:
            files = _read_verified(source, manifest, progress)
        except CorruptSnapshotError as exc:
            if source_snapshot not in (None, LATEST):
                raise RefusedError(f"snapshot {manifest.snapshot_id} of run {source_run!r} is corrupt: {exc}") from None
            log.warning("snapshot %s of run %s is corrupt (%s); forking the previous one",
                        manifest.snapshot_id, source_run, exc)
            continue
        return _write_fork(store, new_run, manifest, files)
    raise SnapshotNotFoundError(f"{_where(source)} has no intact snapshot to fork")


def _fork_candidates(source: RunReader, snapshot: str | None) -> Iterator[Manifest]:
    if snapshot in (None, LATEST):
        yield from source.valid_snapshots()
        return
    status = select_snapshots(source, snapshot)[0]
    if not status.valid:
        raise RefusedError(f"snapshot {snapshot} of run {source.run_id!r} is not valid: {status.problem}")
    yield status.manifest  # type: ignore[misc]


def _read_verified(reader: RunReader, manifest: Manifest, progress: Progress) -> dict[str, RawFile]:
    from runner.checkpoint.writer import RawFile

    progress.begin(f"copying {reader.run_id}@{manifest.snapshot_id}", manifest.total_bytes)
    files: dict[str, RawFile] = {}
    for entry in manifest.files:
        data = reader.read_file(manifest, entry)  # checked against its SHA-256
        files[entry.path] = RawFile(entry.path, data, entry.component)  # by path: a shard per rank
        progress.advance(entry.size)
    return files


def _write_fork(store: Store, new_run: str, source: Manifest, files: dict[str, RawFile]) -> Manifest:
    from runner.checkpoint.writer import PendingSnapshot, write_snapshot

    pending = PendingSnapshot(
        step=source.step,
        reason=Reason.MANUAL,
        components=dict(files),
        epoch=source.epoch,
        parent=None,
        forked_from=f"{source.run_id}@{source.snapshot_id}",
        world_size=source.world_size,
        metrics=dict(source.metrics),
        extra=dict(source.extra),
        sharded=source.sharded,
    )
    manifest = write_snapshot(store, new_run, pending).manifest
    log.info("forked %s@%s into %s as %s", source.run_id, source.snapshot_id, new_run, manifest.snapshot_id)
    return manifest


__all__ = [
    "GcReport", "NoProgress", "PinResult", "Progress", "RefusedError", "RunSummary", "SnapshotRow",
    "VerifyResult", "check_run_id", "check_snapshot_id", "fork", "gc", "list_runs", "open_run", "open_store",
    "parse_source", "pin", "run_ids", "select_snapshots", "snapshot_rows", "summarize_run", "unpin", "verify",
]
