"""The Checkpointer's settings: typed, validated once, readable from RUNNER_* variables."""

from __future__ import annotations

import json
import logging
import os
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeFloat, NonNegativeInt,
                      field_validator)

from runner import control
from runner.checkpoint import layout


class CheckpointSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=1)
    run_id: Annotated[str, AfterValidator(layout.check_run_id)] = "default"
    # A number of steps, or "auto": chosen from the measured save cost and the MTBF (checkpoint/interval.py).
    save_every_steps: Annotated[int | Literal["auto"], BeforeValidator(control.parse_save_every_steps)] = 100
    # With "auto": seconds between interruptions, when you know better than the run's ledger and the prior.
    interruption_mtbf_s: float | None = Field(default=None, gt=0)
    # With "auto": (interruptions, seconds of attempts) on the run's ledger, passed by `runner start`.
    observed_interruptions: tuple[NonNegativeInt, NonNegativeFloat] | None = None
    keep_last: int = Field(default=3, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    resume: str = "latest"  # "latest", "none", or a snapshot id
    control_dir: str | None = None
    async_save: bool = True
    strict: bool = True
    # Keep the host copy of the state between saves and copy into it (faster
    # stalls) at the cost of a second copy in host memory.  None: keep it when the
    # state is at most a quarter of physical memory (state.HOST_COPY_RAM_FRACTION).
    keep_host_copy: bool | None = None

    @field_validator("resume")
    @classmethod
    def _resume(cls, value: str) -> str:
        if value not in ("latest", "none") and not layout.valid_snapshot_id(value):
            raise ValueError("use 'latest', 'none' or a snapshot id")
        return value

    @classmethod
    def from_env(cls, **overrides: Any) -> "CheckpointSettings":
        """Settings from what `runner start` passes; keyword overrides win."""
        env = os.environ
        values: dict[str, Any] = {}
        for field, name in (("bucket", control.ENV_BUCKET), ("run_id", control.ENV_RUN_ID),
                            ("save_every_steps", control.ENV_SAVE_EVERY_STEPS),
                            ("keep_last", control.ENV_KEEP_LAST), ("resume", control.ENV_RESUME),
                            ("control_dir", control.ENV_CONTROL_DIR),
                            ("interruption_mtbf_s", control.ENV_INTERRUPTION_MTBF)):
            if env.get(name):
                values[field] = env[name]
        if env.get(control.ENV_STORAGE_OPTIONS):
            values["storage_options"] = json.loads(env[control.ENV_STORAGE_OPTIONS])
        values["observed_interruptions"] = observed_interruptions_from_env()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def observed_interruptions_from_env() -> tuple[int, float] | None:
    """What `runner start` counted on the run's ledger (RUNNER_OBSERVED_INTERRUPTIONS), or None."""
    raw = os.environ.get(control.ENV_OBSERVED_INTERRUPTIONS)
    if not raw:
        return None
    observed = control.decode_interruptions(raw)
    if observed is None:  # it only tunes the interval: say so and go on with the prior
        logging.getLogger("runner.checkpoint").warning(
            'ignoring %s=%r: expected {"interruptions": N, "exposure_s": S}', control.ENV_OBSERVED_INTERRUPTIONS, raw)
    return observed
