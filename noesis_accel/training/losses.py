"""The one definition of the loss: summed token losses over the label tokens of a whole global batch.

Training divides each micro-batch's summed token losses by the number of label tokens in its
whole global batch (every micro-batch, every rank), so the objective does not depend on how the
global batch is split into micro-batches, accumulation steps and processes: a long example weighs
the same whether it shares its micro-batch with short ones or not. The held-out loss is the same
quantity over the held-out set, computed by `heldout_loss` for the trainer and `noesis-eval` alike.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

# Stored in every checkpoint manifest: a checkpoint written under another normalisation is
# continued with a warning (weights, optimizer and data position are still exact).
LOSS_NORMALIZATION = "global-batch-label-tokens"


def summed_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum (not the mean) of a micro-batch's per-token losses; labels are shifted by the model.

    `num_items_in_batch` switches transformers' causal-LM loss from a mean to a sum divided by it.
    """
    return model(**batch, num_items_in_batch=1).loss


def micro_batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], global_label_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the global-batch loss: its summed token losses / all label tokens."""
    return model(**batch, num_items_in_batch=global_label_tokens).loss


def heldout_loss(
    model: torch.nn.Module,
    dataset: Any,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    micro_batch_size: int,
    device: torch.device | str,
    **sharding: Any,
) -> float:
    """Token-weighted loss over `dataset` (summed token losses / label tokens), sharded across ranks.

    Longest records first, so the first batch shows at once whether the longest one fits in memory.
    `sharding`: `rank`, `world_size`, `autocast` and `reduce_sum` (which adds the ranks' partial sums;
    omit it in a single process), as `heldout_loss_unless_stopped` takes them.
    """
    loss = heldout_loss_unless_stopped(model, dataset, collate, micro_batch_size, device, **sharding)
    assert loss is not None  # nothing can stop it
    return loss


@torch.no_grad()
def heldout_loss_unless_stopped(
    model: torch.nn.Module,
    dataset: Any,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    micro_batch_size: int,
    device: torch.device | str,
    *,
    rank: int = 0,
    world_size: int = 1,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop: Callable[[], bool] | None = None,
    lockstep: bool = False,
) -> float | None:
    """`heldout_loss`, given up (None) when `stop()` turns true before a batch: a stop request's checkpoint
    must not wait for a whole held-out pass. Every rank still reaches the one reduction, with a flag that
    says whether any of them stopped, so all of them give up together and none waits in a collective.

    `lockstep`: the forward pass is itself a collective (sharded weights), so every rank runs the same
    number of them (a rank whose shard is one batch short repeats a batch and does not count it) and the
    ranks agree on a stop before each one.
    """
    was_training = model.training
    model.eval()
    lengths = dataset["length"]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    shard = batches[rank::world_size]
    rounds = -(-len(batches) // world_size) if lockstep else len(shard)
    total = torch.zeros(3, dtype=torch.float64, device=device)  # summed loss, label tokens, stopped ranks
    for position in range(rounds):
        if _stopping(stop, lockstep, reduce_sum, device):
            total[2] = 1
            break
        padding = position >= len(shard)
        rows = [dataset[i] for i in (batches[0] if padding else shard[position])]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        with autocast():
            summed = summed_token_loss(model, batch)
        if not padding:
            total[:2] += torch.tensor(
                [float(summed), sum(int(row["label_count"]) for row in rows)], dtype=torch.float64, device=device
            )
    if reduce_sum is not None:
        total = reduce_sum(total)
    model.train(was_training)
    if total[2] > 0:
        return None
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _stopping(
    stop: Callable[[], bool] | None,
    lockstep: bool,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None,
    device: torch.device | str,
) -> bool:
    """Whether to give up before the next batch: this rank's own view, or (lockstep) any rank's."""
    wanted = stop is not None and stop()
    if lockstep and reduce_sum is not None:
        return float(reduce_sum(torch.tensor([float(wanted)], dtype=torch.float64, device=device))[0]) > 0
    return wanted
