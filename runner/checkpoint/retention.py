"""Retention: which snapshots to keep, and deleting the rest safely.

The policy is a pure function of the run's valid snapshots and pins (easy to
test, shown by `runner gc --dry-run`).  Deletion follows DESIGN.md 3.3: it
only runs after a newer snapshot was committed and validated, never touches
the newest valid snapshot or a pinned one, never touches a snapshot whose
manifest is invalid (that is for an operator to judge), and deletes the
manifest first, then the data, so a kill mid-way leaves invisible garbage
rather than a manifest pointing at nothing.  Data prefixes with no manifest
are swept once older than `orphan_age_s` (a writer may still be uploading),
and only after a last look that no manifest names them: data that a
manifest names is never deleted but with that manifest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from runner.checkpoint import layout
from runner.checkpoint.manifest import Manifest
from runner.checkpoint.reader import RunReader

log = logging.getLogger("runner.checkpoint")

DEFAULT_ORPHAN_AGE_S = 3600.0


@dataclass(frozen=True)
class KeepLastN:
    """Keep the newest `n` valid snapshots (at least the newest one), plus pinned ones."""

    n: int = 3

    def to_delete(self, valid_newest_first: list[Manifest], pinned: set[str]) -> list[Manifest]:
        keep = max(1, self.n)
        return [m for m in valid_newest_first[keep:] if m.snapshot_id not in pinned]


@dataclass(frozen=True)
class GcPlan:
    snapshots: list[Manifest]
    orphans: list[str]  # data prefixes with no manifest, old enough to delete
    invalid: list[str]  # snapshot ids with untrustworthy manifests, left alone

    @property
    def empty(self) -> bool:
        return not (self.snapshots or self.orphans)


def plan(reader: RunReader, policy: KeepLastN, orphan_age_s: float = DEFAULT_ORPHAN_AGE_S,
         now: float | None = None, protect: frozenset[str] | set[str] = frozenset()) -> GcPlan:
    """What to delete. `protect`: snapshot ids kept whatever the policy says.

    A writer protects the snapshot it has just committed: it may not sort
    newest (a rolled-back run below newer-step snapshots, or a newer snapshot
    whose data is corrupt but of the right size), yet it is the one to resume.
    """
    now = time.time() if now is None else now
    statuses, data = reader.scan()  # one data listing serves the checks and the orphan sweep
    valid = [s.manifest for s in statuses if s.valid]
    doomed = policy.to_delete(valid, reader.pinned() | set(protect))  # type: ignore[arg-type]
    with_manifest = {s.snapshot_id for s in statuses}
    newest_mtime: dict[str, float] = {}
    for obj in data:
        sid = layout.snapshot_id_from_data_key(reader.run_id, obj.key)
        if sid and sid not in with_manifest:
            newest_mtime[sid] = max(newest_mtime.get(sid, 0.0), obj.modified or now)
    orphans = sorted(sid for sid, mtime in newest_mtime.items() if now - mtime >= orphan_age_s)
    invalid = [s.snapshot_id for s in statuses if not s.valid]
    return GcPlan(doomed, orphans, invalid)  # type: ignore[arg-type]


def apply(reader: RunReader, gc: GcPlan) -> int:
    """Delete what the plan names; returns how many objects were deleted.

    Every doomed manifest goes first (uncommit), in one bulk delete, then all
    their data in another (one request per 1,000 keys on S3).
    """
    store, run = reader.store, reader.run_id
    manifests = [layout.manifest_key(run, m.snapshot_id) for m in gc.snapshots]
    data = [layout.data_key(run, m.snapshot_id, f.path) for m in gc.snapshots for f in m.files]
    store.delete(manifests)  # manifests first: uncommit
    store.delete(data)
    for manifest in gc.snapshots:
        log.info("retention: deleted snapshot %s (step %d)", manifest.snapshot_id, manifest.step)
    deleted = len(manifests) + len(data)
    for sid in gc.orphans:
        if store.exists(layout.manifest_key(run, sid)):
            continue  # committed since the plan's listing (a slow writer): its data is named now
        keys = [o.key for o in store.list(layout.data_prefix(run, sid))]
        store.delete(keys)
        deleted += len(keys)
        log.info("retention: deleted orphaned data %s (no manifest)", sid)
    return deleted
