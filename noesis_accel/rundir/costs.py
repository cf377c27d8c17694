"""What each attempt of a run cost: its device-hours at the price of the device it got.

`budget.gpu_hour_usd` (or `noesis status price=`) prices every attempt when given (on the CPU it prices
process-hours); else a GPU attempt is priced at its type's list price (config/gpus.py), known from the
CUDA device name its `starting` event recorded. A killed attempt counts up to its last committed record.
"""

from __future__ import annotations

from noesis_accel.config.gpus import GPU_TYPES, type_of_device
from noesis_accel.rundir.history import Attempt


def format_usd(amount: float) -> str:
    """'$1,234.56'; an amount under a cent keeps its first figures ('$0.0042'), so a short CPU or debug
    run never reads as free ('$0.00') while it spends."""
    if 0 < abs(amount) < 0.01:
        return f"${amount:.2g}" if abs(amount) >= 1e-4 else "<$0.0001"
    return f"${amount:,.2f}"


def price_per_device_hour(gpu_hour_usd: float | None, device: str, gpu_name: str | None) -> float | None:
    """One device-hour of an attempt: the price given for the run, else the list price of the GPU it got."""
    if gpu_hour_usd is not None:
        return float(gpu_hour_usd)
    if device != "cuda":
        return None
    kind = type_of_device(gpu_name)
    return GPU_TYPES[kind].usd_per_hour if kind else None


def attempt_usd(attempt: Attempt, gpu_hour_usd: float | None, until: float | None = None) -> float | None:
    """What one attempt cost (None: no price known for its device); `until` closes an attempt still running."""
    price = price_per_device_hour(gpu_hour_usd, attempt.device, attempt.gpu)
    if price is None:
        return None
    end = until if until is not None and attempt.ended is None else (attempt.ended or attempt.started)
    hours = max(0.0, (end - attempt.started) / 3600)
    return hours * max(1, attempt.processes) * price


def spent_usd(attempts: list[Attempt], gpu_hour_usd: float | None, now: float | None = None) -> float | None:
    """Every attempt's cost added up; None when no attempt has a price."""
    costs = [attempt_usd(a, gpu_hour_usd, now if a is attempts[-1] else None) for a in attempts]
    known = [c for c in costs if c is not None]
    return sum(known) if known else None
