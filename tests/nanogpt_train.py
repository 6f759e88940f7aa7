"""A nanoGPT-style training script for the directory-sync tests: it knows nothing of runner.

Like nanoGPT's train.py: one `ckpt.pt` in --out_dir, overwritten in place with
`torch.save` every --save_interval iterations (model, optimizer, model_args,
iter_num, best_val_loss, config), and a resume by a flag (--init_from=resume).
No SIGTERM handler: it dies when stopped.

Unlike nanoGPT, each iteration's batch is drawn from a generator seeded by the
iteration number, so a resume from `ckpt.pt` continues bit for bit (nanoGPT
draws from the global RNG, which its checkpoint does not hold).  Every
iteration prints `iter N loss <float.hex()>`, the exact bits of the loss.

--n_embd sets the model's size (and so how long a save takes); --sleep keeps
it preemptible.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F



def say(line: str) -> None:
    """One line in one write: the supervisor's log shares the pipe, and print() writes the newline apart."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


p = argparse.ArgumentParser()
p.add_argument("--out_dir", default="out")
p.add_argument("--init_from", default="scratch", choices=("scratch", "resume"))
p.add_argument("--max_iters", type=int, default=60)
p.add_argument("--save_interval", type=int, default=5)
p.add_argument("--sleep", type=float, default=0.05)
p.add_argument("--n_embd", type=int, default=32)
p.add_argument("--vocab_size", type=int, default=64)
p.add_argument("--block_size", type=int, default=16)
p.add_argument("--batch_size", type=int, default=8)
p.add_argument("--seed", type=int, default=1337)
args = p.parse_args()

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


class TinyLM(nn.Module):
    """Token + position embeddings, one causal self-attention block, a tied head."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.ln1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        x = x + self.mlp(self.ln2(x))
        logits = x @ self.tok.weight.t()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def get_batch(iter_num: int):
    g = torch.Generator().manual_seed(args.seed + iter_num)
    data = torch.randint(args.vocab_size, (args.batch_size, args.block_size + 1), generator=g)
    data = (data.cumsum(1) % args.vocab_size)  # a learnable pattern: next token = running sum
    return data[:, :-1], data[:, 1:]


model_args = dict(vocab_size=args.vocab_size, block_size=args.block_size, n_embd=args.n_embd)
ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
iter_num, best_val_loss = 0, 1e9
torch.manual_seed(args.seed)
model = TinyLM(**model_args)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
if args.init_from == "resume":
    if os.path.exists(ckpt_path):
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        say(f"resuming from {ckpt_path} at iter {iter_num}")
    else:
        say(f"no {ckpt_path}: starting from scratch")
os.makedirs(args.out_dir, exist_ok=True)

while iter_num < args.max_iters:
    x, y = get_batch(iter_num)
    loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    iter_num += 1
    best_val_loss = min(best_val_loss, loss.item())
    say(f"iter {iter_num} loss {loss.item().hex()}")
    if iter_num % args.save_interval == 0:
        checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
                      "iter_num": iter_num, "best_val_loss": best_val_loss, "config": vars(args)}
        torch.save(checkpoint, ckpt_path)  # in place, like nanoGPT
        say(f"saved ckpt.pt at iter {iter_num} at {time.time():.3f}")
    time.sleep(args.sleep)
say("training done")
