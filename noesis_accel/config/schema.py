"""The structured config schema: every key a YAML file may set, with its type, default and choices.

Hydra rejects unknown keys against these dataclasses (registered by `compose.register`). A key with
a fixed set of values is annotated `Annotated[str, SomeLiteral]` (or a str Enum): OmegaConf 2.3 cannot type a
node as a `Literal` (and an `Enum` node would change the stored values, hence every fingerprint), so it
sees a plain `str`, while `choices()` reads the Literal, which `validate` and its messages use.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Annotated, Any, Literal, Optional

from omegaconf import MISSING

from noesis_accel.config.resume import Resume
from noesis_accel.config.strategy import SINGLE, strategy_names

# Record shapes (see training/formats.py); `chat` is an alias of `messages`.
DataFormat = Literal[
    "auto", "messages", "chat", "sharegpt", "alpaca", "prompt_completion", "conversational_prompt_completion", "text"
]
TrainOn = Literal["assistant", "last_assistant", "all"]
OnTooLong = Literal["truncate", "drop", "error"]
OnBadRecord = Literal["error", "skip"]
Dtype = Literal["float32", "bfloat16", "float16"]
# Attention implementations that keep packed records apart from their positions alone (transformers
# detects the restarts: a block-diagonal mask for eager/sdpa, the variable-length kernel for flash).
PackingAttention = Literal["eager", "sdpa", "flash_attention_2"]
# flex_attention is accepted for padded batches; with data.packing it is refused (validate), since its
# separation of packed records is not established here.
Attention = Literal[PackingAttention, "flex_attention"]
OptimName = Literal["adamw8bit", "adamw"]
MixedPrecision = Literal["no", "bf16", "fp16"]
Device = Literal["auto", "cpu"]  # auto: the GPU when present
# Accelerate's trackers (training/trackers.PACKAGES says what each needs installed), or none.
TrackerName = Literal[
    "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "none"
]
WandbMode = Literal["online", "offline", "disabled"]
PeftBias = Literal["none", "all", "lora_only"]
OnWorldSizeChange = Literal["refuse", "reset_optimizer"]
Preflight = Literal["refuse", "warn"]


def literal_values(literal: Any) -> tuple[str, ...]:
    """The strings of a Literal (nested ones flattened) or the values of an Enum: `Attention` -> ("eager", ...)."""
    if isinstance(literal, type) and issubclass(literal, Enum):
        return tuple(member.value for member in literal)
    values: list[str] = []
    for arg in typing.get_args(literal):
        values.extend(literal_values(arg) if typing.get_origin(arg) is Literal else [arg])
    return tuple(values)


PACKING_ATTENTION = literal_values(PackingAttention)
WANDB_MODES = literal_values(WandbMode)


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
    dtype: Annotated[str, Dtype] = "float32"
    attn_implementation: Annotated[str, Attention] = "sdpa"
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
    format: Annotated[str, DataFormat] = "auto"  # the record shape (see formats.py)
    # The shape of the data group's own file (conf/data/sample.yaml sets it to its `format`). While `format`
    # equals it, a data.path whose first record has another shape is read as that shape, with one line saying
    # so: the group's format describes its own file, not yours. A `format` set to anything else is kept.
    group_format: Optional[str] = None
    # The dataset's own field names, {canonical: yours}: +data.columns={prompt: question, completion: answer}.
    # Canonical: messages, conversations, prompt, completion, text, instruction, input, output, system, tools.
    columns: dict[str, str] = field(default_factory=dict)
    # The dataset's role names mapped to system | user | assistant | tool: +data.roles={narrator: system}; added
    # to the built-in ShareGPT ones (human: user, gpt: assistant, bot: assistant).
    roles: dict[str, str] = field(default_factory=dict)
    role_key: Optional[str] = None  # a message's role field; null: "role", or "from" (ShareGPT) where no "role"
    content_key: Optional[str] = None  # its text field; null: "content", or "value" (ShareGPT) where no "content"
    # What is learned: assistant (every assistant turn), last_assistant (the final one) or all (every token,
    # prompts too). A prompt/completion record learns its completion unless `all`. A message's or a record's
    # own "weight": 0|1 / "train": false|true wins (see formats.py).
    train_on: Annotated[str, TrainOn] = "assistant"
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
    on_too_long: Annotated[str, OnTooLong] = "truncate"
    # A record that cannot be read (invalid JSON, an unknown shape, an empty field): error (list them and stop) or
    # skip it (counted on the console with where the first ones are). Every record bad is an error either way.
    on_bad_record: Annotated[str, OnBadRecord] = "error"
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
    bias: Annotated[str, PeftBias] = "none"


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (cosine with linear warmup)."""

    name: Annotated[str, OptimName] = "adamw"
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
    mixed_precision: Annotated[str, MixedPrecision] = "no"
    device: Annotated[str, Device] = "auto"
    eval_every: float = 0.25  # fraction of total steps (< 1) or a step count; 0 = only before/after
    log_every: int = 1
    # One of the trackers Accelerate ships, or none; its own settings are the `tracker.` keys.
    tracker: Annotated[str, TrackerName] = "tensorboard"
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
    resume: str = Resume.AUTO.value  # auto | never | <path to a checkpoint> (config/resume.py)
    commit_retries: int = 5
    commit_backoff_s: float = 1.0
    # At most this long waiting between a commit's attempts: a commit during a preemption must end
    # within its grace (Modal's SIGKILL comes 30 s after SIGINT). A commit still failing is reported
    # and the run goes on: the next commit, or the exit's, carries what it missed.
    commit_budget_s: float = 20.0
    # After a stop signal, the checkpoint's commit is waited for until this long after the signal at
    # most (commits themselves included): Modal's own exit commit, which carries whatever ours did not
    # finish, needs the rest of the 30 s grace.
    stop_commit_s: float = 10.0
    # Also commit the small progress files (metrics, events, status) this often, and at each start:
    # a hard kill, which commits nothing, then costs steps known to within this period. 0: never.
    progress_commit_s: float = 60.0
    # On another process count: `refuse` continues exactly or not at all (a zero2 checkpoint, whose
    # optimizer state is partitioned per process, is refused; single, ddp and fsdp2 ones continue with
    # their optimizer state), `reset_optimizer` continues with fresh optimizer moments (weights, schedule
    # and data position carried; not exact, stated in the log).
    on_world_size_change: Annotated[str, OnWorldSizeChange] = "refuse"
    # Before a save, if the disk lacks room for one more checkpoint (the newest one's size), drop the
    # oldest kept ones (never the newest complete) instead of only warning.
    make_room: bool = False
    # One writer per run dir: a lease whose heartbeat is older than this is taken over (its owner
    # is presumed dead on another machine); the owner renews it every `lease_heartbeat_s`.
    lease_stale_s: float = 120.0
    lease_heartbeat_s: float = 10.0
    # An out-of-memory error after the run's first optimizer step (which trains the largest batch, so
    # batch shape is ruled out) is taken for fragmentation: the run is retried from its checkpoint this
    # many times, then reported as a user error. One before that first step is reported at once.
    oom_retries: int = 1


