"""The length-bucketed sampler: determinism, disjoint shards, equal counts, padding waste, resume,
the worst batch first."""

from __future__ import annotations

import random

import pytest

from noesis_accel.training.sampling import ORDER_SHUFFLED, ORDER_WORST_FIRST, LengthBucketBatchSampler

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
    resumed.load_state_dict({"epoch": 0, "position": 10, "seed": 1, "order": ORDER_WORST_FIRST})
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


# ------------------------------------------------------------ the worst batch first

# mega_batch_factor 3 with 8 records per global batch: windows of 24 records, about 40 windows of 1000.
WINDOWED = {"mega_batch_factor": 3}


def padded_tokens(s: LengthBucketBatchSampler, global_batch: list[list[int]]) -> tuple[int, int]:
    """(largest micro-batch, total) padded tokens of a global batch."""
    sizes = [s.micro_batch_padded_tokens(micro) for micro in global_batch]
    return max(sizes), sum(sizes)


def records(plan: list[list[list[int]]]) -> list[list[int]]:
    return [sorted(i for micro in global_batch for i in micro) for global_batch in plan]


def without(plan: list[list[list[int]]], global_batch: list[list[int]]) -> list[list[list[int]]]:
    rest = list(plan)
    rest.remove(global_batch)
    return rest


def test_micro_batch_padded_tokens_is_longest_times_count() -> None:
    s = sampler()
    assert s.micro_batch_padded_tokens([0, 1, 2]) == max(LENGTHS[:3]) * 3
    assert s.micro_batch_padded_tokens([]) == 0


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_first_global_batch_holds_the_largest_micro_batch(seed: int) -> None:
    for epoch in range(3):
        s = sampler(seed=seed, **WINDOWED)
        plan = s.plan(epoch)
        assert len(plan) > 100
        largest = max(s.micro_batch_padded_tokens(m) for g in plan for m in g)
        assert padded_tokens(s, plan[0])[0] == largest
        assert s.largest_micro_batch(epoch) in plan[0]
        assert s.micro_batch_padded_tokens(s.largest_micro_batch(epoch)) == largest
        # Where several global batches share the largest micro-batch, the biggest of them goes first.
        assert padded_tokens(s, plan[0]) == max(padded_tokens(s, g) for g in plan)


def test_first_global_batch_has_the_most_padded_tokens_when_the_keys_agree() -> None:
    """One record is far longer than the rest: its micro-batch and its global batch are both the largest."""
    lengths = [100 + i % 50 for i in range(400)]
    lengths[123] = 5000
    for seed in range(3):
        for epoch in range(2):
            s = LengthBucketBatchSampler(lengths, 4, 2, seed=seed, mega_batch_factor=3)
            plan = s.plan(epoch)
            totals = [padded_tokens(s, g)[1] for g in plan]
            assert totals[0] == max(totals)
            assert 123 in s.largest_micro_batch(epoch) and 123 in records(plan[:1])[0]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_other_global_batches_keep_the_shuffled_order(seed: int) -> None:
    for epoch in range(3):
        worst_first = sampler(seed=seed, **WINDOWED).plan(epoch)
        legacy = sampler(seed=seed, order=ORDER_SHUFFLED, **WINDOWED).plan(epoch)
        assert legacy != worst_first  # the worst batch was not already first: the move is tested
        assert without(legacy, worst_first[0]) == worst_first[1:]


def test_worst_first_does_not_depend_on_world_size() -> None:
    """8 records per global batch as 4 x 2 x 1, 4 x 1 x 2, 2 x 1 x 4 and 2 x 2 x 2 (micro x accumulation x world)."""
    for epoch in range(2):
        one = records(sampler(world=1, accumulation=2, **WINDOWED).plan(epoch))
        assert records(sampler(world=2, accumulation=1, **WINDOWED).plan(epoch)) == one
        micro_two = records(sampler(world=4, micro=2, accumulation=1, **WINDOWED).plan(epoch))
        assert records(sampler(world=2, micro=2, accumulation=2, **WINDOWED).plan(epoch)) == micro_two
        assert records(sampler(world=1, micro=2, accumulation=4, **WINDOWED).plan(epoch)) == micro_two


def test_a_state_without_order_resumes_in_the_old_order() -> None:
    """A checkpoint written before worst-first continues with exactly the data order it began with."""
    legacy = list(sampler(order=ORDER_SHUFFLED))
    resumed = sampler()
    resumed.plan(0)  # a plan cached in worst-first order before the load must not survive it
    resumed.load_state_dict({"epoch": 0, "position": 10, "seed": 1})
    assert resumed.order == ORDER_SHUFFLED
    assert list(resumed) == legacy[10 * 2 :]
    assert resumed.state_dict()["order"] == ORDER_SHUFFLED  # and its next checkpoint says so


def test_a_state_with_order_resumes_worst_first() -> None:
    full = list(sampler())
    resumed = sampler(order=ORDER_SHUFFLED)
    resumed.plan(0)
    resumed.load_state_dict({"epoch": 0, "position": 10, "seed": 1, "order": ORDER_WORST_FIRST})
    assert resumed.order == ORDER_WORST_FIRST
    assert list(resumed) == full[10 * 2 :]


@pytest.mark.parametrize("order", [ORDER_WORST_FIRST, ORDER_SHUFFLED])
def test_state_round_trip_keeps_position_and_order(order: str) -> None:
    saved = sampler(order=order)
    saved.set_epoch(2, 7)
    state = saved.state_dict()
    assert state == {"epoch": 2, "position": 7, "seed": 1, "order": order}
    restored = sampler()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert list(restored) == list(saved)


def test_an_unknown_order_is_refused() -> None:
    with pytest.raises(ValueError, match="sampler order 'longest'"):
        sampler(order="longest")
    with pytest.raises(ValueError, match="sampler order 'longest'"):
        sampler().load_state_dict({"epoch": 0, "position": 0, "seed": 1, "order": "longest"})


def test_token_budget_mode_puts_the_worst_first() -> None:
    kw = {"max_tokens_per_batch": 2048, "accumulation": 1, **WINDOWED}
    for seed in range(3):
        s = sampler(seed=seed, **kw)
        plan = s.plan(0)
        assert padded_tokens(s, plan[0]) == max(padded_tokens(s, g) for g in plan)
        assert s.largest_micro_batch(0) in plan[0]
        assert without(sampler(seed=seed, order=ORDER_SHUFFLED, **kw).plan(0), plan[0]) == plan[1:]
