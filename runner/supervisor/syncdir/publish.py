"""Publishing DIR as one sync snapshot: upload what changed, copy what did not, the step, the manifest last.

Why every sync snapshot is whole and self-contained, and how its step is
chosen, are the package's design notes (syncdir/__init__.py).  A mixin of
`DirSync` (sync.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from runner.checkpoint import layout, retention
from runner.checkpoint.manifest import FileEntry, Manifest, Reason
from runner.storage import ObjectNotFoundError, StorageError
from runner.supervisor.syncdir.files import (
    MAX_STEP,
    Fingerprint,
    Read,
    encode_path,
    file_step,
    is_zip,
    key_list,
    keys_in,
    needs_keys,
)
from runner.supervisor.syncdir.state import SYNC_FORMAT, SYNC_MARKER, Scan, Stored, versions

log = logging.getLogger("runner.supervisor")


class Publishing:
    """The commit half of `DirSync`."""

    def _commit(self, scan: Scan, reason: Reason, always: bool = False, reads: dict[str, Read] | None = None,
                catch: tuple[float, Callable[[float], object]] | None = None) -> Manifest | None:
        """Upload the changed files, copy the rest from the previous snapshot, create the manifest, apply retention.

        `reads` are whole versions caught already; `catch` (until, wait) lets
        a torch file that changed while it was read be caught again.  Files
        whose step comes from inside them are read first (the snapshot id
        holds the step); the others are read, hashed and uploaded one at a
        time.  Returns None when nothing turned out to have changed.
        """
        started = time.monotonic()
        reads = dict(reads or {})
        for rel in scan.changed:
            if rel not in reads and self._wants_keys(rel):
                read = self._read_for_commit(rel, scan.found[rel], catch)
                if read is not None:
                    reads[rel] = read
        later = [rel for rel in scan.changed if rel not in reads and not self._wants_keys(rel)]
        keys = {rel: self._keys_of(rel, read.data) for rel, read in reads.items()}
        step = self._next_step(scan, reads, keys, later)
        sid = layout.new_snapshot_id(step)
        files, sent = self._upload(scan, sid, sorted(reads) + later, reads, keys, catch)
        uploaded = len(files)
        carried = {rel: item for rel, item in self._stored.items() if rel in scan.found and rel not in files}
        if not files and len(carried) == len(self._stored) and not always:
            return None
        if not files and not carried and self._stored:
            self._warn_once(("empty", None), "%s is empty now; not committing an empty snapshot over %d synced "
                            "file(s)", self.dir, len(self._stored))
            return None
        for rel, item in sorted(carried.items()):
            if self._carry(rel, item, sid):
                files[rel] = item
        if self.fence is not None:
            self.fence()
        manifest = Manifest(
            run_id=self.run_id, snapshot_id=sid, step=step, reason=reason,
            created_at=dt.datetime.now(dt.timezone.utc),
            parent=self._base.snapshot_id if self._base else None,
            versions=versions(), files=[files[rel].entry for rel in sorted(files)],
            extra={SYNC_MARKER: SYNC_FORMAT},
        ).sealed()  # fmt: skip
        self.store.create_bytes(layout.manifest_key(self.run_id, sid), manifest.to_bytes())
        self._base, self._stored, self._step = manifest, files, step
        self._last_sync = time.monotonic()
        self.commits += 1
        log.info("%s snapshot %s committed (step %d): %d file(s) uploaded (%.1f MB), %d carried over, in %.1f s",
                 "final sync" if reason is Reason.FINAL else "sync", sid, step, uploaded, sent / 1e6,
                 len(files) - uploaded, time.monotonic() - started)
        self._apply_retention(sid)
        return manifest

    def _upload(self, scan: Scan, sid: str, order: list[str], reads: dict[str, Read],
                keys: dict[str, tuple[tuple[str, int], ...]],
                catch: tuple[float, Callable[[float], object]] | None) -> tuple[dict[str, Stored], int]:
        """Upload into `sid` every file of `order` whose bytes changed, one at a time; (what was sent, bytes)."""
        files: dict[str, Stored] = {}
        sent = 0
        for rel in order:
            read = reads.pop(rel, None) or self._read_for_commit(rel, scan.found[rel], catch)
            if read is None:
                continue
            stored = self._stored.get(rel)
            if stored is not None and stored.entry.sha256 == read.sha256:
                self._stored[rel] = replace(stored, fingerprint=read.fingerprint)  # touched, same bytes
                continue
            entry = FileEntry(path=encode_path(rel), size=len(read.data), sha256=read.sha256)
            self.store.write_bytes(layout.data_key(self.run_id, sid, entry.path), read.data)
            files[rel] = Stored(entry, read.fingerprint, keys.get(rel, ()))
            sent += len(read.data)
        return files, sent

    def _read_for_commit(self, rel: str, fp: Fingerprint,
                         catch: tuple[float, Callable[[float], object]] | None) -> Read | None:
        read = self._read_whole(rel, fp)
        if read is None and catch is not None and self._is_checkpoint(rel):
            read = self._catch([rel], *catch).get(rel)  # rewritten since the scan: the next whole version
        return read

    def _wants_keys(self, rel: str) -> bool:
        """Whether the step may come from inside `rel` (a checkpoint without a step in its name or folder)."""
        return self._is_checkpoint(rel) and needs_keys(rel, self.step_rule)

    def _keys_of(self, rel: str, data: bytes) -> tuple[tuple[str, int], ...]:
        if not (is_zip(data) and self._wants_keys(rel)):
            return ()
        return tuple(sorted(keys_in(data, key_list(self.step_rule)).items()))

    def _carry(self, rel: str, item: Stored, sid: str) -> bool:
        """Copy an unchanged file from the previous snapshot into `sid`; False when it cannot be had."""
        assert self._base is not None
        try:
            self.store.copy(layout.data_key(self.run_id, self._base.snapshot_id, item.entry.path),
                        layout.data_key(self.run_id, sid, item.entry.path))
            return True
        except ObjectNotFoundError:
            pass
        # The previous snapshot lost it (deleted by hand, or by a gc): upload it again if DIR still has those bytes.
        path = self.dir / rel
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        if len(data) == item.entry.size and hashlib.sha256(data).hexdigest() == item.entry.sha256:
            self.store.write_bytes(layout.data_key(self.run_id, sid, item.entry.path), data)
            return True
        log.warning("%s is missing from snapshot %s and DIR no longer has that version; left out", rel,
                    self._base.snapshot_id)
        return False

    def _next_step(self, scan: Scan, reads: dict[str, Read], keys: dict[str, tuple[tuple[str, int], ...]],
                   later: list[str]) -> int:
        """The step of a snapshot of what `scan` found: that of its newest file with a step (files.py notes),
        the user's rule first; never less than the previous sync's; else the previous + 1 (a sync counter)."""
        candidates: list[tuple[int, int, int]] = []  # rank, mtime, step

        def consider(rel: str, mtime: int, found: tuple[tuple[str, int], ...]) -> None:
            ranked = file_step(rel, dict(found), self.step_rule, self._is_checkpoint(rel))
            if ranked is not None:
                candidates.append((ranked[0], mtime, ranked[1]))

        for rel, read in reads.items():
            consider(rel, read.fingerprint[1], keys.get(rel, ()))
        for rel in later:
            consider(rel, scan.found[rel][1], ())
        for rel, item in self._stored.items():
            if rel in scan.found and rel not in reads and rel not in later:
                consider(rel, item.fingerprint[1] if item.fingerprint else -1, item.keys)
        if self.step_rule is not None and not any(rank for rank, *_ in candidates):
            self._warn_once(("rule", None), "--sync-step-from found no step in %s; the step comes from file names, "
                            "keys (%s) or a sync counter", self.dir, ", ".join(key_list(None)))
        if not candidates:
            return min(MAX_STEP, self._step + 1)
        return max(self._step, max(candidates)[2])  # the user's rule, then the newest file, then the larger number

    def _apply_retention(self, sid: str) -> None:
        try:
            retention.apply(self.reader, retention.plan(self.reader, self.policy, protect={sid}))
        except StorageError as exc:
            log.warning("retention skipped: %s", exc)
