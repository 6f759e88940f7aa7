"""Training stall per save of the Lightning integration, next to Lightning's own save to local disk.

One live Lightning fit (CPU) of a model whose checkpoint is about `--mb` MB
(Linear(1024, 1024) layers + Adam moments).  At one batch end, on the same
trainer and state, `--repeat` times each (medians printed):
- lightning local: `trainer.save_checkpoint(path)` through Lightning's own
  TorchCheckpointIO to a local file (what a plain Lightning user pays; it blocks);
- runner periodic stall: the callback's due save, which copies the state to
  host memory and returns (the upload runs on the writer thread), and that
  background commit's own time;
- runner emergency: the whole synchronous commit a notice waits for
  (serialize, hash, publish data, manifest), to a local folder and to moto S3.

    .venv/bin/python benchmarks/lightning_bench.py [--mb 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from _moto import MotoS3  # noqa: E402
from runner.checkpoint.manifest import Reason  # noqa: E402
from runner.integrations.lightning import ResumableDataLoader, RunnerCheckpoint  # noqa: E402


class Net(L.LightningModule):
    def __init__(self, layers: int):
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(layers)])

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class Measure(L.Callback):
    """Runs every measurement at the second batch end, on the live trainer."""

    def __init__(self, targets: dict[str, RunnerCheckpoint], repeat: int, folder: str):
        self.targets, self.repeat, self.folder = targets, repeat, folder
        self.rows: list[tuple[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != 2:
            return
        local = self.targets["local"]
        io = trainer.strategy.checkpoint_io
        trainer.strategy.checkpoint_io = L.pytorch.plugins.io.TorchCheckpointIO()  # Lightning's own
        self._time("lightning save_checkpoint to local disk (blocks)",
                   lambda: trainer.save_checkpoint(os.path.join(self.folder, "plain.ckpt"), weights_only=False))
        trainer.strategy.checkpoint_io = io
        size = os.path.getsize(os.path.join(self.folder, "plain.ckpt")) / 2**20
        print(f"checkpoint: {size:.0f} MiB", flush=True)
        for name, ckpt in self.targets.items():
            trainer.strategy.checkpoint_io = ckpt.io
            ckpt._state.trainer = trainer
            stalls, commits = [], []
            for i in range(self.repeat):
                started = time.perf_counter()
                ckpt.checkpointer._save_async(1000 * (i + 1), None, None)  # the callback's due save
                stalls.append(time.perf_counter() - started)
                commits.append(ckpt.checkpointer.wait().write_seconds)
            self.rows.append((f"runner periodic stall ({name})", statistics.median(stalls)))
            self.rows.append((f"  its background commit ({name})", statistics.median(commits)))
            self._time(f"runner emergency save, whole commit ({name})",
                       lambda: ckpt.checkpointer.save(5000, reason=Reason.EMERGENCY))
        trainer.strategy.checkpoint_io = local.io

    def _time(self, label: str, fn) -> None:
        times = []
        for _ in range(self.repeat):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        self.rows.append((label, statistics.median(times)))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=100.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    layers = max(1, round(args.mb * 2**20 / (3 * 4 * 1024 * 1025)))  # weights + two Adam moments, fp32
    with tempfile.TemporaryDirectory() as folder, MotoS3() as s3:
        targets = {"local": RunnerCheckpoint(os.path.join(folder, "bucket"), "bench", keep_last=1),
                   "moto S3": RunnerCheckpoint(f"s3://{s3.new_bucket()}/runs", "bench", keep_last=1)}
        measure = Measure(targets, args.repeat, folder)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, enable_progress_bar=False, logger=False,
                            enable_checkpointing=False, enable_model_summary=False,
                            callbacks=[targets["local"], measure])
        data = TensorDataset(torch.randn(8, 1024))
        trainer.fit(Net(layers), ResumableDataLoader(data, batch_size=2))
        for ckpt in targets.values():
            ckpt.close()
    for label, seconds in measure.rows:
        print(f"{label:<48} {seconds * 1000:9.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
