"""`Store`: one bucket URL, the only door to fsspec.

A store is a root (`s3://bucket/prefix`, `file:///path`, a plain path,
`memory://x`, `oss://…`, `gs://…`) and a handful of whole-object operations on
keys relative to it.  Code above this layer never sees fsspec or botocore.

Why these operations and not `fs.open(...)`: an exception inside
`with fs.open(p, "wb")` still commits a short object on close in s3fs.  Every
write here is whole-object or nothing:
- S3 (and other async stores): `pipe_file` (bytes) and `put_file` (a local
  file), which abort their multipart upload on failure; `mode="create"` sends
  `If-None-Match: *` for exclusive creates.
- Local folders: write a temporary sibling, then `os.replace` (data) or
  `os.link` (exclusive create, fails if the name exists).  fsspec's own local
  `mode="create"` is check-then-write, which two writers can both pass.
Every call goes through one retry wrapper (throttling, 5xx, dropped
connections, with exponential backoff) and one error table (`errors.py`).

Retries never touch the training's random streams.  A retry's jitter must not
come from python's global `random` (nor numpy's or torch's global generators):
the writer thread would shift the user's stream at a moment that depends on
the network, and "resumes bit for bit" would hold only on days without a
throttle.  So:
- `RetryPolicy` draws its jitter from a private `random.Random` of its own.
- botocore's own retry modes draw theirs from the global `random.random`
  (`botocore.retries.standard.ExponentialBackoff`, `retryhandler`), so its
  retries are switched off (`total_max_attempts=1`: its handler then never
  computes a delay) and one `needs-retry` handler of ours, registered on the
  aiobotocore session that every S3 client of a store is made from, sends a
  failed request again: the same replies botocore's standard mode would retry
  (5xx, throttling codes, resets and timeouts; `errors.retryable_reply`), with
  `RetryPolicy`'s delays.  A `retries.total_max_attempts` in `config_kwargs`
  sets how often one request is tried.
- Whole operations (an upload of many parts, a listing) that still fail are
  retried once more here, in `Store._call`, with the same policy.
s3fs's own retry loop sleeps for fixed times, and tempfile and uuid keep
their own generators; a test wraps a save and restore with forced retries
and checks that the three global streams are untouched.

Exclusive creates survive a lost reply.  When the reply to a create was lost
after the store applied it, the retry finds the key taken (412).  The key is
then read back: if it holds exactly the bytes we sent, the create was ours
and it succeeded.  Callers make each body unique to its writer (a manifest
names its fresh snapshot id, a lease record its holder and time), so another
writer's create never reads back as ours.

Exclusive creates are checked, not assumed.  Some S3-compatible servers
ignore `If-None-Match: *` on PutObject and overwrite (s3rver does; older
releases of others did): a second instance's lease or manifest would then
replace the first's without anyone noticing.  So before its first exclusive
create, a remote store creates a probe key twice in the first folder of the
key it is about to create (the run's prefix, which is all a run's
credentials may write to), and deletes it: the second create must be refused.  If it is not,
the create raises `ExclusiveCreateUnsupportedError` with what to do.  One
probe per `Store` (two PUTs and a DELETE), before the first create; or at
`check(prefix)`.  The storage option `exclusive_creates=unchecked` skips
the probe and says so in the log: for an operator who knows that only one
instance of a run ever writes at a time, on such a store.  The probe key is
a `.tmp-` name, so a process killed between its PUT and its DELETE leaves
an object that no listing shows.

Large data is streamed (`open_upload`, upload.py) rather than built as bytes
in memory: on S3 a writer's bytes leave as multipart parts while it writes
(no spool file), completed or aborted at the end; other stores stream into a
spool file (`spool_path` + `write_file`), which releases the GIL where
building a large `bytes` does not, and a local store publishes that very
file with one rename (it is the temporary sibling).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from runner.storage.errors import (
    ExclusiveCreateUnsupportedError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
    StoreNotFoundError,
    UnsupportedURLError,
    is_transient,
    not_implemented,
    retryable_reply,
    retryable_request_error,
    translate,
)
from runner.storage.upload import PartPool, S3Upload, SpoolUpload, Upload

log = logging.getLogger(__name__)
T = TypeVar("T")

# Objects larger than this are fetched as parallel ranged GETs.
_PARALLEL_READ_THRESHOLD = 32 * 2**20
_READ_CHUNK = 16 * 2**20
# S3 part size for data writes (write_bytes, write_file, open_upload); s3fs's default is 50 MiB,
# so anything under 100 MiB went as one PUT stream.  16 MiB parts let s3fs send up
# to `max_concurrency` (10) parts at once from 32 MiB up; on moto a 500 MB snapshot
# uploads ~13% faster than with 50 MiB parts, while 8 MiB was no better than 16 and
# doubles the request count.  Exclusive creates (create_bytes) keep s3fs's default:
# a manifest must stay one PUT with If-None-Match.
_UPLOAD_CHUNK = 16 * 2**20
# Local stores spool and publish through `.tmp-` siblings (invisible to `list`, swept
# by `abort_stale_uploads`); other stores spool in this process's temp folder, in
# files named after the writing process so a later one can remove a killed one's.
_TMP_PREFIX = ".tmp-"
_SPOOL_PREFIX = "runner-spool-"


@dataclass(frozen=True)
class ObjectInfo:
    """One object under the store's root."""

    key: str
    size: int
    modified: float | None  # epoch seconds, when the backend reports it


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient failures.

    The jitter comes from a generator of the policy's own, never from the
    process-global `random` stream that training code draws from.
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0
    jitter: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * (0.5 + self.jitter.random() / 2)


