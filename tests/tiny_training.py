"""A tiny but real training workload for the checkpoint tests, and the processes they start.

`build()` makes a small model (Linear + Dropout), Adam, StepLR, a disabled
GradScaler and a user-defined stateful object; `train_step()` is one real
optimizer step on CPU that draws from every RNG stream the Checkpointer
captures (torch for data and dropout, python `random`, numpy).

The functions below `# -- processes` are what the subprocess tests run: as
`python -m tiny_training MODE ...` (a fresh interpreter), or as the target
of a forkserver child (a fresh process forked from a server that has already
imported torch, so that dozens of kill -9 runs stay fast).  Each writes what
it saw as JSON lines, so that a process killed with SIGKILL still leaves its
record behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch._dynamo  # noqa: F401  building an optimizer imports it (~3 s); once, before a forkserver forks
from torch import nn
from torch.nn import functional as F


class Counter:
    """A user object with state_dict()/load_state_dict() (the data position, say)."""

    def __init__(self) -> None:
        self.samples_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples_seen = int(state["samples_seen"])


class Marker:
    """A component whose content is a known function of the step it was saved at.

    A restored Marker proves the data files came from the snapshot of that
    step, whole: `check(step)` is False for anything torn, mixed or stale.
    """

    SIZE = 16_384

    def __init__(self) -> None:
        self.step = 0
        self.blob = self.expected(0)

    @classmethod
    def expected(cls, step: int) -> torch.Tensor:
        return torch.randn(cls.SIZE, generator=torch.Generator().manual_seed(step))

    def advance(self, step: int) -> None:
        self.step, self.blob = step, self.expected(step)

    def check(self, step: int) -> bool:
        return self.step == step and torch.equal(self.blob, self.expected(step))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "blob": self.blob}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.blob = int(state["step"]), state["blob"]


@dataclass
class Parts:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    counter: Counter

    def components(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler, "counter": self.counter}


def build(seed: int = 0, hidden: int = 8, width: int = 4) -> Parts:
    """A fresh model and its training state; seeds all three global RNG streams (a fresh run is reproducible)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # AMP off, as on CPU; still registered
    return Parts(model, optimizer, scheduler, scaler, Counter())


def train_step(parts: Parts, batch: int = 16) -> float:
    """One real step; consumes the torch, python and numpy RNG streams."""
    width = parts.model[0].in_features
    x = torch.randn(batch, width) * (1 + random.random())
    y = torch.randn(batch, 2) + float(np.random.rand())
    parts.model.train()
    loss = F.mse_loss(parts.model(x), y)
    parts.optimizer.zero_grad()
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.scheduler.step()
    parts.counter.samples_seen += batch
    return float(loss.detach())


def digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(parts: Parts) -> dict[str, str]:
    """SHA-256 of the parameters, the optimizer state and the three global RNG streams, as they are now."""
    import io
    import pickle

    optimizer = io.BytesIO()
    torch.save(parts.optimizer.state_dict(), optimizer)
    rng = pickle.dumps((random.getstate(), np.random.get_state(legacy=False))) + torch.get_rng_state().numpy().tobytes()
    return {"params": digest(parts.model), "optimizer": hashlib.sha256(optimizer.getvalue()).hexdigest(),
            "rng": hashlib.sha256(rng).hexdigest()}


# -- processes -----------------------------------------------------------------


def _record(path: str, **fields: Any) -> None:
    """Append one JSON line; a plain write() reaches the kernel, so SIGKILL cannot lose it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(fields) + "\n").encode())
    finally:
        os.close(fd)


def _enter(env: dict[str, str] | None, cwd: str | None) -> None:
    """A forked child's fresh start: its own environment, folder and caches."""
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    if cwd:
        os.chdir(cwd)
    torch.set_num_threads(1)
    from runner.storage import clear_caches

    clear_caches()


