"""Sharded snapshots of torchrun jobs, through torch.distributed.checkpoint (DCP).

Save (every rank, the same step), in two halves.  `spool`, on the training
thread: DCP plans the job-wide state dict and each rank writes its shards
into one local spool file (`__<rank>_0.distcp`, DCP's own format) beside its
RNG streams (`rank-<rank>.pt`: they differ per rank); that is the training
stall.  `commit`, on the Checkpointer's writer thread for periodic saves (on
the caller's for the others): each rank publishes its files under the
snapshot's fresh prefix, over a gloo group of the writer threads' own.  One gather tells
rank 0 that every rank's files are in the store, with their sizes and
SHA-256; only then does rank 0 write the sharding plan (`dcp-plan.json`,
JSON instead of DCP's pickled `.metadata`, see dcp_metadata.py) and create the
manifest exclusively.  A rank that dies or fails anywhere before that leaves
no manifest, so no snapshot; the outcome is broadcast so every rank returns
the same result or raises the same error.

Restore: rank 0 picks the snapshot and every rank loads that one.  DCP asks
our storage reader for byte ranges of shard files; the reader fetches each
file it needs whole, checks its SHA-256 against the manifest before handing
out any byte, and non-tensor values are unpickled with `weights_only=True`.
DCP reshards to the current world size, so a job saved by 4 ranks resumes
on 2 or 3.

Modules and optimizers go through `torch.distributed.checkpoint.state_dict`
(`get_model_state_dict` / `get_optimizer_state_dict`), which gives DDP and
FSDP2 models the same keys as the bare model and initialises a fresh
optimizer's state so that DCP can load into it.  Every other component's
`state_dict()` must be the same on every rank (DCP saves replicated values
once); what differs per rank belongs in the RNG file or in a DTensor.

The ranks talk over a gloo group of their own (`Group`), whatever backend the
training uses: its collectives are on small CPU objects, once per step for
the stop flag and a few times per save.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from runner.control import lease
from runner.checkpoint import dcp_metadata, layout, state
from runner.checkpoint.manifest import FileEntry, Manifest
from runner.checkpoint.reader import CorruptSnapshotError, RunReader
from runner.checkpoint.writer import PendingSnapshot, create_manifest, fault, manifest_for
from runner.errors import ConfigError, StateMismatchError, UnsafeDataError
from runner.storage import StorageError, Store

log = logging.getLogger("runner.checkpoint")

_LEASE_LOST = "lease lost: "
PLAN_FILE = "dcp-plan.json"
PLAN_COMPONENT = "_plan"
SHARD_COMPONENT = "_shard"


def rng_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def active() -> bool:
    """True in a torch.distributed job (torchrun, any world size): saves are sharded."""
    return dist.is_available() and dist.is_initialized()


class SaveFailed(StorageError):
    """A sharded save that some rank could not complete (raised on every rank)."""


class Group:
    """This job's ranks, over a gloo group of our own, created collectively (every rank builds one).

    Outside a torch.distributed job (`Group(local=True)`) it is one rank, and
    DCP runs without collectives: a plain process can restore a sharded snapshot.
    """

    def __init__(self, local: bool = False) -> None:
        self.local = local
        self.rank = 0 if local else dist.get_rank()
        self.world_size = 1 if local else dist.get_world_size()
        self.pg = None if local else dist.new_group(backend="gloo")
        # A commit runs on the writer thread while training goes on, so its collectives need a group of
        # their own: a group's collectives must come in the same order on every rank, and step()'s votes
        # on the training thread would interleave with them.
        self.commit_pg = None if local else dist.new_group(backend="gloo")

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def agree(self, wish: int) -> int:
        """The largest `wish` of any rank (the step-boundary vote: 0 go on, 1 save, 2 save and stop)."""
        if self.local:
            return wish
        flag = torch.tensor([wish], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.pg)
        return int(flag.item())

    def broadcast(self, value: Any, commit: bool = False) -> Any:
        """Rank 0's `value` on every rank (between our own ranks: pickle is theirs, not the bucket's).

        `commit`: over the commit group (the writer thread's), not the training thread's.
        """
        if self.local:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.commit_pg if commit else self.pg)
        return box[0]

    def all_gather(self, value: Any, commit: bool = False) -> list[Any]:
        if self.local:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.commit_pg if commit else self.pg)
        return out

    def close(self) -> None:
        """Release our gloo groups: left to the interpreter's exit, their threads can abort the process."""
        for pg in (self.pg, self.commit_pg):
            if pg is not None and dist.is_initialized():
                dist.destroy_process_group(pg)
        self.pg = self.commit_pg = None


# -- the state dicts DCP sees -------------------------------------------------------------


def _owners(components: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """For every optimizer component, the module component holding its parameters."""
    modules = [m for m in components.values() if isinstance(m, torch.nn.Module)]
    owners: dict[str, torch.nn.Module] = {}
    for name, obj in components.items():
        if isinstance(obj, torch.optim.Optimizer):
            params = {id(p) for group in obj.param_groups for p in group["params"]}
            owner = next((m for m in modules if params <= {id(p) for p in m.parameters()}), None)
            if owner is None:
                raise ConfigError(f"component {name!r}: its parameters are not all in one module component; "
                                  "pass the model too, so a sharded snapshot can name them")
            owners[name] = owner
    return owners


def _state_dicts(components: Mapping[str, Any], owners: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, obj in components.items():
        if isinstance(obj, torch.nn.Module):
            out[name] = get_model_state_dict(obj)
        elif name in owners:
            out[name] = get_optimizer_state_dict(owners[name], obj)
        else:
            out[name] = obj.state_dict()
    return out


def _load_state_dicts(components: Mapping[str, Any], owners: Mapping[str, torch.nn.Module],
                      loaded: Mapping[str, Any], strict: bool) -> None:
    options = StateDictOptions(strict=strict)
    for name, obj in components.items():
        if name not in loaded:
            continue
        if isinstance(obj, torch.nn.Module):
            set_model_state_dict(obj, loaded[name], options=options)
        elif name in owners:
            set_optimizer_state_dict(owners[name], obj, loaded[name], options=options)
        else:
            obj.load_state_dict(loaded[name])


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
    owners = _owners(components)
    sid = group.broadcast(layout.new_snapshot_id(step) if group.is_coordinator else None)
    fault("before-data", save_number)
    folder = tempfile.TemporaryDirectory(prefix=f"runner-spool-{os.getpid()}-")
    try:
        writer = _SpoolWriter(folder.name)
        dcp.save(_state_dicts(components, owners), storage_writer=writer, process_group=group.pg,
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


# -- restoring -------------------------------------------------------------------------


class _VerifiedFiles:
    """The file system DCP's reader sees: a snapshot's files, fetched whole and checked before use."""

    def __init__(self, reader: RunReader, manifest: Manifest):
        self.reader, self.manifest = reader, manifest
        self.entries = {f.path: f for f in manifest.files}
        self.cache: dict[str, bytes] = {}

    def init_path(self, path: Any) -> str:
        return str(path)

    def concat_path(self, path: Any, suffix: str) -> str:
        return suffix

    def fetch(self, name: str) -> bytes:
        if name not in self.cache:
            entry = self.entries.get(name)
            if entry is None:
                raise CorruptSnapshotError(f"the sharding plan names {name}, which the manifest does not list")
            self.cache[name] = self.reader.read_file(self.manifest, entry)  # SHA-256 checked
        return self.cache[name]

    @contextlib.contextmanager
    def create_stream(self, path: str, mode: str) -> Iterator[io.BytesIO]:
        if mode != "rb":
            raise PermissionError("a snapshot is read-only")
        yield io.BytesIO(self.fetch(path))


class _VerifiedReader(FileSystemReader):
    """DCP's file reader over `_VerifiedFiles`, with the plan from our JSON instead of a pickle."""

    def __init__(self, files: _VerifiedFiles, plan: Any):
        super().__init__(files.manifest.snapshot_id)
        self.fs = files
        self.plan = plan

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        return self.plan

    def read_data(self, plan: Any, planner: Any) -> Any:
        # Fetch and check every file this rank needs before any tensor is touched.
        for name in sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}):
            self.fs.fetch(name)
        return super().read_data(plan, planner)


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but non-tensor values come back through `weights_only=True` (DCP's own is a full unpickle)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeDataError(f"refusing to load {fqn}: it holds more than plain data "
                                  f"({state.unpickling_reason(exc)})") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def load(reader: RunReader, manifest: Manifest, group: Group, components: Mapping[str, Any],
         strict: bool) -> None:
    """Load `manifest` (a sharded snapshot, any world size) into `components` on every rank.

    Raises CorruptSnapshotError / UnsafeDataError (on every rank) when the
    snapshot cannot be trusted, StateMismatchError when strict and the
    structure differs.
    """
    owners = _owners(components)
    plan = _plan(reader, manifest)
    files = _VerifiedFiles(reader, manifest)
    state_dicts = _state_dicts(components, owners)
    try:
        dcp.load(state_dicts, storage_reader=_VerifiedReader(files, plan),
                 planner=_SafeLoadPlanner(allow_partial_load=not strict), process_group=group.pg,
                 no_dist=group.local)
    except dcp.api.CheckpointException as exc:
        raise _translate(manifest, exc) from None
    except RuntimeError as exc:  # raised by the planner before any read: keys missing from the snapshot
        raise StateMismatchError(f"snapshot {manifest.snapshot_id} does not match the job's state: "
                                 f"{str(exc).splitlines()[0][:300]}; pass strict=False to load what matches") from None
    _load_state_dicts(components, owners, state_dicts, strict)
    _restore_rng(files, manifest, group)


def _plan(reader: RunReader, manifest: Manifest) -> Any:
    entry = manifest.file(PLAN_COMPONENT)
    if entry is None:
        raise CorruptSnapshotError(f"sharded snapshot {manifest.snapshot_id} has no sharding plan")
    try:
        plan = dcp_metadata.from_json(reader.read_file(manifest, entry))
    except dcp_metadata.DcpMetadataError as exc:
        raise CorruptSnapshotError(f"sharding plan of {manifest.snapshot_id}: {exc}") from None
    listed = {f.path for f in manifest.files}
    missing = sorted(dcp_metadata.data_files(plan) - listed)
    if missing:
        raise CorruptSnapshotError(f"the sharding plan names files the manifest does not list: {', '.join(missing)}")
    return plan


def _translate(manifest: Manifest, exc: Exception) -> Exception:
    # DCP keeps each rank's failure as an (exception, traceback summary) pair.
    causes = [c[0] if isinstance(c, tuple) else c for c in getattr(exc, "failures", {}).values()]
    for cause in causes:
        if isinstance(cause, (CorruptSnapshotError, UnsafeDataError, StateMismatchError, StorageError)):
            return cause
    text = "; ".join(str(c).splitlines()[0][:200] for c in causes) or str(exc).splitlines()[0][:300]
    if "Missing key" in text or "Size mismatch" in text or "size mismatch" in text:
        return StateMismatchError(f"snapshot {manifest.snapshot_id} does not match the job's state: {text}")
    return CorruptSnapshotError(f"snapshot {manifest.snapshot_id} could not be loaded: {text}")


def _restore_rng(files: _VerifiedFiles, manifest: Manifest, group: Group) -> None:
    # RNG streams are per rank; with another world size there is no stream that is "ours".
    if manifest.world_size != group.world_size:
        log.info("snapshot %s was saved by %d ranks, this job has %d: RNG streams start from their seeds",
                 manifest.snapshot_id, manifest.world_size, group.world_size)
        return
    rng = state.deserialize(files.fetch(rng_file(group.rank)))
    state.check_kind(state.RNG_COMPONENT, None, rng)
    state.restore_rng(rng)

