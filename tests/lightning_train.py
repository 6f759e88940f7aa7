"""A small Lightning training script for the integration tests: CPU, synthetic data, no downloads.

Prints `step N loss <float.hex()>` for every optimizer step (bitwise comparable),
and at the end `stopped at step N` or `finished at step N` and `params <sha256>`
of the final parameters.  Dropout (RNG), Adam (moments), a step-wise LR
schedule and a shuffled, mid-epoch-resumable loader make an inexact resume show.
Bad settings print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from runner.errors import ConfigError
from runner.integrations.lightning import ResumableDataLoader, RunnerCheckpoint
from runner.storage import StorageError


class Net(L.LightningModule):
    def __init__(self, sleep: float = 0.0):
        super().__init__()
        self.save_hyperparameters()  # an AttributeDict in the checkpoint: a non-tensor object to load safely
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        print(f"step {self.global_step + 1} loss {loss.item().hex()}", flush=True)
        time.sleep(self.hparams.sleep)  # keeps the run preemptible mid-way
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sleep", type=float, default=0.05)
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        ckpt = RunnerCheckpoint.from_env()
        path = ckpt.resume_path()
    except (ConfigError, StorageError, ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    L.seed_everything(0, verbose=False)
    model = Net(args.sleep)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(76, 8, generator=g)  # 10 batches of 8 per epoch, the last one of 4
    data = TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))
    loader = ResumableDataLoader(data, batch_size=8, shuffle=True, seed=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, enable_progress_bar=False,
                        logger=False, deterministic=True, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[ckpt])
    print(f"resume from {ckpt.resumed_from.step if ckpt.resumed_from else 0}", flush=True)
    trainer.fit(model, loader, ckpt_path=path)
    ckpt.close()
    print(f"{'stopped' if ckpt.preempted else 'finished'} at step {trainer.global_step}", flush=True)
    digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.parameters())).hexdigest()
    print(f"params {digest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
