"""Llama-3-8B + LoRA on one GPU: our loop against Hugging Face's Trainer, each speed option on and off.

    python bench/llama8b.py --json out.json                       # a GPU (H100/H200): ~4 minutes
    python bench/llama8b.py --cpu-smoke --json out.json           # the same code path, 2 layers, CPU, seconds
    python bench/llama8b.py --write-data data.jsonl --records 400 # the synthetic data set alone
    python bench/llama8b.py --table-from out.json                 # print the table of an earlier (partial) run

The base model has Llama-3-8B's architecture (hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV
heads, vocabulary 128256, RoPE theta 500000, RMSNorm eps 1e-5) with random bf16 weights created on
the GPU, once, and shared by every configuration (LoRA r16 on all linear layers is put on and taken
off again for each). Data: synthetic chat records with a long-tailed length distribution (median
~350, up to 2048 tokens), tokenised by the SmolLM2 tokenizer; the noesis recipe's micro batch 2,
accumulation 4 (global batch 8), bitsandbytes AdamW8bit, bf16. Every runner trains two epochs of
the same records and only the second is timed: start-up costs stay out, and every runner is timed
on exactly the same records (in its own batch order).

Reported per configuration: non-pad tokens/s, step time, peak GPU memory, padding, and

    MFU = (4·N·T + 6·L·d·Σ lᵢ²) / step time / 989e12

with N the base model's matrix-multiply parameters (every Linear, lm_head included; not the
embedding table), T the non-pad tokens of a step and lᵢ its records' lengths: 2N FLOPs per token
forward and 2N for the input gradients backward (the frozen weights get no weight gradient),
plus causal attention (forward 2·l²·d per layer, backward twice that) for L layers of width d;
the LoRA matrices and recomputation under gradient checkpointing are not counted. 989 TFLOP/s
is the H100/H200 dense bf16 peak from the datasheet.

A memory probe trains one micro-batch of the worst shape (2 × 2048 tokens) after a configuration,
with its optimizer state in place, to show what fits on an 80 GB H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_baseline import peak_memory_gib, reset_peak_memory, train_hf_baseline

from noesis_accel.config import compose, to_config, validate
from noesis_accel.core import env
from noesis_accel.training import data as data_mod
from noesis_accel.training import losses, modeling
from noesis_accel.training.metrics import read_metrics
from noesis_accel.training.packing import PackingCollator
from noesis_accel.training.plan import THROUGHPUT_TABLE, record_measured
from noesis_accel.training.trainer import Trainer, _reset_accelerate_state

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16, datasheet
H100_USABLE_GIB = 79.1  # an 80 GB H100 as torch sees it (total_memory), before the CUDA context
_WORDS = (
    "the model answers every question about data training checkpoints volumes gpus batches tokens loss"
    " schedule warmup cosine adapter rank alpha memory kernels attention layers weights gradients steps"
    " because when which while after before first second third result value error reason example simple"
    " careful precise complete answer explains shows describes compares measures"
).split()


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration: which runner, and the options on or off."""

    runner: str  # ours | hf
    checkpointing: bool
    liger: bool = False
    packing: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        options = [f"gc {'on' if self.checkpointing else 'off'}"] + [
            o for o in ("liger", "packing", "compile") if getattr(self, o)
        ]
        return f"{'ours' if self.runner == 'ours' else 'HF Trainer'} ({', '.join(options)})"


# Most telling first, since a time budget may cut the tail. Liger patches the shared model for good, so
# its rows come after every row without it, and compilation (the slowest to start) comes last.
GPU_VARIANTS = [
    Variant("hf", True),
    Variant("ours", True),
    Variant("hf", False),
    Variant("ours", False),
    Variant("ours", False, packing=True),
    Variant("ours", True, packing=True),
    Variant("ours", False, liger=True),
    Variant("ours", True, liger=True),
    Variant("ours", False, liger=True, packing=True),
    Variant("hf", False, liger=True),
    Variant("ours", False, liger=True, compile=True),
]
PROBED = {Variant("ours", True), Variant("ours", False), Variant("ours", False, liger=True)}
CPU_VARIANTS = [
    Variant("hf", True),
    Variant("ours", True),
    Variant("ours", False, packing=True),
    Variant("ours", False, liger=True),
]