class _RequestRetries:
    """botocore's `needs-retry` event: send a failed request again, with our delays.

    Returns the seconds to wait before the next try, or None (no retry): a
    reply botocore's standard mode would retry (5xx, throttling, request
    timeouts) or a request that got no reply (refused, reset, timed out).
    `attempts` counts the tries made so far.
    """

    def __init__(self, policy: RetryPolicy, attempts: int):
        self.policy, self.attempts = policy, attempts

    def __call__(self, attempts: int, response: Any = None, caught_exception: BaseException | None = None,
                 **_: Any) -> float | None:
        if attempts >= self.attempts:
            return None
        if caught_exception is not None:
            retry = retryable_request_error(caught_exception)
        else:
            parsed = (response[1] if response else None) or {}
            retry = retryable_reply(parsed.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                                    parsed.get("Error", {}).get("Code"))
        return self.policy.delay(attempts - 1) if retry else None


_sessions: dict[tuple[str | None, RetryPolicy, int], Any] = {}
_sessions_lock = threading.Lock()


def _retrying_session(profile: str | None, policy: RetryPolicy, attempts: int) -> Any:
    """The aiobotocore session (one per profile and policy, kept like s3fs's instances) whose clients retry our way.

    A handler registered on a session is copied into every client made from
    it, including the clients s3fs makes again after a fork or per region.
    """
    from aiobotocore.session import AioSession

    key = (profile, policy, attempts)
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = AioSession(profile=profile)
            session.register("needs-retry.s3", _RequestRetries(policy, attempts), unique_id="runner-retries")
            _sessions[key] = session
        return session


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """`["KEY=VALUE", "client_kwargs.region_name=eu-west-1"]` -> nested dict.

    Values that look like JSON scalars (true, 3, 1.5, null) are converted.
    Raises ValueError on a pair without `=`.
    """
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"storage option {pair!r} is not KEY=VALUE")
        key, raw = pair.split("=", 1)
        try:
            value: Any = json.loads(raw)
            if isinstance(value, (dict, list)):
                value = raw
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# Tries of one S3 request (the first included), unless config_kwargs.retries says otherwise.
_REQUEST_ATTEMPTS = 3


