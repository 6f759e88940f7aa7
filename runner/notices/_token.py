"""The session-token dance that EC2 IMDSv2 and Alibaba's hardened mode share.

Both services hand out a token for a PUT to /latest/api/token carrying a TTL
header and want it back on every GET in another header; only the header names
differ.  This module owns that token: when to fetch it, when to refresh it,
and what to do on a 401.

Design (after aws-node-termination-handler's `pkg/ec2metadata`, whose issue
#229 was a missed refresh that left it deaf to notices): the token is
refreshed *before* it expires, with a margin, and *again* whenever the service
answers 401 (it restarted, or its clock and ours disagree), retrying the GET
once.  When no token can be had the GET still goes out without one, because a
service that allows the tokenless mode (IMDSv1, Alibaba's normal mode) answers
it; a failed PUT is not tried on every poll (each try can cost a full timeout,
e.g. a hop limit of 1 inside a container) unless a 401 proves the service is
up and wants a token.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from runner.notices._http import Deadline, Endpoint, MetadataError, Response, request

logger = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
MAX_TOKEN_TTL_S = 21600  # the most either service accepts (6 h)


@dataclass(frozen=True)
class TokenHeaders:
    """The two header names one service uses."""

    ttl: str  # sent with the PUT: how long the token should live
    token: str  # sent with each GET: the token itself


class TokenSession:
    """GETs against a token-protected metadata service; thread-safe.

    `timeout` bounds each request.  Raises ValueError from the constructor for
    a TTL the services would refuse.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        headers: TokenHeaders,
        *,
        timeout: float,
        token_ttl: int = MAX_TOKEN_TTL_S,
        token_retry_s: float = 10.0,
    ) -> None:
        if not 1 <= token_ttl <= MAX_TOKEN_TTL_S:
            raise ValueError(f"token_ttl must be 1..{MAX_TOKEN_TTL_S} seconds, got {token_ttl}")
        self._endpoint = endpoint
        self._headers = headers
        self._timeout = timeout
        self._token_ttl = token_ttl
        self._token_retry_s = token_retry_s
        self._token: str | None = None
        self._refresh_at = 0.0  # monotonic time after which the token is fetched anew
        self._retry_at = 0.0  # monotonic time before which a failed PUT is not retried
        self._lock = threading.Lock()

    def get(self, path: str, deadline: Deadline) -> Response:
        """GET `path` with the token; after a 401, fetch a fresh token and retry once.

        Raises MetadataError when the service gives no HTTP answer in time.
        """
        token, fetched_now = self._current(deadline, force=False)
        answer = self._send(path, token, deadline)
        # Retry unless the token we sent is brand new: a service that refuses a
        # fresh token will refuse the next one too.  No token at all (the PUT
        # failed or is backing off) is worth one more PUT: the 401 proves the
        # service is up and wants one.
        if answer.status == 401 and not (token is not None and fetched_now):
            logger.info("%s answered 401 to %s; fetching a new token", self._endpoint.url, path)
            token, _ = self._current(deadline, force=True)
            if token is not None:
                answer = self._send(path, token, deadline)
        return answer

    def fetch(self, deadline: Deadline) -> str | None:
        """Fetch a new token now; returns why that failed, or None on success."""
        with self._lock:
            return self._fetch(deadline)

    def _send(self, path: str, token: str | None, deadline: Deadline) -> Response:
        headers = {self._headers.token: token} if token else {}
        return request(self._endpoint, "GET", path, headers, deadline.timeout(self._timeout))

    def _current(self, deadline: Deadline, *, force: bool) -> tuple[str | None, bool]:
        """(token or None, whether a PUT was tried just now).  Never raises."""
        with self._lock:
            now = time.monotonic()
            if not force and self._token is not None and now < self._refresh_at:
                return self._token, False
            if not force and now < self._retry_at:
                return None, False
            reason = self._fetch(deadline)
            if reason is not None:
                logger.debug("no metadata token from %s: %s", self._endpoint.url, reason)
            return self._token, True

    def _fetch(self, deadline: Deadline) -> str | None:
        """PUT for a token (caller holds the lock); returns why it failed, or None."""
        self._token = None
        try:
            answer = request(
                self._endpoint,
                "PUT",
                TOKEN_PATH,
                {self._headers.ttl: str(self._token_ttl)},
                deadline.timeout(self._timeout),
            )
        except MetadataError as exc:
            self._retry_at = time.monotonic() + self._token_retry_s
            return str(exc)
        if answer.status != 200 or not answer.body.strip():
            self._retry_at = time.monotonic() + self._token_retry_s
            return f"PUT {TOKEN_PATH} answered HTTP {answer.status}"
        self._token = answer.body.strip()
        self._refresh_at = time.monotonic() + self._refresh_after(answer)
        self._retry_at = 0.0
        return None

    def _refresh_after(self, answer: Response) -> float:
        """Seconds until the token should be replaced: its TTL less a safety margin.

        The margin (a quarter of the TTL, at most 60 s) covers clock skew and
        the time a request spends in flight, so a token never expires between
        our check and the server's.  The server's echoed TTL wins if shorter.
        """
        ttl = float(self._token_ttl)
        echoed = answer.header(self._headers.ttl)
        if echoed is not None and echoed.strip().isdigit():
            ttl = min(ttl, float(echoed))
        return ttl - min(60.0, ttl / 4)
