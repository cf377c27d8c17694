"""Cadences given as a fraction of the run or a step count (`ckpt.every`, `train.eval_every`)."""

from __future__ import annotations

import math


def valid_every(every: float) -> bool:
    return (0 < every < 1) or (every >= 1 and float(every).is_integer())


def interval_steps(every: float, total_steps: int) -> int:
    """`ckpt.every`/`train.eval_every` as a step interval: a fraction of the run or a step count."""
    if every <= 0:
        return 0
    if every < 1:
        return max(1, math.floor(total_steps * every))
    return int(every)
