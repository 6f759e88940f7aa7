"""`DirSync`: DIR and the run's sync snapshots, restored before the child starts and synced while it runs.

Owns the sync's state and its lock, the background scanner thread, and the
order of one tick (scan, catch, commit when due); scanning is scan.py,
committing publish.py, the last syncs settle.py, fetching a snapshot's files
restore.py.  The design notes are the package's (syncdir/__init__.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from runner.checkpoint import retention
from runner.checkpoint.manifest import Manifest, Reason
from runner.checkpoint.reader import CorruptSnapshotError, RunReader
from runner.storage import StorageError, Store
from runner.supervisor.syncdir.files import Fingerprint, StepRule, parse_step_rule
from runner.supervisor.syncdir.publish import Publishing
from runner.supervisor.syncdir.restore import SyncDirError, fetch_into
from runner.supervisor.syncdir.scan import Scanning
from runner.supervisor.syncdir.settle import Settling
from runner.supervisor.syncdir.state import Seen, Stored, is_sync_snapshot

log = logging.getLogger("runner.supervisor")

_THREAD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


class DirSync(Scanning, Publishing, Settling):
    """DIR and the run's sync snapshots.  Thread-safe; one background scanner while the child runs.

    Raises (restore, tick, final_sync, after_exit): StorageError from the
    store; restore also SyncDirError when DIR cannot be written.
    """

    def __init__(self, store: Store, run_id: str, directory: str | os.PathLike, *, keep_last: int,
                 settle_s: float = 2.0, scan_s: float = 2.0, interval_s: float = 60.0,
                 step_from: str | StepRule | None = None, fence: Callable[[], None] | None = None):
        self.store = store
        self.run_id = run_id
        self.reader = RunReader(store, run_id)
        self.dir = Path(os.path.abspath(directory))
        self.policy = retention.KeepLastN(keep_last)
        self.settle_s = settle_s
        self.scan_s = scan_s
        self.interval_s = interval_s
        self.step_rule = parse_step_rule(step_from) if isinstance(step_from, str) else step_from
        self.fence = fence  # called right before a manifest is created (the lease's fencing check)
        self.commits = 0
        self._lock = threading.RLock()
        self._base: Manifest | None = None  # the newest sync snapshot: what DIR was last committed as
        self._stored: dict[str, Stored] = {}
        self._seen: dict[str, Seen] = {}
        self._suspect: dict[str, Fingerprint] = {}  # file states never to upload
        self._torn: dict[str, Fingerprint] = {}  # states whose read failed the zip check: not read again
        self._step = 0
        self._last_sync = time.monotonic()
        self._requested = False
        self._warned: set[tuple[str, object]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def base(self) -> Manifest | None:
        return self._base

    @property
    def step(self) -> int | None:
        """The training step of the newest sync snapshot (what DIR provably reached); None before the first."""
        return self._base.step if self._base is not None else None

    def restore(self) -> Manifest | None:
        """Bring DIR to the newest sync snapshot that reads back intact; None when there is none.

        Also moves provably half-written torch files (no zip end record) that
        the snapshot does not hold to DIR/.runner-partial/.
        """
        try:
            if self.dir.exists() and not self.dir.is_dir():
                raise SyncDirError(f"--sync-dir {self.dir} is not a folder")
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SyncDirError(f"cannot create --sync-dir {self.dir}: {exc.strerror or exc}") from None
        with self._lock:
            skipped_corrupt = 0
            for manifest in self.reader.valid_snapshots():
                if not is_sync_snapshot(manifest):
                    log.warning("skipping snapshot %s (%s): it was not made by --sync-dir, so it has no folder to "
                                "restore", manifest.snapshot_id, manifest.reason.value)
                    continue
                started = time.monotonic()
                try:
                    placed, fetched = fetch_into(self.dir, self.reader, manifest, self._keys_of, self._wants_keys)
                except CorruptSnapshotError as exc:
                    skipped_corrupt += 1
                    log.warning("sync snapshot %s is corrupt (%s); trying the previous one", manifest.snapshot_id, exc)
                    continue
                stored = {rel: Stored(entry, fp, keys) for rel, (entry, fp, keys) in placed.items()}
                self._adopt(manifest, stored)
                self._move_aside_partial_zips(keep=set(stored))
                log.info("restored %s from sync snapshot %s (step %d): %d file(s) downloaded (%.1f MB), %d already "
                         "present, in %.1f s", self.dir, manifest.snapshot_id, manifest.step, fetched[0],
                         fetched[1] / 1e6, len(stored) - fetched[0], time.monotonic() - started)
                return manifest
            if skipped_corrupt:
                log.warning("NO INTACT SYNC SNAPSHOT: %d corrupt one(s) skipped; %s starts from what is on disk",
                            skipped_corrupt, self.dir)
            self._move_aside_partial_zips(keep=set())
            return None

    def _adopt(self, manifest: Manifest, stored: dict[str, Stored]) -> None:
        self._base, self._stored, self._step = manifest, stored, manifest.step
        for rel, item in stored.items():
            if item.fingerprint is not None:
                self._seen[rel] = Seen(item.fingerprint, float("-inf"))

    def start(self) -> None:
        """Scan every `scan_s` and commit what is due, until `stop()`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="runner-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the scanner; a commit in flight finishes first."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def request(self) -> None:
        """Sync at the next scan whatever changed (a rebalance recommendation)."""
        self._requested = True

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _THREAD_SIGNALS)  # they belong to the main thread
        while not self._stop.wait(self.scan_s):
            try:
                self.tick()
            except StorageError as exc:
                log.warning("sync of %s failed (%s); trying again in %.0f s", self.dir, exc, self.scan_s)
            except Exception:  # a bug here must not end syncing for the rest of the run
                log.exception("sync of %s failed unexpectedly; trying again in %.0f s", self.dir, self.scan_s)

    def tick(self) -> Manifest | None:
        """One scan; commits a snapshot when a sync is due (module notes). Returns it, or None."""
        with self._lock:
            scan = self._scan()
            requested, self._requested = self._requested, False
            if scan is None:
                return None
            until = time.monotonic() + self.scan_s
            reads = self._catch([r for r in scan.in_flight if self._is_checkpoint(r)], until, self._stop.wait)
            if not (scan.changed or scan.removed or reads):
                if requested:
                    log.info("%s has no settled change to sync; the newest snapshot is current", self.dir)
                return None
            due = requested or bool(reads) or any(self._is_checkpoint(r) for r in scan.changed) \
                or time.monotonic() - self._last_sync >= self.interval_s  # fmt: skip
            return self._commit(scan, Reason.SYNC, reads=reads, catch=(until, self._stop.wait)) if due else None
