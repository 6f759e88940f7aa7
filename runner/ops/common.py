"""What every operator command shares: opening a store and a run, checking ids, progress, refusal.

The commands themselves are in listing.py (ls, verify), retaining.py (gc,
pin) and forking.py (fork); they are plain functions over a `Store` and a
`RunReader` that return plain dataclasses.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from runner.checkpoint import layout
from runner.checkpoint.reader import RunReader
from runner.errors import ConfigError
from runner.storage import Store, StoreNotFoundError

log = logging.getLogger("runner.operations")

LATEST = "latest"


class RefusedError(RuntimeError):
    """The bucket's state makes the operation unsafe or impossible; nothing was changed."""


class Progress(Protocol):
    """Where long operations report the bytes they have read."""

    def begin(self, description: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...


class NoProgress:
    def begin(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


# -- opening ----------------------------------------------------------------


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """A store for `url` that is known to exist. Raises StorageError (UnsupportedURLError, StoreNotFoundError, ...)."""
    store = Store(url, storage_options)
    if not store.is_local:
        store.check()
    elif not store.exists(""):  # do not create a folder for a mistyped path
        raise StoreNotFoundError(f"{url} does not exist: fix --bucket")
    return store


def open_run(store: Store, run_id: str) -> RunReader:
    check_run_id(run_id)
    return RunReader(store, run_id)


def check_run_id(run_id: str) -> None:
    if not layout.valid_run_id(run_id):
        raise ConfigError(f"run id {run_id!r} is not valid: use letters, digits, '.', '_' and '-' (at most 128)")


def check_snapshot_id(snapshot_id: str) -> None:
    if snapshot_id != LATEST and not layout.valid_snapshot_id(snapshot_id):
        raise ConfigError(
            f"{snapshot_id!r} is not a snapshot id (like 000000000100-20250101T120000-a1b2c3) or 'latest'"
        )


def where(reader: RunReader) -> str:
    return f"run {reader.run_id!r} in {reader.store.url}"