@dataclasses.dataclass
class Row:
    variant: str
    runner: str
    status: str  # ok | skipped: why | failed: why
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    padding: float = 0.0
    peak_memory_gib: float | None = None
    probe_peak_gib: float | None = None
    probe_reserved_gib: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0

    @property
    def mfu(self) -> float:
        return self.flops / self.seconds / PEAK_BF16_FLOPS if self.seconds else 0.0


# ---------------------------------------------------------------- data


def long_tailed_chat(path: Path, records: int, seed: int = 0, scale: float = 1.0) -> Path:
    """Chat records shaped like instruction data: short prompts, answers log-normal in length with a
    long tail (median ~300 words, a few past 2048 tokens, which truncation then cuts); `scale`
    shrinks every length (the CPU smoke run)."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(records):
            prompt_words = min(600, max(3, int(scale * rng.lognormvariate(math.log(40), 1.0))))
            answer_words = min(2400, max(5, int(scale * rng.lognormvariate(math.log(300), 0.9))))
            prompt = f"Question {i}: " + " ".join(rng.choice(_WORDS) for _ in range(prompt_words)) + "?"
            answer = " ".join(rng.choice(_WORDS) for _ in range(answer_words)) + "."
            handle.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
                )
                + "\n"
            )
    return path


# ---------------------------------------------------------------- FLOPs


def matmul_parameters(model: torch.nn.Module) -> int:
    """N: weights of every Linear layer of the base model (lm_head included, the embedding table not)."""
    return sum(
        m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name
    )


def step_flops(lengths: list[int], n_params: int, layers: int, width: int) -> float:
    """Model FLOPs of training records of these lengths: 4·N per token plus causal attention."""
    return sum(4.0 * n_params * length + 6.0 * layers * width * length * length for length in lengths)


# ---------------------------------------------------------------- the shared base model


class SharedBase:
    """One base model for every configuration. `modeling.load_base_model` is pointed at it, so each
    configuration still goes through our own `build_model` (checkpointing, Liger, LoRA, compile), and
    `modeling.apply_lora` is watched, so the LoRA it adds can be taken off again afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.liger_applied = False
        self.peft_model: torch.nn.Module | None = None
        self._originals = (modeling.load_base_model, modeling.apply_lora)
        modeling.load_base_model, modeling.apply_lora = self._load, self._apply_lora

    def _load(self, model_cfg: Any, vocab_size: int, device_is_cuda: bool) -> torch.nn.Module:
        if self.liger_applied and not model_cfg.liger:
            raise RuntimeError("Liger kernels already patch the shared model; run Liger variants last")
        if self.peft_model is not None:
            raise RuntimeError("the shared model still carries the previous configuration's LoRA")
        disable = getattr(self.model, "activation_checkpointing_disable", None)  # its name from transformers 5.2x
        (disable or self.model.gradient_checkpointing_disable)()
        self.liger_applied = self.liger_applied or model_cfg.liger
        return self.model

    def _apply_lora(self, model: torch.nn.Module, model_cfg: Any, peft_cfg: Any) -> torch.nn.Module:
        self.peft_model = self._originals[1](model, model_cfg, peft_cfg)
        return self.peft_model

    def release(self) -> None:
        """Take LoRA off and undo compilation, so the next configuration starts from the bare base."""
        if self.peft_model is not None:
            self.peft_model.unload()
            self.peft_model = None
        # peft hooks the embedding output to require grad (one more backward GEMM chain); gone with the LoRA.
        if getattr(self.model, "_require_grads_hooks", None) or getattr(self.model, "_require_grads_hook", None):
            self.model.disable_input_require_grads()
        for layer in modeling.repeated_layers(self.model) or []:
            layer._compiled_call_impl = None
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        modeling.load_base_model, modeling.apply_lora = self._originals


# ---------------------------------------------------------------- runners


