"""Helpers for tests that start real subprocesses of this checkout."""

from __future__ import annotations

import os
import sys

PYTHON = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child python process running this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env
