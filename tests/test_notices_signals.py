"""Signals become TERMINATION notices: real signals, sent to a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runner.notices import NoticeKind, SignalNotices

REPO_ROOT = Path(__file__).resolve().parents[1]

# The child installs SignalNotices, says "ready", waits for the first notice,
# leaves time for repeats to arrive, then prints every notice it got as JSON.
# It imports runner.notices under a bare `runner` package: runner/__init__.py
# imports torch, seconds of start-up that have nothing to do with signals
# (and this also proves that notices need nothing else from the package).
CHILD = """
import json, sys, time, types
package = types.ModuleType("runner")
package.__path__ = [sys.argv[2]]
sys.modules["runner"] = package
from runner.notices import SignalNotices

signals = SignalNotices(grace_seconds=float(sys.argv[1])).install()
print("ready", flush=True)
first = signals.get(timeout=10)
time.sleep(0.5)
got = ([first] if first else []) + signals.poll()
print(json.dumps([notice.to_dict() for notice in got]), flush=True)
"""


def _notices_after(signals_to_send: list[signal.Signals], grace: float = 30.0) -> tuple[list[dict], float]:
    command = [sys.executable, "-c", CHILD, str(grace), str(REPO_ROOT / "runner")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout.readline().strip() == "ready"
            sent_at = time.time()
            for signum in signals_to_send:
                os.kill(child.pid, signum)
                time.sleep(0.05)
            out, _ = child.communicate(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
    assert child.returncode == 0
    return json.loads(out), sent_at


def test_sigterm_twice_is_one_termination_with_grace_deadline():
    notices, sent_at = _notices_after([signal.SIGTERM, signal.SIGTERM], grace=30.0)
    assert len(notices) == 1
    [notice] = notices
    assert notice["kind"] == NoticeKind.TERMINATION.value
    assert notice["source"] == "signal"
    assert "SIGTERM" in notice["detail"]
    assert notice["deadline"] == pytest.approx(sent_at + 30.0, abs=2.0)


def test_different_signals_are_different_events():
    # In this process, with signals pytest leaves alone: each child costs an
    # interpreter start plus `import runner`.
    chosen = [signal.SIGHUP, signal.SIGUSR2]
    with SignalNotices(grace_seconds=5, signals=chosen) as signals:
        for signum in (signal.SIGHUP, signal.SIGHUP, signal.SIGUSR2):
            os.kill(os.getpid(), signum)
        got = [signals.get(timeout=2), signals.get(timeout=2)]
        got += signals.poll()
    assert [n.detail for n in got if n] == ["received SIGHUP", "received SIGUSR2"]
    assert got[0].id != got[1].id
    assert all(n.kind is NoticeKind.TERMINATION for n in got)


def test_install_outside_the_main_thread_is_refused():
    errors: list[BaseException] = []

    def install() -> None:
        try:
            SignalNotices(grace_seconds=1).install()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert errors and "main thread" in str(errors[0])


def test_uninstall_puts_back_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with SignalNotices(grace_seconds=1) as signals:
        assert signals.installed
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


def test_negative_grace_is_refused():
    with pytest.raises(ValueError):
        SignalNotices(grace_seconds=-1)
