"""`ShardedBatchSampler`: one data order for the whole job, split among its ranks, resumable at another world size.

Every test drives one sampler per rank in lockstep, as the ranks of a job
would, and checks what the ranks saw together: each step is the next slice
of the epoch's permutation, and a position saved at one world size and
loaded at another skips and repeats nothing.
"""

from __future__ import annotations

import pytest
import torch

from runner.data import ShardedBatchSampler

SIZE, BATCH = 52, 6  # 8 full batches and a tail of 4 (one sample or more for each of up to 4 ranks)


def job(world_size: int, size: int = SIZE, batch: int = BATCH, **kwargs) -> list[ShardedBatchSampler]:
    """One sampler per rank of a job."""
    return [ShardedBatchSampler(size, batch, rank=rank, world_size=world_size, **kwargs)
            for rank in range(world_size)]


def take(iterators: list, steps: int | None = None) -> list[list[list[int]]]:
    """`steps` steps of every rank (all that is left of the epoch when None): [step][rank] -> indices."""
    out = []
    while steps is None or len(out) < steps:
        shares = [next(it, None) for it in iterators]
        if all(share is None for share in shares):  # every rank's epoch ended (and moved on)
            break
        assert None not in shares, f"the ranks disagree on the number of steps: {shares}"
        out.append(shares)
    return out


