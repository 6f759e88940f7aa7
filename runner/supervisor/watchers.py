"""Where the supervisor's events come from: notice sources and signals, fed into one queue.

Owns: choosing the cloud notice source from the settings, polling it in a
thread (first poll at once, then every `poll_interval_s`, duplicates
dropped), turning SIGTERM/SIGINT/SIGHUP into TERMINATION notices with the
configured grace, and waking the main loop on SIGCHLD.

Why one queue: the main loop blocks on `SimpleQueue.get()` and wakes only
when something happened (a notice, a child status, a timeout it chose), so
an idle supervisor uses no CPU.  `SimpleQueue.put()` is reentrant, so a
signal handler may call it (see runner/notices/signals.py).  Helper threads
block the termination signals and SIGCHLD, so the kernel delivers those to
the main thread, where Python runs the handlers.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from typing import Any

from runner.notices import (
    AlibabaSource,
    Deduper,
    Ec2Source,
    GcpSource,
    Notice,
    NoticeSource,
    NullSource,
    SignalNotices,
    detect,
)
from runner.notices.registry import DEFAULT_DETECT_TIMEOUT_S

log = logging.getLogger("runner.supervisor")

CHILD_EVENT = "child"  # SIGCHLD: some child changed state; reap
_MAIN_THREAD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


class NoticeSourceError(ValueError):
    """The configured notice source cannot be built (e.g. a malformed endpoint URL)."""


def plan_source(name: str, imds_endpoint: str | None) -> NoticeSource | list[NoticeSource]:
    """The source for `name`, or for "auto" the candidates to probe; no I/O.

    Raises NoticeSourceError for a bad endpoint or an unknown name.
    """
    per_request = max(0.05, DEFAULT_DETECT_TIMEOUT_S * 0.8)
    try:
        if name == "none":
            return NullSource()
        if name == "ec2":
            return Ec2Source(imds_endpoint)
        if name == "alibaba":
            return AlibabaSource()
        if name == "gcp":
            return GcpSource()
        if name == "auto":
            return [Ec2Source(imds_endpoint, timeout=per_request), AlibabaSource(timeout=per_request),
                    GcpSource(timeout=per_request)]  # fmt: skip
    except ValueError as exc:
        raise NoticeSourceError(f"notice source {name}: {exc}") from None
    raise NoticeSourceError(f"unknown notice source {name!r}; use auto, ec2, alibaba, gcp or none")


def _block_main_thread_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)


class CloudWatcher:
    """Polls a notice source in a daemon thread and puts new notices on `events`."""

    def __init__(self, planned: NoticeSource | list[NoticeSource], interval_s: float, events: queue.SimpleQueue):
        self._planned = planned
        self._interval = interval_s
        self._events = events
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runner-notices", daemon=True)
        self.source: NoticeSource | None = None
        self.polls = 0

    def start(self) -> "CloudWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        _block_main_thread_signals()
        planned = self._planned
        source = detect(DEFAULT_DETECT_TIMEOUT_S, planned) if isinstance(planned, list) else planned
        self.source = source
        if isinstance(source, NullSource):
            log.info("no cloud notice source; only SIGTERM/SIGINT/SIGHUP stop the run")
            return
        where = getattr(source, "endpoint", "")
        log.info("watching %s notices%s every %.1f s", source.name, f" at {where}" if where else "", self._interval)
        check = getattr(source, "check", None)
        if check is not None:
            problem = _quietly(check)
            if problem:
                log.warning("%s", problem)
        dedupe = Deduper()
        while True:
            started = time.monotonic()
            notices: list[Notice] = _quietly(source.poll) or []
            self.polls += 1
            for notice in dedupe.filter(notices):
                self._events.put(notice)
            if self._stop.wait(max(0.05, self._interval - (time.monotonic() - started))):
                return


def _quietly(fn: Any) -> Any:
    """Sources promise not to raise; a bug in one must not take the watcher down."""
    try:
        return fn()
    except Exception:
        log.debug("notice source call failed", exc_info=True)
        return None


class SignalWatcher:
    """SIGTERM/SIGINT/SIGHUP -> TERMINATION notices on `events`; SIGCHLD -> CHILD_EVENT.

    Install and uninstall from the main thread.
    """

    def __init__(self, grace_seconds: float, events: queue.SimpleQueue):
        self._events = events
        self._notices = SignalNotices(grace_seconds)
        self._thread = threading.Thread(target=self._forward, name="runner-signals", daemon=True)
        self._previous_chld: Any = None

    def install(self) -> "SignalWatcher":
        self._notices.install()
        self._previous_chld = signal.signal(signal.SIGCHLD, self._on_sigchld)
        self._thread.start()
        return self

    def uninstall(self) -> None:
        self._notices.uninstall()
        signal.signal(signal.SIGCHLD, self._previous_chld if self._previous_chld is not None else signal.SIG_DFL)
        self._notices.queue.put(None)  # type: ignore[arg-type]  # ends the forwarder
        self._thread.join(timeout=2.0)

    def _on_sigchld(self, signum: int, frame: Any) -> None:
        self._events.put(CHILD_EVENT)  # reentrant; nothing else here

    def _forward(self) -> None:
        _block_main_thread_signals()
        while True:
            notice = self._notices.get()
            if notice is None:
                return
            self._events.put(notice)