def train(bucket: str, run_id: str, steps: int, save_every: int, log: str, *, step_sleep: float = 0.0,
          env: dict[str, str] | None = None, cwd: str | None = None, async_save: bool = True) -> int:
    """Restore, record what was restored, train to `steps` saving every `save_every`, save final.

    Stops early (exit 0) when the Checkpointer says so (a stop request).
    """
    _enter(env, cwd)
    import runner

    parts = build(seed=1234)
    began = time.perf_counter()  # `seconds`: the Checkpointer's start and restore (runner's part of start-up)
    ckpt = runner.Checkpointer(bucket, run_id, save_every_steps=save_every, keep_last=3,
                               async_save=async_save, **parts.components())
    step = ckpt.restore()
    restored = ckpt.last_snapshot
    _record(log, event="restored", step=step, pid=os.getpid(), digest=digest(parts.model),
            seconds=time.perf_counter() - began,
            snapshot=restored.snapshot_id if restored else None, finished=ckpt.finished,
            verify=ckpt.reader.verify(restored) if restored else None)
    while step < steps:
        train_step(parts)
        step += 1
        _record(log, event="step", step=step, digest=digest(parts.model))
        if ckpt.step(step):
            last = ckpt.last_snapshot
            _record(log, event="stopped", step=step, snapshot=last.snapshot_id if last else None,
                    reason=last.reason.value if last else None)
            ckpt.close()
            return 0
        time.sleep(step_sleep)
    done = fingerprint(parts)  # before the final save: it must not move anything
    result = ckpt.save(step, final=True)
    _record(log, event="finished", step=step, snapshot=result.manifest.snapshot_id, digest=digest(parts.model),
            fingerprint=done, after_save=fingerprint(parts))
    ckpt.close()
    return 0


def restore_only(bucket: str, run_id: str, log: str, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
    """A fresh start that only restores and records what it got (step, model digest, deep verify)."""
    _enter(env, cwd)
    import runner

    parts = build(seed=4321)
    with runner.Checkpointer(bucket, run_id, **parts.components()) as ckpt:
        step = ckpt.restore()
        restored = ckpt.last_snapshot
        _record(log, event="restored", step=step, pid=os.getpid(), digest=digest(parts.model),
                snapshot=restored.snapshot_id if restored else None,
                verify=ckpt.reader.verify(restored) if restored else None)


def save_forever(bucket: str, run_id: str, log: str, env: dict[str, str], cwd: str, async_save: bool) -> None:
    """Restore, check what came back, then save at every step until killed.

    Records: `restored` (step, deep-verify result, whether the Marker and the
    extras belong to that step), `started` before each save begins and
    `committed` once a save is known to be committed.
    """
    _enter(env, cwd)
    import runner

    parts, marker = build(seed=7), Marker()
    extra: dict[str, Any] = {}
    ckpt = runner.Checkpointer(bucket, run_id, save_every_steps=1, keep_last=2, async_save=async_save,
                               extra=extra, marker=marker, **parts.components())
    step = ckpt.restore()
    restored = ckpt.last_snapshot
    _record(log, event="restored", step=step, pid=os.getpid(),
            snapshot=restored.snapshot_id if restored else None,
            verify=ckpt.reader.verify(restored) if restored else None,
            marker_ok=marker.check(step), extra_ok=extra.get("step", 0) == step)
    committed = step
    while True:
        train_step(parts)
        step += 1
        marker.advance(step)
        extra["step"] = step
        _record(log, event="started", step=step)
        ckpt.step(step)
        last = ckpt.last_commit  # async: step() waited for the previous save before starting this one
        if last is not None and last.manifest.step != committed:
            committed = last.manifest.step
            _record(log, event="committed", step=committed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tiny_training")
    p.add_argument("mode", choices=["train"])
    p.add_argument("--bucket", required=True)
    p.add_argument("--run-id", default="tiny")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--log", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    return train(args.bucket, args.run_id, args.steps, args.save_every, args.log, step_sleep=args.step_sleep)


if __name__ == "__main__":
    sys.exit(main())