def probe_worst_micro_batch(
    model: torch.nn.Module, accelerator: Any, optimizer: Any, seq_len: int, micro_batch: int, packing: bool
) -> tuple[float | None, float | None]:
    """Peak memory of one forward + backward on the longest micro-batch the data allows.

    Two rows of `seq_len` and `seq_len - 1` tokens (so the padded layout carries a mask, as real
    batches do), ids below 1000 so any tokenizer's ids fit; the optimizer state stays allocated.
    """
    if not torch.cuda.is_available():
        return None, None
    lengths = [seq_len - i for i in range(micro_batch)]
    rows = [
        {"input_ids": torch.randint(3, 1000, (n,)).tolist(), "labels": torch.randint(3, 1000, (n,)).tolist()}
        for n in lengths
    ]
    batch = (PackingCollator() if packing else data_mod.PaddingCollator(0))(rows)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    reset_peak_memory()
    with accelerator.autocast():
        loss = losses.micro_batch_loss(model, batch, sum(lengths))
    accelerator.backward(loss)
    torch.cuda.synchronize()
    peak, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    optimizer.zero_grad(set_to_none=True)
    return peak, reserved


def run_ours(
    variant: Variant, overrides: list[str], root: Path, steps: int, untimed: int, arch: dict, probe_len: int | None
) -> Row:
    cfg = validate(
        compose(
            overrides
            + [
                f"run.root={root}",
                f"run.name=ours-{_slug(variant)}",
                f"train.max_steps={steps}",
                f"ckpt.every={steps}",
                "train.eval_every=0",
                "train.tracker=none",
                "train.progress_bar=false",
                "data.eval_fraction=0",
                f"model.gradient_checkpointing={variant.checkpointing}",
                f"model.liger={variant.liger}",
                f"data.packing={variant.packing}",
                f"model.compile={variant.compile}",
            ]
        )
    )
    trainer = None
    try:
        trainer = Trainer.for_config(cfg)
        if trainer.sampler.num_global_batches(0) != untimed:  # else "the second epoch" is not what is timed
            raise RuntimeError(f"an epoch holds {trainer.sampler.num_global_batches(0)} steps, not {untimed}")
        reset_peak_memory()
        trainer.train()
        peak = peak_memory_gib()
        metrics = {m["step"]: m for m in read_metrics(trainer.rundir.path) if "loss" in m}
        lengths = trainer.sampler.lengths
        timed = [micro for batch in trainer.sampler.plan(1) for micro in batch]  # the second epoch
        padded = sum(int(lengths[m].max()) * len(m) for m in timed)
        real = sum(int(lengths[m].sum()) for m in timed)
        flops = step_flops([int(lengths[i]) for m in timed for i in m], arch["n_params"], arch["layers"], arch["width"])
        row = Row(
            variant.name,
            variant.runner,
            "ok",
            steps - untimed,
            metrics[steps]["tokens_seen"] - metrics[untimed]["tokens_seen"],
            metrics[steps]["time"] - metrics[untimed]["time"],
            flops,
            0.0 if variant.packing else 1 - real / padded,
            peak,
        )
        if probe_len and variant in PROBED:
            row.probe_peak_gib, row.probe_reserved_gib = probe_worst_micro_batch(
                trainer.model,
                trainer.accelerator,
                trainer.optimizer,
                probe_len,
                cfg.train.micro_batch_size,
                variant.packing,
            )
        trainer.metrics.close()
        return row
    finally:
        if trainer is not None:
            trainer.session.close()  # the lease let go: the next variant runs in this process
        del trainer
        _reset_accelerate_state()


def run_hf(variant: Variant, overrides: list[str], root: Path, steps: int, untimed: int, arch: dict) -> Row:
    """The baseline: transformers' Trainer, length-grouped, on the same records, LoRA and optimizer."""
    cfg = to_config(
        compose(
            overrides
            + [
                "data.eval_fraction=0",
                f"model.gradient_checkpointing={variant.checkpointing}",
                f"model.liger={variant.liger}",
            ]
        )
    )
    run = train_hf_baseline(cfg, steps, root / "hf")
    accumulation = cfg.train.global_batch_size // cfg.train.micro_batch_size
    timed = run.batches[untimed * accumulation : steps * accumulation]  # step i trains batches (i-1)·acc ... i·acc-1
    assert len(timed) == (steps - untimed) * accumulation, "the Trainer trained another number of batches"
    real, padded = sum(b[0] for b in timed), sum(b[1] for b in timed)
    flops = step_flops([n for b in timed for n in b[2]], arch["n_params"], arch["layers"], arch["width"])
    return Row(
        variant.name,
        variant.runner,
        "ok",
        steps - untimed,
        real,
        run.step_end[steps] - run.step_end[untimed],
        flops,
        1 - real / padded,
        run.peak_memory_gib,
    )


