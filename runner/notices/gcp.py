"""GCP notices: the Spot / preemptible VM's ``preempted`` metadata flag.

Owns: reading ``/computeMetadata/v1/instance/preempted`` (header
``Metadata-Flavor: Google``), which says ``FALSE`` until Compute Engine starts
preempting the VM and ``TRUE`` from then on.  GCP gives no time with it, only
its documented 30 s of grace, so the deadline is counted from the first poll
that saw ``TRUE``; later polls repeat that same deadline (and id) instead of
moving it forward.

Endpoint: the constructor argument, else ``$GCE_METADATA_HOST`` (host[:port],
as google-auth reads it), else ``metadata.google.internal``.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from runner.notices._http import Deadline, MetadataError, request
from runner.notices._service import MetadataService
from runner.notices.base import Notice, NoticeKind

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://metadata.google.internal"
HOST_ENV = "GCE_METADATA_HOST"
FLAVOR_HEADERS = {"Metadata-Flavor": "Google"}
METADATA_ROOT_PATH = "/computeMetadata/v1/"
PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
GRACE_S = 30.0
# 30 s of notice leaves little room: poll twice as often as on EC2.
POLL_INTERVAL_S = 1.0


def resolve_endpoint(endpoint: str | None) -> str:
    """The constructor argument, else http://$GCE_METADATA_HOST, else metadata.google.internal."""
    if endpoint:
        return endpoint
    host = os.environ.get(HOST_ENV)
    return f"http://{host}" if host else DEFAULT_ENDPOINT


class GcpSource(MetadataService, label="GCE metadata", root_path=METADATA_ROOT_PATH):
    """Preemption notices from the GCE metadata server (its endpoint: the module note)."""

    name = "gcp"
    poll_interval = POLL_INTERVAL_S

    def __init__(self, endpoint: str | None = None, *, timeout: float = 0.5, poll_budget: float = 1.0) -> None:
        super().__init__(endpoint, timeout=timeout, poll_budget=poll_budget)
        self._first_seen: float | None = None  # epoch time of the first TRUE
        self._lock = threading.Lock()

    @classmethod
    def resolve_endpoint(cls, endpoint: str | None) -> str:
        return resolve_endpoint(endpoint)

    def poll(self) -> list[Notice]:
        """A TERMINATION once the VM is being preempted; [] otherwise or on any trouble."""
        deadline = Deadline(self._poll_budget)
        try:
            answer = request(
                self._endpoint, "GET", PREEMPTED_PATH, FLAVOR_HEADERS, deadline.timeout(self._timeout)
            )
        except MetadataError as exc:
            self._failures.failed(str(exc))
            return []
        if answer.status != 200:
            self._failures.failed(f"GET {PREEMPTED_PATH} answered HTTP {answer.status}")
            return []
        self._failures.succeeded()
        if answer.body.strip().upper() != "TRUE":
            with self._lock:
                self._first_seen = None  # a later TRUE is a new preemption
            return []
        return [self._preemption_notice()]

    def probe(self) -> bool:
        """True when a GCE metadata server answers, marked with its Metadata-Flavor header."""
        answer = self._get_root(FLAVOR_HEADERS)
        return answer is not None and answer.status == 200 and answer.header("Metadata-Flavor") == "Google"

    def _preemption_notice(self) -> Notice:
        with self._lock:
            if self._first_seen is None:
                self._first_seen = time.time()
            first_seen = self._first_seen
        detail = f"GCP preemption: the VM is being preempted, {GRACE_S:.0f} s of grace"
        # The payload includes when we first saw TRUE so every poll repeats one id.
        payload = f"TRUE|{first_seen:.3f}"
        return Notice.create(NoticeKind.TERMINATION, "gcp", payload, first_seen + GRACE_S, detail)
