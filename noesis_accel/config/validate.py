"""`validate(cfg)`: every problem of a composed config, gathered into one error; the config typed if none."""

from __future__ import annotations

from operator import attrgetter

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from noesis_accel.config.batch import accumulation_steps, world_size
from noesis_accel.config.cadence import valid_every
from noesis_accel.config.keys import is_declared, unknown_key_line
from noesis_accel.config.modal_gpu import modal_gpu_problems
from noesis_accel.config.schema import CHOICES, PACKING_ATTENTION, WANDB_MODES, Config
from noesis_accel.config.typed import to_config
from noesis_accel.core.errors import ConfigError


def undeclared_keys(cfg: DictConfig, schema_type: type | None = None) -> list[str]:
    """Keys the schema does not declare, each with the nearest declared one.

    Hydra accepts `+train.lerning_rate=1e-4` (the `+` its own error suggests for an unknown key)
    even on a typed config; the run would then train without it and record it as if applied. The
    command line is checked before Hydra (overrides.py); this catches what config files bring.
    """
    schema = schema_type or Config
    return [unknown_key_line(key, schema) for key in _undeclared(cfg, schema)]


def _undeclared(cfg: DictConfig, schema_type: type) -> list[str]:
    return [key for key in flatten_keys(cfg) if not is_declared(key, schema_type)]


def flatten_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of `cfg`, leaves and sections, without resolving values."""
    keys = []
    for key in cfg:
        dotted = prefix + str(key)
        keys.append(dotted)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            keys += flatten_keys(node, f"{dotted}.")
    return keys


REQUIRED_KEYS = ("model.name_or_path", "data.path")


def validate(cfg: DictConfig) -> Config:
    """Check everything that can be checked without loading a model or data; one error lists all.

    Returns the config as the schema's dataclasses: the one conversion a command makes of what it
    composed. The composed checks (interpolations, undeclared and required keys) need the DictConfig;
    the rest read the typed config, checked on a copy without those keys so every problem is listed.
    """
    try:
        OmegaConf.to_container(cfg, resolve=True)  # every ${...} resolves, or we say which one does not
    except InterpolationResolutionError as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else err
        raise ConfigError(f"{getattr(err, 'full_key', '') or 'config'}: {str(cause).splitlines()[0]}") from None
    undeclared = _undeclared(cfg, Config)
    problems = [unknown_key_line(key, Config) for key in undeclared]
    missing = [key for key in REQUIRED_KEYS if OmegaConf.is_missing(cfg, key) or not OmegaConf.select(cfg, key)]
    problems += [f"{key}: is required (set it in a config file or as an override)" for key in missing]
    config = to_config(_checkable(cfg, undeclared, missing)) if problems else to_config(cfg)
    problems += config_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return config


def _checkable(cfg: DictConfig, undeclared: list[str], missing: list[str]) -> DictConfig:
    """A copy of `cfg` the schema's dataclasses can hold: undeclared keys left out, missing ones empty."""
    copy = cfg.copy()
    with open_dict(copy):
        for key in undeclared:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(copy, parent) if parent else copy
            if isinstance(node, DictConfig) and leaf in node:  # not under an undeclared key left out already
                del node[leaf]
    for key in missing:
        OmegaConf.update(copy, key, "")
    return copy