@dataclass
class DistributedConfig:
    """Process layout. `type` is the strategy; the launcher starts `num_processes` per machine."""

    type: str = SINGLE  # a conf/distributed/*.yaml's `type:` (its choices: CHOICES below)
    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = 29500
    # DeepSpeed JSON (zero2); micro batch, accumulation and clipping are filled in from train/optim.
    deepspeed_config: Optional[str] = None
    # On a cluster, a machine whose launcher has not answered for this long is lost: the others stop
    # and the attempt ends as a crash (retried), instead of idling in a collective (processes/cluster_watch.py).
    peer_timeout_s: float = 60.0
    # Every process group's own timeout for one collective, stated rather than torch's default (30 min
    # for gloo, 10 for NCCL): the backstop for a peer whose launcher answers while its GPU work hangs.
    # Long enough for rank 0 to prepare the data while the others wait at a barrier.
    collective_timeout_s: float = 1800.0


@dataclass
class ModalConfig:
    """How `modal run launch/modal_entry.py` runs this config on Modal; local runs only validate it."""

    app_name: str = "noesis-accel"
    # TYPE[:COUNT], e.g. H100:8, or a list of them tried in order when the first is scarce, e.g.
    # [H100:8, H200:8] (every entry with the same count). A container holds at most 8 GPUs; 16, 24, ...
    # run as a cluster of 8-GPU containers. null: a CPU container (the demo). `Any` because a structured
    # config cannot type Union[str, list[str]]; `modal_gpu.modal_gpu_problems` checks the value instead.
    gpu: Any = None
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
class BudgetConfig:
    """What a run may spend, over all its attempts (`noesis plan` estimates it before anything starts)."""

    # The cap in dollars over every attempt, killed ones included; null: no cap. Before each step the run
    # checks what it spent plus what one more step and a checkpoint cost, and stops at a checkpoint
    # (state `budget`, not retried) rather than pass it. A restart with a higher cap continues exactly.
    usd: Optional[float] = None
    # A plan whose estimate is over `usd` is refused before any GPU starts; `warn` starts it anyway
    # (the cap still holds while it runs).
    preflight: Annotated[str, Preflight] = "refuse"
    # The price of one GPU-hour for this run; null: the GPU type's list price (config/gpus.py). On the
    # CPU (a local run) it prices process-hours, which is how a budget is tried without a GPU.
    gpu_hour_usd: Optional[float] = None


