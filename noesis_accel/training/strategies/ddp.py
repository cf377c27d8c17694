"""`distributed=ddp`: torch DistributedDataParallel through Accelerate (gloo on the CPU, NCCL on GPUs)."""

from __future__ import annotations

from noesis_accel.training.strategies.base import Strategy


class Ddp(Strategy):
    """Every process holds the whole model and optimizer; gradients are averaged in buckets during backward.

    Its checkpoints hold the whole (trainable) optimizer state, so a single process or any other DDP
    count continues them exactly.
    """

    name = "ddp"
