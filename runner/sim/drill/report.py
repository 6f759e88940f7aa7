"""What `runner drill` found: its report, as plain dataclasses with stable JSON field names.

Owns the report's shape only; run.py fills it, runner/cli/terminal.py renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Interruption:
    """One planned interruption and what it did."""

    index: int
    kind: str
    planned_step: int  # where it was aimed (kill-upload: the save it kills)
    happened: bool = False
    at_step: int | None = None  # the step reached when it hit (kill-upload: the step being saved)
    reached_step: int | None = None  # the highest step that instance reached
    emergency_snapshot: str | None = None  # committed on the way out (notice, sigterm)
    emergency_step: int | None = None
    resumed_from: int | None = None  # the step the next instance resumed from
    steps_lost: int | None = None  # steps the next instance had to redo
    exit_code: int | None = None  # of that instance's `runner start` (-9: killed)
    stop_seconds: float | None = None  # from the interruption to the instance's end
    resume_seconds: float | None = None  # from the next instance's start to its first step
    note: str = ""

    def describe(self) -> str:
        """One line for the drill's log."""
        if not self.happened:
            return self.note or f"{self.kind} did not happen (exit {self.exit_code})"
        saved = f"emergency snapshot at step {self.emergency_step}" if self.emergency_step is not None \
            else "no emergency snapshot"  # fmt: skip
        return (f"{self.kind} at step {self.at_step}, runner start exited {self.exit_code}, {saved}; "
                f"the next instance resumes from step {self.resumed_from} ({self.steps_lost} step(s) to redo)")

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "kind": self.kind, "planned_step": self.planned_step, "happened": self.happened,
            "at_step": self.at_step, "reached_step": self.reached_step,
            "emergency_snapshot": self.emergency_snapshot, "emergency_step": self.emergency_step,
            "resumed_from": self.resumed_from, "steps_lost": self.steps_lost, "exit_code": self.exit_code,
            "stop_seconds": _round(self.stop_seconds), "resume_seconds": _round(self.resume_seconds),
            "note": self.note,
        }  # fmt: skip


@dataclass
class ComponentResult:
    """One component file of the two final snapshots."""

    component: str
    reference_sha256: str | None
    interrupted_sha256: str | None
    result: str  # same-bytes | same-values | different | missing | ignored
    detail: str = ""

    @property
    def identical(self) -> bool:
        return self.result in ("same-bytes", "same-values", "ignored")

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "reference_sha256": self.reference_sha256,
                "interrupted_sha256": self.interrupted_sha256, "result": self.result, "detail": self.detail}


@dataclass
class RunResult:
    """One of the two runs."""

    run_id: str
    attempts: int = 0
    seconds: float = 0.0  # wall time of all its instances
    final_snapshot: str | None = None
    final_step: int | None = None
    first_step_seconds: float | None = None  # the reference: a cold start, to compare resume times with

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "attempts": self.attempts, "seconds": _round(self.seconds),
                "final_snapshot": self.final_snapshot, "final_step": self.final_step,
                "first_step_seconds": _round(self.first_step_seconds)}


@dataclass
class DrillReport:
    bucket: str
    command: list[str]
    seed: int
    reference: RunResult
    interrupted: RunResult
    interruptions: list[Interruption] = field(default_factory=list)
    components: list[ComponentResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # anything that makes the drill fail besides a difference
    logs: str | None = None  # where the instances' output was kept (on failure)

    @property
    def identical(self) -> bool:
        return not self.problems and bool(self.components) and all(c.identical for c in self.components)

    @property
    def steps_lost(self) -> int:
        return sum(i.steps_lost or 0 for i in self.interruptions)

    def to_json(self) -> dict[str, Any]:
        return {
            "identical": self.identical, "bucket": self.bucket, "command": self.command, "seed": self.seed,
            "reference": self.reference.to_json(), "interrupted": self.interrupted.to_json(),
            "interruptions": [i.to_json() for i in self.interruptions],
            "interruptions_happened": sum(i.happened for i in self.interruptions),
            "steps_lost": self.steps_lost,
            "components": [c.to_json() for c in self.components],
            "problems": self.problems, "logs": self.logs,
        }  # fmt: skip


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
