"""Checkpoints: manifest model, key layout, state capture, writer, reader, retention, facade.

Only `state`, `writer` and `checkpointer` import torch; the names below are
resolved lazily so that readers of the bucket (the supervisor, `runner ls`)
do not import it.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Checkpointer": "runner.checkpoint.checkpointer",
    "preemption_requested": "runner.checkpoint.checkpointer",
    "Manifest": "runner.checkpoint.manifest",
    "ManifestError": "runner.checkpoint.manifest",
    "Reason": "runner.checkpoint.manifest",
    "RunReader": "runner.checkpoint.reader",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runner.checkpoint' has no attribute {name!r}")
