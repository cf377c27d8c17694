"""The composed config as the schema's dataclasses (`Config`), converted once where a command starts.

OmegaConf's `DictConfig` is what composing, interpolation, overrides and the Hydra/Modal plumbing work
on; everything that reads settings takes the dataclasses, so the type checker sees each key's type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from noesis_accel.config.schema import Config

Section = TypeVar("Section")


def as_schema(node: DictConfig, schema_type: type[Section]) -> Section:
    """A composed (or schema-merged) config node as its schema dataclass: interpolations resolved.

    Raises OmegaConf's own errors for what the dataclass cannot hold (a missing mandatory value, an
    undeclared key), which `validate` reports by name before any caller gets here.
    """
    typed = OmegaConf.to_object(node)
    if not isinstance(typed, schema_type):
        raise TypeError(f"expected a config typed as {schema_type.__name__}, got {type(typed).__name__}")
    return typed


def to_config(cfg: DictConfig) -> Config:
    """The whole training config as `Config` (see `validate`, which checks it first and returns this)."""
    return as_schema(cfg, Config)


def over_schema(saved: Mapping[str, Any]) -> DictConfig:
    """A resolved config (a run dir's config.yaml, the launcher's config file) laid over the schema.

    A key added to the schema since it was written keeps its default; a key the schema no longer
    declares is OmegaConf's error (the callers say which file). A DictConfig, since the callers apply
    overrides to it or convert it with `to_config`.
    """
    merged = OmegaConf.merge(OmegaConf.structured(Config), saved)
    assert isinstance(merged, DictConfig)
    return merged