# ---------------------------------------------------------------- report


def row_line(r: Row) -> str:
    if r.status != "ok":
        return f"{r.variant:<40}{'-':>10}{'-':>8}{'-':>7}{'-':>10}{'-':>7}{'-':>12}  {r.status}"
    peak = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "-"
    probe = f"{r.probe_peak_gib:.1f}" if r.probe_peak_gib is not None else "-"
    return (
        f"{r.variant:<40}{r.tokens_per_s:>10.0f}{r.step_seconds:>8.3f}{100 * r.mfu:>6.1f}%{peak:>10}"
        f"{100 * r.padding:>6.1f}%{probe:>12}  ok"
    )


def table(rows: list[Row], header: str) -> str:
    lines = [
        header,
        f"{'configuration':<40}{'tok/s':>10}{'step s':>8}{'MFU':>7}{'peak GiB':>10}"
        f"{'pad':>7}{'2x2048 GiB':>12}  status",
    ]
    lines += [row_line(r) for r in rows]
    done = {r.variant: r for r in rows if r.status == "ok"}
    for gc_state in ("on", "off"):
        hf = done.get(f"HF Trainer (gc {gc_state})")
        same = done.get(f"ours (gc {gc_state})")
        best = max(
            (r for r in done.values() if r.runner == "ours" and f"gc {gc_state}" in r.variant),
            key=lambda r: r.tokens_per_s,
            default=None,
        )
        if hf and same:
            lines.append(
                f"gc {gc_state}: ours / HF Trainer, same options: {same.tokens_per_s / hf.tokens_per_s:.2f}x; "
                f"best ours ({best.variant}) / HF Trainer: {best.tokens_per_s / hf.tokens_per_s:.2f}x "
                "(target >= 1.3x)"
            )
    fastest_hf = max((r for r in done.values() if r.runner == "hf"), key=lambda r: r.tokens_per_s, default=None)
    fastest = max((r for r in done.values() if r.runner == "ours"), key=lambda r: r.tokens_per_s, default=None)
    if fastest_hf and fastest:
        lines.append(
            f"fastest ours ({fastest.variant}) / fastest HF Trainer ({fastest_hf.variant}): "
            f"{fastest.tokens_per_s / fastest_hf.tokens_per_s:.2f}x; its MFU {100 * fastest.mfu:.1f}% "
            "(target >= 40%)"
        )
    probes = [r for r in rows if r.probe_peak_gib is not None]
    for r in probes:
        verdict = "fits" if r.probe_reserved_gib < H100_USABLE_GIB - 2 else "does NOT fit"
        lines.append(
            f"worst micro-batch (2 x 2048) with {r.variant}: peak {r.probe_peak_gib:.1f} GiB allocated, "
            f"{r.probe_reserved_gib:.1f} GiB reserved: {verdict} an 80 GB H100 "
            f"({H100_USABLE_GIB} GiB less 2 for the CUDA context)"
        )
    return "\n".join(lines)


def write_json(path: Path | None, rows: list[Row], info: dict) -> None:
    if path is None:
        return
    payload = {
        **info,
        "rows": [
            dataclasses.asdict(r) | {"tokens_per_s": r.tokens_per_s, "step_seconds": r.step_seconds, "mfu": r.mfu}
            for r in rows
        ],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)  # rewritten after every configuration: a run stopped by its time limit keeps what it did


def rows_from_json(path: Path) -> tuple[list[Row], dict]:
    payload = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in names}) for r in payload["rows"]], payload


# ---------------------------------------------------------------- main


