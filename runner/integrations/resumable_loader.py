"""`ResumableDataLoader`: a DataLoader whose position a trainer can save, for an exact mid-epoch resume.

Why it exists: Lightning saves a train loader's position only when the loader
itself has `state_dict()`/`load_state_dict()`; a plain DataLoader restarts its
epoch from the first batch on a mid-epoch resume, so a resumed run trains on
other data than the uninterrupted one.  This one implements that protocol on
runner's `ShardedBatchSampler` (data.py: one seeded permutation per epoch).
It imports only torch; runner.integrations.lightning re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from runner.data import ShardedBatchSampler

__all__ = ["ResumableDataLoader"]


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose position Lightning saves and restores, so a mid-epoch resume is exact.

    The order is runner's `ShardedBatchSampler` (one seeded permutation per
    epoch, no draw from the global RNG); the position is counted in batches
    *delivered* to the loop, not indices handed to workers ahead of it, so it
    holds with `num_workers > 0`.  The workers' base seed depends on (seed,
    epoch) only; a mid-epoch resume restarts the workers' own random streams
    from the epoch's start (random augmentations there are not replayed exactly).
    Other DataLoader keywords pass through.  One process only (rank 0 of 1).
    """

    def __init__(self, dataset: Any, batch_size: int = 1, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, **kwargs: Any):
        sampler = ShardedBatchSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                                      rank=0, world_size=1)
        if "generator" in kwargs:
            raise ValueError("ResumableDataLoader seeds its own generator from seed=; do not pass generator=")
        # Its own generator, reseeded per epoch, makes the worker base seed torch draws at every iter()
        # a function of (seed, epoch): no draw from the global RNG, which runner restores on resume.
        super().__init__(dataset, batch_sampler=sampler, generator=torch.Generator(), **kwargs)
        self._at: tuple[int, int] | None = None  # (epoch, samples delivered) while an epoch is being iterated

    def __len__(self) -> int:
        # A whole epoch, wherever the position is: Lightning counts the batches already done itself.
        sampler = self.batch_sampler
        whole = sampler.size / sampler.global_batch_size
        return math.floor(whole) if sampler.drop_last else math.ceil(whole)

    def __iter__(self) -> Iterator[Any]:
        sampler = self.batch_sampler
        self.generator.manual_seed(sampler.seed * 1_000_003 + sampler.epoch)
        self._at = (sampler.epoch, sampler.consumed)
        return _Delivered(self, super().__iter__())

    def state_dict(self) -> dict[str, Any]:
        saved = self.batch_sampler.state_dict()
        if self._at is not None:
            saved["epoch"], saved["consumed"] = self._at
        return saved

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        sampler = self.batch_sampler
        sampler.load_state_dict(saved)
        if sampler.consumed >= sampler.size:  # saved after the epoch's last batch: the next epoch is next
            sampler.epoch, sampler.consumed = sampler.epoch + 1, 0
        self._at = None


class _Delivered:
    """Iterates a ResumableDataLoader, recording how far the loop has been given batches."""

    def __init__(self, loader: ResumableDataLoader, inner: Iterator[Any]):
        self.loader, self.inner = loader, inner
        self.epoch, self.start = loader._at  # type: ignore[misc]
        self.n = 0

    def __iter__(self) -> "_Delivered":
        return self

    def __next__(self) -> Any:
        try:
            batch = next(self.inner)
        except StopIteration:
            self.loader._at = None  # the sampler itself has moved to the next epoch
            raise
        self.n += 1
        sampler = self.loader.batch_sampler
        self.loader._at = (self.epoch, min(self.start + self.n * sampler.global_batch_size, sampler.size))
        return batch
