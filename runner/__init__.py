"""runner: a spot-instance-aware training runner for PyTorch.

    import runner
    ckpt = runner.Checkpointer.from_env(model=model, optimizer=opt)
    step = ckpt.restore()

The library's names are imported lazily, so that `runner start` and the other
tools that never touch tensors do not pay for importing torch.

Where everything lives, and who imports whom: docs/architecture.md.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Checkpointer": "runner.checkpoint.checkpointer",
    "preemption_requested": "runner.checkpoint.checkpointer",
    "Manifest": "runner.checkpoint.manifest",
    "Reason": "runner.checkpoint.manifest",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
