"""The exceptions a user of `runner` may see, gathered in one place.

Few classes, each subclassing a builtin, so callers can catch them by meaning.
The checkpoint errors are defined here (and re-exported by checkpoint/) so
that this module depends on storage/ alone and every layer may import it.
"""

from runner.storage import (
    ObjectExistsError,
    StorageError,
    StoreAccessError,
    StoreNotFoundError,
    StoreUnreachableError,
    UnsupportedURLError,
)


class ManifestError(ValueError):
    """A manifest that cannot be trusted: unparsable, foreign, tampered, or unsupported."""


class CorruptSnapshotError(ValueError):
    """A snapshot's data does not match its manifest (missing, short, or altered)."""


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
