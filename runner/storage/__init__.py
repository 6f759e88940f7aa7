"""Storage: the only code that imports fsspec/botocore (see store.py, upload.py, errors.py)."""

from runner.storage.errors import (
    ExclusiveCreateUnsupportedError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
    StoreAccessError,
    StoreNotFoundError,
    StoreUnreachableError,
    TransientStorageError,
    UnsupportedURLError,
)
from runner.storage.store import ObjectInfo, RetryPolicy, Store, clear_caches, parse_storage_options
from runner.storage.upload import Upload

__all__ = [
    "ExclusiveCreateUnsupportedError",
    "ObjectExistsError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "RetryPolicy",
    "StorageError",
    "Store",
    "StoreAccessError",
    "StoreNotFoundError",
    "StoreUnreachableError",
    "TransientStorageError",
    "UnsupportedURLError",
    "Upload",
    "clear_caches",
    "parse_storage_options",
]