def _s3_defaults(options: dict[str, Any], policy: RetryPolicy) -> dict[str, Any]:
    """Bounded timeouts, and request retries that are ours rather than botocore's (see the module note).

    An endpoint that drops connections (wrong AWS_ENDPOINT_URL, a firewall)
    fails after 3 attempts x 3 s plus backoff, about 10 s; throttles and 5xx
    get 3 tries of each request, and the whole operation is retried again by
    `Store._call`.  The endpoint, credentials, region and profile come from the
    standard AWS chain (AWS_ENDPOINT_URL, AWS_PROFILE, ...), which botocore
    reads itself; a `session` given by the caller is used as it is.
    """
    opts = dict(options)
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("connect_timeout", 3)
    config.setdefault("read_timeout", 60)
    asked = dict(config.get("retries") or {})
    attempts = int(asked.get("total_max_attempts") or (asked.get("max_attempts", _REQUEST_ATTEMPTS - 1) + 1))
    # botocore's own retries draw their jitter from the global stream: one try each, ours retry.
    # Adaptive mode's client-side rate limiting (no jitter) is kept when asked for.
    mode = "adaptive" if asked.get("mode") == "adaptive" else "standard"
    config["retries"] = {"total_max_attempts": 1, "mode": mode}
    opts["config_kwargs"] = config
    if "session" not in opts:
        opts["session"] = _retrying_session(opts.pop("profile", None), policy, max(1, attempts))
    if "endpoint_url" not in opts and os.environ.get("AWS_ENDPOINT_URL_S3"):
        opts["endpoint_url"] = os.environ["AWS_ENDPOINT_URL_S3"]
    return opts


