"""Reading a run's snapshots: listing, validating, finding the newest valid one.

No mutable "latest" pointer is trusted.  The newest valid snapshot is found
by listing manifests newest first and checking each: it parses, its own hash
matches, its version is supported, it names itself, and every file it lists
exists with the listed size.  Data is checked against its SHA-256 as it is
read, before anything is deserialized.  Whatever fails is skipped with a
warning that says why, and the next older snapshot is tried.

Manifests are immutable, so a reader keeps the ones it has parsed (by
snapshot id, with the size and time a listing gave them) and does not fetch
them again while listings show them unchanged; the listing stays the
authority on what exists, and every file check is made afresh.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from runner.checkpoint import layout
from runner.checkpoint.manifest import FileEntry, Manifest, ManifestError
from runner.storage import ObjectInfo, ObjectNotFoundError, Store
from runner.errors import CorruptSnapshotError  # defined there, re-exported here

log = logging.getLogger("runner.checkpoint")

# Files of a snapshot fetched ahead of the one being deserialized, on restore.
_READ_AHEAD = 4


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
        self._parsed: dict[str, tuple[ObjectInfo, Manifest]] = {}  # snapshot id -> (as listed, parsed)
        self._lock = threading.Lock()  # the writer thread (retention) and the training thread share a reader

    def snapshot_ids(self) -> list[str]:
        """Ids of every manifest of the run, newest first."""
        return sorted(self._listed_manifests(), reverse=True)

    def _listed_manifests(self) -> dict[str, ObjectInfo]:
        """Snapshot id -> its manifest object, as listed now; forgets parsed manifests no longer listed."""
        listed: dict[str, ObjectInfo] = {}
        for o in self.store.list(layout.manifests_prefix(self.run_id)):
            sid = layout.snapshot_id_from_manifest_key(o.key)
            if sid:
                listed[sid] = o
        with self._lock:
            self._parsed = {sid: v for sid, v in self._parsed.items() if sid in listed}
        return listed

    def load_manifest(self, snapshot_id: str, listed: ObjectInfo | None = None) -> Manifest:
        """Raises ManifestError (untrustworthy) or ObjectNotFoundError.

        `listed`: the manifest's entry in a listing just made; a manifest
        already parsed when listed with the same size and time is not fetched again.
        """
        with self._lock:
            cached = self._parsed.get(snapshot_id)
        if cached is not None and listed is not None and cached[0] == listed:
            return cached[1]
        data = self.store.read_bytes(layout.manifest_key(self.run_id, snapshot_id))
        manifest = Manifest.from_bytes(data)
        if manifest.snapshot_id != snapshot_id or manifest.run_id != self.run_id:
            raise ManifestError(
                f"it names {manifest.run_id}/{manifest.snapshot_id}, not {self.run_id}/{snapshot_id}"
            )
        if listed is not None:
            with self._lock:
                self._parsed[snapshot_id] = (listed, manifest)
        return manifest

    def _sizes(self) -> dict[str, int]:
        return {o.key: o.size for o in self.data_objects()}

    def data_objects(self) -> list[ObjectInfo]:
        return self.store.list(layout.data_prefix(self.run_id))

    def status(self, snapshot_id: str, sizes: dict[str, int] | None = None,
               listed: ObjectInfo | None = None) -> SnapshotStatus:
        """Shallow check: the manifest and the presence and size of every file.

        `sizes` (data key -> size) and `listed` (the manifest's entry) come from
        listings the caller just made; without them the store is asked.
        """
        try:
            manifest = self.load_manifest(snapshot_id, listed)
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
        listed = self._listed_manifests()
        data = self.data_objects() if listed else []
        yield from self._statuses(listed, data)

    def scan(self) -> tuple[list[SnapshotStatus], list[ObjectInfo]]:
        """`list(statuses())` and the data listing they were checked against (retention reuses it)."""
        listed = self._listed_manifests()
        data = self.data_objects()  # after the manifests: a listed manifest's data was written before it
        return list(self._statuses(listed, data)), data

    def _statuses(self, listed: dict[str, ObjectInfo], data: list[ObjectInfo]) -> Iterator[SnapshotStatus]:
        sizes = {o.key: o.size for o in data}
        for sid in sorted(listed, reverse=True):
            yield self.status(sid, sizes, listed[sid])

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

    def read_files(self, manifest: Manifest, entries: list[FileEntry]) -> Iterator[tuple[FileEntry, bytes]]:
        """`read_file` of each entry, in order, fetched `_READ_AHEAD` at a time.

        A restore asks for a snapshot's files one after another, each a round
        trip (and, on a throttled store, a retry) of its own; fetching ahead
        overlaps them, while no more than `_READ_AHEAD` files wait in memory
        beside the one being deserialized.
        """
        if len(entries) <= 1:
            yield from ((entry, self.read_file(manifest, entry)) for entry in entries)
            return
        with ThreadPoolExecutor(max_workers=_READ_AHEAD, thread_name_prefix="runner-read") as pool:
            pending = deque()
            try:
                for entry in entries:
                    pending.append((entry, pool.submit(self.read_file, manifest, entry)))
                    if len(pending) > _READ_AHEAD:
                        done, future = pending.popleft()
                        yield done, future.result()
                while pending:
                    done, future = pending.popleft()
                    yield done, future.result()
            finally:
                for _, future in pending:
                    future.cancel()

    def verify(self, manifest: Manifest) -> str | None:
        """Deep check (reads every byte). Returns the problem, or None when intact."""
        try:
            for _ in self.read_files(manifest, list(manifest.files)):
                pass
        except CorruptSnapshotError as exc:
            return str(exc)
        return None

    def pinned(self) -> set[str]:
        keys = self.store.list(layout.pins_prefix(self.run_id), remember=False)  # usually empty
        return {k.key.rsplit("/", 1)[-1] for k in keys if layout.valid_snapshot_id(k.key.rsplit("/", 1)[-1])}


def newest_preferring_final(reader: RunReader) -> Manifest | None:
    """The snapshot a run resumes from: the newest valid one, a final one winning a tie at the same step.

    The tie is real: a script's last `ckpt.step(n)` may save periodically
    and its `ckpt.save(n, final=True)` follows within the same second, and
    snapshot ids order such twins by their random suffix.  Raises StorageError.
    """
    found: Manifest | None = None
    for manifest in reader.valid_snapshots():
        if found is not None and manifest.step != found.step:
            break
        if found is None or manifest.final:
            found = manifest
        if manifest.final:
            break
    return found
