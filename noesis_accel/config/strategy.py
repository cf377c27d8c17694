"""The distributed strategy a config names: one of the `type:` values of conf/distributed/*.yaml.

The strategies themselves (what each does with the Accelerator, checkpoints, evaluation) are classes in
noesis_accel/training/strategies/; this wing only knows their names, so adding one is a class there and
a YAML file here, nothing else.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import yaml

from noesis_accel.config.paths import CONF_DIR

SINGLE = "single"  # one process: the rules for other counts name the others


@cache
def strategy_names() -> tuple[str, ...]:
    """Every `distributed.type` a config may hold, from conf/distributed/, `single` first."""
    names = {
        str((yaml.safe_load(path.read_text()) or {}).get("type", path.stem))
        for path in (CONF_DIR / "distributed").glob("*.yaml")
    }
    return (SINGLE, *sorted(names - {SINGLE}))


def strategy(cfg: Any) -> str:
    """The strategy of a config (any object with `distributed.type`); ValueError names the key if unknown."""
    value = str(cfg.distributed.type)
    if value not in strategy_names():
        raise ValueError(f"distributed.type: {value!r} is not one of {', '.join(strategy_names())}")
    return value