def _setup(args: argparse.Namespace, root: Path) -> tuple[list[str], list[Variant]]:
    records = args.global_batch * args.steps  # one epoch of `steps`; each runner trains two, times the second
    data_path = long_tailed_chat(root / "chat.jsonl", records, seed=0, scale=0.1 if args.cpu_smoke else 1.0)
    common = [
        f"data.path={data_path}",
        "data.format=chat",
        "data.min_examples=1",
        f"data.cache_dir={root / 'cache'}",
        f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        "optim=adamw8bit",
        "optim.lr=1e-4",
        "peft.r=16",
        "peft.alpha=32",
        "peft.dropout=0.05",
        "peft.target_modules=[all-linear]",
        "data.pad_to_multiple_of=8",
    ]
    if args.cpu_smoke:
        # The same code path on a 2-layer model of Llama-3's proportions, in fp32 on the CPU.
        common += [
            "model=llama3_8b_arch",
            "model.architecture.hidden_size=64",
            "model.architecture.intermediate_size=224",
            "model.architecture.num_hidden_layers=2",
            "model.architecture.num_attention_heads=4",
            "model.architecture.num_key_value_heads=1",
            "model.architecture.head_dim=16",
            "~model.architecture.vocab_size",
            "model.dtype=float32",
            "model.attn_implementation=eager",
            "train.device=cpu",
            "train.mixed_precision=no",
            "data.max_length=256",
        ]
    else:
        common += [
            "model=llama3_8b_arch",
            "model.dtype=bfloat16",
            "train.device=auto",
            "train.mixed_precision=bf16",
            "data.max_length=2048",
        ]
    if args.tokenizer:
        common += [f"model.name_or_path={args.tokenizer}", "model.gguf_file=null"]
    return common + list(args.overrides), CPU_VARIANTS if args.cpu_smoke else GPU_VARIANTS


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per epoch (GPU 10, CPU smoke 2); two epochs, the second timed",
    )
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=None, help="GPU 8 (accumulation 4), CPU smoke 4")
    parser.add_argument("--tokenizer", help="a local tokenizer dir (the GPU machine has no gguf package)")
    parser.add_argument(
        "--only", help="comma-separated configurations to run, e.g. hf-gc,ours-nogc-liger (default: all)"
    )
    parser.add_argument("--budget-s", type=float, default=None, help="start no configuration after this many seconds")
    parser.add_argument("--no-probe", action="store_true", help="skip the 2 x 2048 memory probes")
    parser.add_argument("--cpu-smoke", action="store_true", help="2 layers on the CPU: checks the code path, not speed")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--record",
        nargs="?",
        const=THROUGHPUT_TABLE,
        type=Path,
        help="add 'ours (gc on)' (the recipe's options) to the table noesis plan reads (default: the package's)",
    )
    parser.add_argument("--write-data", type=Path, help="only write the synthetic data set here and exit")
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--table-from", type=Path, help="only print the table of an earlier run's JSON")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every configuration")
    args = parser.parse_args(argv)
    if args.write_data:
        long_tailed_chat(args.write_data, args.records)
        return []
    if args.table_from:
        rows, info = rows_from_json(args.table_from)
        print(table(rows, info.get("header", "")))
        return rows
    args.steps = args.steps or (2 if args.cpu_smoke else 10)
    args.global_batch = args.global_batch or (4 if args.cpu_smoke else 8)
    started = time.monotonic()
    env.apply_alloc_conf("expandable_segments:True")  # before the first CUDA allocation, as the trainer does
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --cpu-smoke to check the code path on the CPU")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overrides, variants = _setup(args, root)
        if args.only:
            wanted = {name.strip() for name in args.only.split(",")}
            variants = [v for v in variants if _slug(v) in wanted]
        cfg = to_config(compose(overrides))
        tokenizer = modeling.load_tokenizer(cfg.model)
        on_cuda = torch.cuda.is_available() and not args.cpu_smoke
        created = time.monotonic()
        base = modeling.load_base_model(cfg.model, len(tokenizer), on_cuda)
        if on_cuda:
            torch.cuda.synchronize()
        arch = {
            "n_params": matmul_parameters(base),
            "layers": int(base.config.num_hidden_layers),
            "width": int(base.config.num_attention_heads * base.config.head_dim),
        }
        device = torch.cuda.get_device_name() if on_cuda else "cpu"
        info = {
            "device": device,
            "torch": torch.__version__,
            "parameters": sum(p.numel() for p in base.parameters()),
            "matmul_parameters": arch["n_params"],
            "model_seconds": round(time.monotonic() - created, 1),
            "timed_steps": args.steps,
            "micro_batch": args.micro_batch,
            "global_batch": args.global_batch,
            "records": args.global_batch * args.steps,
            "mfu_formula": "(4*N*T + 6*L*d*sum(l_i^2)) / step_s / 989e12",
            "header": f"Llama-3-8B shape ({sum(p.numel() for p in base.parameters()) / 1e9:.2f}B parameters, "
            f"N={arch['n_params'] / 1e9:.2f}B in matmuls) + LoRA r16 all-linear on {device}: micro "
            f"{args.micro_batch} x accumulation {args.global_batch // args.micro_batch}, "
            f"{args.steps} steps per epoch, the second of two epochs timed",
        }
        print(f"base model built in {info['model_seconds']} s on {device}", flush=True)
        shared = SharedBase(base)
        rows: list[Row] = []
        try:
            for variant in variants:
                if args.budget_s is not None and time.monotonic() - started > args.budget_s:
                    rows.append(Row(variant.name, variant.runner, "skipped: out of time"))
                elif variant.liger and not on_cuda:
                    rows.append(Row(variant.name, variant.runner, "skipped: Liger needs CUDA"))
                else:
                    # Written first, so a run stopped by its time limit shows which configuration it was in.
                    write_json(args.json, rows + [Row(variant.name, variant.runner, "started, no result")], info)
                    rows.append(_run_one(variant, overrides, root, args, shared, arch, on_cuda))
                print(row_line(rows[-1]), f"[{time.monotonic() - started:.0f} s]", flush=True)
                write_json(args.json, rows, info)
        finally:
            shared.close()
    print("\n" + table(rows, info["header"]), flush=True)
    if args.record:
        _record(rows, overrides, info, args.record, len(tokenizer))
    return rows


