"""Batch arithmetic: `global batch = micro batch x accumulation x world size`, accumulation derived."""

from __future__ import annotations

from noesis_accel.config.schema import Config
from noesis_accel.core.errors import ConfigError


def world_size(cfg: Config) -> int:
    return cfg.distributed.num_processes * cfg.distributed.num_machines


def accumulation_steps(cfg: Config, world: int | None = None) -> int:
    """`global = micro x accumulation x world`: derived, never set by hand. Raises if impossible."""
    world = world_size(cfg) if world is None else world
    global_batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if micro > 0 and global_batch > 0 and global_batch % (micro * world) == 0:
        return global_batch // (micro * world)
    valid_micro = [m for m in range(1, global_batch + 1) if global_batch % (m * world) == 0]
    valid_world = [w for w in range(1, global_batch + 1) if global_batch % (micro * w) == 0] if micro > 0 else []
    raise ConfigError(
        f"train.global_batch_size={global_batch} is not micro_batch_size ({micro}) x accumulation x "
        f"world size ({world}) for any whole accumulation. With {world} process(es) valid "
        f"train.micro_batch_size values are {valid_micro or 'none'}; with micro_batch_size={micro} "
        f"valid world sizes are {valid_world or 'none'}."
    )


def batch_splits(global_batch: int, world: int, preferred_micro: int) -> list[str]:
    """Ways to write `global = micro x accumulation x world` ('micro 2 x accumulation 5'), the current micro first."""
    micros = sorted({preferred_micro, 1, 2, 4, 8, 16}, key=lambda m: (m != preferred_micro, m))
    return [
        f"micro {m} x accumulation {global_batch // (m * world)}" for m in micros if global_batch % (m * world) == 0
    ]
