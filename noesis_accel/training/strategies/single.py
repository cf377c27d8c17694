"""`distributed=single`: one process, on the CPU or one GPU."""

from __future__ import annotations

from noesis_accel.training.strategies.base import Strategy


class Single(Strategy):
    """Everything in one process: the base strategy's replicated checkpoints, which any count continues."""

    name = "single"