def _record(rows: list[Row], overrides: list[str], info: dict, path: Path, vocab_size: int) -> None:
    """The recipe's configuration (ours, gradient checkpointing on, no packing or Liger) measured here
    becomes the time noesis plan gives for this shape on this GPU type, in place of its FLOPs estimate."""
    recipe = Variant("ours", True).name
    measured = next((r for r in rows if r.variant == recipe and r.status == "ok"), None)
    if measured is None:
        print(f"not recorded: no result for {recipe}", flush=True)
        return
    rate = measured.tokens_per_s / (1 - measured.padding)  # what the plans count: padded tokens
    row = record_measured(
        to_config(compose(overrides)),
        rate,
        f"bench/llama8b.py on {info['device']}, {recipe}, micro {info['micro_batch']}: "
        f"{measured.tokens_per_s:.0f} non-pad tok/s at {100 * measured.padding:.1f}% padding, "
        f"MFU {100 * measured.mfu:.1f}%",
        vocab_size=vocab_size,
        table=path,
    )
    print(f"recorded in {path}: {row}", flush=True)


def _slug(variant: Variant) -> str:
    return "-".join(
        [variant.runner, "gc" if variant.checkpointing else "nogc"]
        + [o for o in ("liger", "packing", "compile") if getattr(variant, o)]
    )


def _run_one(
    variant: Variant,
    overrides: list[str],
    root: Path,
    args: argparse.Namespace,
    shared: SharedBase,
    arch: dict,
    on_cuda: bool,
) -> Row:
    probe_len = None if args.no_probe or not on_cuda else 2048
    total, untimed = 2 * args.steps, args.steps
    try:
        if variant.runner == "ours":
            return run_ours(variant, overrides, root, total, untimed, arch, probe_len)
        return run_hf(variant, overrides, root, total, untimed, arch)
    except Exception as err:  # one configuration failing (an OOM, a kernel) must not lose the others
        return Row(variant.name, variant.runner, f"failed: {err.__class__.__name__}: {str(err).splitlines()[0][:160]}")
    finally:
        shared.release()


if __name__ == "__main__":
    main()
