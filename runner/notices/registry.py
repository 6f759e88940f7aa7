"""Notice sources by name, and `detect()` for ``--notice-source auto``.

Owns: the mapping from the names users type (`ec2`, `alibaba`, `gcp`, `none`,
`auto`) to source objects, and the off-cloud-safe detection of which cloud
this machine is on.

Why detection probes concurrently in daemon threads: off-cloud, each probe is
a connection to a link-local or reserved address that may be refused at once,
time out, or (for ``metadata.google.internal``) stall in a DNS lookup that no
socket timeout covers.  Probing all clouds at once and waiting on a queue with
one overall timeout bounds `detect()` by that timeout whatever the network
does; a probe still stuck afterwards dies with its daemon thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from runner.notices.alibaba import AlibabaSource
from runner.notices.base import NoticeSource, NullSource
from runner.notices.ec2 import Ec2Source
from runner.notices.gcp import GcpSource

logger = logging.getLogger(__name__)

AUTO = "auto"
DEFAULT_DETECT_TIMEOUT_S = 1.0

_FACTORIES: dict[str, Callable[[], NoticeSource]] = {
    "ec2": Ec2Source,
    "alibaba": AlibabaSource,
    "gcp": GcpSource,
    "none": NullSource,
}


def source_names() -> tuple[str, ...]:
    """The names `create_source` accepts, `auto` included."""
    return (AUTO, *_FACTORIES)


def create_source(name: str, *, detect_timeout: float = DEFAULT_DETECT_TIMEOUT_S) -> NoticeSource:
    """The source called `name`; for `auto`, whatever `detect()` finds.

    Endpoints come from each source's environment variable or its default.
    Raises ValueError for an unknown name.
    """
    key = name.strip().lower()
    if key == AUTO:
        return detect(detect_timeout)
    try:
        factory = _FACTORIES[key]
    except KeyError:
        raise ValueError(
            f"unknown notice source {name!r}; choose one of: {', '.join(source_names())}"
        ) from None
    return factory()


def detect(
    timeout: float = DEFAULT_DETECT_TIMEOUT_S, candidates: Sequence[NoticeSource] | None = None
) -> NoticeSource:
    """The first candidate whose `probe()` says yes within `timeout`, else a NullSource.

    `candidates` defaults to EC2, Alibaba and GCP built with a per-request
    timeout that fits in `timeout`.  Never raises, never waits past `timeout`
    (plus scheduling noise).
    """
    if candidates is None:
        candidates = _default_candidates(timeout)
    answers: queue.SimpleQueue[NoticeSource | None] = queue.SimpleQueue()
    for source in candidates:
        threading.Thread(
            target=_probe_into, args=(source, answers), name=f"probe-{source.name}", daemon=True
        ).start()
    end = time.monotonic() + timeout
    for _ in candidates:
        left = end - time.monotonic()
        if left <= 0:
            break
        try:
            found = answers.get(timeout=left)
        except queue.Empty:
            break
        if found is not None:
            logger.info("notice source detected: %s", found.name)
            return found
    logger.info("no cloud metadata service answered within %.1f s; no cloud notices", timeout)
    return NullSource()


def _default_candidates(timeout: float) -> list[NoticeSource]:
    # Each probe is one request, so it may use most of the overall budget.
    per_request = max(0.05, timeout * 0.8)
    return [
        Ec2Source(timeout=per_request),
        AlibabaSource(timeout=per_request),
        GcpSource(timeout=per_request),
    ]


def _probe_into(source: NoticeSource, answers: queue.SimpleQueue[NoticeSource | None]) -> None:
    try:
        found = source.probe()
    except Exception:  # a probe must never take detection down with it
        logger.debug("probe of %s raised", source.name, exc_info=True)
        found = False
    answers.put(source if found else None)
