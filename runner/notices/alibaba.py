"""Alibaba Cloud notices: the preemptible ECS instance's termination time.

Owns: reading ``instance/spot/termination-time`` from the ECS metadata service
at 100.100.100.200 in its security-hardened mode (a session token from
``PUT /latest/api/token`` with ``X-aliyun-ecs-metadata-token-ttl-seconds``,
sent back as ``X-aliyun-ecs-metadata-token``).  Alibaba documents the item as
404 while the instance is safe and, once it is to be reclaimed, a UTC time
such as ``2026-11-25T14:00:00Z``; an empty answer also means "safe".  Alibaba
gives about five minutes between that notice and the release.

The endpoint, timeouts and token handling are shared with EC2
(`_service.MetadataService`, `_token.TokenSession`); when hardened
mode is not enforced and no token can be had, the tokenless GET still works.
"""

from __future__ import annotations

import logging

from runner.notices._http import Deadline, MetadataError
from runner.notices._service import MetadataService
from runner.notices._token import TokenHeaders
from runner.notices.base import RECOMMENDED_POLL_INTERVAL_S, Notice, NoticeKind, parse_utc_timestamp

logger = logging.getLogger(__name__)

TERMINATION_TIME_PATH = "/latest/meta-data/instance/spot/termination-time"
POLL_INTERVAL_S = RECOMMENDED_POLL_INTERVAL_S


# Alibaba has no standard variable for the endpoint: RUNNER_ALIBABA_METADATA_ENDPOINT is ours, for tests.
class AlibabaSource(MetadataService, label="Alibaba ECS metadata", default_endpoint="http://100.100.100.200",
                    endpoint_env="RUNNER_ALIBABA_METADATA_ENDPOINT", root_path="/latest/meta-data/",
                    token_headers=TokenHeaders(ttl="X-aliyun-ecs-metadata-token-ttl-seconds",
                                               token="X-aliyun-ecs-metadata-token")):
    """Preemptible-instance termination notices from Alibaba ECS metadata."""

    name = "alibaba"
    poll_interval = POLL_INTERVAL_S

    def poll(self) -> list[Notice]:
        """The termination notice if there is one; [] otherwise or on any trouble."""
        try:
            answer = self._session.get(TERMINATION_TIME_PATH, Deadline(self._poll_budget))
        except MetadataError as exc:
            self._failures.failed(str(exc))
            return []
        if answer.status not in (200, 404):
            self._failures.failed(f"GET {TERMINATION_TIME_PATH} answered HTTP {answer.status}")
            return []
        self._failures.succeeded()
        if answer.status == 404:
            return []
        notice = _termination_notice(answer.body.strip())
        return [notice] if notice is not None else []

    def probe(self) -> bool:
        """True when an ECS metadata service answers (one tokenless GET).

        200 is normal mode; hardened mode refuses a tokenless GET with 401 or
        403, which still proves the service is there.
        """
        answer = self._get_root()
        return answer is not None and answer.status in (200, 401, 403) and answer.header("Metadata-Flavor") is None


def _termination_notice(when: str) -> Notice | None:
    """A TERMINATION for a time; None for an empty or non-time answer (both mean "safe")."""
    if not when:
        return None
    try:
        deadline = parse_utc_timestamp(when)
    except ValueError:
        logger.warning("Alibaba termination-time is not a time, ignoring: %r", when[:200])
        return None
    detail = f"Alibaba preemptible instance to be released at {when}"
    return Notice.create(NoticeKind.TERMINATION, "alibaba", when, deadline, detail)
