"""The training process of the kill campaign (benchmarks/chaos.py): small, real, and exactly replayable.

Runs under `runner start` as a plain process or under torchrun (gloo, CPU,
DDP over 2 ranks).  Every step draws from the three RNG streams the
Checkpointer captures (torch, python `random`, numpy), and dropout, so a
resume that restores anything less than the whole state ends on another
trajectory.  What it saw goes to CHAOS_LOG as JSON lines written with one
write() each, so a SIGKILL cannot lose a line that was written:
    restored   step, snapshot id, deep-verify result (None: every byte matches)
    step       rank 0, after each optimizer step
    committed  rank 0, each snapshot the Checkpointer reported committed
    finished   per rank: SHA-256 of parameters, optimizer state and RNG streams
Settings (environment): CHAOS_LOG, CHAOS_STEPS, CHAOS_STEP_SLEEP, CHAOS_BLOB_MB
(a component of that many MiB, so that data files go up as multipart uploads).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import pickle
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import runner


class Blob:
    """A large component whose content is a function of the step: a torn or stale file cannot pass for it."""

    def __init__(self, megabytes: float) -> None:
        self.n = int(megabytes * 2**20 / 4)
        self.step = 0
        self.data = self.expected(0)

    def expected(self, step: int) -> torch.Tensor:
        return torch.arange(self.n, dtype=torch.float32) + step

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "data": self.data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.data = int(state["step"]), state["data"]
        if not torch.equal(self.data, self.expected(self.step)):
            raise ValueError(f"blob of step {self.step} is not that step's content")


def record(**fields: Any) -> None:
    fd = os.open(os.environ["CHAOS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(fields) + "\n").encode())
    finally:
        os.close(fd)


def fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode() + tensor.detach().contiguous().numpy().tobytes())
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    h.update(buf.getvalue())
    h.update(pickle.dumps((random.getstate(), np.random.get_state(legacy=False))))
    h.update(torch.get_rng_state().numpy().tobytes())
    return h.hexdigest()


def build(rank: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    # Each rank its own streams (the Checkpointer saves one RNG file per rank); the model starts equal.
    torch.manual_seed(1234)
    model: nn.Module = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    torch.manual_seed(1234 + rank)
    random.seed(99 + rank)
    np.random.seed(7 + rank)
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    return model, optimizer, scheduler


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    x = torch.randn(8, 4) * (1 + random.random())
    y = torch.randn(8, 2) + float(np.random.rand())
    model.train()
    loss = F.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def train() -> int:
    rank = dist.get_rank() if dist.is_initialized() else 0
    steps = int(os.environ.get("CHAOS_STEPS", "12"))
    pause = float(os.environ.get("CHAOS_STEP_SLEEP", "0.05"))
    model, optimizer, scheduler = build(rank)
    components: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    blob_mb = float(os.environ.get("CHAOS_BLOB_MB", "0"))
    blob = Blob(blob_mb) if blob_mb > 0 else None
    if blob is not None:
        components["blob"] = blob
    ckpt = runner.Checkpointer.from_env(**components)
    step = ckpt.restore()
    restored = ckpt.last_snapshot
    record(event="restored", rank=rank, pid=os.getpid(), step=step, finished=ckpt.finished,
           snapshot=restored.snapshot_id if restored else None,
           verify=ckpt.reader.verify(restored) if restored and rank == 0 else None)
    committed = restored.snapshot_id if restored else None
    while step < steps:
        train_step(model, optimizer, scheduler)
        step += 1
        if blob is not None:
            blob.step, blob.data = step, blob.expected(step)
        if rank == 0:
            record(event="step", step=step)
        stop = ckpt.step(step)
        committed = _report_commit(ckpt, committed, rank)
        if stop:
            ckpt.close()
            return 0
        time.sleep(pause)
    result = ckpt.save(step, final=True)
    _report_commit(ckpt, committed, rank)
    record(event="finished", rank=rank, step=step, snapshot=result.manifest.snapshot_id,
           fingerprint=fingerprint(model.module if dist.is_initialized() else model, optimizer))
    ckpt.close()
    return 0


def _report_commit(ckpt: runner.Checkpointer, seen: str | None, rank: int) -> str | None:
    last = ckpt.last_commit
    if last is not None and last.manifest.snapshot_id != seen and rank == 0:
        record(event="committed", snapshot=last.manifest.snapshot_id, step=last.manifest.step)
        return last.manifest.snapshot_id
    return seen


def main() -> int:
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        return train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
