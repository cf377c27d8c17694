"""The length-bucketed, seeded, distributed, resumable batch sampler.

One epoch's plan is a list of *global batches*; each global batch is `accumulation x world`
micro-batches of similar length. Micro-batch `j` of a global batch goes to rank `j % world`,
accumulation slot `j // world`. The plan depends only on (seed, epoch, lengths, global batch),
never on the world size, so a run resumed on another process count draws the same samples, and
the position is a count of global batches: skipping consumed batches is an index, O(1).
The epoch's worst global batch for memory goes first, so an out-of-memory error comes at the first
optimizer step or not at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

ORDER_WORST_FIRST = "worst_first"
"""The shuffled global batches with the one holding the largest micro-batch moved to the front."""
ORDER_SHUFFLED = "shuffled"
"""The shuffled global batches as they come: the order of checkpoints written before worst-first."""
ORDERS = (ORDER_WORST_FIRST, ORDER_SHUFFLED)


class LengthBucketBatchSampler:
    """Yields this rank's micro-batches (lists of dataset indices), resumable mid-epoch.

    Args:
        lengths: token count of every record.
        micro_batch_size: records per micro-batch (fixed-count mode).
        accumulation: micro-batches per rank per optimizer step.
        world_size, rank: the process layout.
        seed: with the epoch, fixes the whole order.
        mega_batch_factor: records are sorted by length within windows of this many global batches,
            so batches are length-homogeneous yet the order stays random.
        max_tokens_per_batch: if set, micro-batches are filled up to this many padded tokens instead
            of `micro_batch_size` records.
        order: `ORDER_WORST_FIRST` (the epoch's worst global batch for memory first, the rest
            shuffled) or `ORDER_SHUFFLED` (all shuffled; what a checkpoint without "order" used).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        micro_batch_size: int,
        accumulation: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        mega_batch_factor: int = 50,
        max_tokens_per_batch: int | None = None,
        order: str = ORDER_WORST_FIRST,
    ) -> None:
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.micro_batch_size = micro_batch_size
        self.accumulation = accumulation
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self.max_tokens_per_batch = max_tokens_per_batch
        self.micro_per_global = accumulation * world_size
        self.epoch = 0
        self.position = 0  # global batches of `epoch` already consumed
        self._plan_cache: dict[int, list[list[list[int]]]] = {}
        self._order = ORDER_WORST_FIRST
        self.order = order  # through the setter: checked

    @property
    def order(self) -> str:
        """How an epoch's global batches are ordered: `ORDER_WORST_FIRST` or `ORDER_SHUFFLED`."""
        return self._order

    @order.setter
    def order(self, order: str) -> None:
        if order not in ORDERS:
            raise ValueError(f"sampler order {order!r} is not one of {', '.join(ORDERS)}")
        if order != self._order:
            self._plan_cache = {}  # a cached plan is in the old order
        self._order = order

    # ------------------------------------------------------------ the plan

    def _generator(self, epoch: int) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + epoch)
        return generator

    def _micro_batches_by_count(self, window: list[int]) -> list[list[int]]:
        size = self.micro_batch_size
        return [window[i : i + size] for i in range(0, len(window) - size + 1, size)]

    def _micro_batches_by_tokens(self, window: list[int]) -> list[list[int]]:
        limit = self.max_tokens_per_batch
        assert limit is not None, "only called when max_tokens_per_batch is set"
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for index in window:  # sorted longest first, so the first record sets the width
            longest_if_added = max(longest, int(self.lengths[index]))
            if current and longest_if_added * (len(current) + 1) > limit:
                batches.append(current)
                current, longest_if_added = [], int(self.lengths[index])
            current.append(index)
            longest = longest_if_added
        if current:
            batches.append(current)
        return batches

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """All global batches of an epoch, each a list of `micro_per_global` micro-batches.

        In `ORDER_WORST_FIRST` the global batch holding the largest micro-batch comes first and the
        others keep their shuffled order; in `ORDER_SHUFFLED` all keep it.
        """
        if epoch in self._plan_cache:
            return self._plan_cache[epoch]
        result = self._shuffled_global_batches(epoch)
        if self.order == ORDER_WORST_FIRST and result:
            result.insert(0, result.pop(self._worst_global_batch(result)))
        self._plan_cache = {epoch: result}  # one epoch at a time is all the loop needs
        return result

    def _shuffled_global_batches(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's global batches, length-bucketed within windows, in a seeded random order."""
        generator = self._generator(epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window_size = self.micro_batch_size * self.micro_per_global * self.mega_batch_factor
        micro_batches: list[list[int]] = []
        global_batches: list[list[list[int]]] = []
        for start in range(0, len(order), window_size):
            window = order[start : start + window_size]
            window.sort(key=lambda i: -int(self.lengths[i]))  # stable: ties keep their random order
            if self.max_tokens_per_batch:
                micro_batches.extend(self._micro_batches_by_tokens(window))
            else:
                # Fixed count: whole global batches per window, the window's remainder is dropped
                # only in the last window (earlier windows are exact multiples).
                micro_batches.extend(self._micro_batches_by_count(window))
            while len(micro_batches) >= self.micro_per_global:
                global_batches.append(micro_batches[: self.micro_per_global])
                micro_batches = micro_batches[self.micro_per_global :]
        # Leftover micro-batches cannot fill a global batch: dropped, so every rank steps equally.
        shuffled = torch.randperm(len(global_batches), generator=generator).tolist()
        return [global_batches[i] for i in shuffled]

    def _worst_global_batch(self, global_batches: list[list[list[int]]]) -> int:
        """Position of the global batch holding the largest micro-batch (in padded tokens).

        The micro-batch is the key, not the global batch: activations are freed after each
        micro-batch's backward and gradients are fixed-size buffers, so a rank's peak memory is set
        by the largest micro-batch it runs. Ties go to the larger global batch (total padded
        tokens), then to the earlier position.
        """
        worst, worst_key = 0, (-1, -1)
        for position, global_batch in enumerate(global_batches):
            sizes = [self.micro_batch_padded_tokens(micro) for micro in global_batch]
            key = (max(sizes), sum(sizes))
            if key > worst_key:  # strictly larger: an equal key keeps the earlier position
                worst, worst_key = position, key
        return worst

    def num_global_batches(self, epoch: int) -> int:
        return len(self.plan(epoch))

    # ------------------------------------------------------------ iteration and state

    def rank_micro_batches(self, global_batch: list[list[int]]) -> list[list[int]]:
        return global_batch[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's micro-batches from the current position to the end of the epoch.

        The sampler does not advance itself: the trainer calls `advance()` once per optimizer step,
        so prefetching data workers never make the saved position run ahead of the model.
        """
        plan = self.plan(self.epoch)
        for global_batch in plan[self.position :]:
            yield from self.rank_micro_batches(global_batch)

    def __len__(self) -> int:
        return (self.num_global_batches(self.epoch) - self.position) * self.accumulation

    def current_global_batch(self) -> list[int]:
        """Every record of the global batch at the current position, across all ranks."""
        return [index for micro in self.plan(self.epoch)[self.position] for index in micro]

    def advance(self) -> None:
        """One optimizer step (one global batch) has been consumed."""
        self.position += 1

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position

    def state_dict(self) -> dict[str, int | str]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "order": self.order}

    def load_state_dict(self, state: Mapping[str, int | str]) -> None:
        """Restore the position and the order the saved run used.

        A state without "order" was written before worst-first existed: its run continues in the
        shuffled order it began with, so the resumed data order is exactly the old one.
        """
        self.order = str(state.get("order", ORDER_SHUFFLED))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ------------------------------------------------------------ diagnostics

    def micro_batch_padded_tokens(self, micro: list[int]) -> int:
        """Tokens a micro-batch occupies once padded: its longest record x its record count."""
        return int(self.lengths[micro].max()) * len(micro) if micro else 0

    def largest_micro_batch(self, epoch: int) -> list[int]:
        """Record indices of the epoch's largest micro-batch in padded tokens (its memory peak).

        In `ORDER_WORST_FIRST` it is in the first global batch; on a tie the earliest in the plan.

        Raises:
            ValueError: the epoch has no global batch (too few records for one).
        """
        micro_batches = [micro for global_batch in self.plan(epoch) for micro in global_batch]
        if not micro_batches:
            raise ValueError(f"epoch {epoch} has no global batch: too few records for one")
        return max(micro_batches, key=self.micro_batch_padded_tokens)  # max keeps the first of equals

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of padded positions over every micro-batch of an epoch (all ranks)."""
        padded = real = 0
        for global_batch in self.plan(epoch):
            for micro in global_batch:
                lengths = self.lengths[micro]
                padded += int(lengths.max()) * len(micro)
                real += int(lengths.sum())
        return 1 - real / padded if padded else 0.0


def planned_steps(sampler: LengthBucketBatchSampler, max_steps: int | None, epochs: float) -> int:
    """Optimizer steps of a run: `max_steps`, or `epochs` worth of global batches (a fraction of the
    last epoch rounded up); 0 when the data cannot fill one global batch."""
    first = sampler.num_global_batches(0)
    if first == 0:
        return 0
    if max_steps:
        return int(max_steps)
    whole = math.floor(epochs)
    counts = [sampler.num_global_batches(e) for e in range(math.ceil(epochs))]
    # round() first: 1.1 - 1 is 0.10000000000000009, and ceil would add a step.
    fraction = round(counts[whole] * (epochs - whole), 6) if epochs > whole else 0
    return max(1, sum(counts[:whole]) + math.ceil(fraction))
