"""The distributed strategy a config asks for, and whether DeepSpeed carries it."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any


class Strategy(str, Enum):
    """`distributed.type`: the values a config may hold, stated once (the schema annotates the key with it)."""

    SINGLE = "single"  # one process: the CPU or one GPU
    DDP = "ddp"  # torch DistributedDataParallel (gloo on CPU, NCCL on GPU)
    ZERO2 = "zero2"  # DeepSpeed ZeRO-2 through Accelerate

    @property
    def uses_deepspeed(self) -> bool:
        return self is Strategy.ZERO2


def strategy(cfg: Any) -> Strategy:
    """The strategy of a config (any object with `distributed.type`); ValueError names the key if unknown."""
    value = str(cfg.distributed.type)
    try:
        return Strategy(value)
    except ValueError:
        choices = ", ".join(s.value for s in Strategy)
        raise ValueError(f"distributed.type: {value!r} is not one of {choices}") from None


def uses_deepspeed(cfg: Any) -> bool:
    """True when this config trains through DeepSpeed (its checkpoints are DeepSpeed's format)."""
    return strategy(cfg).uses_deepspeed


def saved_with_deepspeed(manifest: Mapping[str, Any]) -> bool:
    """True when a checkpoint manifest says DeepSpeed wrote it.

    A manifest records Accelerate's `distributed_type` (`DistributedType.DEEPSPEED`), not the config's
    strategy, so a checkpoint from any version of the config is read the same way.
    """
    return "DEEPSPEED" in str(manifest.get("distributed_type", ""))
