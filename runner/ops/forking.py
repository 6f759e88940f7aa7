"""`runner fork`: a snapshot of one run copied, byte for byte, as the first snapshot of a new run.

Why fork copies bytes rather than state: the snapshot is read and checked
against its SHA-256, then written unchanged (same file names, same
components) under a fresh snapshot id with a new manifest.  Nothing is
deserialized, so forking never runs code and works for snapshots of any
shape, sync-dir ones included.  The writer (and so torch) is imported only
by fork, so the read-only commands start fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from runner.checkpoint.manifest import Manifest, Reason
from runner.checkpoint.reader import CorruptSnapshotError, RunReader
from runner.errors import ConfigError, SnapshotNotFoundError
from runner.ops.common import LATEST, NoProgress, Progress, RefusedError, check_run_id, check_snapshot_id, log, where
from runner.ops.listing import select_snapshots
from runner.storage import Store

if TYPE_CHECKING:
    from runner.checkpoint.writer import RawFile

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
        raise RefusedError(f"{where(target)} already has snapshots: fork into a new run id")
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
    raise SnapshotNotFoundError(f"{where(source)} has no intact snapshot to fork")


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
