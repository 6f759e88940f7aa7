"""`ShardedBatchSampler`: a job's data order that survives a resume at another world size.

Why not torch's DistributedSampler: it deals indices round-robin by rank, so
its position is "batch k of rank r", which means nothing once the job comes
back with 3 ranks instead of 2; and it pads or drops to make ranks even, so
samples are seen twice or never.  Here the order is one permutation per
epoch for the whole job; every step takes the next `global_batch_size`
indices and splits them among the ranks.  The state is how many samples of
this epoch the whole job has consumed, the same number on every rank and
meaningful at any world size: a job saved by 2 ranks at sample 48 resumes on
3 ranks at sample 48, and no sample of the epoch is skipped or repeated.

With a fixed global batch split evenly, the job's gradient (DDP averages the
ranks' means) is the same at every world size, up to floating-point order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class ShardedBatchSampler:
    """This rank's batches of dataset indices (use as a DataLoader's `batch_sampler`).

    Iterating yields the rest of the current epoch, then moves to the next
    epoch.  The position advances as batches are handed out, so save after the
    step that used them.  `rank`/`world_size` default to the process group's.
    """

    def __init__(self, size: int, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, rank: int | None = None, world_size: int | None = None):
        if size < 1 or global_batch_size < 1:
            raise ValueError("size and global_batch_size must be at least 1")
        self.size, self.global_batch_size = size, global_batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        if self.world_size > global_batch_size:
            raise ValueError(f"global_batch_size {global_batch_size} leaves some of {self.world_size} ranks nothing")
        tail = size % global_batch_size
        if tail and not drop_last and tail < self.world_size:
            # An empty batch breaks DataLoader's collate and DDP's backward on that rank.
            raise ValueError(f"the epoch's last batch has {tail} sample(s) for {self.world_size} ranks, so some "
                             f"would get none: pass drop_last=True, or a global batch size that leaves a larger tail")
        self.epoch = 0
        self.consumed = 0  # samples of this epoch the whole job has used

    def order(self) -> torch.Tensor:
        """This epoch's permutation of the dataset, the same on every rank."""
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        while self.consumed < self.size:
            chunk = order[self.consumed: self.consumed + self.global_batch_size]
            if self.drop_last and len(chunk) < self.global_batch_size:
                break
            # Shares differ by at most one sample when the last batch does not split evenly.
            share = torch.tensor_split(chunk, self.world_size)[self.rank]
            self.consumed += len(chunk)
            yield share.tolist()
        self.epoch += 1
        self.consumed = 0

    def __len__(self) -> int:
        """Batches left in this epoch (the same on every rank)."""
        left = self.size - self.consumed
        full, rest = divmod(left, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["size"]) != self.size or int(state["seed"]) != self.seed:
            raise ValueError(f"data position was saved for {state['size']} samples with seed {state['seed']}, "
                             f"this sampler has {self.size} with seed {self.seed}")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    joined = dist.is_available() and dist.is_initialized()
    world = world_size if world_size is not None else (dist.get_world_size() if joined else 1)
    me = rank if rank is not None else (dist.get_rank() if joined else 0)
    if not 0 <= me < world:
        raise ValueError(f"rank {me} is not in a world of {world}")
    return me, world
