"""Checkpoints: manifest model, key layout, state capture, writer, reader, retention, facade."""

from runner.checkpoint.checkpointer import Checkpointer, preemption_requested
from runner.checkpoint.manifest import Manifest, ManifestError, Reason
from runner.checkpoint.reader import RunReader

__all__ = ["Checkpointer", "Manifest", "ManifestError", "Reason", "RunReader", "preemption_requested"]
