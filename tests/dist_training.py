"""A small data-parallel training job for the torchrun tests (CPU, gloo).

Run under torchrun (any world size) or as a plain process.  Settings come
from the environment:
    TOTAL_STEPS      steps to train (default 16); a final snapshot at the end
    MODE             ddp (default) or fsdp (FSDP2 `fully_shard`)
    LOSS_LOG         rank 0 appends "step loss" lines (the job's mean loss)
    PARAMS_OUT       rank 0 writes the full model state here at the end (torch.save)
    NOTICE_AT        at this step, rank 0 alone gets SIGUSR1 (a notice on one machine)
    STEP_SLEEP       seconds to sleep per step (to leave time for a signal)
    KILL_RANK        only this rank keeps RUNNER_FAULT_KILL_AT (SIGKILL of one rank mid-save)
The data is 96 fixed samples; the global batch is 12 (divisible by 1, 2, 3, 4
ranks), so the job's gradient is the same at any world size.
"""

from __future__ import annotations

import datetime
import os
import signal
import time

import torch
import torch.distributed as dist
from torch import nn

import runner
from runner.data import ShardedBatchSampler

SAMPLES, GLOBAL_BATCH = 96, 12


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = (x @ torch.randn(8, 1, generator=g)).tanh() + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    return x, y


def build(mode: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model: nn.Module = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    if dist.is_initialized() and mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main() -> None:
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train() -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if os.environ.get("KILL_RANK", str(rank)) != str(rank):
        os.environ.pop("RUNNER_FAULT_KILL_AT", None)
    total = int(os.environ.get("TOTAL_STEPS", "16"))
    notice_at = int(os.environ.get("NOTICE_AT", "-1"))
    pause = float(os.environ.get("STEP_SLEEP", "0"))
    log_path = os.environ.get("LOSS_LOG")
    x, y = data()
    model, optimizer = build(os.environ.get("MODE", "ddp"))
    sampler = ShardedBatchSampler(SAMPLES, GLOBAL_BATCH, seed=3)
    ckpt = runner.Checkpointer.from_env(model=model, optimizer=optimizer, data=sampler)
    step = ckpt.restore()
    while step < total:
        for batch in sampler:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            step += 1
            job_loss = loss.detach() * len(batch) / GLOBAL_BATCH
            if dist.is_initialized():
                dist.all_reduce(job_loss)
            if rank == 0 and log_path:
                with open(log_path, "a") as f:
                    f.write(f"{step} {job_loss.item():.9f}\n")
            if step == notice_at and rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(pause)
            if ckpt.step(step, epoch=sampler.epoch):
                ckpt.close()
                return
            if step >= total:
                break
    ckpt.save(step, final=True)
    params = full_params(model)
    if rank == 0 and os.environ.get("PARAMS_OUT"):
        torch.save(params, os.environ["PARAMS_OUT"])
    ckpt.close()


if __name__ == "__main__":
    main()