@dataclass
class PlanConfig:
    """How `noesis plan` estimates what it cannot read or measure (every estimate says where it came from)."""

    # Model FLOPs utilisation assumed where no measured throughput of this model shape on this GPU
    # type exists (assets/throughput.json, fed by bench/).
    mfu: float = 0.35
    # When the data cannot be read here (it lies on a Modal Volume): the training records, and their
    # mean length in tokens (null: data.max_length, the worst case). Reading the data replaces both.
    records: Optional[int] = None
    mean_tokens: Optional[int] = None
    # Write speed of the run dir's storage, for the time one checkpoint save takes.
    disk_mb_s: float = 200.0
    # CUDA context, cuBLAS workspace and the caching allocator's slack, per GPU.
    cuda_overhead_gib: float = 2.0


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
    # W&B mode; null: $WANDB_MODE, else online. An offline run is uploaded
    # later with `wandb sync <run dir>/logs/wandb/offline-run-*` (every attempt of the run, one W&B run).
    mode: Annotated[Optional[str], WandbMode] = None
    # MLflow tracking URI (a server, a database); null: $MLFLOW_TRACKING_URI, else one file store for every
    # run under run.root (`mlflow ui --backend-store-uri <run.root>/mlruns`); the run dir keeps its run id.
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
    # JSONL, one object per line: {"prompt": ..., "expected": ... (optional), "tags": [...] (optional)}; null: none.
    # The default, the demo's file, asks the demo model its name: a run of other data is asked (up to 64 of)
    # its held-out records instead, the user turn with its reference answer expected (after/prompts.py).
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
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


@dataclass
class EvalRunConfig:
    """The primary config of `noesis-eval` (conf/eval.yaml): a run dir, its model and data, the eval keys."""

    run_dir: str = MISSING
    checkpoint: Optional[str] = None  # a checkpoints/step-NNNNNN dir to evaluate instead of the final adapter
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _is_choice(meta: Any) -> bool:
    return typing.get_origin(meta) is Literal or (isinstance(meta, type) and issubclass(meta, Enum))


def choices(section: type) -> dict[str, tuple[str, ...]]:
    """{key: its allowed values} for each field of a schema dataclass annotated with a Literal."""
    hints = typing.get_type_hints(section, include_extras=True)
    found = {}
    for f in fields(section):
        hint = hints[f.name]
        if typing.get_origin(hint) is Annotated:
            literal = next((m for m in hint.__metadata__ if _is_choice(m)), None)
            if literal is not None:
                found[f.name] = literal_values(literal)
    return found


def config_choices() -> dict[str, tuple[str, ...]]:
    """{dotted key: allowed values} over the whole training config, e.g. "distributed.type": ("single", ...)."""
    sections = typing.get_type_hints(Config)
    return {
        f"{name}.{key}": values
        for name, section in sections.items()
        for key, values in choices(section).items()
        # A key whose null has its own meaning says so in its own check (tracker.mode: null is $WANDB_MODE).
        if typing.get_origin(typing.get_type_hints(section)[key]) is not typing.Union
    }


# distributed.type's choices are the strategies conf/distributed/ holds, not a list written here.
CHOICES = {**config_choices(), "distributed.type": strategy_names()}
