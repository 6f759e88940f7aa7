"""Putting a sync snapshot's files into a --sync-dir: all of them or none (sync.py decides which snapshot).

Every file is downloaded, checked against its SHA-256 (the reader does) and
staged as a `.runner-restore-*` temporary beside its target first; only when
all are good are they moved into place (os.replace), so a corrupt snapshot
never leaves DIR a mix of two.  Files already present with the same bytes are
left alone (not even their inode changes); files not in the snapshot are
never deleted.  Decoded names are checked again here (the bucket is not
trusted): the path must stay inside DIR.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from runner.checkpoint.manifest import FileEntry, Manifest
from runner.checkpoint.reader import CorruptSnapshotError, RunReader
from runner.storage import StorageError
from runner.supervisor.syncdir.files import PRIVATE_PREFIX, Fingerprint, decode_path, fingerprint

Keys = tuple[tuple[str, int], ...]


class SyncDirError(ValueError):
    """DIR cannot be used (it is a file, or cannot be created or written)."""


def fetch_into(directory: Path, reader: RunReader, manifest: Manifest, keys_of: Callable[[str, bytes], Keys],
               wants_keys: Callable[[str], bool]) -> tuple[dict[str, tuple[FileEntry, Fingerprint, Keys]],
                                                          tuple[int, int]]:
    """Stage every file of `manifest`, then move them into place.

    Returns, per DIR-relative path, its entry, the local state it now has and
    the step keys inside it (`keys_of`, asked for the files `wants_keys`);
    and (files downloaded, bytes downloaded).  Raises CorruptSnapshotError
    (the caller tries an older snapshot), SyncDirError, StorageError.
    """
    keep: dict[str, tuple[Path, FileEntry]] = {}
    staged: list[tuple[Path, Path, str, FileEntry]] = []
    keys: dict[str, Keys] = {}
    try:
        for entry in manifest.files:
            try:
                rel = decode_path(entry.path)
            except ValueError as exc:
                raise CorruptSnapshotError(str(exc)) from None
            target = local_path(directory, rel)
            if target.is_file() and target.stat().st_size == entry.size and sha256_file(target) == entry.sha256:
                keep[rel] = (target, entry)
                keys[rel] = keys_of(rel, target.read_bytes()) if wants_keys(rel) else ()
                continue
            data = reader.read_file(manifest, entry)  # checked against its SHA-256
            keys[rel] = keys_of(rel, data)
            staged.append((stage(target, data), target, rel, entry))
        for tmp, target, rel, entry in staged:
            if target.is_dir():
                raise SyncDirError(f"cannot restore {target}: a folder has that name")
            os.replace(tmp, target)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise SyncDirError(f"cannot write into --sync-dir {directory}: {exc}") from None
    finally:
        for tmp, *_ in staged:
            tmp.unlink(missing_ok=True)
    placed = {rel: (entry, fingerprint(os.stat(path)), keys[rel]) for rel, (path, entry) in keep.items()}
    for _, target, rel, entry in staged:
        placed[rel] = (entry, fingerprint(os.stat(target)), keys[rel])
    return placed, (len(staged), sum(e.size for *_, e in staged))


def local_path(directory: Path, rel: str) -> Path:
    target = (directory / rel).resolve()
    if not target.is_relative_to(directory.resolve()):
        raise CorruptSnapshotError(f"{rel!r} escapes {directory}")
    return target


def stage(target: Path, data: bytes) -> Path:
    """`data` written and fsynced to a private temporary beside `target`; the caller moves it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{PRIVATE_PREFIX}restore-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
