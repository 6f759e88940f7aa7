"""What every metadata-service notice source shares: where the service is, how long to wait, one failure log.

Owns the common shape of `Ec2Source`, `AlibabaSource` and `GcpSource`: the
endpoint (the constructor argument, else an environment variable, else the
cloud's fixed address), the per-request timeout and the per-poll budget, a
session token for the services that want one (IMDSv2-style), the failure log
that speaks once per outage, and the tokenless probe of the service's root.
Each source keeps what differs: its paths, its answers, its notices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from runner.notices._http import Endpoint, FailureLog, MetadataError, Response, request
from runner.notices._token import MAX_TOKEN_TTL_S, TokenHeaders, TokenSession


class MetadataService:
    """The base of the HTTP metadata sources; a subclass names its service in its class line.

    `class Ec2Source(MetadataService, label=..., default_endpoint=..., ...)`.
    Raises ValueError from the constructor when the endpoint is not an http(s) URL.
    """

    label = "metadata"  # how the failure log names the service: "<label> at <url>"
    default_endpoint = ""
    endpoint_env = ""  # the variable that moves the endpoint ("" for none)
    root_path = "/"
    token_headers: TokenHeaders | None = None  # None: the service takes no session token

    def __init_subclass__(cls, **service: object) -> None:
        super().__init_subclass__()
        for key, value in service.items():
            if not hasattr(MetadataService, key):
                raise TypeError(f"{cls.__name__}: unknown metadata service setting {key!r}")
            setattr(cls, key, value)

    def __init__(self, endpoint: str | None = None, *, timeout: float = 0.5, poll_budget: float = 1.0,
                 token_ttl: int = MAX_TOKEN_TTL_S, token_retry_s: float = 10.0) -> None:
        self._endpoint = Endpoint.parse(self.resolve_endpoint(endpoint))
        self._timeout = timeout
        self._poll_budget = poll_budget
        if self.token_headers is not None:
            self._session = TokenSession(self._endpoint, self.token_headers, timeout=timeout, token_ttl=token_ttl,
                                         token_retry_s=token_retry_s)
        self._failures = FailureLog(logging.getLogger(type(self).__module__), f"{self.label} at {self._endpoint.url}")

    @classmethod
    def resolve_endpoint(cls, endpoint: str | None) -> str:
        """The constructor argument, else the class's environment variable, else its fixed address."""
        return endpoint or (os.environ.get(cls.endpoint_env) if cls.endpoint_env else None) or cls.default_endpoint

    @property
    def endpoint(self) -> str:
        return self._endpoint.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint={self.endpoint!r})"

    def _get_root(self, headers: Mapping[str, str] | None = None) -> Response | None:
        """One tokenless GET of the service's root; None when nothing answers."""
        try:
            return request(self._endpoint, "GET", self.root_path, headers, timeout=self._timeout)
        except MetadataError:
            return None
