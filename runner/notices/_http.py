"""The tiny HTTP client that the metadata sources share, and its failure log.

Why `http.client` and not `requests` or `urllib.request`: a metadata service
is one plain-HTTP host on a link-local address, so no new dependency is worth
it; and `urllib.request` honours `HTTP_PROXY`, which would send requests for
169.254.169.254 to a corporate proxy, follows redirects, and raises on every
non-2xx status, when here a 404 is the normal "no notice" answer.

Every request runs under a `Deadline` so that one `poll()` (a token PUT plus
two GETs, plus one retry after a 401) never takes longer than its budget, even
against a server that accepts connections and then stalls.
"""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

# Metadata answers are a few hundred bytes; never let a broken or hostile
# endpoint make us buffer more than this.
MAX_BODY_BYTES = 64 * 1024


class MetadataError(OSError):
    """A metadata request got no HTTP answer: refused, timed out, reset, garbled."""


@dataclass(frozen=True)
class Endpoint:
    """Where a metadata service listens, parsed once from its URL."""

    scheme: str
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Parse ``http://host[:port][/prefix]``; raises ValueError for anything else."""
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"metadata endpoint must be an http(s) URL with a host, got {url!r}")
        default_port = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, parts.port or default_port, parts.path.rstrip("/"))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if self.scheme == "https" else 80
        port = "" if self.port == default_port else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.base_path}"


@dataclass(frozen=True)
class Response:
    """An HTTP answer, whatever its status."""

    status: int
    body: str
    headers: Mapping[str, str]

    def header(self, name: str) -> str | None:
        """A response header, case-insensitively."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


class Deadline:
    """A time budget shared by the requests of one operation."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def timeout(self, per_request: float) -> float:
        """The timeout for the next request; raises MetadataError when none is left."""
        left = self.remaining()
        if left <= 0:
            raise MetadataError("time budget for this metadata poll is spent")
        return min(per_request, left)


def request(
    endpoint: Endpoint,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    timeout: float = 0.5,
) -> Response:
    """Send one request and return its answer, any status included.

    Raises MetadataError when there is no HTTP answer (connection refused,
    timeout, reset, unparsable reply), never for an HTTP status.
    """
    conn_class = http.client.HTTPSConnection if endpoint.scheme == "https" else http.client.HTTPConnection
    conn = conn_class(endpoint.host, endpoint.port, timeout=timeout)
    try:
        # A PUT with no body still needs Content-Length: 0, or some servers
        # (and IMDS) wait for a body that never comes.
        body = b"" if method in ("PUT", "POST") else None
        conn.request(method, endpoint.base_path + path, body=body, headers=dict(headers or {}))
        answer = conn.getresponse()
        payload = answer.read(MAX_BODY_BYTES)
        return Response(answer.status, payload.decode("utf-8", "replace"), dict(answer.getheaders()))
    except (OSError, http.client.HTTPException) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        raise MetadataError(f"{method} {endpoint.url}{path}: {reason}") from exc
    finally:
        conn.close()


class FailureLog:
    """Logs a failing endpoint once per outage instead of on every poll.

    A source polled every 2 s off-cloud, or during a metadata outage, would
    otherwise write tens of thousands of identical warnings a day.
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._failing = False

    def failed(self, reason: str) -> None:
        if self._failing:
            self._logger.debug("%s still failing: %s", self._what, reason)
        else:
            self._logger.warning("%s failed, will keep polling: %s", self._what, reason)
        self._failing = True

    def succeeded(self) -> None:
        if self._failing:
            self._logger.info("%s answers again", self._what)
        self._failing = False
