"""The run before it runs: whether it fits, how long it takes and what it costs, from the config alone.

`make_plan(cfg)` loads nothing heavy: the model is counted on the meta device (footprint.py), the data
is prepared exactly as training prepares it (the same cache) where it can be read here, and the time
comes from a measured throughput of this model shape on this GPU type (assets/throughput.json, fed by
bench/) or else from the FLOPs of a step at a stated MFU. Every figure says where it came from.
The trainer writes the same plan to the run dir's plan.json, so status and the report can compare.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from noesis_accel.config import Config, accumulation_steps, world_size
from noesis_accel.config.gpus import GIB, PRICES_AS_OF, gpu_type
from noesis_accel.config.modal_gpu import gpu_specs, parse_gpu_spec
from noesis_accel.core.errors import ConfigError, DataError, UserError, redact_tree
from noesis_accel.rundir.costs import format_usd
from noesis_accel.training import footprint as fp
from noesis_accel.training.footprint import MemoryTerm
from noesis_accel.training.sampling import LengthBucketBatchSampler, planned_steps
from noesis_accel.training.strategies import build_strategy

THROUGHPUT_TABLE = Path(__file__).resolve().parent.parent / "assets" / "throughput.json"
PLAN_FILE = "plan.json"


@dataclass
class DataFigures:
    """The training data as the plan sees it: read here (exact) or assumed (data not readable here)."""

    exact: bool
    source: str  # in words: where the figures came from
    records: int
    tokens: int  # per epoch, what the model reads (after truncation)
    learned_tokens: int | None  # per epoch; None when not read
    steps: int
    epochs: float
    micro_batch_rows: int  # the largest micro-batch: its records
    micro_batch_length: int  # and its padded length
    compute_tokens: int  # padded tokens the whole run pushes through the model (every step, every rank)


@dataclass
class GpuPlan:
    """One `modal.gpu` entry (or the CPU): memory per device against its capacity, time and cost."""

    spec: str  # "H100:8", or "cpu"
    device: str  # the GPU type, or "cpu"
    devices: int
    capacity_bytes: int | None
    terms: list[MemoryTerm]
    tokens_per_s_per_device: float | None
    throughput_source: str
    hours: float | None
    usd_per_device_hour: float | None
    price_source: str

    @property
    def total_bytes(self) -> int:
        return sum(term.bytes for term in self.terms)

    @property
    def fits(self) -> bool:
        return self.capacity_bytes is None or self.total_bytes <= self.capacity_bytes

    @property
    def largest(self) -> MemoryTerm:
        return max(self.terms, key=lambda term: term.bytes)

    @property
    def device_hours(self) -> float | None:
        return None if self.hours is None else self.hours * self.devices

    @property
    def usd(self) -> float | None:
        if self.device_hours is None or self.usd_per_device_hour is None:
            return None
        return self.device_hours * self.usd_per_device_hour

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "device_hours": self.device_hours,
            "usd": self.usd,
            "seconds_per_step": None,
        }


@dataclass
class Plan:
    created: float
    run: str
    model: fp.Footprint
    data: DataFigures
    gpus: list[GpuPlan]
    checkpoint_bytes: int
    checkpoint_seconds: float
    keep_last: int
    budget_usd: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def first(self) -> GpuPlan:
        return self.gpus[0]

    @property
    def storage_bytes(self) -> int:
        """keep_last checkpoints, and one more while the next is written (the oldest goes after it completes)."""
        return self.checkpoint_bytes * (self.keep_last + 1)

    def seconds_per_step(self, gpu: GpuPlan | None = None) -> float | None:
        gpu = gpu or self.first
        if gpu.hours is None or not self.data.steps:
            return None
        return gpu.hours * 3600 / self.data.steps

    def to_json(self) -> dict[str, Any]:
        gpus = []
        for gpu in self.gpus:
            entry = gpu.to_json()
            entry["seconds_per_step"] = self.seconds_per_step(gpu)
            gpus.append(entry)
        return {
            "created": self.created,
            "run": self.run,
            "model": self.model.to_json(),
            "data": asdict(self.data),
            "gpus": gpus,
            "checkpoint_bytes": self.checkpoint_bytes,
            "checkpoint_seconds": self.checkpoint_seconds,
            "keep_last": self.keep_last,
            "storage_bytes": self.storage_bytes,
            "budget_usd": self.budget_usd,
            "prices_as_of": PRICES_AS_OF,
            "notes": self.notes,
        }


# ---------------------------------------------------------------- the data


def data_figures(
    cfg: Config, prepared: Any | None = None, read_data: bool = True
) -> tuple[DataFigures, LengthBucketBatchSampler | None]:
    """The data as training will see it: `prepared` (training's own), else prepared here, else assumed.

    Assumed when the data cannot be read here (it lies on a Modal Volume, or the tokenizer is a hub
    model this machine cannot reach) or `read_data` is false: then `plan.records` records of
    `plan.mean_tokens` tokens, and the largest micro-batch is the worst case, micro_batch_size x data.max_length.
    """
    why = None if read_data else "the data is read where it lies, not here"
    if prepared is None and read_data:
        try:
            prepared = _prepare(cfg)
        except UserError as err:
            why = str(err).splitlines()[0]
    if prepared is not None:
        return _read_figures(cfg, prepared)
    return _assumed_figures(cfg, why or "the data cannot be read here"), None


def _prepare(cfg: Config) -> Any:
    from noesis_accel.training import data as data_mod
    from noesis_accel.training import modeling

    if not data_mod.is_hub_dataset(cfg.data.path) and not Path(cfg.data.path).expanduser().exists():
        raise DataError(f"data.path: {cfg.data.path} is not on this machine")
    tokenizer = modeling.load_tokenizer(cfg.model)
    return data_mod.prepare(cfg.data, tokenizer, cfg.train.seed)


def plan_sampler(cfg: Config, lengths: Any) -> LengthBucketBatchSampler:
    """The sampler training builds for this config (one rank's view; the plan is the same on every rank)."""
    return LengthBucketBatchSampler(
        lengths,
        micro_batch_size=cfg.train.micro_batch_size,
        accumulation=accumulation_steps(cfg),
        world_size=world_size(cfg),
        seed=cfg.train.seed,
        mega_batch_factor=cfg.data.mega_batch_factor,
        max_tokens_per_batch=cfg.data.max_tokens_per_batch,
    )


def _read_figures(cfg: Config, prepared: Any) -> tuple[DataFigures, LengthBucketBatchSampler]:
    lengths = list(prepared.train["length"])
    sampler = plan_sampler(cfg, lengths)
    steps = planned_steps(sampler, cfg.train.max_steps, cfg.train.epochs)
    epochs = math.ceil(cfg.train.epochs) if not cfg.train.max_steps else 1
    largest = max(
        (sampler.largest_micro_batch(epoch) for epoch in range(max(1, epochs)) if sampler.num_global_batches(epoch)),
        key=sampler.micro_batch_padded_tokens,
        default=[],
    )
    figures = DataFigures(
        exact=True,
        source=f"{cfg.data.path} (read and tokenised as training does)",
        records=len(lengths),
        tokens=sum(lengths),
        learned_tokens=int(sum(prepared.train["label_count"])),
        steps=steps,
        epochs=steps / sampler.num_global_batches(0) if sampler.num_global_batches(0) else 0.0,
        micro_batch_rows=len(largest),
        micro_batch_length=int(max(lengths[i] for i in largest)) if largest else 0,
        compute_tokens=_compute_tokens(sampler, steps, cfg.data.packing),
    )
    return figures, sampler


def _compute_tokens(sampler: LengthBucketBatchSampler, steps: int, packed: bool) -> int:
    """Tokens the run's steps push through the model: padded rows, or the records' own tokens when packed."""
    total, epoch, done = 0, 0, 0
    while done < steps:
        plan = sampler.plan(epoch)
        if not plan:
            break
        for global_batch in plan[: steps - done]:
            for micro in global_batch:
                total += int(sampler.lengths[micro].sum()) if packed else sampler.micro_batch_padded_tokens(micro)
        done += min(len(plan), steps - done)
        epoch += 1
    return total


def _assumed_figures(cfg: Config, why: str) -> DataFigures:
    records = cfg.plan.records
    if records is None:
        raise DataError(
            f"plan: {why}; to plan without the data give its size: plan.records=N (and plan.mean_tokens=T), "
            "or point data.path at a local copy"
        )
    max_length = cfg.data.max_length
    mean = cfg.plan.mean_tokens or max_length
    global_batch = cfg.train.global_batch_size
    per_epoch = int(records) // global_batch
    if cfg.train.max_steps:
        steps = cfg.train.max_steps
    else:
        epochs = cfg.train.epochs
        steps = int(per_epoch * math.floor(epochs) + math.ceil(round(per_epoch * (epochs - math.floor(epochs)), 6)))
    micro = cfg.train.micro_batch_size
    padded = max_length if cfg.plan.mean_tokens is None else min(max_length, mean)
    return DataFigures(
        exact=False,
        source=(
            f"assumed: {why}; plan.records={records} records of "
            + (f"plan.mean_tokens={mean}" if cfg.plan.mean_tokens else f"data.max_length={max_length} (the worst case)")
            + " tokens"
        ),
        records=int(records),
        tokens=int(records) * mean,
        learned_tokens=None,
        steps=max(steps, 0),
        epochs=steps / per_epoch if per_epoch else 0.0,
        micro_batch_rows=micro,
        micro_batch_length=max_length,  # the longest a micro-batch can be: what memory must hold
        compute_tokens=steps * global_batch * padded,
    )


# ---------------------------------------------------------------- memory


def memory_terms(cfg: Config, model: fp.Footprint, devices: int, gpu: bool) -> list[MemoryTerm]:
    """Bytes per device, term by term, as this strategy lays them out."""
    activations = model.activations
    optimizer = "8-bit AdamW" if cfg.optim.name == "adamw8bit" else "32-bit AdamW"
    terms = build_strategy(cfg).weight_terms(model, max(1, devices), optimizer)
    if activations is not None:
        checkpointing = cfg.model.gradient_checkpointing
        liger = cfg.model.liger
        layers_part = activations.saved(checkpointing) - activations.logits
        other = activations.saved(not checkpointing) - activations.logits
        shape = f"{activations.rows} x {activations.length} tokens"
        terms.append(
            MemoryTerm(
                "activations",
                layers_part,
                f"{shape}, gradient checkpointing {'on' if checkpointing else 'off'} "
                f"({_gib(other)} {'without' if checkpointing else 'with'} it)",
            )
        )
        terms.append(
            MemoryTerm(
                "logits",
                0 if liger else 3 * activations.logits,
                "Liger's fused loss never builds them"
                if liger
                else f"vocab {model.vocab_size:,} x {activations.tokens:,} tokens x 4 bytes: log-probs and 2 gradients",
            )
        )
    if gpu:
        terms.append(
            MemoryTerm(
                "CUDA context and workspace",
                int(cfg.plan.cuda_overhead_gib * GIB),
                "allowance: context, cuBLAS workspace, allocator slack (plan.cuda_overhead_gib)",
            )
        )
    return terms


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------- time and cost


def shape_key(model: fp.Footprint, cfg: Config) -> str:
    """What a throughput measurement is valid for: the model's shape and whether it trains LoRA."""
    return _shape_key(model.model_type, model.layers, model.hidden_size, model.vocab_size, cfg)


def _shape_key(model_type: str, layers: int, hidden: int, vocab: int, cfg: Config) -> str:
    peft = f"lora{cfg.peft.r}" if cfg.peft.enabled else "full"
    return f"{model_type}-L{layers}-h{hidden}-v{vocab}-{peft}"


def record_measured(
    cfg: Config, tokens_per_s: float, source: str, vocab_size: int | None = None, table: Path = THROUGHPUT_TABLE
) -> dict[str, Any]:
    """A bench's measurement of `cfg` training on this machine's device (its GPU type, or "cpu"), added
    to the table the plans read; returns the row.

    `tokens_per_s`: tokens one device pushes through the model a second, padding included (what a
    plan's compute tokens count: padded rows, or the records' own tokens when packed).
    """
    from noesis_accel.config.gpus import type_of_device

    config = fp.model_shape(cfg.model, vocab_size).config
    key = _shape_key(
        str(config.model_type),
        int(config.num_hidden_layers),
        int(config.hidden_size),
        int(config.vocab_size),
        cfg,
    )
    device = "cpu"
    if _cuda() and cfg.train.device != "cpu":
        import torch

        name = torch.cuda.get_device_name(0)
        device = type_of_device(name) or name
    record_throughput(key, device, tokens_per_s, source, table)
    return {"shape": key, "device": device, "tokens_per_s_per_device": round(tokens_per_s, 2)}


def measured_throughput(key: str, device: str, table: Path | None = None) -> dict[str, Any] | None:
    """The newest measurement of `key` on `device` (a GPU type, or "cpu"), or None."""
    try:
        rows = json.loads((table or THROUGHPUT_TABLE).read_text())
    except (OSError, ValueError):
        return None
    found = [row for row in rows if row.get("shape") == key and row.get("device") == device]
    return max(found, key=lambda row: str(row.get("date", "")), default=None)


def record_throughput(key: str, device: str, tokens_per_s: float, source: str, table: Path = THROUGHPUT_TABLE) -> None:
    """Add a measurement (bench/ calls this with what it measured) to the table the plans read; the newest
    row of a shape and device is the one a plan uses."""
    rows = json.loads(table.read_text()) if table.is_file() else []
    rows.append(
        {
            "shape": key,
            "device": device,
            "tokens_per_s_per_device": round(tokens_per_s, 2),
            "source": source,
            "date": time.strftime("%Y-%m-%d"),
        }
    )
    tmp = table.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, table)


def flops_per_token(model: fp.Footprint, cfg: Config, length: int) -> float:
    """Training FLOPs per token: forward 2N; backward 2N for the activations' gradients, and 2N more for
    the weights' when the base trains (full fine-tuning); another forward with gradient checkpointing;
    attention's score and value products (6 x layers x length x hidden, causal) on top."""
    n = model.params.base_params + model.params.trainable_params
    multiple = 4 + (0 if cfg.peft.enabled else 2) + (2 if cfg.model.gradient_checkpointing else 0)
    return multiple * n + 6 * model.layers * length * model.hidden_size


def _time(
    cfg: Config, model: fp.Footprint, data: DataFigures, device: str, devices: int
) -> tuple[float | None, str, float | None]:
    """(tokens/s per device, where it came from, hours) for this device type."""
    measured = measured_throughput(shape_key(model, cfg), device)
    rate: float | None
    if measured is not None:
        rate = float(measured["tokens_per_s_per_device"])
        source = f"measured: {measured['source']} ({measured['date']})"
    elif device == "cpu":
        return None, "no measurement of this model shape on a CPU (bench/throughput.py records one)", None
    else:
        mean_length = data.tokens / data.records if data.records else data.micro_batch_length
        flops = flops_per_token(model, cfg, int(mean_length))
        rate = cfg.plan.mfu * gpu_type(device).bf16_tflops * 1e12 / flops
        source = f"FLOPs at MFU {cfg.plan.mfu:.0%} of {gpu_type(device).bf16_tflops:g} bf16 TFLOPS (plan.mfu)"
    hours = data.compute_tokens / (rate * devices) / 3600 if rate else None
    return rate, source, hours


def _price(cfg: Config, device: str) -> tuple[float | None, str]:
    if cfg.budget.gpu_hour_usd is not None:
        per = "process-hour" if device == "cpu" else "GPU-hour"
        return cfg.budget.gpu_hour_usd, f"budget.gpu_hour_usd (${cfg.budget.gpu_hour_usd:g}/{per})"
    if device == "cpu":
        return None, "no price for the CPU (set budget.gpu_hour_usd)"
    return gpu_type(device).usd_per_hour, f"Modal's list price, {PRICES_AS_OF}"


# ---------------------------------------------------------------- the plan


def targets(cfg: Config) -> list[tuple[str, str, int]]:
    """(spec, device type or "cpu", devices) for each `modal.gpu` entry, or this run's own device."""
    specs = gpu_specs(cfg.modal.gpu)
    if specs:
        return [(spec, *parse_gpu_spec(spec)) for spec in specs]
    if cfg.train.device == "cpu" or not _cuda():
        return [("cpu", "cpu", world_size(cfg))]
    import torch

    from noesis_accel.config.gpus import type_of_device

    kind = type_of_device(torch.cuda.get_device_name(0)) or "H100"
    return [(f"{kind}:{world_size(cfg)}", kind, world_size(cfg))]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def make_plan(
    cfg: Config,
    prepared: Any | None = None,
    vocab_size: int | None = None,
    read_data: bool = True,
    host_bytes: int | None = None,
) -> Plan:
    """Everything `noesis plan` prints, for `cfg` (validated); `prepared`: training's own data, if loaded.

    `read_data=False` plans from `plan.records` without reading the data here; `host_bytes` is the
    memory a CPU run will have (a Modal container's, not this machine's).
    """
    data, _ = data_figures(cfg, prepared, read_data)
    if vocab_size is None and cfg.model.architecture and "vocab_size" not in cfg.model.architecture:
        from noesis_accel.training import modeling

        vocab_size = len(modeling.load_tokenizer(cfg.model))
    planned = targets(cfg)
    on_gpu = planned[0][1] != "cpu"  # every entry is a GPU type, or the one entry is the CPU
    model = fp.footprint(cfg, data.micro_batch_rows, data.micro_batch_length, vocab_size, gpu=on_gpu)
    gpus = []
    for spec, device, devices in planned:
        on_gpu = device != "cpu"
        rate, source, hours = _time(cfg, model, data, device, devices)
        price, price_source = _price(cfg, device)
        capacity = gpu_type(device).memory_bytes if on_gpu else (host_bytes or host_memory_bytes())
        gpus.append(
            GpuPlan(
                spec,
                device,
                devices,
                capacity,
                memory_terms(cfg, model, devices, on_gpu),
                rate,
                source,
                hours,
                price,
                price_source,
            )
        )
    checkpoint = checkpoint_bytes(cfg, model, gpus[0].devices)
    return Plan(
        created=time.time(),
        run=f"{cfg.run.root}/{cfg.run.name}",
        model=model,
        data=data,
        gpus=gpus,
        checkpoint_bytes=checkpoint,
        checkpoint_seconds=checkpoint / (cfg.plan.disk_mb_s * 1e6),
        keep_last=cfg.ckpt.keep_last,
        budget_usd=cfg.budget.usd,
    )


def checkpoint_bytes(cfg: Config, model: fp.Footprint, devices: int) -> int:
    """One checkpoint, as the run's strategy writes it (a few kilobytes of RNG and sampler state aside)."""
    return build_strategy(cfg).checkpoint_bytes(model, max(1, devices))


# ---------------------------------------------------------------- checks


def fit_problem(plan: Plan, cfg: Config) -> str | None:
    """One line when some entry's memory does not fit: the largest term, and what would fit."""
    for gpu in plan.gpus:
        if gpu.fits or gpu.capacity_bytes is None:
            continue
        largest = gpu.largest
        fixes = ", ".join(_fixes(plan, gpu, cfg)) or "a bigger GPU, or fewer tokens per micro-batch"
        return (
            f"plan: {gpu.spec} does not fit: {_gib(gpu.total_bytes)} per {gpu.device} of {_gib(gpu.capacity_bytes)}; "
            f"the largest term is {largest.name}, {_gib(largest.bytes)} ({largest.detail}); would fit: {fixes}"
        )
    return None


def _fixes(plan: Plan, gpu: GpuPlan, cfg: Config) -> list[str]:
    """Overrides that bring this entry under its capacity, each alone, recounted on the meta device."""
    capacity = gpu.capacity_bytes or 0
    over = gpu.total_bytes - capacity
    by_name = {term.name: term.bytes for term in gpu.terms}
    activations = by_name.get("activations", 0) + by_name.get("logits", 0)
    fixes = []
    micro = cfg.train.micro_batch_size
    profile = plan.model.activations
    if profile is not None and activations:
        per_row = activations / max(1, profile.rows)
        for smaller in range(micro - 1, 0, -1):
            if cfg.train.global_batch_size % (smaller * gpu.devices) == 0 and per_row * (micro - smaller) >= over:
                fixes.append(f"train.micro_batch_size={smaller}")
                break
        length = profile.length
        while length > 64 and activations * (1 - length / profile.length) < over:
            length //= 2
        if length > 64 and length < profile.length:
            fixes.append(f"data.max_length={length}")
        if not cfg.model.gradient_checkpointing:
            saved_with = profile.saved(True) - profile.saved(False)
            if -saved_with >= over:
                fixes.append("model.gradient_checkpointing=true")
    if not cfg.model.load_in_4bit and cfg.peft.enabled and gpu.device != "cpu":
        quantised = plan.model.params.base_bytes * (1 - fp.NF4_BYTES_PER_WEIGHT / 2)  # from 2 bytes a weight
        if quantised >= over:
            fixes.append("model.load_in_4bit=true")
    if gpu.device != "cpu":
        from noesis_accel.config.gpus import GPU_TYPES

        bigger = sorted(
            (g for g in GPU_TYPES.values() if g.memory_bytes >= gpu.total_bytes), key=lambda g: g.usd_per_hour
        )
        if bigger:
            fixes.append(f"modal.gpu={bigger[0].name}:{gpu.devices}")
    return fixes


def budget_problem(plan: Plan) -> str | None:
    """One line when the estimate of some entry is over `budget.usd`."""
    if plan.budget_usd is None:
        return None
    for gpu in plan.gpus:
        if gpu.usd is not None and gpu.usd > plan.budget_usd:
            return (
                f"budget.usd: the plan for {gpu.spec} is {format_usd(gpu.usd)} ({gpu.device_hours:,.2f} "
                f"{'GPU' if gpu.device != 'cpu' else 'process'}-hours at ${gpu.usd_per_device_hour:g}), over the "
                f"budget of {format_usd(plan.budget_usd)}; raise budget.usd, or set budget.preflight=warn to start "
                "anyway (the cap still stops the run at a checkpoint)"
            )
    return None


def refuse_if_unfit(plan: Plan, cfg: Config) -> None:
    """The checks before any GPU starts: memory, then the budget (unless budget.preflight=warn)."""
    problem = fit_problem(plan, cfg)
    if problem:
        raise ConfigError(problem)
    over = budget_problem(plan)
    if over and cfg.budget.preflight == "refuse":
        raise ConfigError(over)


def check_before_gpu(cfg: Config, read_data: bool = True, host_bytes: int | None = None) -> Plan:
    """`make_plan` + `refuse_if_unfit`: what `modal run` and a sweep run for every job."""
    plan = make_plan(cfg, read_data=read_data, host_bytes=host_bytes)
    refuse_if_unfit(plan, cfg)
    return plan


# ---------------------------------------------------------------- plan.json


def write_plan(run_dir: Path, plan: Plan) -> Path:
    path = run_dir / PLAN_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(redact_tree(plan.to_json()), indent=2) + "\n")  # paths can hold a token
    os.replace(tmp, path)
    return path


