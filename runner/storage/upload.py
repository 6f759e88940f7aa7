"""Streaming uploads: an object written as it is produced, published whole or not at all.

Why stream: a snapshot's data used to be serialized into a spool file in the
temp folder and then uploaded from it, so every byte was written to local
disk, read back and sent, and the upload of a component could not start
before its serialization had ended.  On S3, `S3Upload` takes the bytes as
`torch.save` writes them, cuts them into parts of `PART_SIZE` and sends each
full part as an UploadPart while serialization goes on.  What is left to do
when the serializer finishes is the last part or parts in flight and one
CompleteMultipartUpload.

How: each part is a coroutine on s3fs's event loop thread (`fs.loop`, where
every s3fs request of the store runs), handed over from the writing thread
with `asyncio.run_coroutine_threadsafe`; the writing thread waits only when
`PARTS_IN_FLIGHT` parts of its store are out (back-pressure: memory stays
within that many parts plus the one being filled by each open upload, and
`PartPool` reuses the buffers of parts sent while any upload is open).  The
requests go through the store's own s3fs client, made from the session that
carries our `needs-retry` handler (store.py), so a request is retried as any
other of the store's, with the RetryPolicy's private jitter; a part that
still fails with a transient error is sent again with the same policy, as
`Store._call` retries a whole operation (its bytes are still in memory).

Whole or nothing: nothing is visible before `commit()`, which completes the
multipart upload, or, for an object no larger than one part, sends it as one
PutObject.  Any failure (a part, the complete, an exception in the code
writing into the upload) aborts the multipart upload once every part in
flight has settled (a part that lands after an abort would hold storage
again).  A process killed mid-stream leaves an incomplete multipart upload,
which no listing shows and `Store.abort_stale_uploads` (or a bucket lifecycle
rule) removes later.

A lost reply to CompleteMultipartUpload: the store completed the upload, the
reply never came, the retry is answered NoSuchUpload (S3 may instead answer
it with the object for a while, as moto does: that is a plain success).  The
object at the key
is then looked at (one HEAD): when its size is ours and its ETag is the
multipart ETag of our parts (S3's: the MD5 of the parts' binary MD5s, which
their UploadPart replies gave as their ETags, then "-N"), the complete was
ours and the upload succeeded.  Why that is safe: the key lies under a fresh
snapshot id (step, time to the microsecond, random suffix), written by this
upload alone; NoSuchUpload means completed or aborted, and an aborted upload
leaves no object at a key that nobody else writes.  The ETag guards against
the unforeseen (a store that reuses keys); on a store whose ETags do not have
that form the size decides, and the log says so.  The manifest's SHA-256 is
still checked on every restore.

Other stores (local folders, memory://, gs://, ossfs): `SpoolUpload` writes
into the store's spool file (`Store.spool_path`), published by
`Store.write_file` on commit: on a local store the spool is the key's
`.tmp-` sibling, fsynced and renamed, so the bytes are written once.
"""

from __future__ import annotations

import abc

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
import re
import threading
from typing import TYPE_CHECKING, Any

from runner.storage.errors import StorageError, is_transient, translate

if TYPE_CHECKING:
    from runner.storage.store import RetryPolicy, Store

log = logging.getLogger(__name__)

# Bytes per UploadPart: the part size of the store's other multipart writes (`_UPLOAD_CHUNK`).
PART_SIZE = 16 * 2**20
# UploadParts in flight at once per store (all its open uploads together), 8 x 16 MiB.
PARTS_IN_FLIGHT = 8
_MD5_ETAG = re.compile(r"^[0-9a-fA-F]{32}$")


class Upload(abc.ABC):
    """A write-only file object whose bytes become one object at commit.

    `write` as a file's; `finish()` once every byte is written (nothing is
    visible yet); `commit()` publishes the object whole (it calls `finish`
    first if needed) and aborts on failure; `abort()` makes sure nothing is
    published and frees what the upload holds (a no-op once committed).
    As a context manager: commit on a normal exit, abort on an exception.
    Raises StorageError from `write`, `finish` and `commit`.
    """

    size = 0

    @abc.abstractmethod
    def write(self, data: Any) -> int: ...

    def flush(self) -> None:
        """torch.save flushes its target; the bytes are already handed over."""

    @abc.abstractmethod
    def finish(self) -> None: ...

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> "Upload":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.commit()


