"""Scanning DIR: which files changed and have settled, which are still being written, and whole reads of them.

A polling scan, and when a file counts as written (settled), are the
package's design notes (syncdir/__init__.py); what one file's bytes say
(zip tail, CRC-32s, a consistent read) is files.py.  A mixin of `DirSync`
(sync.py): it reads and updates the sync's records of files seen, stored,
suspect and torn under its lock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable

from runner.supervisor.syncdir.files import (
    PRIVATE_PREFIX,
    Fingerprint,
    Read,
    fingerprint,
    is_zip,
    read_consistent,
    tail_state,
    zip_complete,
    zip_whole,
)
from runner.supervisor.syncdir.state import Scan, Seen, is_checkpoint

log = logging.getLogger("runner.supervisor")

_CATCH_POLL_S = 0.01  # how often a torch file being rewritten is looked at for a whole version
_CATCH_READS = 5  # whole reads of one file per catch: one too big to read between two saves costs no more


class Scanning:
    """The scan half of `DirSync`."""

    def _scan(self, everything_settled: bool = False) -> Scan | None:
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
                seen = self._seen[rel] = Seen(fp, now)
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
        return Scan(found, changed, in_flight, removed)

    def _settled(self, rel: str, seen: Seen, now: float, everything_settled: bool) -> bool:
        if seen.zip_state is None:
            seen.zip_state = tail_state(self.dir / rel)
        if seen.zip_state == "complete":
            return True
        if seen.zip_state == "partial":
            return False
        return everything_settled or now - seen.since >= self.settle_s

    def _is_checkpoint(self, rel: str) -> bool:
        """A checkpoint by its name, or a torch zip by its content (what a termination waits for)."""
        seen = self._seen.get(rel)
        return is_checkpoint(rel) or (seen is not None and seen.zip_state in ("complete", "partial"))

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

    def _read_whole(self, rel: str, expected: Fingerprint | None, zips_only: bool = False) -> Read | None:
        """A consistent read of a whole version of `rel` (files.py notes); None to look again later.

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

    def _warn_once(self, key: tuple[str, object], message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)
