"""What a run has spent over all its attempts, what finishing will cost, and whether `budget.usd` allows one more step.

Every attempt is priced by the device it actually got (events.jsonl records the GPU each attempt saw):
`budget.gpu_hour_usd` when set (on the CPU it prices process-hours), else the GPU type's list price
(config/gpus.py). A killed attempt counts up to its last committed record, so its cost is a lower bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from noesis_accel.config import Config
from noesis_accel.rundir.costs import price_per_device_hour, spent_usd
from noesis_accel.rundir.history import Attempt


@dataclass
class Spend:
    """The running attempt's view of the money: what is spent, and whether the cap allows going on.

    `previous_usd` is what earlier attempts cost (fixed when this one starts); this attempt costs its
    device-hours since `started` at `price` per device-hour.
    """

    cap_usd: float | None
    price: float | None  # per device-hour, this attempt
    devices: int
    started: float  # this attempt's start (its `starting` event), time.time()
    previous_usd: float = 0.0

    @classmethod
    def for_attempt(
        cls,
        cfg: Config,
        attempts: list[Attempt],
        devices: int,
        device: str,
        gpu_name: str | None,
        failed_starts: list[Attempt] | None = None,
    ) -> Spend:
        """The spend of the newest of `attempts` (this one: its start is the last attempt's).

        `failed_starts` (starts refused before training) are no attempts, but their machine time was paid
        for: the budget counts it.
        """
        gpu_hour_usd = cfg.budget.gpu_hour_usd
        started = attempts[-1].started if attempts else time.time()
        earlier = attempts[:-1] + list(failed_starts or [])
        previous = spent_usd(earlier, gpu_hour_usd) if earlier else None
        return cls(
            cap_usd=cfg.budget.usd,
            price=price_per_device_hour(gpu_hour_usd, device, gpu_name),
            devices=max(1, devices),
            started=started,
            previous_usd=previous or 0.0,
        )

    def cost_of(self, seconds: float) -> float:
        return (self.price or 0.0) * self.devices * seconds / 3600

    def spent(self, now: float | None = None) -> float:
        return self.previous_usd + self.cost_of((now or time.time()) - self.started)

    def would_pass_cap(self, seconds_ahead: float, now: float | None = None) -> bool:
        """Whether `seconds_ahead` more of this attempt (a step and a checkpoint) would take it past the cap.

        No cap, or no price for this device: never.
        """
        if self.cap_usd is None or self.price is None:
            return False
        return self.spent(now) + self.cost_of(seconds_ahead) > self.cap_usd

    def projected(self, seconds_left: float, now: float | None = None) -> float:
        """The whole run's cost if the rest takes `seconds_left` at this attempt's price."""
        return self.spent(now) + self.cost_of(seconds_left)
