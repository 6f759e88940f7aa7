"""Termination signals (SIGTERM, SIGINT, SIGHUP) as TERMINATION notices.

Owns: installing handlers for the signals a container runtime, a terminal or
an orchestrator uses to say "stop", turning each into a `Notice` whose
deadline is "now + the grace the caller was given" (e.g. Docker's stop
timeout), and delivering it to a thread-safe queue that the supervisor reads.

Why a `queue.SimpleQueue`: a Python signal handler runs in the main thread,
between two bytecodes of whatever that thread was doing, possibly inside a
`queue.Queue` or `threading.Event` method that holds their (non-reentrant)
lock, which would deadlock.  `SimpleQueue.put()` is implemented in C and is
documented as reentrant, so it is safe to call from a handler.  The handler
does nothing else that takes a lock (no logging); `poll()` logs instead.

The same signal twice (a runtime that repeats SIGTERM, a user pressing
Ctrl-C again) is one event: it has one id and is queued once.  A different
signal is a separate event.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from runner.notices.base import Notice, NoticeKind, notice_id

logger = logging.getLogger(__name__)

SOURCE_NAME = "signal"


def default_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGINT and, where the platform has it, SIGHUP."""
    names = ("SIGTERM", "SIGINT", "SIGHUP")
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


class SignalNotices:
    """Signals in, TERMINATION notices out.  Also usable as a `NoticeSource`.

    Use from the main thread::

        with SignalNotices(grace_seconds=110) as signals:
            ...
            for notice in signals.poll(): ...     # or signals.get(timeout=1.0)

    `grace_seconds` must be >= 0 (ValueError otherwise).
    """

    name = SOURCE_NAME

    def __init__(
        self,
        grace_seconds: float,
        signals: Iterable[signal.Signals] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {grace_seconds}")
        self._grace = grace_seconds
        self._signals = tuple(signals) if signals is not None else default_signals()
        self._clock = clock
        self._queue: queue.SimpleQueue[Notice] = queue.SimpleQueue()
        self._seen: set[int] = set()
        self._previous: dict[int, Any] = {}

    @property
    def queue(self) -> queue.SimpleQueue[Notice]:
        """Where notices arrive; safe to read from any thread."""
        return self._queue

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> SignalNotices:
        """Install the handlers, remembering the previous ones.

        Raises RuntimeError when called from a thread other than the main one
        (Python delivers signals to the main thread only) or twice.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("SignalNotices.install() must be called from the main thread")
        if self._previous:
            raise RuntimeError("SignalNotices is already installed")
        for signum in self._signals:
            self._previous[int(signum)] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before `install()`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> SignalNotices:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def poll(self) -> list[Notice]:
        """The notices queued since the last call; never blocks."""
        notices: list[Notice] = []
        while True:
            try:
                notices.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for notice in notices:
            logger.info("%s; deadline in %.0f s", notice.detail, notice.seconds_left() or 0.0)
        return notices

    def get(self, timeout: float | None = None) -> Notice | None:
        """Wait for the next notice, up to `timeout` seconds; None if none came."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def probe(self) -> bool:
        return True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The handler: runs in the main thread; must not take any lock."""
        if signum in self._seen:
            return
        self._seen.add(signum)
        name = signal.Signals(signum).name
        notice = Notice(
            kind=NoticeKind.TERMINATION,
            source=SOURCE_NAME,
            deadline=self._clock() + self._grace,
            detail=f"received {name}",
            id=notice_id(SOURCE_NAME, NoticeKind.TERMINATION, name),
        )
        self._queue.put(notice)
