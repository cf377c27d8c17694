"""The distributed strategies, one class each (single, ddp, zero2, fsdp2), chosen by `distributed.type`.

Adding one is a module here with one `Strategy` subclass whose `name` is the new type, and a YAML file
conf/distributed/NAME.yaml that sets `type: NAME` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from noesis_accel.config import Config
from noesis_accel.core.errors import ConfigError, UserError
from noesis_accel.training.strategies.base import Strategy
from noesis_accel.training.strategies.checkpoint_files import REPLICATED


@cache
def all_strategies() -> dict[str, type[Strategy]]:
    """{name: class} of every strategy module in this package."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found: dict[str, type[Strategy]] = {}
    pending = list(Strategy.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "name" in cls.__dict__:
            found[cls.name] = cls
    return found


def strategy_class(name: str) -> type[Strategy]:
    known = all_strategies()
    if name not in known:
        raise ConfigError(f"distributed.type: {name!r} is not one of {', '.join(sorted(known))}")
    return known[name]


def build_strategy(cfg: Config) -> Strategy:
    """The run's strategy, from `distributed.type`."""
    return strategy_class(cfg.distributed.type)(cfg)


def saved_format(manifest: Mapping[str, Any]) -> str:
    """The format a checkpoint's files are in: the manifest says so, or (older manifests) the strategy
    that recognises Accelerate's recorded `distributed_type` as its own."""
    if manifest.get("state_format"):
        return str(manifest["state_format"])
    for cls in all_strategies().values():
        if cls.wrote_before_formats_were_named(manifest):
            return cls.state_format
    return REPLICATED


def _readers(state_format: str) -> dict[str, type[Strategy]]:
    return {name: cls for name, cls in all_strategies().items() if cls.state_format == state_format}


def strategies_reading(state_format: str) -> list[str]:
    """The strategies that continue checkpoints of `state_format`."""
    return sorted(_readers(state_format))


def reader_of(path: Path, manifest: Mapping[str, Any]) -> type[Strategy]:
    """The strategy class that reads the checkpoint at `path` (its weights, for export and eval)."""
    state_format = saved_format(manifest)
    readers = _readers(state_format)
    if not readers:
        raise UserError(f"checkpoint {path} is in format {state_format!r}, which this version cannot read")
    return next(iter(readers.values()))


__all__ = ["Strategy", "all_strategies", "build_strategy", "reader_of", "saved_format", "strategies_reading"]
