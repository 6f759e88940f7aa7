"""What the sync-dir modules share: the marks of a sync snapshot, and the records of files stored, seen and scanned."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from runner.checkpoint.manifest import FileEntry, Manifest
from runner.supervisor.syncdir.files import Fingerprint

SYNC_MARKER = "sync_dir"  # manifest.extra[SYNC_MARKER] = the name encoding's version
SYNC_FORMAT = 1
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")


def is_checkpoint(rel: str) -> bool:
    return rel.lower().endswith(CHECKPOINT_SUFFIXES)


def is_sync_snapshot(manifest: Manifest) -> bool:
    return manifest.extra.get(SYNC_MARKER) == SYNC_FORMAT


@dataclass(frozen=True)
class Stored:
    """A file as the newest sync snapshot holds it, and the local state it was read from."""

    entry: FileEntry
    fingerprint: Fingerprint
    keys: tuple[tuple[str, int], ...] = ()  # integer step keys found inside it (files.keys_in)


@dataclass
class Seen:
    """A file as the scans saw it: since when unchanged, and what its zip tail says."""

    fingerprint: Fingerprint
    since: float  # monotonic time of the first scan that saw this fingerprint
    zip_state: str | None = None  # "complete", "partial" or "other" (not a zip); None until looked at


@dataclass(frozen=True)
class Scan:
    """One pass over DIR."""

    found: dict[str, Fingerprint]
    changed: list[str]  # settled and different from the stored version
    in_flight: list[str]  # changed but still being written
    removed: list[str]  # stored but gone from DIR


def names(rels: set[str] | list[str]) -> str:
    names = sorted(rels)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def versions() -> dict[str, str]:
    from runner import __version__

    return {"runner": __version__, "python": platform.python_version()}
