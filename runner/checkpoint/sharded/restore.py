"""Restoring a sharded snapshot: every rank loads the one rank 0 picked, each file's SHA-256 checked first.

DCP asks our storage reader for byte ranges of shard files; the reader
fetches each file it needs whole, checks it against the manifest before
handing out any byte, and non-tensor values are unpickled with
`weights_only=True`.  DCP reshards to the current world size.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import FileSystemReader

from runner.checkpoint import state
from runner.checkpoint.sharded import dcp_metadata
from runner.checkpoint.manifest import Manifest
from runner.checkpoint.reader import CorruptSnapshotError, RunReader
from runner.errors import StateMismatchError, UnsafeDataError
from runner.storage import StorageError

log = logging.getLogger("runner.checkpoint")

from runner.checkpoint.sharded.group import PLAN_COMPONENT, Group, load_state_dicts, owners_of, rng_file, state_dicts


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
    owners = owners_of(components)
    plan = _plan(reader, manifest)
    files = _VerifiedFiles(reader, manifest)
    wanted = state_dicts(components, owners)
    try:
        dcp.load(wanted, storage_reader=_VerifiedReader(files, plan),
                 planner=_SafeLoadPlanner(allow_partial_load=not strict), process_group=group.pg,
                 no_dist=group.local)
    except dcp.api.CheckpointException as exc:
        raise _translate(manifest, exc) from None
    except RuntimeError as exc:  # raised by the planner before any read: keys missing from the snapshot
        raise StateMismatchError(f"snapshot {manifest.snapshot_id} does not match the job's state: "
                                 f"{str(exc).splitlines()[0][:300]}; pass strict=False to load what matches") from None
    load_state_dicts(components, owners, wanted, strict)
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
