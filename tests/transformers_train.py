"""A Hugging Face Trainer script as a user writes it, with runner's callback (tests/test_integration_transformers.py).

A 2-layer GPT-2 built from a config (no downloads) on a synthetic dataset,
on CPU.  For the tests it prints, per optimizer step, `loss <step> <float.hex>`
(the exact loss, not the Trainer's rounded log), and at the end the
callback's save timings and a SHA-256 of the final parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import runner
from runner.integrations.transformers import RunnerCallback


class Recording(Trainer):
    """Prints each step's exact loss; sleeps a little per step to stay preemptible."""

    pause_s = 0.0

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        print(f"loss {self.state.global_step + 1} {loss.item().hex()}", flush=True)
        time.sleep(self.pause_s)
        return loss


def dataset(n: int = 96, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (length,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--output-dir", default="out")
    p.add_argument("--save-total-limit", type=int, default=0)
    p.add_argument("--n-embd", type=int, default=32)  # larger models for timing saves
    p.add_argument("--n-layer", type=int, default=2)
    a = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GPT2LMHeadModel(GPT2Config(n_layer=a.n_layer, n_head=2, n_embd=a.n_embd, vocab_size=64,
                                                n_positions=32))
    args = TrainingArguments(
        output_dir=a.output_dir, max_steps=a.steps, per_device_train_batch_size=8, learning_rate=3e-3,
        warmup_steps=3, save_strategy="steps", save_steps=a.save_steps, save_total_limit=a.save_total_limit or None,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    callback = RunnerCallback.from_env()
    trainer = Recording(model=model, args=args, train_dataset=dataset(), callbacks=[callback])
    Recording.pause_s = a.sleep
    resume = callback.restore(args.output_dir)
    print(f"child: resume from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    callback.close()
    print(f"child: saves {json.dumps(callback.commits)}", flush=True)
    if runner.preemption_requested():
        print(f"child: stopped at step {trainer.state.global_step}", flush=True)
        return 0
    print(f"child: finished params {digest(model)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
