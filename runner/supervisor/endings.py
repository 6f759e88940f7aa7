"""How a run ends, said once: the newest snapshot that counts, and the status (with its log line) for each ending.

Owns the supervisor's reading of the store (the newest valid snapshot, a
final one winning a tie) and the endings that need no process handling:
finished, stopped for a peer node, storage failed.  `newest` is
checkpoint.reader.newest_preferring_final.  The termination path is
in stopping.py; the status enum and exit codes in status.py.
"""

from __future__ import annotations

import logging

from runner.checkpoint.manifest import Manifest
from runner.checkpoint.reader import RunReader, newest_preferring_final
from runner.storage import StorageError, UnsupportedURLError
from runner.supervisor.child import ChildExit
from runner.supervisor.status import RunStatus

log = logging.getLogger("runner.supervisor")


def describe(manifest: Manifest | None) -> str:
    if manifest is None:
        return "the start (no snapshot)"
    return f"snapshot {manifest.snapshot_id} (step {manifest.step}, {manifest.reason.value})"


def step_of(manifest: Manifest | None) -> int:
    return manifest.step if manifest is not None else 0


newest = newest_preferring_final  # the snapshot the next start resumes from (raises StorageError)


def newest_or_none(reader: RunReader) -> Manifest | None:
    """`newest`, or None (logged) when the store cannot be listed: for messages on the way out."""
    try:
        return newest_preferring_final(reader)
    except StorageError as exc:
        log.warning("cannot list the snapshots: %s", exc)
        return None


def finished(run_id: str, outcome: ChildExit, found: Manifest | None) -> RunStatus:
    """The child ended with a final snapshot, or exited 0 without one (finished too, with a warning)."""
    if found is not None and found.final:
        if outcome.returncode != 0:
            log.warning("child %s after committing its final snapshot; the run is finished", outcome.describe())
        log.info("run %s finished: final snapshot %s at step %d", run_id, found.snapshot_id, found.step)
    else:
        log.warning("the child exited 0 without a final snapshot (newest: %s); treating the run as finished. "
                    "Call ckpt.save(step, final=True) at the end of training", describe(found))
    return RunStatus.FINISHED


def peer_stopped(peer_stop: dict, outcome: ChildExit, found: Manifest | None) -> RunStatus:
    """The job stopped for another node's notice: say which snapshot holds it; the caller exits 76."""
    said = str(peer_stop.get("snapshot_id"))
    if found is not None and found.snapshot_id == said:
        log.info("another node was preempted: the job committed snapshot %s at step %d and stopped (child %s); "
                 "start again here to rejoin the group", said, found.step, outcome.describe())
    else:
        log.warning("another node was preempted and the job stopped (child %s), but snapshot %s is not the "
                    "newest valid one; the next start resumes from %s", outcome.describe(), said, describe(found))
    return RunStatus.PEER_STOPPED


def storage_failed(exc: StorageError, at_start: bool) -> RunStatus:
    """A bad URL at start is a configuration error (2); any other storage failure ends the run (1)."""
    log.error("%s", exc)
    if at_start and isinstance(exc, UnsupportedURLError):
        return RunStatus.CONFIG_ERROR
    return RunStatus.STORAGE_FAILED
