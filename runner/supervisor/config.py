"""`runner start`'s settings: typed, validated once at the edge (the CLI builds it)."""

from __future__ import annotations

import re
import signal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from runner import control
from runner.checkpoint import layout

_PYTHON = re.compile(r"(.*/)?python[0-9.]*")


def is_python(arg: str) -> bool:
    """True for a Python interpreter: python, python3, python3.11, /usr/bin/python3 ..."""
    return bool(_PYTHON.fullmatch(arg))


class StartConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=1)
    run_id: Annotated[str, AfterValidator(layout.check_run_id)] = "default"
    command: list[str] = Field(min_length=1)
    # A number of steps, or "auto" (the child chooses it: runner/checkpoint/interval.py).
    save_every_steps: Annotated[int | Literal["auto"], BeforeValidator(control.parse_save_every_steps)] = 100
    # With "auto": seconds between interruptions (else the child uses this run's ledger and its prior).
    interruption_mtbf_s: float | None = Field(default=None, gt=0)
    keep_last: int = Field(default=3, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    notice_source: Literal["auto", "ec2", "alibaba", "gcp", "none"] = "auto"
    grace_seconds: float = Field(default=25.0, gt=0)  # for a bare SIGTERM
    max_restarts: int = Field(default=3, ge=0)
    sync_dir: str | None = None
    # Directory-sync mode (syncdir/).  The signal that stops the child after
    # the last sync on a termination notice: SIGTERM, TERM or 15.
    sync_signal: str = "SIGTERM"
    sync_settle_s: float = Field(default=2.0, gt=0)  # unchanged this long = written (torch zips: once complete)
    sync_scan_s: float = Field(default=2.0, gt=0, le=60)  # how often DIR is scanned
    sync_interval_s: float = Field(default=60.0, ge=0)  # at most this often for changes to non-checkpoint files only
    # Where a sync snapshot's training step comes from before the built-in rules (syncdir/files.py): a key inside
    # torch files (`iter_num`, `trainer.global_step`) or a regex over file paths with one group.
    sync_step_from: str | None = None
    imds_endpoint: str | None = None
    poll_interval_s: float = Field(default=2.0, gt=0, le=5)
    # First restart delay; it doubles for each further crash without progress (capped at 60 s).
    restart_backoff_s: float = Field(default=1.0, ge=0)
    # Consecutive crashes without a snapshot past the resume step that count as a crash loop.
    crash_loop_limit: int = Field(default=3, ge=1)
    # How long the run's lease lasts without renewal (renewed every third of it);
    # a replacement instance waits at most this long after a holder vanished.
    lease_ttl_s: float = Field(default=60.0, ge=3)
    # Cost ledger (runner/cost): prices override what the metadata service and AWS say.
    price_per_hour: float | None = Field(default=None, ge=0)
    price_label: str | None = Field(default=None, max_length=120)  # where price_per_hour comes from, for reports
    on_demand_price_per_hour: float | None = Field(default=None, ge=0)
    price_lookup: bool = True  # ask EC2 / the Pricing API on EC2 (else the bundled table only)
    heartbeat_s: float = Field(default=60.0, ge=0.5, le=600)  # ledger heartbeats; a hard kill ends at the last
    cost_log_interval_s: float = Field(default=300.0, ge=1)  # the live "cost so far" line
    # The EC2 Auto Scaling group to scale to zero once the run is finished (scale_down.py).
    scale_down_group: str | None = None
    # torchrun, built by launch.py: ranks per node, nodes ("N" or "MIN:MAX"), the c10d rendezvous endpoint.
    nproc_per_node: int | None = Field(default=None, ge=1)
    nnodes: str | None = Field(default=None, pattern=r"^[1-9][0-9]*(:[1-9][0-9]*)?$")
    rdzv_endpoint: str | None = None

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            from runner.rendezvous import parse_endpoint

            parse_endpoint(value)  # ValueError: "bad rendezvous endpoint ...: expected HOST:PORT"
        return value

    @field_validator("nnodes")
    @classmethod
    def _nnodes(cls, value: str | None) -> str | None:
        low, _, high = (value or "1").partition(":")
        if high and int(low) > int(high):
            raise ValueError(f"--nnodes {value}: MIN is above MAX")
        return value

    @model_validator(mode="after")
    def _torchrun(self) -> "StartConfig":
        if self.max_nodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (where the nodes meet)")
        if self.torchrun and any(part.rsplit("/", 1)[-1] in ("torchrun", "torch.distributed.run")
                                 for part in self.command[:4]):
            raise ValueError("the command is torchrun already: give --nproc-per-node/--nnodes to runner or to "
                             "torchrun, not to both")
        option = self.command[1] if len(self.command) > 1 and is_python(self.command[0]) else ""
        if self.torchrun and option.startswith("-") and option != "-m":
            raise ValueError(f"torchrun starts the script itself, so python's own option {option} cannot be "
                             "passed: give `python SCRIPT ARGS` or `python -m MODULE ARGS` (PYTHONUNBUFFERED=1 "
                             "stands in for -u)")
        if self.torchrun and self.sync_dir is not None:
            raise ValueError("--sync-dir does not go with --nproc-per-node/--nnodes: sharded jobs save through "
                             "runner.Checkpointer")
        return self

    @property
    def torchrun(self) -> bool:
        """True when runner builds a torchrun command (launch.py)."""
        return any(v is not None for v in (self.nproc_per_node, self.nnodes, self.rdzv_endpoint))

    @property
    def max_nodes(self) -> int:
        return int((self.nnodes or "1").rsplit(":", 1)[-1])

    @field_validator("sync_step_from")
    @classmethod
    def _sync_step_from(cls, value: str | None) -> str | None:
        if value is not None:
            from runner.supervisor.syncdir.files import parse_step_rule

            parse_step_rule(value)  # ValueError: what to write instead
        return value

    @field_validator("sync_signal", mode="before")
    @classmethod
    def _sync_signal(cls, value: Any) -> str:
        text = str(value).strip().upper()
        name = text if text.startswith("SIG") else f"SIG{text}"
        try:
            sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[name]
        except (KeyError, ValueError):
            raise ValueError(f"{value!r} is not a signal name or number (e.g. SIGTERM, INT, 15)") from None
        return sig.name

    @property
    def sync_signal_number(self) -> signal.Signals:
        return signal.Signals[self.sync_signal]
