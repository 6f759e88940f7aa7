"""The storage layer's one error table.

Everything that fsspec, s3fs, aiobotocore or botocore can raise is translated
here, once, into the few exceptions that code above the storage layer handles
(`StorageError` and its subclasses, all `OSError`s).  Each carries a message
a user can act on: what failed, for which URL, and what to do.

`is_transient()` is the single place that decides what the retry wrapper may
try again (throttling, 5xx, dropped or timed-out connections).
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Iterator

from botocore import exceptions as boto_exc

try:  # aiohttp is what s3fs speaks HTTP through; it is optional for fsspec.
    import aiohttp
except ImportError:  # pragma: no cover - aiohttp ships with s3fs
    aiohttp = None


class StorageError(OSError):
    """A storage operation failed; `str()` is one line fit for a user."""


class StoreNotFoundError(StorageError, FileNotFoundError):
    """The bucket (or local folder) itself does not exist."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """A key that should exist does not."""


class ObjectExistsError(StorageError, FileExistsError):
    """An exclusive create found the key already written."""


class StoreAccessError(StorageError, PermissionError):
    """Credentials are missing, wrong or lack a permission."""


class StoreUnreachableError(StorageError, ConnectionError):
    """The endpoint could not be reached (network, DNS, wrong endpoint URL)."""


class TransientStorageError(StorageError):
    """A throttle, a 5xx or a dropped connection that outlived its retries."""


class ExclusiveCreateUnsupportedError(StorageError):
    """The store does not honour exclusive creates (S3: PutObject with `If-None-Match: *`).

    Some S3-compatible servers ignore the header and overwrite: a second
    writer's manifest or lease would then replace the first's, unseen.
    """


class UnsupportedURLError(StorageError, ValueError):
    """The URL names a protocol that no installed fsspec backend serves (or a storage option is invalid)."""


_TRANSIENT_ERRNOS = {errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.EREMOTEIO, errno.EAGAIN}
_TRANSIENT_STATUS = {500, 502, 503, 504}
# Error codes worth another try whatever the status: botocore's standard retry mode's
# throttling and transient codes (botocore/retries/standard.py), which S3 and its
# look-alikes send (SlowDown with 503, RequestTimeout with 400).
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "TransactionInProgressException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled",
    "EC2ThrottledException", "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
    "InternalError", "ServiceUnavailable",
})
# Throttling and server-side error codes, or a 5xx status as a word (not inside a port like ":45003").
_TRANSIENT_TEXT = re.compile(r"SlowDown|Throttl|RequestTimeout|InternalError|ServiceUnavailable|\b50[0234]\b")

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    boto_exc.EndpointConnectionError,
    boto_exc.ConnectTimeoutError,
    socket.gaierror,
    ConnectionRefusedError,
)
_DROPPED_ERRORS: tuple[type[BaseException], ...] = (
    boto_exc.ReadTimeoutError,
    boto_exc.ConnectionClosedError,
    boto_exc.HTTPClientError,
    socket.timeout,
    TimeoutError,
    ConnectionResetError,
)
if aiohttp is not None:
    _CONNECTION_ERRORS += (aiohttp.ClientConnectorError,)
    _DROPPED_ERRORS += (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)


def retryable_reply(status: int | None, code: str | None) -> bool:
    """True for an HTTP reply that another try of the same request may turn into a success."""
    return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES


def retryable_request_error(exc: BaseException) -> bool:
    """True for a request that failed without a reply (refused, reset, timed out): send it again.

    Wider than `is_transient`: a refused connection is worth a few quick tries
    of one request, not the whole operation's backoff.
    """
    return isinstance(exc, (boto_exc.ConnectionError, boto_exc.HTTPClientError, *_DROPPED_ERRORS))


def is_transient(exc: BaseException) -> bool:
    """True when trying the same call again may succeed."""
    if isinstance(exc, StorageError):
        return isinstance(exc, TransientStorageError)
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError)):
        return False
    if isinstance(exc, _DROPPED_ERRORS):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if isinstance(exc, _CONNECTION_ERRORS):
        return False  # its text holds the endpoint URL, whose port may look like a status
    for e in _chain(exc):  # s3fs puts the botocore ClientError (with the status) in __cause__
        if _response(e).get("ResponseMetadata", {}).get("HTTPStatusCode") in _TRANSIENT_STATUS:
            return True
        if _TRANSIENT_TEXT.search(str(e)):
            return True
    return False


def translate(exc: BaseException, url: str, key: str = "") -> StorageError:
    """Map any backend exception to one of ours, with a message a user can act on."""
    if isinstance(exc, StorageError):
        return exc
    where = f"{url.rstrip('/')}/{key}" if key else url
    out: StorageError
    if isinstance(exc, (boto_exc.NoCredentialsError, boto_exc.PartialCredentialsError)):
        out = StoreAccessError(
            f"no credentials for {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
            "or attach an instance role"
        )
    elif isinstance(exc, boto_exc.NoRegionError):
        out = StorageError(f"no region for {url}: set AWS_REGION")
    elif isinstance(exc, PermissionError):
        out = StoreAccessError(f"access denied to {where}: check the credentials and the policy ({_first_line(exc)})")
    elif isinstance(exc, FileExistsError):
        out = ObjectExistsError(f"{where} already exists")
    elif isinstance(exc, FileNotFoundError):
        if _missing_bucket(exc):
            out = StoreNotFoundError(f"bucket of {url} does not exist: create it or fix --bucket")
        else:
            out = ObjectNotFoundError(f"{where} does not exist")
    elif isinstance(exc, _CONNECTION_ERRORS):
        out = StoreUnreachableError(
            f"cannot reach the store for {url}: check the network and AWS_ENDPOINT_URL ({_first_line(exc)})"
        )
    elif is_transient(exc):
        out = TransientStorageError(f"storage kept failing for {where}: {_first_line(exc)}")
    else:
        out = StorageError(f"storage error on {where}: {_first_line(exc)}")
    out.__cause__ = exc
    return out


def not_implemented(exc: BaseException) -> bool:
    """The store answered that it lacks the feature asked for (S3 `NotImplemented`, HTTP 501).

    s3fs turns that reply into an OSError with errno ENOSYS.
    """
    for e in _chain(exc):
        response = _response(e)
        if response.get("Error", {}).get("Code") == "NotImplemented":
            return True
        if response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501:
            return True
        if isinstance(e, OSError) and e.errno == errno.ENOSYS:
            return True
    return False


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def _response(exc: BaseException) -> dict:
    response = getattr(exc, "response", None)
    return response if isinstance(response, dict) else {}


def _missing_bucket(exc: BaseException) -> bool:
    """The bucket itself is gone (NoSuchBucket), not just a key in it.

    The key's own message may well contain "bucket" (in the bucket's name).
    """
    for e in _chain(exc):
        if _response(e).get("Error", {}).get("Code") == "NoSuchBucket":
            return True
        text = str(e)
        if "NoSuchBucket" in text or "specified bucket does not exist" in text.lower():
            return True
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
