"""Every wait of the supervisor: block on its one event queue until something holds, and hear notices meanwhile.

Owns the supervisor's event queue (notices, SIGCHLD, a lost lease) and the
one way to wait on it.  Why one helper: the supervisor waits in many places
(the run lease held by another instance, an unanswering rendezvous store,
the restart backoff, the child's acknowledgement and exit, the last sync of
--sync-dir), and in every one of them a termination notice must still be
heard: either it ends the wait (nothing runs that could save, so stop now)
or it moves the deadline forward (a stop is already under way).  Written
once, no wait can forget to listen, reap, or put back what it did not use.

Events that a wait does not consume (a rebalance while no child runs, a
lost lease) go back on the queue when the wait ends, so that the main loop
sees them; `holding()` keeps them across several waits, for a caller that
waits in a loop and would otherwise get them straight back.
"""

from __future__ import annotations

import math
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from runner.notices import Notice, NoticeKind
from runner.supervisor.watchers import CHILD_EVENT

Deadline = float | Callable[[], float]  # time.monotonic() seconds, or how to read it (it may move)


def is_termination(event: object) -> bool:
    return isinstance(event, Notice) and event.kind is NoticeKind.TERMINATION


class Events:
    """The supervisor's event queue; `reap` collects the child's exit status (called on SIGCHLD and each wake)."""

    def __init__(self, reap: Callable[[], None]):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.reap = reap
        self._held: list[object] | None = None

    def put(self, event: object) -> None:
        self.queue.put(event)

    def next(self, timeout: float) -> object:
        """The next event, or None after `timeout` seconds; SIGCHLD reaps on the way (and reads as None)."""
        try:
            event = self.queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if event == CHILD_EVENT:
            self.reap()
            return None
        return event

    def wait(self, *, until: Deadline = math.inf, done: Callable[[], bool] | None = None, poll_s: float = math.inf,
             on_notice: Callable[[Notice], bool] | None = None) -> Notice | None:
        """Block until `done()` holds or `until` passes (None then), checking every `poll_s` seconds at most.

        A notice goes to `on_notice`, which returns True to end the wait with
        it; without `on_notice` a termination ends the wait and anything else
        is kept.  Kept events go back on the queue when the wait ends.
        """
        deadline = until if callable(until) else (lambda: until)  # type: ignore[assignment,return-value]
        kept: list[object] = self._held if self._held is not None else []
        try:
            while True:
                self.reap()
                if done is not None and done():
                    return None
                left = deadline() - time.monotonic()
                if left <= 0:
                    return None
                event = self.next(min(left, poll_s))
                if isinstance(event, Notice) and (on_notice(event) if on_notice else is_termination(event)):
                    return event
                if event is not None and not (isinstance(event, Notice) and on_notice):
                    kept.append(event)
        finally:
            if self._held is None:
                self._put_back(kept)

    def sleep(self, seconds: float, on_notice: Callable[[Notice], bool] | None = None) -> Notice | None:
        """`wait` for `seconds` from now."""
        return self.wait(until=time.monotonic() + seconds, poll_s=seconds, on_notice=on_notice)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Keep what the waits inside do not consume until the block ends, then put it back."""
        outer, self._held = self._held, []
        try:
            yield
        finally:
            held, self._held = self._held, outer
            self._put_back(held)

    def termination_pending(self) -> Notice | None:
        """A termination already queued (came while nothing ran), without blocking; other events stay queued."""
        seen: list[object] = []
        try:
            while True:
                try:
                    event = self.queue.get_nowait()
                except queue.Empty:
                    return None
                if is_termination(event):
                    return event  # type: ignore[return-value]
                seen.append(event)
        finally:
            self._put_back(seen)

    def _put_back(self, events: list[object]) -> None:
        for event in events:
            self.queue.put(event)
