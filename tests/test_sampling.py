"""The length-bucketed sampler: determinism, disjoint shards, equal counts, padding waste, resume."""

from __future__ import annotations

import random

import pytest

from noesis_accel.training.sampling import LengthBucketBatchSampler

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(10, 500) for _ in range(1000)]


def sampler(
    world: int = 1, rank: int = 0, micro: int = 4, accumulation: int = 2, seed: int = 1, **kw
) -> LengthBucketBatchSampler:
    return LengthBucketBatchSampler(LENGTHS, micro, accumulation, world, rank, seed, **kw)


def test_same_seed_and_epoch_give_the_same_batches() -> None:
    assert list(sampler()) == list(sampler())
    other_epoch = sampler()
    other_epoch.set_epoch(1)
    assert list(other_epoch) != list(sampler())
    assert list(sampler(seed=2)) != list(sampler())


def test_ranks_get_disjoint_shards_and_equal_counts() -> None:
    shards = [list(sampler(world=4, rank=r, accumulation=1)) for r in range(4)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for shard in shards for batch in shard for i in batch]
    assert len(seen) == len(set(seen))
    assert len(seen) >= len(LENGTHS) - 16  # at most one global batch's worth is dropped


def test_global_batches_do_not_depend_on_world_size() -> None:
    """8 = 4 x 2 x 1 and 8 = 4 x 1 x 2: the same samples reach each optimizer step."""
    one = sampler(world=1, accumulation=2).plan(0)
    two = sampler(world=2, accumulation=1).plan(0)
    assert [sorted(i for m in g for i in m) for g in one] == [sorted(i for m in g for i in m) for g in two]
    micro_two = sampler(world=2, micro=2, accumulation=2).plan(0)  # 8 = 2 x 2 x 2
    assert [sorted(i for m in g for i in m) for g in one] == [sorted(i for m in g for i in m) for g in micro_two]


def test_length_bucketing_cuts_padding_waste() -> None:
    bucketed = sampler().padding_fraction()
    rng = random.Random(0)
    order = list(range(len(LENGTHS)))
    rng.shuffle(order)
    padded = real = 0
    for i in range(0, len(order) - 3, 4):
        batch = [LENGTHS[j] for j in order[i : i + 4]]
        padded += max(batch) * 4
        real += sum(batch)
    random_waste = 1 - real / padded
    assert bucketed < 0.05 and random_waste > 0.3


def test_resume_position_skips_consumed_batches() -> None:
    full = list(sampler())
    resumed = sampler()
    resumed.load_state_dict({"epoch": 0, "position": 10, "seed": 1})
    assert list(resumed) == full[10 * 2 :]  # 10 optimizer steps x accumulation 2
    state = resumed.state_dict()
    assert state["position"] == 10 and state["epoch"] == 0
    resumed.advance()
    assert resumed.state_dict()["position"] == 11


def test_token_budget_batches_respect_the_budget() -> None:
    budget = 2048
    s = sampler(max_tokens_per_batch=budget, accumulation=1)
    batches = list(s)
    assert all(max(LENGTHS[i] for i in b) * len(b) <= budget for b in batches)
    assert len({i for b in batches for i in b}) > 0.9 * len(LENGTHS)
    ranks = [list(sampler(world=2, rank=r, max_tokens_per_batch=budget, accumulation=1)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_steps_the_same_number_of_times(world: int) -> None:
    counts = {len(list(sampler(world=world, rank=r, accumulation=2))) for r in range(world)}
    assert len(counts) == 1