def check_config(config: Config) -> None:
    """`validate`'s checks of the typed config, for a caller handed one (the trainer's own entries)."""
    problems = config_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def config_problems(cfg: Config) -> list[str]:
    """Every problem of a typed config's values, each `key: why`."""
    problems: list[str] = []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")

    for key, choices in CHOICES.items():
        value = attrgetter(key)(cfg)
        check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")

    check(
        bool(cfg.run.name.strip()) and "/" not in cfg.run.name,
        "run.name",
        "must be a non-empty name without '/' (it names the run directory)",
    )

    train, optim, ckpt, data, dist = cfg.train, cfg.optim, cfg.ckpt, cfg.data, cfg.distributed
    check(train.max_steps is None or train.max_steps > 0, "train.max_steps", "must be > 0 or null")
    check(train.max_steps is not None or train.epochs > 0, "train.epochs", "must be > 0 when max_steps is null")
    check(train.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
    check(train.global_batch_size > 0, "train.global_batch_size", "must be > 0")
    check(train.log_every > 0, "train.log_every", "must be > 0")
    check(train.print_every is None or train.print_every > 0, "train.print_every", "must be > 0 or null")
    check(train.eval_every >= 0, "train.eval_every", "must be >= 0")
    check(
        cfg.tracker.mode in (None, *WANDB_MODES),
        "tracker.mode",
        f"{cfg.tracker.mode!r} is not one of {', '.join(WANDB_MODES)} (or null: $WANDB_MODE)",
    )
    check(optim.lr > 0, "optim.lr", "must be > 0")
    check(0 <= optim.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    check(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    check(
        len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), "optim.betas", "must be two numbers in [0, 1)"
    )
    check(optim.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")
    check(
        valid_every(ckpt.every),
        "ckpt.every",
        f"{ckpt.every} must be a fraction in (0, 1) of the run or a whole step count >= 1",
    )
    check(ckpt.every_minutes is None or ckpt.every_minutes > 0, "ckpt.every_minutes", "must be > 0 or null")
    check(ckpt.keep_last >= 1, "ckpt.keep_last", "must be >= 1 (the newest complete checkpoint is always kept)")
    check(ckpt.commit_retries >= 0, "ckpt.commit_retries", "must be >= 0")
    check(ckpt.commit_budget_s >= 0, "ckpt.commit_budget_s", "must be >= 0 seconds")
    check(ckpt.stop_commit_s >= 0, "ckpt.stop_commit_s", "must be >= 0 seconds")
    check(cfg.distributed.peer_timeout_s > 0, "distributed.peer_timeout_s", "must be > 0 seconds")
    check(cfg.distributed.collective_timeout_s > 0, "distributed.collective_timeout_s", "must be > 0 seconds")
    check(ckpt.progress_commit_s >= 0, "ckpt.progress_commit_s", "must be >= 0 seconds (0: no progress commits)")
    check(
        0 < ckpt.lease_heartbeat_s < ckpt.lease_stale_s,
        "ckpt.lease_heartbeat_s",
        f"must be > 0 and below ckpt.lease_stale_s ({ckpt.lease_stale_s})",
    )
    check(bool(ckpt.resume), "ckpt.resume", "must be auto, never or a checkpoint path")
    check(data.max_length >= 8, "data.max_length", "must be >= 8 tokens")
    check(data.min_examples >= 1, "data.min_examples", "must be >= 1")
    check(data.num_proc is None or data.num_proc >= 1, "data.num_proc", "must be >= 1 or null (one per core)")
    check(0 <= data.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)")
    check(data.mega_batch_factor >= 1, "data.mega_batch_factor", "must be >= 1")
    check(
        data.max_tokens_per_batch is None or data.max_tokens_per_batch >= data.max_length,
        "data.max_tokens_per_batch",
        f"must be >= data.max_length ({data.max_length}) so every record fits",
    )
    check(
        dist.num_processes >= 1 and dist.num_machines >= 1,
        "distributed.num_processes",
        "num_processes and num_machines must be >= 1",
    )
    check(0 <= dist.machine_rank < dist.num_machines, "distributed.machine_rank", "must be in [0, num_machines)")
    check(
        dist.type != "single" or world_size(cfg) == 1,
        "distributed.type",
        "single runs one process; use distributed=ddp, zero2 or fsdp2 for num_processes > 1",
    )
    check(
        dist.type != "zero2" or bool(dist.deepspeed_config),
        "distributed.deepspeed_config",
        "zero2 needs a DeepSpeed JSON (conf/deepspeed/zero2.json)",
    )
    on_cpu = train.device == "cpu"
    check(
        not (cfg.model.load_in_4bit and on_cpu),
        "model.load_in_4bit",
        "4-bit (QLoRA) needs a GPU; set train.device=auto on a GPU machine or model.load_in_4bit=false",
    )
    check(
        not (cfg.model.load_in_4bit and not cfg.peft.enabled),
        "model.load_in_4bit",
        "a 4-bit base can only be trained with LoRA (peft.enabled=true)",
    )
    check(
        train.mixed_precision != "fp16" or dist.type not in ("zero2", "fsdp2"),
        "train.mixed_precision",
        f"fp16 loss scaling is not wired for {dist.type}; use bf16",
    )
    check(
        not (cfg.model.load_in_4bit and dist.type == "fsdp2"),
        "model.load_in_4bit",
        "fsdp2 shards a bf16 base across the GPUs instead of quantising it; use model.load_in_4bit=false "
        "(or distributed=zero2 for QLoRA)",
    )
    check(
        not (data.packing and cfg.model.attn_implementation not in PACKING_ATTENTION),
        "data.packing",
        f"attention '{cfg.model.attn_implementation}' cannot keep packed records apart; "
        f"use model.attn_implementation={'|'.join(PACKING_ATTENTION)} or data.packing=false",
    )
    check(
        not (cfg.model.liger and on_cpu),
        "model.liger",
        "Liger kernels are Triton GPU kernels; set model.liger=false for train.device=cpu",
    )
    check(
        not (cfg.model.liger and any("lm_head" in t for t in cfg.peft.target_modules)),
        "model.liger",
        "the fused linear cross-entropy reads lm_head's base weight and would skip its LoRA; "
        "drop lm_head from peft.target_modules or set model.liger=false",
    )
    check(cfg.peft.r > 0 and cfg.peft.alpha > 0, "peft.r", "r and alpha must be > 0")
    check(0 <= cfg.peft.dropout < 1, "peft.dropout", "must be in [0, 1)")
    if train.micro_batch_size > 0 and train.global_batch_size > 0 and world_size(cfg) > 0:
        try:
            accumulation_steps(cfg)
        except ConfigError as err:
            problems.append(f"train.global_batch_size: {err}")
    # Unguarded: an empty list is falsy but refused (null and "" have no problems).
    problems.extend(f"modal.gpu: {p}" for p in modal_gpu_problems(cfg))
    check(
        0 < cfg.modal.timeout_s <= 24 * 3600, "modal.timeout_s", "must be in (0, 86400]: Modal allows 24 h per attempt"
    )
    check(0 <= cfg.modal.retries <= 10, "modal.retries", "must be in [0, 10] (Modal's limit)")
    check(
        0 <= cfg.modal.deadline_margin_s < cfg.modal.timeout_s,
        "modal.deadline_margin_s",
        "must be >= 0 and below modal.timeout_s",
    )
    return problems