def read_plan(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- words


def _gib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f} GiB" if value >= 0.01 * GIB else f"{value / 2**20:.1f} MiB"


def _count(value: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return str(value)


def plan_line(plan: Plan) -> str:
    """One line: the first entry's memory, the steps, the time and the cost, against the budget."""
    gpu = plan.first
    parts = [
        f"{gpu.spec} {_gib(gpu.total_bytes)} of {_gib(gpu.capacity_bytes) if gpu.capacity_bytes else 'unknown'}",
        f"{plan.data.steps:,} steps" + ("" if plan.data.exact else " (data assumed: plan.records)"),
    ]
    if gpu.hours is not None:
        parts.append(f"~{gpu.hours:.2f} h")
    parts.append(f"~{format_usd(gpu.usd)}" if gpu.usd is not None else "cost unknown")
    if plan.budget_usd is not None:
        parts.append(f"budget {format_usd(plan.budget_usd)}")
    return "plan: " + ", ".join(parts)


def format_plan(plan: Plan) -> str:
    """What `noesis plan` prints."""
    m, d = plan.model, plan.data
    params = m.params
    lines = [
        f"plan for {plan.run}",
        f"model:       {m.model_type}, {m.layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size:,} "
        f"(shape: {m.shape_source})",
        f"parameters:  {params.base_params:,} in the base ({_count(params.base_params)}) + "
        f"{params.trainable_params:,} trainable ({_count(params.trainable_params)}) = "
        f"{params.base_params + params.trainable_params:,}",
        f"data:        {d.source}",
        f"             {d.records:,} records, {d.tokens:,} tokens"
        + (f", {d.learned_tokens:,} learned" if d.learned_tokens is not None else "")
        + " per epoch",
        f"             {d.steps:,} steps ({d.epochs:.2f} epochs); largest micro-batch {d.micro_batch_rows} x "
        f"{d.micro_batch_length} = {d.micro_batch_rows * d.micro_batch_length:,} tokens (trained first)",
    ]
    for gpu in plan.gpus:
        capacity = _gib(gpu.capacity_bytes) if gpu.capacity_bytes else "unknown"
        verdict = "fits" if gpu.fits else "DOES NOT FIT"
        lines.append(
            f"memory per {gpu.device} ({gpu.spec}): {_gib(gpu.total_bytes)} of {capacity}: {verdict}"
            + (" (host memory)" if gpu.device == "cpu" else "")
        )
        for term in gpu.terms:
            lines.append(f"  {term.name:28} {_gib(term.bytes):>11}  {term.detail}")
        lines.append(
            "  time:  "
            + (
                f"{gpu.tokens_per_s_per_device:,.0f} tokens/s per {gpu.device} ({gpu.throughput_source}); "
                f"{gpu.hours:.2f} h wall, {gpu.device_hours:.2f} {'GPU' if gpu.device != 'cpu' else 'process'}-hours"
                if gpu.hours is not None and gpu.tokens_per_s_per_device and gpu.device_hours is not None
                else f"unknown: {gpu.throughput_source}"
            )
            + " (start-up and evaluation not included)"
        )
        lines.append(
            "  cost:  "
            + (
                f"{format_usd(gpu.usd)} at ${gpu.usd_per_device_hour:g} ({gpu.price_source})"
                if gpu.usd is not None
                else "-"
            )
            + (f"; {gpu.price_source}" if gpu.usd is None else "")
        )
    lines.append(
        f"checkpoint:  {_gib(plan.checkpoint_bytes)} each, ~{plan.checkpoint_seconds:.1f} s to save; "
        f"ckpt.keep_last={plan.keep_last} needs {_gib(plan.storage_bytes)} (one more while the next is written)"
    )
    if plan.budget_usd is not None:
        lines.append(f"budget:      {format_usd(plan.budget_usd)} (budget.usd)")
    return "\n".join(lines)
