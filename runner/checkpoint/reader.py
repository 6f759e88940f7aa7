"""Reading a run's snapshots: listing, validating, finding the newest valid one.

No mutable "latest" pointer is trusted.  The newest valid snapshot is found
by listing manifests newest first and checking each: it parses, its own hash
matches, its version is supported, it names itself, and every file it lists
exists with the listed size.  Data is checked against its SHA-256 as it is
read, before anything is deserialized.  Whatever fails is skipped with a
warning that says why, and the next older snapshot is tried.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from runner.checkpoint import layout
from runner.checkpoint.manifest import FileEntry, Manifest, ManifestError
from runner.storage import ObjectNotFoundError, Store

log = logging.getLogger("runner.checkpoint")


class CorruptSnapshotError(ValueError):
    """A snapshot's data does not match its manifest (missing, short, or altered)."""


@dataclass(frozen=True)
class SnapshotStatus:
    """One manifest in the bucket and whether it can be trusted."""

    snapshot_id: str
    manifest: Manifest | None
    problem: str | None  # None when valid

    @property
    def valid(self) -> bool:
        return self.problem is None


class RunReader:
    """Read-only view of one run in a store."""

    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id

    def snapshot_ids(self) -> list[str]:
        """Ids of every manifest of the run, newest first."""
        ids = (layout.snapshot_id_from_manifest_key(o.key) for o in self.store.list(layout.manifests_prefix(self.run_id)))
        return sorted((i for i in ids if i), reverse=True)

    def load_manifest(self, snapshot_id: str) -> Manifest:
        """Raises ManifestError (untrustworthy) or ObjectNotFoundError."""
        manifest = Manifest.from_bytes(self.store.read_bytes(layout.manifest_key(self.run_id, snapshot_id)))
        if manifest.snapshot_id != snapshot_id or manifest.run_id != self.run_id:
            raise ManifestError(
                f"it names {manifest.run_id}/{manifest.snapshot_id}, not {self.run_id}/{snapshot_id}"
            )
        return manifest

    def _sizes(self) -> dict[str, int]:
        return {o.key: o.size for o in self.store.list(layout.data_prefix(self.run_id))}

    def status(self, snapshot_id: str, sizes: dict[str, int] | None = None) -> SnapshotStatus:
        """Shallow check: the manifest and the presence and size of every file."""
        try:
            manifest = self.load_manifest(snapshot_id)
        except ManifestError as exc:
            return SnapshotStatus(snapshot_id, None, f"bad manifest: {exc}")
        except ObjectNotFoundError:
            return SnapshotStatus(snapshot_id, None, "manifest vanished")
        sizes = self._sizes() if sizes is None else sizes
        for entry in manifest.files:
            key = layout.data_key(self.run_id, snapshot_id, entry.path)
            if key not in sizes:
                return SnapshotStatus(snapshot_id, manifest, f"file {entry.path} is missing")
            if sizes[key] != entry.size:
                return SnapshotStatus(snapshot_id, manifest, f"file {entry.path} has {sizes[key]} bytes, manifest says {entry.size}")
        return SnapshotStatus(snapshot_id, manifest, None)

    def statuses(self) -> Iterator[SnapshotStatus]:
        """Every snapshot newest first, shallow-checked with one data listing."""
        ids = self.snapshot_ids()
        sizes = self._sizes() if ids else {}
        for sid in ids:
            yield self.status(sid, sizes)

    def valid_snapshots(self) -> Iterator[Manifest]:
        """Shallow-valid manifests newest first; each skipped one is logged once."""
        for st in self.statuses():
            if st.valid:
                yield st.manifest  # type: ignore[misc]
            else:
                log.warning("skipping snapshot %s/%s: %s", self.run_id, st.snapshot_id, st.problem)

    def newest_valid(self) -> Manifest | None:
        return next(self.valid_snapshots(), None)

    def read_file(self, manifest: Manifest, entry: FileEntry) -> bytes:
        """The file's bytes, checked against the manifest. Raises CorruptSnapshotError."""
        key = layout.data_key(self.run_id, manifest.snapshot_id, entry.path)
        try:
            data = self.store.read_bytes(key)
        except ObjectNotFoundError:
            raise CorruptSnapshotError(f"{entry.path} is missing") from None
        if len(data) != entry.size:
            raise CorruptSnapshotError(f"{entry.path} has {len(data)} bytes, manifest says {entry.size}")
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise CorruptSnapshotError(f"{entry.path} does not match its checksum")
        return data

    def verify(self, manifest: Manifest) -> str | None:
        """Deep check (reads every byte). Returns the problem, or None when intact."""
        for entry in manifest.files:
            try:
                self.read_file(manifest, entry)
            except CorruptSnapshotError as exc:
                return str(exc)
        return None

    def pinned(self) -> set[str]:
        keys = self.store.list(layout.pins_prefix(self.run_id))
        return {k.key.rsplit("/", 1)[-1] for k in keys if layout.valid_snapshot_id(k.key.rsplit("/", 1)[-1])}