class Store:
    """Whole-object operations on keys under one root URL.

    Raises (from every method): `StorageError` subclasses only.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None):
        self.url = url.rstrip("/") or url
        self.retry = retry or RetryPolicy()
        options = dict(storage_options or {})
        # Ours, not fsspec's: whether exclusive creates are probed (see the module note).
        exclusive = str(options.pop("exclusive_creates", "check"))
        if exclusive not in ("check", "unchecked"):
            raise UnsupportedURLError(f"storage option exclusive_creates must be check or unchecked, not {exclusive!r}")
        self._exclusive_unchecked = exclusive == "unchecked"
        self._exclusive_known = False
        self._probe_lock = threading.Lock()
        protocol = fsspec.utils.get_protocol(url)
        if protocol in ("s3", "s3a"):
            options = _s3_defaults(options, self.retry)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except (ValueError, ImportError) as exc:
            raise UnsupportedURLError(
                f"cannot open {url!r}: {exc}. Use s3://, oss://, gs://, file:// or a local path "
                "(install runner[oss] / runner[gcs] for those stores)"
            ) from None
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._is_s3 = hasattr(self.fs, "call_s3")  # s3fs: multipart part size, bulk deletes, streaming uploads
        self._parts = PartPool(size=_UPLOAD_CHUNK)  # every streaming upload's parts in flight, and their buffers

    # -- paths -------------------------------------------------------------

    def path(self, key: str) -> str:
        return f"{self.root}/{key.lstrip('/')}" if key else self.root

    def _key(self, path: str) -> str:
        path = path.rstrip("/")
        root = self.root.lstrip("/")
        return path.lstrip("/")[len(root):].lstrip("/")

    # -- the retry wrapper -------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any, key: str = "", **kwargs: Any) -> T:
        for attempt in range(self.retry.attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # translated below; nothing escapes untranslated
                if attempt + 1 < self.retry.attempts and is_transient(exc):
                    delay = self.retry.delay(attempt)
                    log.debug("transient storage error on %s (%s); retrying in %.2fs", key, exc, delay)
                    time.sleep(delay)
                    continue
                raise translate(exc, self.url, key) from exc
        raise AssertionError("unreachable")  # the loop always returns or raises

    # -- operations --------------------------------------------------------

    def check(self, prefix: str = "") -> None:
        """Fail fast with a clear error when the bucket cannot be used.

        A missing local folder is created (a local "bucket" is just a folder);
        a missing S3 bucket is an error (creating buckets is the operator's call).
        With a `prefix` (a run's, `RUN_ID/`), a remote store also proves now,
        under it, that it honours exclusive creates (ExclusiveCreateUnsupportedError
        otherwise), rather than at the first create.
        """
        if self.is_local:
            self._call(self.fs.makedirs, self.root, exist_ok=True)
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self._call(self.fs.ls, bucket, refresh=True)
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                raise StoreNotFoundError(f"bucket {bucket!r} of {self.url} does not exist: create it or fix --bucket") from None
            raise
        if prefix:
            self._ensure_exclusive(prefix.rstrip("/"))

    def read_bytes(self, key: str) -> bytes:
        """The whole object; large objects are fetched as parallel ranged GETs."""
        path = self.path(key)
        if self.is_local:
            return self._call(self.fs.cat_file, path, key=key)
        size = self.size(key)
        if size < _PARALLEL_READ_THRESHOLD or not hasattr(self.fs, "cat_ranges"):
            return self._call(self.fs.cat_file, path, key=key)
        starts = list(range(0, size, _READ_CHUNK))
        ends = [min(s + _READ_CHUNK, size) for s in starts]
        parts = self._call(self.fs.cat_ranges, [path] * len(starts), starts, ends, on_error="raise", key=key)
        return b"".join(parts)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Publish `data` at `key` whole, or not at all."""
        path = self.path(key)
        if self.is_local:
            self._call(self._local_write, path, data, exclusive=False, key=key)
        else:
            self._call(self.fs.pipe_file, path, data, key=key, **self._chunking())

    def open_upload(self, key: str) -> Upload:
        """A file object to write `key`'s bytes into, published whole at `commit()` (upload.py).

        S3: the bytes stream out as multipart parts while they are written, and
        nothing is visible before the commit; any failure aborts the upload.
        Other stores: a spool file (`spool_path`) that `write_file` publishes.
        As a context manager it commits on a normal exit and aborts on an exception.
        """
        if self._is_s3:
            return S3Upload(self.fs, self.path(key), self.url, key, self.retry, self._parts)
        return SpoolUpload(self, key)

    def spool_path(self, key: str) -> str:
        """A fresh local path to write `key`'s bytes into, for `write_file(key, path)` to publish.

        Local stores: a `.tmp-` sibling of `key` (its folder is created), which
        `write_file` renames into place, so the bytes are written once; a writer
        killed meanwhile leaves only a `.tmp-` file, invisible to `list` and swept
        by `abort_stale_uploads`.  Other stores: a file in the temp folder.  The
        caller removes the path if it still exists when done (see `discard_spool`).
        """
        if self.is_local:
            folder = os.path.dirname(self.path(key))
            self._call(os.makedirs, folder, exist_ok=True, key=key)
            return os.path.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        return _remote_spool_path()

    @staticmethod
    def discard_spool(path: str) -> None:
        """Remove a spool file if it is still there (after a failure, or a remote upload)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def write_file(self, key: str, local_path: str) -> None:
        """Publish the local file `local_path` at `key` whole, or not at all.

        Remote stores upload it with `put_file` (multipart from 32 MiB, aborted on
        failure); the file is left in place.  Local stores fsync it and rename it
        into place when it is a `spool_path(key)` (it is then gone), otherwise copy
        it to a temporary sibling first.  A missing `local_path` raises
        ObjectNotFoundError, like a missing key.
        """
        path = self.path(key)
        if self.is_local:
            self._call(self._local_publish, local_path, path, key=key)
        else:
            self._call(self.fs.put_file, local_path, path, key=key, **self._chunking())

    def _chunking(self) -> dict[str, Any]:
        return {"chunksize": _UPLOAD_CHUNK} if self._is_s3 else {}

    def _local_publish(self, src: str, dst: str) -> None:
        folder = os.path.dirname(dst)
        spooled = (os.path.basename(src).startswith(_TMP_PREFIX)
                   and os.path.dirname(os.path.abspath(src)) == os.path.abspath(folder))
        if not spooled:  # someone else's file: copy it beside its destination first
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex}")
            try:
                shutil.copyfile(src, tmp)
                self._local_publish(tmp, dst)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(src, dst)

    def create_bytes(self, key: str, data: bytes) -> None:
        """Exclusive create: raises `ObjectExistsError` if `key` already holds other bytes.

        A key that holds exactly `data` is our own create whose reply was lost
        (the store applied it, the retry was refused): that is a success.  The
        caller's bytes must be unique to its writer for this to be exclusive.
        """
        path = self.path(key)
        try:
            if self.is_local:
                self._call(self._local_write, path, data, exclusive=True, key=key)
            else:
                self.prepare_create(key)
                self._call(self.fs.pipe_file, path, data, mode="create", key=key)
        except ObjectExistsError:
            if self._holds(key, data):
                log.info("the reply to creating %s was lost, but the object is ours: created", key)
                return
            raise

    def prepare_create(self, key: str) -> None:
        """Run the once-per-store exclusive-create probe for `key` now, if it has not run (a no-op on local stores).

        A writer calls it while its data uploads, so that its first `create_bytes`
        is one request rather than four in sequence.  Raises what the probe raises.
        """
        # In the run's own folder (a key's first one): all that a run's credentials may write to.
        folder, _, rest = key.strip("/").partition("/")
        self._ensure_exclusive(folder if rest else "")

    def _ensure_exclusive(self, folder: str) -> None:
        """Once per store, before its first remote exclusive create: prove the store refuses a second one."""
        if self.is_local or self._exclusive_known:
            return
        with self._probe_lock:  # the writer and the lease threads may both create first
            if self._exclusive_known:
                return
            if self._exclusive_unchecked:
                log.warning("exclusive creates on %s are not checked (exclusive_creates=unchecked): safe only while "
                            "a single instance of each run writes to it", self.url)
            else:
                self._probe_exclusive(folder)
            self._exclusive_known = True

    def _probe_exclusive(self, folder: str) -> None:
        key = f"{folder}/{_TMP_PREFIX}create-probe-{uuid.uuid4().hex}" if folder else \
            f"{_TMP_PREFIX}create-probe-{uuid.uuid4().hex}"
        path = self.path(key)
        unsupported = ExclusiveCreateUnsupportedError(
            f"{self.url} does not honour exclusive creates (a second PUT with If-None-Match: * of "
            f"{self.url}/{folder + '/' if folder else ''}{_TMP_PREFIX}create-probe-* was not refused), so two instances of a run could both "
            "hold its lease and commit snapshots: use a store with conditional writes (AWS S3 has them), or, if no "
            "second instance of a run can ever start while one runs, pass --storage-option exclusive_creates=unchecked")
        try:
            self._call(self.fs.pipe_file, path, b"probe 1", mode="create", key=key)
            self._call(self.fs.pipe_file, path, b"probe 2", mode="create", key=key)
        except ObjectExistsError:
            # Refused: the store checks the condition.  (A first create whose reply was lost and
            # whose retry was refused ends here too, and proves the same.)
            log.debug("%s refuses a second exclusive create: conditional writes work", self.url)
            return
        except StorageError as exc:
            if not_implemented(exc):  # a store that rejects the header outright
                raise unsupported from None
            raise
        finally:
            try:
                self.delete([key])
            except StorageError as exc:  # a leftover .tmp- name is invisible to every listing
                log.debug("could not remove the probe %s: %s", key, exc)
        raise unsupported

    def _holds(self, key: str, data: bytes) -> bool:
        """True when `key` exists with exactly `data` (read back after a refused create)."""
        if not self.is_local:
            self.fs.invalidate_cache(self.path(key))
        try:
            return self.read_bytes(key) == data
        except StorageError:  # gone again, or unreadable: not provably ours
            return False

    def _local_write(self, path: str, data: bytes, exclusive: bool) -> None:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                os.link(tmp, path)  # atomic, and fails when the name exists
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def copy(self, src: str, dst: str) -> None:
        """Copy object `src` to `dst` inside the store (no bytes through this machine); whole or nothing.

        Raises ObjectNotFoundError when `src` is gone.
        """
        if self.is_local:
            # A key is never a spool file, so publishing it copies it beside dst first.
            self._call(self._local_publish, self.path(src), self.path(dst), key=dst)
        else:
            self._call(self.fs.copy, self.path(src), self.path(dst), key=dst)

    def size(self, key: str) -> int:
        path = self.path(key)
        try:
            info = self._call(self.fs.info, path, key=key)
        except ObjectNotFoundError:
            if self.is_local:
                raise
            self._forget(path)  # a cached listing is trusted for what it names, never for what it lacks
            info = self._call(self.fs.info, path, key=key)
        return int(info["size"])

    def exists(self, key: str) -> bool:
        path = self.path(key)
        if self._call(self.fs.exists, path, key=key):
            return True
        if self.is_local:
            return False
        # A "no" from a listing cached before the object was created (retention's last look
        # before deleting data, a manifest read after a commit by another process): ask the store.
        self._forget(path)
        return bool(self._call(self.fs.exists, path, key=key))

    def _forget(self, path: str) -> None:
        """Drop fsspec's cached listings of `path`'s folders (list() fills them), so the next call asks the store."""
        self.fs.invalidate_cache(path)

    def list(self, prefix: str = "", *, remember: bool = True) -> list[ObjectInfo]:
        """Every object under `prefix` (recursively), sorted by key; [] when none.

        `remember=False`, for a folder (`prefix` ending in "/") likely empty, on S3:
        one request even when nothing is there (s3fs otherwise asks whether the
        folder is itself an object: two more), but the sizes listed are not kept
        for later reads of those objects (each will ask the store).
        """
        base = self.path(prefix.rstrip("/"))
        if not remember and self._is_s3 and prefix.endswith("/") and "/" in base:
            parent, name = base.rsplit("/", 1)
            find: Callable[..., Any] = functools.partial(self.fs.find, parent, prefix=f"{name}/")
        else:
            find = functools.partial(self.fs.find, base)
        try:
            found = self._call(find, detail=True, key=prefix)
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError) and not isinstance(exc, StoreNotFoundError):
                return []
            raise
        out = []
        for path, info in found.items():
            name = os.path.basename(path.rstrip("/"))
            if info.get("type") == "directory" or name.startswith(_TMP_PREFIX):
                continue
            out.append(ObjectInfo(self._key(path), int(info.get("size") or 0), _mtime(info)))
        return sorted(out, key=lambda o: o.key)

    def delete(self, keys: Iterable[str]) -> None:
        """Delete objects; keys that are already gone are not an error.

        On S3, one DeleteObjects request per 1,000 keys.
        """
        paths = [self.path(k) for k in keys]
        if not paths:
            return
        per_request = 1000 if self._is_s3 else 1
        for start in range(0, len(paths), per_request):
            batch = paths[start:start + per_request]
            try:
                if self._is_s3:
                    self._call(self._s3_delete, batch, key=self._key(batch[0]))
                else:
                    self._call(self.fs.rm_file, batch[0], key=self._key(batch[0]))
            except StorageError as exc:
                if not isinstance(exc.__cause__, FileNotFoundError):
                    raise
        if self.is_local:
            _prune_empty_dirs({os.path.dirname(p) for p in paths}, stop=self.root)

    def _s3_delete(self, paths: list[str]) -> None:
        """One DeleteObjects request; a key it could not delete raises (as `rm_file` would)."""
        bucket = paths[0].split("/", 1)[0]
        objects = [{"Key": p.split("/", 1)[1]} for p in paths]
        for p in paths:
            self.fs.invalidate_cache(p)
        out = self.fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
        errors = out.get("Errors") or []
        if errors:
            first = errors[0]
            text = f"{first.get('Code')}: {first.get('Message')} ({first.get('Key')}; {len(errors)} keys not deleted)"
            # The error table reads PermissionError as access denied, and throttling or 5xx codes in the text as transient.
            raise PermissionError(text) if first.get("Code") == "AccessDenied" else OSError(text)

    def abort_stale_uploads(self, prefix: str, older_than_s: float) -> int:
        """Abort S3 multipart uploads under `prefix` started more than `older_than_s` ago.

        On a local folder, remove the temporary files of writes that died (a
        killed writer's `.tmp-*`, invisible to `list`), the local equivalent.
        Returns how many were aborted; 0 on stores without multipart uploads.
        """
        if self.is_local:
            cutoff_s = time.time() - older_than_s
            return self._call(self._remove_stale_temporaries, self.path(prefix), cutoff_s, key=prefix)
        call = getattr(self.fs, "call_s3", None)
        if call is None:
            return 0
        bucket, _, root_key = self.path(prefix).partition("/")
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_s)
        try:
            listing = self._call(call, "list_multipart_uploads", Bucket=bucket, Prefix=root_key, key=prefix)
        except StorageError as exc:
            if not not_implemented(exc):
                raise
            # Some S3-compatible servers (s3rver) cannot list uploads; there is nothing to sweep then.
            log.info("%s cannot list multipart uploads (%s): none aborted", self.url, exc)
            return 0
        aborted = 0
        for upload in listing.get("Uploads", []):
            if upload["Initiated"] <= cutoff:
                self._call(call, "abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                           UploadId=upload["UploadId"], key=upload["Key"])
                aborted += 1
        return aborted


    def _remove_stale_temporaries(self, base: str, cutoff_s: float) -> int:
        removed, folders = 0, set()
        for folder, _, names in os.walk(base):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    if name.startswith(_TMP_PREFIX) and os.stat(path).st_mtime <= cutoff_s:
                        os.unlink(path)
                        removed += 1
                        folders.add(folder)
                except FileNotFoundError:  # its writer finished (or another sweep got it) meanwhile
                    continue
        _prune_empty_dirs(folders, stop=self.root)
        return removed


_spool_lock = threading.Lock()
_spools_swept = False


def _remote_spool_path() -> str:
    """A fresh file name in the temp folder; the first call of a process removes dead processes' spools."""
    global _spools_swept
    folder = tempfile.gettempdir()
    with _spool_lock:
        if not _spools_swept:
            _spools_swept = True
            _sweep_dead_spools(folder)
    return os.path.join(folder, f"{_SPOOL_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")


def _sweep_dead_spools(folder: str, min_age_s: float = 900.0) -> None:
    """Remove spool files left by killed writers: their process is gone and they sat untouched a while.

    The age guard spares a live writer in another PID namespace that shares the folder.
    """
    try:
        names = [n for n in os.listdir(folder) if n.startswith(_SPOOL_PREFIX)]
    except OSError:
        return
    cutoff = time.time() - min_age_s
    for name in names:
        pid = name[len(_SPOOL_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        try:
            if os.stat(path).st_mtime <= cutoff:
                os.unlink(path)
        except OSError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _mtime(info: dict[str, Any]) -> float | None:
    for name in ("LastModified", "mtime", "created"):
        value = info.get(name)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _prune_empty_dirs(folders: set[str], stop: str) -> None:
    """Remove now-empty local folders up to (not including) the store root."""
    stop = os.path.abspath(stop)
    for folder in sorted(folders, key=len, reverse=True):
        folder = os.path.abspath(folder)
        while folder.startswith(stop + os.sep):
            try:
                os.rmdir(folder)
            except OSError:
                break
            folder = os.path.dirname(folder)


def clear_caches() -> None:
    """Forget cached filesystem instances and sessions (tests, and after a fork)."""
    with _sessions_lock:
        _sessions.clear()
    for cls in list(fsspec.registry.values()) if hasattr(fsspec.registry, "values") else []:
        clear = getattr(cls, "clear_instance_cache", None)
        if clear:
            clear()
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:  # pragma: no cover
        pass
