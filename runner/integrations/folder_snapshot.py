"""A framework's checkpoint folder <-> one runner snapshot (the same format as the Checkpointer's).

Owns publishing a local folder that a framework wrote (Hugging Face's
`checkpoint-N/`) as a snapshot, and putting a snapshot's files back as such a
folder.  The key layout, the manifest, the fault points and the store are
runner's own (checkpoint/layout, manifest, writer, reader; runner.storage).

Design notes (why):

- Files are published as they are, not re-serialized: the framework loads
  its own files on resume, so the snapshot holds exactly what it wrote.  Each
  file is hashed by streaming it and uploaded with `Store.write_file`
  (`put_file`: multipart, aborted on failure; a local store copies, fsyncs
  and renames), never read whole into memory.
- Publishing runs off the training thread, so the folder could change under
  it (a framework that re-saves the same step in place).  Every file's (size,
  mtime, inode) is taken before it is hashed and checked again after the
  upload; a folder that changed meanwhile is not committed (`FolderChangedError`).
- The manifest is created exclusively, after every data file and after the
  lease fence; a kill anywhere before it leaves invisible data only.
- Restoring never writes into place before every byte is checked: each file
  is read through `RunReader.read_file` (size and SHA-256 against the
  manifest), written to a staging folder beside the destination, and the
  staging folder is renamed into place only when all are good.  Nothing here
  unpickles anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.checkpoint import layout
from runner.checkpoint.manifest import FileEntry, Manifest, Reason
from runner.checkpoint.reader import CorruptSnapshotError, RunReader
from runner.checkpoint.writer import (CommitResult, PendingSnapshot, create_manifest, fault, manifest_for,
                                     next_save_number)
from runner.storage import Store

log = logging.getLogger("runner.integrations")

STAGING_PREFIX = ".runner-restore-"
SET_ASIDE = ".runner-set-aside"
_HASH_CHUNK = 8 << 20
_PUBLISH_THREADS = 4


class FolderChangedError(RuntimeError):
    """A file of the folder changed while it was being published: the snapshot was not committed."""


class UnstorableNameError(ValueError):
    """A file name that a manifest cannot hold (see manifest._SAFE_PATH)."""


Fingerprint = tuple[int, int, int]  # size, mtime_ns, inode


@dataclass(frozen=True)
class FolderSave:
    """A folder to publish, with what the manifest says about it."""

    folder: Path
    step: int
    reason: Reason
    parent: str | None = None
    epoch: int = 0
    metrics: dict[str, float] | None = None
    extra: dict[str, Any] | None = None
    stall_seconds: float = 0.0  # the training thread's share, reported in the commit record


def _fingerprint(path: Path) -> Fingerprint:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def list_files(folder: Path) -> dict[str, Fingerprint]:
    """Relative path -> fingerprint of every regular file under `folder`, sorted; links are refused."""
    files: dict[str, Fingerprint] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise UnstorableNameError(f"{folder}/{rel} is a symbolic link; a snapshot holds regular files only")
        if path.is_file():
            try:
                FileEntry(path=rel, size=0, sha256="0" * 64)
            except ValueError:
                raise UnstorableNameError(f"file name {rel!r} in {folder} cannot be stored in a snapshot "
                                          "(use letters, digits, '.', '_' and '-')") from None
            files[rel] = _fingerprint(path)
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def publish_folder(store: Store, run_id: str, save: FolderSave,
                   fence: Callable[[], None] | None = None) -> CommitResult:
    """Publish every file of `save.folder` as one snapshot at `save.step`, then commit it.

    Raises StorageError, FolderChangedError, UnstorableNameError, or what `fence` raises.
    """
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    files = list_files(save.folder)
    if not files:
        raise FileNotFoundError(f"{save.folder} holds no files to publish")
    sid = layout.new_snapshot_id(save.step)
    number = next_save_number()
    fault("before-data", number)

    def one(rel: str) -> FileEntry:
        path = save.folder / rel
        entry = FileEntry(path=rel, size=files[rel][0], sha256=_sha256(path))
        store.write_file(layout.data_key(run_id, sid, rel), str(path))
        return entry

    with ThreadPoolExecutor(max_workers=_PUBLISH_THREADS, thread_name_prefix="runner-publish") as pool:
        rels = list(files)
        entries = [one(rels[0])]  # the first file is out before the others: a kill at mid-data leaves one
        fault("mid-data", number)
        entries += list(pool.map(one, rels[1:]))
    changed = [rel for rel in files if _fingerprint(save.folder / rel) != files[rel]]
    if changed:
        raise FolderChangedError(f"{', '.join(changed)} in {save.folder} changed while being published; "
                                 "not committed")
    fault("before-manifest", number)
    if fence is not None:
        fence()
    pending = PendingSnapshot(step=save.step, reason=save.reason, components={}, epoch=save.epoch,
                              parent=save.parent, metrics=dict(save.metrics or {}), extra=dict(save.extra or {}),
                              capture_seconds=save.stall_seconds)
    manifest = manifest_for(run_id, sid, pending, entries)
    create_manifest(store, run_id, manifest.to_bytes(), sid)
    fault("after-manifest", number)
    return CommitResult(manifest, save.stall_seconds, time.perf_counter() - started)


def restore_folder(reader: RunReader, manifest: Manifest, dest: Path) -> None:
    """Put `manifest`'s files at `dest` (a folder), all checked before any is in place.

    An existing `dest` with other content is moved to `<parent>/.runner-set-aside/`.
    Raises CorruptSnapshotError (nothing changed at `dest`), StorageError.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        for entry in manifest.files:
            data = reader.read_file(manifest, entry)  # size and SHA-256 checked here
            target = (staging / entry.path).resolve()
            if staging.resolve() not in target.parents:
                raise CorruptSnapshotError(f"{entry.path} escapes its folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if dest.exists():
            if matches(dest, manifest):
                return  # already there (a restart on the same machine): leave it as it is
            set_aside(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def matches(folder: Path, manifest: Manifest) -> bool:
    """True when `folder` holds exactly the manifest's files, byte for byte."""
    try:
        present = list_files(folder)
    except (OSError, UnstorableNameError):
        return False
    wanted = {e.path: e for e in manifest.files}
    if set(present) != set(wanted):
        return False
    return all(present[rel][0] == e.size and _sha256(folder / rel) == e.sha256 for rel, e in wanted.items())


def set_aside(path: Path) -> Path:
    """Move `path` out of the framework's way, into `<parent>/.runner-set-aside/`; returns where it went."""
    aside = path.parent / SET_ASIDE
    aside.mkdir(exist_ok=True)
    target = aside / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    os.replace(path, target)
    log.warning("moved %s to %s: it is not the run's newest valid snapshot", path, target)
    return target
