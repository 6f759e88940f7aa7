"""`runner ls` and `runner verify`: what a bucket holds, and whether each snapshot reads back intact.

Read-only: nothing here writes to the store.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from runner.checkpoint import layout
from runner.checkpoint.reader import CorruptSnapshotError, RunReader, SnapshotStatus
from runner.errors import SnapshotNotFoundError
from runner.ops.common import LATEST, NoProgress, Progress, check_snapshot_id, where
from runner.storage import Store

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
        raise SnapshotNotFoundError(f"{where(reader)} has no snapshots: check --run-id (runner ls lists the runs)")
    if snapshot is None:
        return statuses
    if snapshot == LATEST:
        valid = [s for s in statuses if s.valid]
        if not valid:
            raise SnapshotNotFoundError(f"{where(reader)} has no valid snapshot")
        return valid[:1]
    chosen = [s for s in statuses if s.snapshot_id == snapshot]
    if not chosen:
        raise SnapshotNotFoundError(
            f"no snapshot {snapshot} in {where(reader)}: runner ls --run-id {reader.run_id} lists them"
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
