"""The shared notice vocabulary: Notice ids, Deduper, timestamps, the registry by name."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from runner.notices import (
    AlibabaSource,
    Deduper,
    Ec2Source,
    GcpSource,
    Notice,
    NoticeKind,
    NoticeSource,
    NullSource,
    SignalNotices,
    create_source,
    source_names,
)
from runner.notices.base import format_utc_timestamp, parse_utc_timestamp


def _notice(payload: str = "terminate|2026-11-25T14:00:00Z", source: str = "ec2") -> Notice:
    return Notice.create(NoticeKind.TERMINATION, source, payload, 1.0, "detail")


def test_same_payload_gives_same_id_and_equal_notices():
    first, second = _notice(), _notice()
    assert first.id == second.id
    assert first == second  # received_at differs but is not part of equality


def test_different_payload_or_source_gives_different_id():
    assert _notice("terminate|A").id != _notice("terminate|B").id
    assert _notice(source="ec2").id != _notice(source="alibaba").id
    rebalance = Notice.create(NoticeKind.REBALANCE, "ec2", "terminate|2026-11-25T14:00:00Z", None, "d")
    assert rebalance.id != _notice().id


def test_notice_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _notice().deadline = 5.0  # type: ignore[misc]


def test_seconds_left_and_to_dict():
    notice = Notice.create(NoticeKind.TERMINATION, "ec2", "p", 100.0, "d")
    assert notice.seconds_left(now=70.0) == 30.0
    assert Notice.create(NoticeKind.REBALANCE, "ec2", "p", None, "d").seconds_left() is None
    as_dict = notice.to_dict()
    assert as_dict["kind"] == "termination" and as_dict["deadline"] == 100.0 and as_dict["id"] == notice.id


def test_deduper_passes_each_id_once():
    deduper = Deduper()
    polls = [[_notice()], [_notice()], [_notice(), _notice("terminate|later")]]
    passed = [notice for poll in polls for notice in deduper.filter(poll)]
    assert [n.id for n in passed] == [_notice().id, _notice("terminate|later").id]


def test_deduper_memory_is_bounded_oldest_forgotten_first():
    deduper = Deduper(max_ids=2)
    a, b, c = _notice("a"), _notice("b"), _notice("c")
    assert deduper.filter([a, b, c]) == [a, b, c]
    assert deduper.filter([b, c]) == []
    assert deduper.filter([a]) == [a]  # forgotten, so passed again: the safe direction


def test_deduper_is_one_event_across_threads():
    deduper = Deduper()
    passed: list[Notice] = []
    lock = threading.Lock()

    def offer() -> None:
        for _ in range(200):
            got = deduper.filter([_notice()])
            with lock:
                passed.extend(got)

    threads = [threading.Thread(target=offer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(passed) == 1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-25T14:00:00Z", "2026-11-25T14:00:00Z"),
        ("2026-11-25T15:00:00+01:00", "2026-11-25T14:00:00Z"),
        ("2026-11-25T14:00:00", "2026-11-25T14:00:00Z"),  # no offset: UTC, as the clouds document
        (" 2026-11-25T14:00:00Z\n", "2026-11-25T14:00:00Z"),
    ],
)
def test_utc_timestamps_parse(text: str, expected: str):
    assert format_utc_timestamp(parse_utc_timestamp(text)) == expected


@pytest.mark.parametrize("text", ["", "soon", "2026-13-45T99:00:00Z"])
def test_bad_timestamps_raise_value_error(text: str):
    with pytest.raises(ValueError):
        parse_utc_timestamp(text)


@pytest.mark.parametrize(
    "name, kind",
    [("ec2", Ec2Source), ("alibaba", AlibabaSource), ("gcp", GcpSource), ("none", NullSource), (" EC2 ", Ec2Source)],
)
def test_sources_by_name(name: str, kind: type):
    source = create_source(name)
    assert isinstance(source, kind)
    assert isinstance(source, NoticeSource)
    assert source.name == name.strip().lower()


def test_unknown_source_name_says_what_to_choose():
    with pytest.raises(ValueError, match="choose one of: auto, ec2, alibaba, gcp, none"):
        create_source("azure")
    assert source_names() == ("auto", "ec2", "alibaba", "gcp", "none")


def test_null_source_and_signal_helper_speak_the_interface():
    assert NullSource().poll() == [] and NullSource().probe()
    assert isinstance(SignalNotices(grace_seconds=1), NoticeSource)
