"""Building the `Accelerator` for a process layout: precision, accumulation, and the strategy's own arguments.

The processes themselves are started by `launcher.py`; a process already started by `torchrun` or
`accelerate launch` is detected (by `WORLD_SIZE`) and used as it is.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Protocol

from noesis_accel.config import Config, accumulation_steps


class StrategyArguments(Protocol):
    """What a distributed strategy (training/strategies/) adds to the Accelerator: its plugin, its handlers."""

    def accelerator_kwargs(self, timeout: datetime.timedelta) -> dict[str, Any]: ...


def launched_world_size() -> int | None:
    """The world size a launcher (torchrun, accelerate launch, ...) set, or None if none did."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_rendezvous() -> None:
    """The environment torchrun would set for a world of one, on a free local port."""
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        os.environ.setdefault(key, value)


def build_accelerator(cfg: Config, logging_dir: Path, strategy: StrategyArguments):  # -> accelerate.Accelerator
    """The Accelerator for this config: precision, accumulation, CPU/GPU, tracker, and what `strategy` adds
    (its plugin, its process-group handlers)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    world = launched_world_size() or 1
    accumulation = accumulation_steps(cfg, world)
    timeout = datetime.timedelta(seconds=cfg.distributed.collective_timeout_s)
    kwargs: dict[str, Any] = {
        "mixed_precision": cfg.train.mixed_precision,
        "gradient_accumulation_steps": accumulation,
        "cpu": cfg.train.device == "cpu",
        # We step the schedule once per optimizer step ourselves; Accelerate would otherwise step it
        # num_processes times per call (it assumes per-process schedules).
        "step_scheduler_with_optimizer": False,
        "project_config": ProjectConfiguration(project_dir=str(logging_dir.parent), logging_dir=str(logging_dir)),
        "log_with": None if cfg.train.tracker == "none" else cfg.train.tracker,
    }
    kwargs.update(strategy.accelerator_kwargs(timeout))
    return Accelerator(**kwargs)
