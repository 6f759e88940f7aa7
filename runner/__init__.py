"""runner: a spot-instance-aware training runner for PyTorch.

    import runner
    ckpt = runner.Checkpointer.from_env(model=model, optimizer=opt)
    step = ckpt.restore()
"""

__version__ = "0.1.0"

from runner.checkpoint import Checkpointer, Manifest, Reason, preemption_requested  # noqa: E402

__all__ = ["Checkpointer", "Manifest", "Reason", "__version__", "preemption_requested"]
