"""Helpers for tests that start real subprocesses of this checkout."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

PYTHON = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child python process running this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


class RendezvousStore:
    """`python -m runner rendezvous` on a free loopback port, started as the on-demand instance starts it."""

    def __init__(self, entry: tuple[str, ...] = ("-m", "runner", "rendezvous")) -> None:
        import pytest

        self.proc = subprocess.Popen([PYTHON, *entry, "--port", "0", "--host", "127.0.0.1"],
                                     env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", lines[0] if lines else "")
        if not match:
            self.stop()
            pytest.fail(f"no ready line from the store: {lines} {self.proc.stderr.read()}")
        self.endpoint = f"127.0.0.1:{match.group(1)}"

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Stop it with `signum`; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