class SpoolUpload(Upload):
    """Into the store's spool file; `Store.write_file` publishes it on commit."""

    def __init__(self, store: "Store", key: str):
        self.store, self.key = store, key
        self.path = store.spool_path(key)
        self._file: Any = open(self.path, "wb")
        self._done = False

    def write(self, data: Any) -> int:
        n = self._file.write(data)
        self.size += n
        return n

    def finish(self) -> None:
        if not self._file.closed:
            self._file.close()

    def commit(self) -> None:
        try:
            self.finish()
            self.store.write_file(self.key, self.path)
            self._done = True
        finally:
            self.store.discard_spool(self.path)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        if not self._done:
            self.store.discard_spool(self.path)


class PartPool:
    """What a store's streaming uploads share: at most `count` parts in flight, and part buffers.

    A buffer whose part is sent is kept for the next part while any upload is
    open: filling memory already touched costs about a tenth of filling fresh
    memory (page faults, zeroing) on a busy machine.  When the last open upload
    ends, the kept buffers are let go, so nothing is held between saves.
    """

    def __init__(self, count: int = PARTS_IN_FLIGHT, size: int = PART_SIZE):
        self.count, self.size = count, size
        self._slots = threading.BoundedSemaphore(count)
        self._lock = threading.Lock()
        self._free: list[bytearray] = []
        self._open = 0

    def acquire(self, timeout: float) -> bool:
        return self._slots.acquire(timeout=timeout)

    def release(self) -> None:
        self._slots.release()

    def opened(self) -> None:
        with self._lock:
            self._open += 1

    def closed(self) -> None:
        with self._lock:
            self._open -= 1
            if self._open == 0:
                self._free.clear()

    def buffer(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(self.size)

    def give_back(self, buffer: bytearray) -> None:
        with self._lock:
            if self._open and len(buffer) == self.size and len(self._free) <= self.count:
                self._free.append(buffer)


class S3Upload(Upload):
    """Parts sent while the object is written; see the module note."""

    def __init__(self, fs: Any, path: str, url: str, key: str, policy: "RetryPolicy", pool: PartPool):
        self._fs, self._path, self._url, self._key = fs, path, url, key
        self._bucket, self._object, _ = fs.split_path(path)
        self._policy, self._pool, self._part_size = policy, pool, pool.size
        self._buffer = bytearray()  # the part being filled: grows as written until the first part is out
        self._fill = 0
        self._created: concurrent.futures.Future[str] | None = None  # the multipart upload's id
        self._parts: list[concurrent.futures.Future[str]] = []  # each part's ETag, in part order
        self._error: BaseException | None = None  # the first failure of a request in flight
        self._body: bytearray | None = None  # an object of one part at most: sent whole at commit
        self._state = "open"  # open -> finished -> committed, or aborted
        pool.opened()

    # -- the writing thread ----------------------------------------------------

    def write(self, data: Any) -> int:
        if self._state != "open":
            raise ValueError(f"write to a {self._state} upload of {self._key}")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        total, pos = len(view), 0
        while pos < total:
            if self._fill == self._part_size:  # more bytes follow a full part: it is not the last one
                self._send_part(last=False)
            take = min(self._part_size - self._fill, total - pos)
            end = self._fill + take
            if len(self._buffer) >= end:  # a whole part's buffer (the pool's)
                self._buffer[self._fill:end] = view[pos:pos + take]
            else:  # the first part: a small object never holds a whole part's memory
                self._buffer += view[pos:pos + take]
            self._fill, pos = end, pos + take
        self.size += total
        return total

    def finish(self) -> None:
        """Every byte is written: send the last part (nothing is visible until commit)."""
        if self._state != "open":
            return
        if self._created is None:
            self._body = self._buffer
            del self._body[self._fill:]
        else:
            self._send_part(last=True)
        self._buffer, self._fill = bytearray(), 0
        self._state = "finished"

    def _send_part(self, last: bool) -> None:
        self._raise_failure()
        while not self._pool.acquire(timeout=0.5):  # back-pressure; a failed part ends the wait
            self._raise_failure()
        body = self._buffer
        del body[self._fill:]  # a short last part (the pool keeps whole buffers only)
        self._buffer, self._fill = (bytearray() if last else self._pool.buffer()), 0
        if self._created is None:
            self._created = self._submit(self._create())
        future = self._submit(self._upload_part(len(self._parts) + 1, body))
        future.add_done_callback(functools.partial(self._part_done, body))
        self._parts.append(future)

    def _part_done(self, body: bytearray, future: concurrent.futures.Future[str]) -> None:
        self._pool.release()
        self._pool.give_back(body)
        if not future.cancelled() and future.exception() is not None and self._error is None:
            self._error = future.exception()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise translate(self._error, self._url, self._key)

    # -- publishing ------------------------------------------------------------

    def commit(self) -> None:
        if self._state == "committed":
            return
        try:
            self.finish()
            if self._created is None:
                self._run(self._retrying("put_object", Bucket=self._bucket, Key=self._object, Body=self._body))
            else:
                self._complete()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, StorageError) or not isinstance(exc, Exception):
                raise
            raise translate(exc, self._url, self._key) from exc
        self._state, self._body = "committed", None
        self._pool.closed()
        self._fs.invalidate_cache(self._path)

    def _complete(self) -> None:
        etags = [future.result() for future in self._parts]  # the first failed part raises
        upload_id = self._created.result()  # type: ignore[union-attr]
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]
        try:
            self._run(self._retrying("complete_multipart_upload", Bucket=self._bucket, Key=self._object,
                                     UploadId=upload_id, MultipartUpload={"Parts": parts}))
        except FileNotFoundError as exc:  # NoSuchUpload: completed by a try whose reply was lost, or aborted
            if not self._completed_as(etags):
                raise StorageError(
                    f"the multipart upload of {self._url}/{self._key} was aborted before it completed (by "
                    "abort_stale_uploads or a lifecycle rule?); nothing was written") from exc
            log.info("the reply to completing %s was lost, but the object is ours: written", self._key)

    def _completed_as(self, etags: list[str]) -> bool:
        """True when the object now at the key is the one our parts make (see the module note)."""
        try:
            head = self._run(self._retrying("head_object", Bucket=self._bucket, Key=self._object))
        except FileNotFoundError:
            return False
        if int(head.get("ContentLength", -1)) != self.size:
            return False
        found = str(head.get("ETag", "")).strip('"')
        expected = multipart_etag(etags)
        if expected is None or "-" not in found:
            log.info("%s: the store's ETags are not MD5-based (%s); its size is ours", self._key, found)
            return True
        return found == expected

    def abort(self) -> None:
        if self._state in ("committed", "aborted"):
            return
        self._state, self._body, self._buffer = "aborted", None, bytearray()
        try:
            # Every part in flight settles first (not cancelled: one whose body is out could still land after the abort).
            concurrent.futures.wait(self._parts)
            upload_id = self._created.result() if self._created is not None else None
        except Exception:  # never created: nothing to abort
            upload_id = None
        finally:
            self._pool.closed()
        if upload_id is None:
            return
        try:
            self._run(self._retrying("abort_multipart_upload", Bucket=self._bucket, Key=self._object,
                                     UploadId=upload_id))
        except FileNotFoundError:
            pass  # already gone
        except Exception as exc:  # invisible either way; abort_stale_uploads or a lifecycle rule sweeps it
            log.warning("could not abort the multipart upload of %s (%s); it stays invisible",
                        self._key, translate(exc, self._url, self._key))

    # -- on the event loop -----------------------------------------------------

    def _submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._fs.loop)

    def _run(self, coro: Any) -> Any:
        return self._submit(coro).result()

    async def _create(self) -> str:
        out = await self._retrying("create_multipart_upload", Bucket=self._bucket, Key=self._object)
        return out["UploadId"]

    async def _upload_part(self, number: int, body: bytearray) -> str:
        upload_id = await asyncio.wrap_future(self._created)  # type: ignore[arg-type]
        out = await self._retrying("upload_part", Bucket=self._bucket, Key=self._object, UploadId=upload_id,
                                   PartNumber=number, Body=body)
        return out["ETag"]

    async def _retrying(self, method: str, **kwargs: Any) -> Any:
        """One request through s3fs, sent again after a transient failure with the store's RetryPolicy."""
        attempts = self._policy.attempts
        for attempt in range(attempts):
            try:
                return await self._fs._call_s3(method, **kwargs)
            except Exception as exc:
                if attempt + 1 < attempts and is_transient(exc):
                    delay = self._policy.delay(attempt)
                    log.debug("transient storage error on %s %s (%s); retrying in %.2fs", method, self._key, exc, delay)
                    await asyncio.sleep(delay)
                    continue
                raise
        raise AssertionError("unreachable")  # the loop always returns or raises


def multipart_etag(etags: list[str]) -> str | None:
    """S3's ETag of a multipart object from its parts' ETags (MD5 of their binary MD5s, "-N"); None if not MD5s."""
    digests = [etag.strip('"') for etag in etags]
    if not digests or not all(_MD5_ETAG.match(d) for d in digests):
        return None
    return f"{hashlib.md5(b''.join(bytes.fromhex(d) for d in digests)).hexdigest()}-{len(digests)}"


__all__ = ["PART_SIZE", "PARTS_IN_FLIGHT", "PartPool", "S3Upload", "SpoolUpload", "StorageError", "Upload", "multipart_etag"]
