"""Notices: "this machine is going away" from every place that can say it.

One `Notice` type and one `NoticeSource` interface (base.py); one module per
source: termination signals (signals.py), EC2 IMDSv2 (ec2.py), Alibaba ECS
(alibaba.py), GCP (gcp.py); sources by name and cloud detection
(registry.py).  The local IMDSv2 simulator for tests, drills and the demo
is runner/sim/imds.py: a tool, not part of the runtime path.
"""

from runner.notices.alibaba import AlibabaSource
from runner.notices.base import (
    RECOMMENDED_POLL_INTERVAL_S,
    Deduper,
    Notice,
    NoticeKind,
    NoticeSource,
    NullSource,
    notice_id,
)
from runner.notices.ec2 import Ec2Source, InstanceFacts
from runner.notices.gcp import GcpSource
from runner.notices.registry import create_source, detect, source_names
from runner.notices.signals import SignalNotices

__all__ = [
    "RECOMMENDED_POLL_INTERVAL_S",
    "AlibabaSource",
    "Deduper",
    "Ec2Source",
    "GcpSource",
    "InstanceFacts",
    "Notice",
    "NoticeKind",
    "NoticeSource",
    "NullSource",
    "SignalNotices",
    "create_source",
    "detect",
    "notice_id",
    "source_names",
]