def flat(steps: list[list[list[int]]]) -> list[int]:
    return [i for step in steps for share in step for i in share]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_each_step_is_the_next_global_batch_split_into_disjoint_shares(world_size):
    samplers = job(world_size)
    order = samplers[0].order().tolist()
    steps = take([iter(s) for s in samplers])
    assert len(steps) == 9
    for n, shares in enumerate(steps):
        assert [i for share in shares for i in share] == order[n * BATCH:(n + 1) * BATCH]
        assert sum(len(s) for s in shares) == len({i for s in shares for i in s}), "a sample on two ranks"
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_an_epoch_covers_every_index_once(world_size):
    seen = flat(take([iter(s) for s in job(world_size)]))
    assert sorted(seen) == list(range(SIZE))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_drop_last_drops_only_the_short_tail(world_size):
    samplers = job(world_size, drop_last=True)
    order = samplers[0].order().tolist()
    steps = take([iter(s) for s in samplers])
    assert len(steps) == SIZE // BATCH
    assert flat(steps) == order[:SIZE // BATCH * BATCH]
    assert all(sum(len(share) for share in step) == BATCH for step in steps)


def test_the_order_is_the_same_on_every_rank_and_changes_per_epoch():
    samplers = job(3, seed=7)
    first = [s.order() for s in samplers]
    assert all(torch.equal(first[0], o) for o in first[1:])
    assert sorted(first[0].tolist()) == list(range(SIZE)) and first[0].tolist() != list(range(SIZE))

    epoch0 = flat(take([iter(s) for s in samplers]))
    assert [s.epoch for s in samplers] == [1, 1, 1] and [s.consumed for s in samplers] == [0, 0, 0]
    epoch1 = flat(take([iter(s) for s in samplers]))
    assert epoch0 == first[0].tolist()
    assert sorted(epoch1) == list(range(SIZE)) and epoch1 != epoch0
    # The order is a function of (seed, epoch) only: a fresh job at the same seed repeats it.
    assert flat(take([iter(s) for s in job(2, seed=7)])) == epoch0
    assert job(1, seed=8)[0].order().tolist() != epoch0


def test_without_shuffle_the_order_is_the_dataset_order():
    assert flat(take([iter(s) for s in job(3, shuffle=False)])) == list(range(SIZE))


@pytest.mark.parametrize("before, after, epochs, steps", [
    (2, 3, 0, 3),
    (2, 3, 1, 5),  # the epoch is carried too: the second epoch's order goes on
    (3, 1, 0, 4),
    (4, 2, 0, 1),
    (4, 2, 1, 7),
    (1, 4, 0, 8),  # only the tail is left
])
def test_a_position_saved_at_one_world_size_resumes_at_another_without_gaps_or_repeats(before, after, epochs,
                                                                                          steps):
    old = job(before, seed=3)
    iterators = [iter(s) for s in old]
    for _ in range(epochs):
        take(iterators)
        iterators = [iter(s) for s in old]
    seen_before = flat(take(iterators, steps))
    states = [s.state_dict() for s in old]
    assert all(state == states[0] for state in states), "ranks disagree on the position"
    assert states[0]["epoch"] == epochs and states[0]["consumed"] == steps * BATCH

    new = job(after, seed=3)
    for sampler in new:
        sampler.load_state_dict(states[0])
    order = new[0].order().tolist()
    assert seen_before == order[:steps * BATCH]
    seen_after = flat(take([iter(s) for s in new]))
    assert seen_before + seen_after == order
    assert sorted(seen_before + seen_after) == list(range(SIZE))
    # The resumed job goes on into the next epoch like any other.
    assert [s.epoch for s in new] == [epochs + 1] * after
    assert sorted(flat(take([iter(s) for s in new]))) == list(range(SIZE))


@pytest.mark.parametrize("change, words", [
    ({"size": SIZE + 1}, f"{SIZE + 1} samples"),
    ({"seed": 4}, "seed 4"),
])
def test_a_position_from_another_dataset_or_seed_is_refused(change, words):
    saved = job(2, seed=3)[0]
    take([iter(saved)], 2)
    state = dict(saved.state_dict(), **change)
    fresh = job(2, seed=3)[1]
    with pytest.raises(ValueError, match=words):
        fresh.load_state_dict(state)
    assert (fresh.epoch, fresh.consumed) == (0, 0), "a refused state must not move the sampler"


def test_more_ranks_than_the_global_batch_is_refused():
    with pytest.raises(ValueError, match="global_batch_size 4 .* 5 ranks"):
        ShardedBatchSampler(SIZE, 4, rank=0, world_size=5)
    ShardedBatchSampler(SIZE, 4, rank=3, world_size=4)  # one sample each is enough


def test_a_last_batch_too_small_for_every_rank_is_refused_unless_dropped():
    # 17 samples in batches of 8: the tail of 1 would leave 3 of 4 ranks an empty batch (collate and DDP fail).
    with pytest.raises(ValueError, match="1 sample.* 4 ranks.*drop_last=True"):
        ShardedBatchSampler(17, 8, rank=3, world_size=4)
    dropped = ShardedBatchSampler(17, 8, rank=3, world_size=4, drop_last=True)
    assert [len(b) for b in dropped] == [2, 2]
    assert [len(b) for b in ShardedBatchSampler(17, 8, rank=0, world_size=1)] == [8, 8, 1]


@pytest.mark.parametrize("kwargs", [
    dict(size=0, global_batch_size=4, rank=0, world_size=1),
    dict(size=10, global_batch_size=0, rank=0, world_size=1),
    dict(size=10, global_batch_size=4, rank=2, world_size=2),
    dict(size=10, global_batch_size=4, rank=-1, world_size=2),
])
def test_bad_sizes_and_ranks_are_refused(kwargs):
    with pytest.raises(ValueError):
        ShardedBatchSampler(**kwargs)


def test_outside_a_process_group_the_sampler_is_the_only_rank():
    sampler = ShardedBatchSampler(SIZE, BATCH)
    assert (sampler.rank, sampler.world_size) == (0, 1)
    assert next(iter(sampler)) == sampler.order()[:BATCH].tolist()


@pytest.mark.parametrize("drop_last, full", [(False, 9), (True, 8)])
def test_len_counts_the_batches_left_in_the_epoch(drop_last, full):
    samplers = job(2, drop_last=drop_last)
    assert [len(s) for s in samplers] == [full, full]
    iterators = [iter(s) for s in samplers]
    for left in range(full - 1, -1, -1):
        take(iterators, 1)
        assert [len(s) for s in samplers] == [left, left]
    assert take(iterators) == []
    assert [len(s) for s in samplers] == [full, full], "the next epoch starts whole"

    resumed = job(3, drop_last=drop_last)[0]
    resumed.load_state_dict(dict(samplers[0].state_dict(), consumed=4 * BATCH + 1))
    assert len(resumed) == len(list(resumed)) == (4 if drop_last else 5)
