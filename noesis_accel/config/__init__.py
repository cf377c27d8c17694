"""The config wing: the schema (schema.py), composing conf/ (compose.py) and checking the result (validate.py).

Every public name is re-exported here, so `from noesis_accel.config import X` works for callers outside
the wing; `sweeps` (Hydra multiruns) is imported as its own module.
"""

from noesis_accel.config.batch import accumulation_steps, batch_splits, world_size
from noesis_accel.config.cadence import interval_steps, valid_every
from noesis_accel.config.compose import CONF_DIR, compose, order_overrides, register
from noesis_accel.config.fingerprint import (
    ADDED_KEY_DEFAULTS,
    RESTART_SAFE_PREFIXES,
    differing_math_keys,
    fingerprint,
    flatten,
    math_keys,
)
from noesis_accel.config.modal_gpu import (
    GPUS_PER_CONTAINER,
    MODAL_GPU_TYPES,
    gpu_spec_text,
    gpu_specs,
    modal_gpu_problems,
    modal_layout,
    parse_gpu_spec,
)
from noesis_accel.config.resume import Resume, resume_mode
from noesis_accel.config.schema import (
    CHOICES,
    PACKING_ATTENTION,
    WANDB_MODES,
    CkptConfig,
    Config,
    DataConfig,
    DistributedConfig,
    EnvConfig,
    EvalConfig,
    EvalRunConfig,
    ModalConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    RunConfig,
    TrackerConfig,
    TrainConfig,
    choices,
    literal_values,
)
from noesis_accel.config.strategy import strategy, strategy_names
from noesis_accel.config.typed import as_schema, over_schema, to_config
from noesis_accel.config.validate import check_config, config_problems, flatten_keys, undeclared_keys, validate

__all__ = [
    "ADDED_KEY_DEFAULTS",
    "CHOICES",
    "CONF_DIR",
    "GPUS_PER_CONTAINER",
    "MODAL_GPU_TYPES",
    "PACKING_ATTENTION",
    "RESTART_SAFE_PREFIXES",
    "WANDB_MODES",
    "CkptConfig",
    "Config",
    "DataConfig",
    "DistributedConfig",
    "EnvConfig",
    "EvalConfig",
    "EvalRunConfig",
    "ModalConfig",
    "ModelConfig",
    "OptimConfig",
    "PeftConfig",
    "Resume",
    "RunConfig",
    "TrackerConfig",
    "TrainConfig",
    "accumulation_steps",
    "as_schema",
    "batch_splits",
    "check_config",
    "choices",
    "compose",
    "config_problems",
    "differing_math_keys",
    "fingerprint",
    "flatten",
    "flatten_keys",
    "gpu_spec_text",
    "gpu_specs",
    "interval_steps",
    "literal_values",
    "math_keys",
    "modal_gpu_problems",
    "modal_layout",
    "order_overrides",
    "over_schema",
    "parse_gpu_spec",
    "register",
    "resume_mode",
    "strategy",
    "to_config",
    "undeclared_keys",
    "strategy_names",
    "valid_every",
    "validate",
    "world_size",
]
