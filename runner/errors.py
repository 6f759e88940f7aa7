"""The exceptions a user of `runner` may see, gathered in one place.

Few classes, each subclassing a builtin, so callers can catch them by meaning.
"""

from runner.checkpoint.manifest import ManifestError
from runner.checkpoint.reader import CorruptSnapshotError
from runner.storage import (
    ObjectExistsError,
    StorageError,
    StoreAccessError,
    StoreNotFoundError,
    StoreUnreachableError,
    UnsupportedURLError,
)


class UnsafeDataError(ValueError):
    """A data file holds something other than tensors and plain containers."""


class StateMismatchError(ValueError):
    """A saved model does not fit the registered one (structure changed)."""


class ConfigError(ValueError):
    """A setting is missing or invalid; the message says which and what to do."""


class SnapshotNotFoundError(LookupError):
    """A snapshot named by the user does not exist or is not valid."""


__all__ = [
    "ConfigError",
    "CorruptSnapshotError",
    "ManifestError",
    "ObjectExistsError",
    "SnapshotNotFoundError",
    "StateMismatchError",
    "StorageError",
    "StoreAccessError",
    "StoreNotFoundError",
    "StoreUnreachableError",
    "UnsafeDataError",
    "UnsupportedURLError",
]
