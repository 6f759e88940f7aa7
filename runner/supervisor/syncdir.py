"""Directory-sync mode (`runner start --sync-dir DIR`): a folder of checkpoints <-> the run's snapshots.

For training scripts that checkpoint on their own (GPT-SoVITS's trainer
writes `G_<step>.pth`/`D_<step>.pth` into its logs folder), SageMaker-style.
Owns: choosing the sync snapshot DIR is restored from before the child
starts (syncrestore.py puts its files in place); watching DIR while the child
runs and committing its whole state as snapshots (reason "sync"); the last
sync on a termination notice and when the child ends ("final" after a clean
exit); the step of a sync snapshot.  What one file holds (its stored name,
whether it is whole, its step) is syncfiles.py.  The supervisor (run.py)
decides when to call it.

Design notes (why):

- Every sync snapshot lists the WHOLE settled state of DIR and is
  self-contained: files that changed are uploaded into the new snapshot's
  prefix, files that did not are copied server-side (S3 CopyObject, a local
  copy) from the previous sync snapshot's prefix.  So the manifest format,
  RunReader, verify, fork and retention are unchanged and stay correct:
  deleting a snapshot never removes bytes another manifest needs.  Rejected:
  re-uploading unchanged files (slow inside a notice window, and a file that
  is being rewritten has no good local copy to upload), and manifests that
  point into older snapshots (every reader, retention and fork would have to
  follow references, and retention could delete data a kept manifest uses).
  The price is storage: keep_last K snapshots hold up to K copies of DIR.
  Copies are `Store.copy` (S3 CopyObject; copy + rename on a local folder).
- A polling scan (every `scan_s`, 2 s by default), not inotify: it works the
  same in containers, on bind mounts and on network filesystems (NFS, EFS,
  FUSE mounts of buckets), where inotify misses writes made by other hosts
  or is not available at all; it needs no dependency (`watchdog` falls back
  to polling in exactly those cases anyway); a 2 s scan of a logs folder of
  a few hundred files costs well under a millisecond of CPU per second.
- When a file counts as written ("settled"): its (size, mtime, inode) have
  not changed for `settle_s`.  A torch checkpoint (`torch.save`'s zip format:
  it starts with `PK\\x03\\x04`) counts only as a whole version (syncfiles:
  end record in place, the same stat before and after the read, every
  CRC-32 right), and then at once, without waiting out `settle_s`.  So a
  half-written or torn `.pth` is never uploaded, even when its writer
  pauses longer than the settle period.  The snapshot keeps the previous
  version of a file that is still in flight.
- A torch file rewritten in place (nanoGPT's `ckpt.pt`, saved every few
  iterations) may never stay unchanged from one scan to the next, so a scan
  that finds one being written, or that reads it as it changes, "catches"
  it: looks every 10 ms, until the next scan is due, for the moment between
  two saves, and publishes the first whole version it reads.  So the newest
  whole version is published at every scan that finds a new one, however
  often it is rewritten, as long as it stays whole for longer than one read
  of it takes (a file rewritten with no pause at all has no whole moment).
- When a sync is committed: as soon as a settled change touches a checkpoint
  file (`.pth`, `.pt`, `.ckpt`, `.safetensors`); changes to other files
  (train.log, TensorBoard events) ride along, or are committed on their own
  at most every `interval_s`, so that a log written every few seconds does
  not copy every checkpoint every few seconds.  A rebalance recommendation,
  a termination notice and the child's end sync at once.  A termination
  waits for checkpoint files in flight until the stop plan's ack time, for
  other files one settle period at most; a file that never stays unchanged
  for `settle_s` (a chatty log) is synced only when it pauses.
- The step of a sync snapshot: that of the newest (by mtime) file it holds
  that has one (syncfiles: `--sync-step-from`, then a number in a
  checkpoint's name or `checkpoint-N` folder, then an `iter_num` /
  `global_step` / `step` key inside it), never less than the previous
  sync's step, so that the newest state always sorts newest.  A snapshot
  with no such file gets the previous step + 1 (a sync counter, the last
  resort).  Files whose step is inside them are read before the others
  (the snapshot id holds the step), so they are held in memory together.
- File names (syncfiles): safe segments as they are, others as `_b32.` +
  base32.  Symlinks, sockets and our own `.runner-*` temporaries are not
  synced.
- Restore (syncrestore) never leaves a mix of two snapshots in DIR; a
  corrupt snapshot is skipped for the previous one.
- When the child dies, whatever it was still writing is suspect: that exact
  file state is never uploaded (a later, different state of the file is).
  A suspect checkpoint is also taken out of the restarted child's way: put
  back to its synced version, or moved to DIR/.runner-partial/ (a trainer
  that loads its newest `G_*.pth` would otherwise crash on it forever).

Whole files are read into memory to be hashed and uploaded (the store has
whole-object writes only), one file at a time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import platform
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from runner.checkpoint import layout, retention
from runner.checkpoint.manifest import FileEntry, Manifest, Reason
from runner.checkpoint.reader import CorruptSnapshotError, RunReader
from runner.storage import ObjectNotFoundError, StorageError, Store
from runner.supervisor.syncrestore import SyncDirError, fetch_into, stage  # noqa: F401  (SyncDirError: API)
from runner.supervisor.syncfiles import (  # noqa: F401  (names, step_from_name, zip_complete: this module's API)
    ENCODED_PREFIX,
    MAX_STEP,
    PRIVATE_PREFIX,
    Fingerprint,
    Read,
    StepRule,
    decode_path,
    encode_path,
    file_step,
    fingerprint,
    is_zip,
    key_list,
    keys_in,
    needs_keys,
    parse_step_rule,
    read_consistent,
    step_from_name,
    tail_state,
    zip_complete,
    zip_whole,
)

log = logging.getLogger("runner.supervisor")

SYNC_MARKER = "sync_dir"  # manifest.extra[SYNC_MARKER] = the name encoding's version
SYNC_FORMAT = 1
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
_FINAL_POLL_S = 0.25
_CATCH_POLL_S = 0.01  # how often a torch file being rewritten is looked at for a whole version
_CATCH_READS = 5  # whole reads of one file per catch: one too big to read between two saves costs no more
_THREAD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


# -- names, steps, completeness (pure) ---------------------------------------------------


def is_checkpoint(rel: str) -> bool:
    return rel.lower().endswith(CHECKPOINT_SUFFIXES)


def is_sync_snapshot(manifest: Manifest) -> bool:
    return manifest.extra.get(SYNC_MARKER) == SYNC_FORMAT


@dataclass(frozen=True)
class _Stored:
    """A file as the newest sync snapshot holds it, and the local state it was read from."""

    entry: FileEntry
    fingerprint: Fingerprint
    keys: tuple[tuple[str, int], ...] = ()  # integer step keys found inside it (syncfiles.keys_in)


@dataclass
class _Seen:
    """A file as the scans saw it: since when unchanged, and what its zip tail says."""

    fingerprint: Fingerprint
    since: float  # monotonic time of the first scan that saw this fingerprint
    zip_state: str | None = None  # "complete", "partial" or "other" (not a zip); None until looked at


@dataclass(frozen=True)
class _Scan:
    """One pass over DIR."""

    found: dict[str, Fingerprint]
    changed: list[str]  # settled and different from the stored version
    in_flight: list[str]  # changed but still being written
    removed: list[str]  # stored but gone from DIR


class DirSync:
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
        self._stored: dict[str, _Stored] = {}
        self._seen: dict[str, _Seen] = {}
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

    # -- restore ----------------------------------------------------------------------------

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
                stored = {rel: _Stored(entry, fp, keys) for rel, (entry, fp, keys) in placed.items()}
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

    def _move_aside_partial_zips(self, keep: set[str]) -> None:
        """A torch file without its zip end record, left by a writer killed before we started: out of the way."""
        scan = self._scan()
        for rel in scan.in_flight if scan else ():
            if rel not in keep and self._seen[rel].zip_state == "partial":
                self._suspect[rel] = scan.found[rel]  # type: ignore[union-attr]
        self._put_back_partial_checkpoints()

    def _adopt(self, manifest: Manifest, stored: dict[str, _Stored]) -> None:
        self._base, self._stored, self._step = manifest, stored, manifest.step
        for rel, item in stored.items():
            if item.fingerprint is not None:
                self._seen[rel] = _Seen(item.fingerprint, float("-inf"))

    # -- the background scanner -----------------------------------------------------------

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

    # -- syncing ----------------------------------------------------------------------------

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

    def _catch(self, rels: list[str], until: float, wait: Callable[[float], object]) -> dict[str, Read]:
        """Whole versions of torch files being (re)written: looked at every 10 ms until `until`.

        A file rewritten in place every fraction of a second never stays
        unchanged, but it is whole between two saves: the first consistent,
        whole read of each is what gets published.  At most `_CATCH_READS`
        whole reads per file (each starts only once its end record is in
        place).  Stops early when `wait` returns True (the scanner is being
        stopped).
        """
        got: dict[str, Read] = {}
        pending = list(rels)
        tries = dict.fromkeys(rels, _CATCH_READS)
        while pending:
            for rel in list(pending):
                if tail_state(self.dir / rel) != "complete":
                    continue
                read = self._read_whole(rel, None, zips_only=True)
                tries[rel] -= 1
                if read is not None:
                    got[rel] = read
                if read is not None or not tries[rel]:
                    pending.remove(rel)
            if not pending or time.monotonic() + _CATCH_POLL_S >= until or wait(_CATCH_POLL_S):
                break
        return got

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
            scan = self._scan()
            waiting = set(scan.in_flight) if scan else set()
            others_until = time.monotonic() + self.settle_s + _FINAL_POLL_S
            reads: dict[str, Read] = {}
            died = False
            if waiting:
                log.info("waiting for %s to be written", _names(waiting))
            while scan is not None and waiting:
                now = time.monotonic()
                if now >= others_until:
                    waiting = {rel for rel in waiting if self._is_checkpoint(rel)}
                    if not waiting:
                        break
                left = until() - now
                if left <= 0:
                    log.warning("still being written at the deadline, so the snapshot keeps their previous "
                                "version (or leaves them out): %s", _names(waiting))
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

    def _is_checkpoint(self, rel: str) -> bool:
        """A checkpoint by its name, or a torch zip by its content (what a termination waits for)."""
        seen = self._seen.get(rel)
        return is_checkpoint(rel) or (seen is not None and seen.zip_state in ("complete", "partial"))

    def _suspect_in_flight(self, scan: _Scan | None) -> None:
        for rel in scan.in_flight if scan else ():
            self._suspect[rel] = scan.found[rel]  # type: ignore[union-attr]
            level = logging.WARNING if self._is_checkpoint(rel) else logging.INFO
            log.log(level, "%s was being written when the child died; that state of it is not synced", rel)

    def _scan(self, everything_settled: bool = False) -> _Scan | None:
        if not self.dir.is_dir():
            self._warn_once(("gone", None), "--sync-dir %s is gone; nothing is synced until it is back", self.dir)
            return None
        now = time.monotonic()
        found: dict[str, Fingerprint] = {}
        for folder, dirs, files in os.walk(self.dir):
            dirs[:] = [d for d in dirs if not d.startswith(PRIVATE_PREFIX)]
            for name in files:
                if name.startswith(PRIVATE_PREFIX):
                    continue
                path = os.path.join(folder, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found[os.path.relpath(path, self.dir).replace(os.sep, "/")] = fingerprint(st)
        for rel in list(self._seen):
            if rel not in found:
                del self._seen[rel]
        changed, in_flight = [], []
        for rel, fp in sorted(found.items()):
            seen = self._seen.get(rel)
            if seen is None or seen.fingerprint != fp:
                seen = self._seen[rel] = _Seen(fp, now)
            stored = self._stored.get(rel)
            if stored is not None and stored.fingerprint == fp:
                continue
            suspect = self._suspect.get(rel)
            if suspect == fp:
                continue  # carried in its previous version, if any
            if suspect is not None:
                del self._suspect[rel]  # written again since
            if self._settled(rel, seen, now, everything_settled):
                changed.append(rel)
            else:
                in_flight.append(rel)
        removed = [rel for rel in self._stored if rel not in found]
        return _Scan(found, changed, in_flight, removed)

    def _settled(self, rel: str, seen: _Seen, now: float, everything_settled: bool) -> bool:
        if seen.zip_state is None:
            seen.zip_state = tail_state(self.dir / rel)
        if seen.zip_state == "complete":
            return True
        if seen.zip_state == "partial":
            return False
        return everything_settled or now - seen.since >= self.settle_s

    # -- one commit -------------------------------------------------------------------------------

    def _commit(self, scan: _Scan, reason: Reason, always: bool = False, reads: dict[str, Read] | None = None,
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
        files: dict[str, _Stored] = {}
        sent = 0
        for rel in sorted(reads) + later:
            read = reads.pop(rel, None) or self._read_for_commit(rel, scan.found[rel], catch)
            if read is None:
                continue
            stored = self._stored.get(rel)
            if stored is not None and stored.entry.sha256 == read.sha256:
                self._stored[rel] = replace(stored, fingerprint=read.fingerprint)  # touched, same bytes
                continue
            entry = FileEntry(path=encode_path(rel), size=len(read.data), sha256=read.sha256)
            self.store.write_bytes(layout.data_key(self.run_id, sid, entry.path), read.data)
            files[rel] = _Stored(entry, read.fingerprint, keys.get(rel, ()))
            sent += len(read.data)
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
            versions=_versions(), files=[files[rel].entry for rel in sorted(files)],
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

    def _read_for_commit(self, rel: str, fp: Fingerprint,
                         catch: tuple[float, Callable[[float], object]] | None) -> Read | None:
        read = self._read_whole(rel, fp)
        if read is None and catch is not None and self._is_checkpoint(rel):
            read = self._catch([rel], *catch).get(rel)  # rewritten since the scan: the next whole version
        return read

    def _read_whole(self, rel: str, expected: Fingerprint | None, zips_only: bool = False) -> Read | None:
        """A consistent read of a whole version of `rel` (syncfiles notes); None to look again later.

        `expected`: the state the scan saw as settled; a read of it that is
        not whole marks that state never to be uploaded.  Without it (a torch
        file caught while rewritten) only whole zips count, and a state that
        failed its CRC check is not read again.
        """
        path = self.dir / rel
        if expected is None:
            if tail_state(path) != "complete":
                return None
            try:
                expected = fingerprint(os.lstat(path))
            except OSError:
                return None
            if self._torn.get(rel) == expected:
                return None
        got = read_consistent(path, expected)
        if got is None:
            return None  # changed or gone: the next look tells
        data, fp = got
        if zips_only and not is_zip(data):
            return None
        if not zip_complete(data):
            if not zips_only:
                self._warn_once((rel, fp), "%s looks like an unfinished torch checkpoint (no zip end record); "
                                "not synced until it is complete", rel)
                self._suspect[rel] = fp
            return None
        if not zip_whole(data):
            self._warn_once((rel, fp), "%s is not one whole torch file (a CRC-32 or its zip directory does not "
                            "match: rewritten while it was read, or damaged); that version is not synced", rel)
            self._torn[rel] = fp
            return None
        return Read(data, hashlib.sha256(data).hexdigest(), fp)

    def _wants_keys(self, rel: str) -> bool:
        """Whether the step may come from inside `rel` (a checkpoint without a step in its name or folder)."""
        return self._is_checkpoint(rel) and needs_keys(rel, self.step_rule)

    def _keys_of(self, rel: str, data: bytes) -> tuple[tuple[str, int], ...]:
        if not (is_zip(data) and self._wants_keys(rel)):
            return ()
        return tuple(sorted(keys_in(data, key_list(self.step_rule)).items()))

    def _carry(self, rel: str, item: _Stored, sid: str) -> bool:
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

    def _next_step(self, scan: _Scan, reads: dict[str, Read], keys: dict[str, tuple[tuple[str, int], ...]],
                   later: list[str]) -> int:
        """The step of a snapshot of what `scan` found: that of its newest file with a step (syncfiles notes),
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

    def _warn_once(self, key: tuple[str, object], message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)


def _names(rels: set[str] | list[str]) -> str:
    names = sorted(rels)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _versions() -> dict[str, str]:
    from runner import __version__

    return {"runner": __version__, "python": platform.python_version()}
