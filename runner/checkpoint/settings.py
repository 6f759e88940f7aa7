"""The Checkpointer's settings: typed, validated once, readable from RUNNER_* variables."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from runner import control
from runner.checkpoint import layout


class CheckpointSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=1)
    run_id: Annotated[str, AfterValidator(layout.check_run_id)] = "default"
    save_every_steps: int = Field(default=100, ge=1)
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
                            ("control_dir", control.ENV_CONTROL_DIR)):
            if env.get(name):
                values[field] = env[name]
        if env.get(control.ENV_STORAGE_OPTIONS):
            values["storage_options"] = json.loads(env[control.ENV_STORAGE_OPTIONS])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
