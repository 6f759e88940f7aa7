"""When the child stops: let the files in flight settle (a termination), or take what it left (its end).

On a termination, checkpoint files still being written are waited for until
the stop plan's ack time, other files one settle period at most; when the
child dies, what it was writing is suspect and never uploaded in that
state, and a half-written checkpoint is put back or moved aside.  A mixin
of `DirSync` (sync.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace

from runner.checkpoint.manifest import Manifest, Reason
from runner.checkpoint.reader import CorruptSnapshotError
from runner.storage import StorageError
from runner.supervisor.syncdir.files import PRIVATE_PREFIX, Read, fingerprint
from runner.supervisor.syncdir.restore import stage
from runner.supervisor.syncdir.state import Scan, names

log = logging.getLogger("runner.supervisor")

_FINAL_POLL_S = 0.25


class Settling:
    """The stopping half of `DirSync`."""

    def final_sync(self, until: Callable[[], float], wait: Callable[[float], None],
                   alive: Callable[[], bool]) -> Manifest | None:
        """On a termination notice: let the files in flight settle, then commit.

        Checkpoint files in flight are waited for until `until()` (monotonic);
        other files for one settle period at most (a log appended every
        second would otherwise hold the snapshot until the deadline): those
        still changing then keep their previous version.

        `wait(seconds)` passes time (the supervisor keeps handling events in
        it); `alive()` says whether the child still runs.  Returns the
        snapshot that now holds DIR's state (a new one, or the previous one
        when nothing changed); None when there is none.
        """
        self.stop()

        def pause(seconds: float) -> bool:
            wait(seconds)
            return False

        with self._lock:
            scan, reads, died = self._settle(until, wait, alive, pause)
            if scan is None:
                return None
            catch = (until(), pause) if not died else None
            committed = self._commit(scan, Reason.SYNC, reads=reads, catch=catch) \
                if scan.changed or scan.removed or reads else None  # fmt: skip
            if died:
                self._put_back_partial_checkpoints()
            if committed is None and self._base is not None:
                log.info("%s is unchanged since sync snapshot %s (step %d)", self.dir, self._base.snapshot_id,
                         self._base.step)
            return committed or self._base

    def _settle(self, until: Callable[[], float], wait: Callable[[float], None], alive: Callable[[], bool],
                pause: Callable[[float], bool]) -> tuple[Scan | None, dict[str, Read], bool]:
        """Wait for the files in flight (final_sync's rules): (the last scan, whole versions caught, the child died)."""
        scan = self._scan()
        waiting = set(scan.in_flight) if scan else set()
        others_until = time.monotonic() + self.settle_s + _FINAL_POLL_S
        reads: dict[str, Read] = {}
        died = False
        if waiting:
            log.info("waiting for %s to be written", names(waiting))
        while scan is not None and waiting:
            now = time.monotonic()
            if now >= others_until:
                waiting = {rel for rel in waiting if self._is_checkpoint(rel)}
                if not waiting:
                    break
            left = until() - now
            if left <= 0:
                log.warning("still being written at the deadline, so the snapshot keeps their previous "
                            "version (or leaves them out): %s", names(waiting))
                break
            if not alive():
                scan, died = self._scan(), True
                self._suspect_in_flight(scan)
                break
            # A torch file rewritten in place may never settle while the child trains on: catch a whole version.
            slice_end = now + min(_FINAL_POLL_S, left)
            reads.update(self._catch(sorted(r for r in waiting if self._is_checkpoint(r)), slice_end, pause))
            if time.monotonic() < slice_end:
                wait(slice_end - time.monotonic())
            scan = self._scan()
            waiting = (waiting & set(scan.in_flight) if scan else set()) - set(reads)
        return scan, reads, died

    def after_exit(self, clean: bool) -> Manifest | None:
        """The child ended: commit what it left.  A clean exit commits a final snapshot (the run is done).

        What the child was still writing when it died is suspect and never
        uploaded in that state; a half-written checkpoint is put back to its
        synced version, or moved to DIR/.runner-partial/, so that a restarted
        child does not load it.  Returns the new snapshot, or None.
        """
        self.stop()
        with self._lock:
            scan = self._scan(everything_settled=clean)
            if scan is None:
                return None
            self._suspect_in_flight(scan)
            if clean:
                return self._commit(scan, Reason.FINAL, always=True)
            committed = self._commit(scan, Reason.SYNC) if scan.changed or scan.removed else None
            self._put_back_partial_checkpoints()
            return committed

    def _suspect_in_flight(self, scan: Scan | None) -> None:
        for rel in scan.in_flight if scan else ():
            self._suspect[rel] = scan.found[rel]  # type: ignore[union-attr]
            level = logging.WARNING if self._is_checkpoint(rel) else logging.INFO
            log.log(level, "%s was being written when the child died; that state of it is not synced", rel)

    def _put_back_partial_checkpoints(self) -> None:
        for rel, fp in list(self._suspect.items()):
            if not self._is_checkpoint(rel):
                continue
            path = self.dir / rel
            try:
                if fingerprint(os.lstat(path)) != fp:
                    continue
                stored = self._stored.get(rel)
                if stored is not None and self._base is not None:
                    try:
                        data = self.reader.read_file(self._base, stored.entry)
                    except (CorruptSnapshotError, StorageError) as exc:
                        log.warning("cannot put back %s from snapshot %s: %s", rel, self._base.snapshot_id, exc)
                    else:
                        os.replace(stage(path, data), path)
                        self._stored[rel] = replace(stored, fingerprint=fingerprint(os.stat(path)))
                        del self._suspect[rel]
                        log.warning("%s was half-written when the child died; put back its version from snapshot %s",
                                    rel, self._base.snapshot_id)
                        continue
                aside = self.dir / f"{PRIVATE_PREFIX}partial" / rel
                aside.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, aside)
                del self._suspect[rel]
                log.warning("%s is half-written (its writer died); moved to %s so that the child does not load it",
                            rel, aside)
            except OSError as exc:
                log.warning("cannot move the half-written %s out of the way: %s", rel, exc)

    def _move_aside_partial_zips(self, keep: set[str]) -> None:
        """A torch file without its zip end record, left by a writer killed before we started: out of the way."""
        scan = self._scan()
        for rel in scan.in_flight if scan else ():
            if rel not in keep and self._seen[rel].zip_state == "partial":
                self._suspect[rel] = scan.found[rel]  # type: ignore[union-attr]
        self._put_back_partial_checkpoints()
