"""`runner gc` and `runner pin`: what retention may delete, and what it must keep.

Why gc reads a snapshot before deleting: retention's plan trusts the shallow
check (manifest, presence and size of every file).  A bit-flipped newest
snapshot passes it, and deleting the older ones would then leave no good
snapshot at all.  So before anything is deleted, the kept snapshots are read
in full, newest first, until one proves intact; if none does, gc refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.checkpoint import layout, retention
from runner.checkpoint.manifest import Manifest
from runner.checkpoint.reader import RunReader, SnapshotStatus
from runner.errors import ConfigError
from runner.ops.common import LATEST, NoProgress, Progress, RefusedError, check_snapshot_id, log, where
from runner.ops.listing import select_snapshots, verify

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
        f"no snapshot that gc would keep in {where(reader)} reads back intact, so nothing was deleted: "
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
