"""Saving a sharded snapshot: `spool` on the training thread, `commit` on the writer thread (sharded/ notes).

Each rank writes its shards into a local spool file with DCP, publishes its
files under the snapshot's fresh prefix, and rank 0 writes the plan and the
manifest once every rank's files are in the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from runner.control import lease
from runner.checkpoint import layout, state
from runner.checkpoint.sharded import dcp_metadata
from runner.checkpoint.manifest import FileEntry, Manifest
from runner.checkpoint.writer import PendingSnapshot, create_manifest, fault, manifest_for
from runner.storage import Store

log = logging.getLogger("runner.checkpoint")

from runner.checkpoint.sharded.group import (
    _LEASE_LOST,
    PLAN_COMPONENT,
    PLAN_FILE,
    SHARD_COMPONENT,
    Group,
    SaveFailed,
    owners_of,
    rng_file,
    state_dicts,
)

# -- the state dicts DCP sees -------------------------------------------------------------


# -- saving ---------------------------------------------------------------------------


class _SpoolWriter(FileSystemWriter):
    """DCP's file writer into a local spool folder, minus the pickled `.metadata`: the plan is kept for us."""

    def __init__(self, folder: str):
        super().__init__(folder, single_file_per_rank=True, sync_files=False, overwrite=True)
        self.plan: Any = None

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:  # the coordinator only
        metadata.storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        self.plan = metadata


def _publish(store: Store, key: str, path: str, component: str, name: str) -> FileEntry:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    store.write_file(key, path)
    return FileEntry(path=name, size=os.path.getsize(path), sha256=digest, component=component)


@dataclass
class Spooled:
    """One rank's part of a save on local disk (DCP's shard file and the RNG file), not yet published."""

    sid: str
    folder: tempfile.TemporaryDirectory | None = None
    plan: bytes | None = None  # rank 0's: the sharding plan as JSON
    problem: str | None = None  # why this rank has nothing to publish

    def files(self, rank: int) -> list[tuple[str, str]]:
        """(file name, component) of what to publish, shards first."""
        assert self.folder is not None
        shards = sorted(n for n in os.listdir(self.folder.name) if n.endswith(".distcp"))
        return [(n, SHARD_COMPONENT) for n in shards] + [(rng_file(rank), f"{state.RNG_COMPONENT}.{rank}")]

    def cleanup(self) -> None:
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None


def spool(group: Group, components: Mapping[str, Any], step: int, save_number: int) -> Spooled:
    """Every rank, on the training thread, at the same step: DCP writes this rank's shards to local disk.

    This is the training stall of a sharded save (collective over the
    training group).  A rank that fails returns its problem instead of
    raising, so that every rank still reaches `commit`'s gather.
    """
    owners = owners_of(components)
    sid = group.broadcast(layout.new_snapshot_id(step) if group.is_coordinator else None)
    fault("before-data", save_number)
    folder = tempfile.TemporaryDirectory(prefix=f"runner-spool-{os.getpid()}-")
    try:
        writer = _SpoolWriter(folder.name)
        dcp.save(state_dicts(components, owners), storage_writer=writer, process_group=group.pg,
                 no_dist=group.local)
        state.serialize_to(state.capture_rng(), os.path.join(folder.name, rng_file(group.rank)))
        plan = dcp_metadata.to_json(writer.plan) if writer.plan is not None else None
        return Spooled(sid, folder, plan)
    except Exception as exc:
        folder.cleanup()
        return Spooled(sid, problem=f"rank {group.rank}: {exc}")


def _publish_spooled(store: Store, run_id: str, spooled: Spooled, rank: int, save_number: int) -> list[FileEntry]:
    assert spooled.folder is not None
    entries = []
    for index, (name, component) in enumerate(spooled.files(rank)):
        entries.append(_publish(store, layout.data_key(run_id, spooled.sid, name),
                                os.path.join(spooled.folder.name, name), component, name))
        if index == 0:
            fault("mid-data", save_number)
    return entries


def commit(store: Store, run_id: str, group: Group, spooled: Spooled, pending: PendingSnapshot,
           save_number: int, fence: Any = None) -> Manifest:
    """Every rank, after `spool` (on the writer thread for periodic saves): publish, then rank 0 commits.

    Collective over the commit group.  Returns the committed manifest on
    every rank; raises SaveFailed on every rank when any rank failed
    (nothing committed), lease.LeaseLostError when the fence refuses.
    """
    try:
        entries = [] if spooled.problem else _publish_spooled(store, run_id, spooled, group.rank, save_number)
        mine: tuple[list[FileEntry], str | None] = (entries, spooled.problem)
    except Exception as exc:  # every rank must reach the gather, or the others would wait for ever
        mine = ([], f"rank {group.rank}: {exc}")
    finally:
        spooled.cleanup()
    fault("before-manifest", save_number)
    reports = group.all_gather(mine, commit=True)
    outcome: tuple[bytes | None, str | None] = (None, None)
    if group.is_coordinator:
        outcome = _commit(store, run_id, spooled.sid, pending, reports, spooled.plan, fence)
    manifest_bytes, problem = group.broadcast(outcome, commit=True)
    if problem is not None and problem.startswith(_LEASE_LOST):
        raise lease.LeaseLostError(problem.removeprefix(_LEASE_LOST))
    if problem is not None:
        raise SaveFailed(f"sharded snapshot at step {pending.step} not committed: {problem}")
    fault("after-manifest", save_number)
    return Manifest.from_bytes(manifest_bytes)


def save(store: Store, run_id: str, group: Group, components: Mapping[str, Any], pending: PendingSnapshot,
         save_number: int, fence: Any = None) -> Manifest:
    """`spool` then `commit`, on the calling thread: a save that returns committed (or raises on every rank)."""
    return commit(store, run_id, group, spool(group, components, pending.step, save_number), pending, save_number,
                  fence)


def _commit(store: Store, run_id: str, sid: str, pending: PendingSnapshot,
            reports: list[tuple[list[FileEntry], str | None]], plan: bytes | None,
            fence: Any) -> tuple[bytes | None, str | None]:
    """Rank 0: write the plan and the manifest once every rank's files are in; (manifest, None) or (None, why)."""
    problems = [problem for _, problem in reports if problem]
    if problems or plan is None:
        return None, problems[0] if problems else "rank 0 has no sharding plan"
    try:
        if fence is not None:
            fence()
        store.write_bytes(layout.data_key(run_id, sid, PLAN_FILE), plan)
        files = [entry for rank_entries, _ in reports for entry in rank_entries]
        files.append(FileEntry(path=PLAN_FILE, size=len(plan), sha256=hashlib.sha256(plan).hexdigest(),
                               component=PLAN_COMPONENT))
        manifest = manifest_for(run_id, sid, pending, files, sharded=True)
        data = manifest.to_bytes()
        create_manifest(store, run_id, data, sid)
        return data, None
    except lease.LeaseLostError as exc:  # every rank stops, as a single process would
        return None, f"{_LEASE_LOST}{exc}"
    except Exception as exc:  # told to every rank
        return None, f"{type(exc).__name__}: {exc}"
