"""EC2 notices through the instance metadata service (IMDSv2), and instance facts.

Owns: the spot `instance-action` notice (a
TERMINATION whose deadline is the time AWS gives), the rebalance
recommendation (a REBALANCE, no deadline), the start-time `check()` that
explains a missing token, and `instance_facts()` for the cost ledger.

The IMDSv2 session token (refreshed before expiry and after a 401) is kept
by `_token.TokenSession`, which Alibaba shares.  `probe()` is tokenless on
purpose; its docstring says why.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from runner.notices._http import Deadline, MetadataError, Response, request
from runner.notices._service import MetadataService
from runner.notices._token import TokenHeaders
from runner.notices.base import (
    RECOMMENDED_POLL_INTERVAL_S,
    Notice,
    NoticeKind,
    parse_utc_timestamp,
)

logger = logging.getLogger(__name__)

METADATA_ROOT_PATH = "/latest/meta-data/"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
FACT_PATHS = {
    "instance_id": "/latest/meta-data/instance-id",
    "instance_type": "/latest/meta-data/instance-type",
    "availability_zone": "/latest/meta-data/placement/availability-zone",
    "region": "/latest/meta-data/placement/region",
    "lifecycle": "/latest/meta-data/instance-life-cycle",
}

# AWS gives two minutes; used only when a notice's own time is unreadable.
SPOT_NOTICE_S = 120.0
POLL_INTERVAL_S = RECOMMENDED_POLL_INTERVAL_S
HOP_LIMIT_HINT = (
    "inside a container this is usually the instance's metadata hop limit of 1: "
    "set HttpPutResponseHopLimit=2 (aws ec2 modify-instance-metadata-options "
    "--instance-id <id> --http-put-response-hop-limit 2)"
)


@dataclass(frozen=True)
class InstanceFacts:
    """What the cost ledger needs to know about the machine; None when unknown."""

    cloud: str
    instance_id: str | None
    instance_type: str | None
    availability_zone: str | None
    region: str | None
    lifecycle: str | None  # "spot" or "on-demand" on EC2


class Ec2Source(MetadataService, label="EC2 metadata", default_endpoint="http://169.254.169.254",
                endpoint_env="AWS_EC2_METADATA_SERVICE_ENDPOINT", root_path=METADATA_ROOT_PATH,
                token_headers=TokenHeaders(ttl="X-aws-ec2-metadata-token-ttl-seconds",
                                           token="X-aws-ec2-metadata-token")):
    """Spot interruption and rebalance notices from EC2's IMDSv2 (the endpoint variable is the AWS SDKs').

    `timeout` bounds each request, `poll_budget` one whole `poll()`.
    """

    name = "ec2"
    poll_interval = POLL_INTERVAL_S

    # -- the NoticeSource interface ------------------------------------------

    def poll(self) -> list[Notice]:
        """Current notices: at most one round of requests, [] on any trouble."""
        deadline = Deadline(self._poll_budget)
        readers: tuple[tuple[str, Callable[[str], Notice]], ...] = (
            (INSTANCE_ACTION_PATH, _instance_action_notice),
            (REBALANCE_PATH, _rebalance_notice),
        )
        notices: list[Notice] = []
        healthy = True
        for path, read in readers:
            try:
                answer = self._session.get(path, deadline)
            except MetadataError as exc:
                # Keep what we have: a termination read before the budget ran out still counts.
                self._failures.failed(str(exc))
                return notices
            notice = self._notice_from(answer, path, read)
            healthy = healthy and answer.status in (200, 404)
            if notice is not None:
                notices.append(notice)
        if healthy:
            self._failures.succeeded()
        return notices

    def probe(self) -> bool:
        """True when an EC2 metadata service answers; one tokenless GET.

        Tokenless on purpose: inside a container with hop limit 1 the token PUT
        hangs, yet this is EC2 and `check()` should tell the user why.  An
        IMDSv2-only service answers 401, an IMDSv1 one 200; GCP's metadata
        server shares the address but marks its answers with Metadata-Flavor.
        """
        answer = self._get_root()
        return answer is not None and _looks_like_ec2(answer)

    # -- start-time check and facts -----------------------------------------

    def check(self) -> str | None:
        """None when notices can be read; otherwise one line saying why not and what to do."""
        try:
            answer = request(self._endpoint, "GET", METADATA_ROOT_PATH, timeout=self._timeout)
        except MetadataError as exc:
            return f"EC2 metadata service at {self.endpoint} is not reachable ({exc}); spot notices will not be seen"
        if not _looks_like_ec2(answer):
            return (
                f"{self.endpoint} answers HTTP {answer.status} but is not an EC2 metadata service; "
                "spot notices will not be seen"
            )
        reason = self._session.fetch(Deadline(self._timeout * 2))
        if reason is None:
            return None
        if answer.status == 200:
            return (
                f"EC2 metadata service at {self.endpoint} gives no IMDSv2 token ({reason}); "
                f"reading notices with IMDSv1 for now; {HOP_LIMIT_HINT}"
            )
        return (
            f"EC2 metadata service at {self.endpoint} answers but gives no IMDSv2 token ({reason}), "
            f"so spot notices cannot be read; {HOP_LIMIT_HINT}"
        )

    def instance_facts(self) -> InstanceFacts:
        """Instance id, type, zone, region and life cycle; fields are None when unknown."""
        deadline = Deadline(self._timeout * (len(FACT_PATHS) + 2))
        values: dict[str, str | None] = {}
        for field_name, path in FACT_PATHS.items():
            values[field_name] = self._read_fact(path, deadline)
        if values["region"] is None and values["availability_zone"]:
            values["region"] = _region_from_zone(values["availability_zone"])
        return InstanceFacts(cloud="ec2", **values)

    # -- helpers ------------------------------------------------------------

    def _notice_from(self, answer: Response, path: str, read: Callable[[str], Notice]) -> Notice | None:
        """404 is the normal "nothing yet"; 200 is a notice; anything else is logged."""
        if answer.status == 404:
            return None
        if answer.status != 200:
            self._failures.failed(f"GET {path} answered HTTP {answer.status}")
            return None
        try:
            return read(answer.body)
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("unreadable EC2 notice at %s (%s): %r", path, exc, answer.body[:200])
            return None

    def _read_fact(self, path: str, deadline: Deadline) -> str | None:
        try:
            answer = self._session.get(path, deadline)
        except MetadataError as exc:
            logger.debug("EC2 fact %s unavailable: %s", path, exc)
            return None
        value = answer.body.strip()
        return value if answer.status == 200 and value else None


def _looks_like_ec2(answer: Response) -> bool:
    return answer.status in (200, 401) and answer.header("Metadata-Flavor") is None


def _instance_action_notice(body: str) -> Notice:
    """`{"action": "terminate", "time": "..."}` -> TERMINATION with that deadline."""
    payload = json.loads(body)
    action = str(payload["action"])
    when = str(payload.get("time", ""))
    try:
        deadline = parse_utc_timestamp(when)
        detail = f"EC2 spot interruption: {action} at {when}"
    except ValueError:
        # A termination without a readable time is still a termination; assume
        # AWS's two minutes rather than treating it as "no rush".
        deadline = time.time() + SPOT_NOTICE_S
        detail = f"EC2 spot interruption: {action} (time {when!r} unreadable, assuming {SPOT_NOTICE_S:.0f} s)"
    return Notice.create(NoticeKind.TERMINATION, "ec2", f"{action}|{when}", deadline, detail)


def _rebalance_notice(body: str) -> Notice:
    """`{"noticeTime": "..."}` -> REBALANCE (no deadline: the instance is not yet reclaimed)."""
    payload = json.loads(body)
    when = str(payload["noticeTime"])
    detail = f"EC2 rebalance recommendation at {when}"
    return Notice.create(NoticeKind.REBALANCE, "ec2", when, None, detail)


_ZONE_RE = re.compile(r"^([a-z]{2}(?:-[a-z]+)+-\d+)[a-z]$")


def _region_from_zone(zone: str) -> str | None:
    """``us-east-1a`` -> ``us-east-1``; None for forms this cannot undo (local zones)."""
    match = _ZONE_RE.match(zone)
    return match.group(1) if match else None
