"""An out-of-memory error in training, read for what it means, and said in one line.

The run's first optimizer step trains its largest micro-batch (the sampler puts it first), so an
out-of-memory error before that step completes is the batch shape: it would fail the same way every
time, and is a user error (not retried). One after it is fragmentation or a neighbour's memory: a
fresh process may get through, so it is a crash, retried from the checkpoint at most `ckpt.oom_retries`
times, and then reported as the user error.
"""

from __future__ import annotations

import torch

from noesis_accel.core.errors import UserError

FIXES = (
    "lower train.micro_batch_size (the global batch stays; accumulation grows), lower data.max_length, "
    "set model.gradient_checkpointing=true or model.load_in_4bit=true, or choose a GPU with more memory "
    "(noesis plan shows each term)"
)


class OutOfMemory(UserError):
    """The batch shape does not fit: retrying would fail the same way."""


class OutOfMemoryCrash(RuntimeError):
    """Out of memory after the largest batch had fitted: a restart from the checkpoint may get through.

    Not a user error, so Modal retries it and a sweep job is retryable; printed as one line.
    """

    exit_code = 1


def memory_figures(device: torch.device) -> str:
    """The allocator's figures on a GPU (allocated, reserved, total), or what is known on the CPU."""
    if device.type != "cuda":
        return "on the CPU"
    gib = 2**30
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    return (
        f"{torch.cuda.memory_allocated(index) / gib:.2f} GiB allocated, "
        f"{torch.cuda.memory_reserved(index) / gib:.2f} GiB reserved, "
        f"peak {torch.cuda.max_memory_allocated(index) / gib:.2f} GiB of {total / gib:.2f} GiB on "
        f"{torch.cuda.get_device_name(index)}"
    )


def batch_shape(batch: dict[str, torch.Tensor]) -> str:
    ids = batch.get("input_ids")
    if ids is None:
        return "?"
    rows, length = ids.shape[0], ids.shape[-1]
    return f"{rows} x {length} = {rows * length:,} tokens"


def out_of_memory(
    step: int, batch: dict[str, torch.Tensor], device: torch.device, previous: int, retries: int
) -> OutOfMemory | OutOfMemoryCrash:
    """What an out-of-memory error at optimizer step `step + 1` is: `previous` attempts of the run ended
    the same way already, and `retries` (ckpt.oom_retries) may."""
    where = f"out of memory at step {step + 1} (micro-batch {batch_shape(batch)}; {memory_figures(device)})"
    if step == 0:
        return OutOfMemory(f"{where}: the run's first step trains its largest batch, so it cannot fit; {FIXES}")
    if previous >= retries:
        return OutOfMemory(
            f"{where}, after the largest batch had fitted, and {previous} earlier attempt(s) ended the same way "
            f"(ckpt.oom_retries={retries}); not retried again. {FIXES}"
        )
    return OutOfMemoryCrash(
        f"{where}, after the largest batch had fitted: taken for fragmentation, so a restart resumes from the "
        f"newest checkpoint (retry {previous + 1} of ckpt.oom_retries={retries})"
    )
