"""Throughput: Hugging Face's Trainer against our loop, same model, data, batch, optimizer and steps.

    python bench/throughput.py                      # SmolLM2-135M + LoRA, batch 4, CPU
    python bench/throughput.py --steps 40 train.mixed_precision=bf16 model.dtype=bfloat16   # a GPU
    python bench/throughput.py --also packing=data.packing=true --also compile=model.compile=true

Both runners train the same LoRA model on the same tokenised, variable-length chat data with
torch AdamW, a cosine schedule and clipping. Reported: non-pad tokens per second over the timed
steps (the first `--warmup` steps are excluded for both), the padding fraction of the batches each
one actually trained on, peak GPU memory when on a GPU, and the ratio ours / Trainer. `--also` adds
runs of our loop with an option switched on, measured against the same Trainer baseline. Each runner
runs `--repeats` times, in A B / B A order, and its tokens/s pools all its rounds: on a shared machine
one round of each swings by 10% with the neighbours' load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_baseline import peak_memory_gib, reset_peak_memory, train_hf_baseline

from noesis_accel.config import compose, to_config, validate
from noesis_accel.training.metrics import read_metrics
from noesis_accel.training.plan import THROUGHPUT_TABLE, record_measured
from noesis_accel.training.trainer import Trainer

_WORDS = (
    "noesis understands the question and answers with care about models data training checkpoints volumes"
    " gpus batches tokens loss schedule warmup cosine adapter rank alpha"
).split()


def synthetic_chat(path: Path, records: int, seed: int) -> Path:
    """Chat records whose answers vary from a few words to a few hundred: padding matters here."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(records):
            answer = " ".join(rng.choice(_WORDS) for _ in range(int(rng.paretovariate(1.2) * 12)))[:2400]
            record = {
                "messages": [
                    {"role": "user", "content": f"Question {i}: tell me about {rng.choice(_WORDS)}."},
                    {"role": "assistant", "content": answer or "ok"},
                ]
            }
            handle.write(json.dumps(record) + "\n")
    return path


@dataclasses.dataclass
class Result:
    name: str
    tokens: int
    seconds: float
    padding: float
    peak_memory_gib: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_ours(overrides: list[str], steps: int, warmup: int, root: Path, variant: str = "") -> Result:
    cfg = validate(
        compose(
            overrides
            + [
                f"run.root={root}",
                f"run.name=ours{variant}",
                f"train.max_steps={steps}",
                f"ckpt.every={steps}",
                "train.eval_every=0",
                "train.tracker=none",
                "train.progress_bar=false",
                "data.eval_fraction=0",
            ]
        )
    )
    trainer = Trainer.for_config(cfg)
    reset_peak_memory()
    trainer.train()
    metrics = {m["step"]: m for m in read_metrics(trainer.rundir.path) if "loss" in m}
    tokens = metrics[steps]["tokens_seen"] - metrics[warmup]["tokens_seen"]
    seconds = metrics[steps]["time"] - metrics[warmup]["time"]
    lengths = trainer.sampler.lengths
    consumed = [micro for batch in trainer.sampler.plan(0)[warmup:steps] for micro in batch]
    padded = sum(int(lengths[m].max()) * len(m) for m in consumed)
    real = sum(int(lengths[m].sum()) for m in consumed)
    padding = 0.0 if cfg.data.packing else 1 - real / padded
    return Result(
        f"ours (length buckets{', ' + variant if variant else ''})", tokens, seconds, padding, peak_memory_gib()
    )


def run_hf_trainer(overrides: list[str], steps: int, warmup: int, root: Path, strategy: str) -> Result:
    """The baseline: transformers' Trainer on the same tokenised data and the same LoRA model."""
    cfg = to_config(compose(overrides + ["data.eval_fraction=0"]))
    run = train_hf_baseline(cfg, steps, root / f"hf-{strategy}", strategy)
    used = run.batches[warmup:steps]  # batch i is trained in step i+1 (the loader may prefetch one more)
    tokens = sum(real for real, _, _ in used)
    padding = 1 - tokens / sum(padded for _, padded, _ in used)
    return Result(
        f"HF Trainer ({strategy})", tokens, run.step_end[steps] - run.step_end[warmup], padding, run.peak_memory_gib
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps",
        type=int,
        default=40,
        help="optimizer steps; the default is one whole epoch, so both runners see the same records",
    )
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from timing (both runners)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--records", type=int, default=160)
    parser.add_argument("--random-too", action="store_true", help="also time the Trainer with random batches")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=OVERRIDE[,OVERRIDE]",
        help="one more run of ours with these overrides, e.g. packing=data.packing=true",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="rounds of every runner, the order reversed every other round; tok/s pools the rounds",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--record",
        nargs="?",
        const=THROUGHPUT_TABLE,
        type=Path,
        help="add ours' tokens/s (padding included) to the table noesis plan reads (default: the package's)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.mixed_precision=bf16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_path = synthetic_chat(root / "bench.jsonl", args.records, seed=0)
        overrides = [
            "train.device=auto",
            f"data.path={data_path}",
            "data.format=chat",
            "data.max_length=512",
            "data.min_examples=1",
            f"train.global_batch_size={args.micro_batch}",
            f"train.micro_batch_size={args.micro_batch}",
            "optim=adamw",
            "peft.dropout=0.05",
            f"data.cache_dir={root / 'cache'}",
            *args.overrides,
        ]
        runners = [lambda at: run_hf_trainer(overrides, args.steps, args.warmup, at, "group_by_length")]
        if args.random_too:
            runners.append(lambda at: run_hf_trainer(overrides, args.steps, args.warmup, at, "random"))
        ours_at = len(runners)
        runners.append(lambda at: run_ours(overrides, args.steps, args.warmup, at))
        for spec in args.also:
            name, _, extra = spec.partition("=")
            runners.append(
                lambda at, name=name, extra=extra: run_ours(
                    overrides + extra.split(","), args.steps, args.warmup, at, name
                )
            )
        rounds = [[] for _ in runners]  # rounds[runner] = its result in each round
        for round_ in range(args.repeats):
            # Every other round in reverse order (A B, B A): a machine that speeds up or slows down over
            # the run (other tenants, heat) then weighs on both runners alike instead of on the later one.
            order = range(len(runners)) if round_ % 2 == 0 else reversed(range(len(runners)))
            for i in order:
                rounds[i].append(runners[i](root / f"round{round_}"))
    results = [_pooled(runs) for runs in rounds]
    baseline, ours = results[0], results[ours_at]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"\nthroughput on {device}: {args.steps} steps (first {args.warmup} untimed), micro batch {args.micro_batch}, "
        f"{args.repeats} round(s), overrides {args.overrides or 'none'}"
    )
    if args.repeats > 1:
        for round_ in range(args.repeats):
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{runs[round_].name} {runs[round_].tokens_per_s:.1f}" for runs in rounds)
                + f" tok/s; ratio {rounds[ours_at][round_].tokens_per_s / rounds[0][round_].tokens_per_s:.2f}x"
            )
    print(f"{'runner':<34}{'non-pad tok/s':>15}{'padding':>10}{'peak GiB':>10}")
    for r in results:
        peak = f"{r.peak_memory_gib:.2f}" if r.peak_memory_gib is not None else "-"
        print(f"{r.name:<34}{r.tokens_per_s:>15.1f}{100 * r.padding:>9.1f}%{peak:>10}")
    ratio = ours.tokens_per_s / baseline.tokens_per_s
    print(f"ratio ours / HF Trainer (group_by_length): {ratio:.2f}x  (target >= 1.2x)")
    for r in results[ours_at + 1 :]:  # the --also runs
        print(
            f"ratio {r.name} / HF Trainer: {r.tokens_per_s / baseline.tokens_per_s:.2f}x; "
            f"/ ours: {r.tokens_per_s / ours.tokens_per_s:.2f}x"
        )
    if args.record:
        rate = ours.tokens_per_s / (1 - ours.padding)  # what the plans count: padded tokens
        row = record_measured(
            to_config(compose(overrides)),
            rate,
            f"bench/throughput.py on {device}, micro {args.micro_batch}, {' '.join(args.overrides) or 'fp32'}: "
            f"{ours.tokens_per_s:.1f} non-pad tok/s at {100 * ours.padding:.1f}% padding",
            table=args.record,
        )
        print(f"recorded in {args.record}: {row}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "results": [dataclasses.asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results],
                    "ratio": ratio,
                    "device": device,
                    "rounds": args.repeats,
                },
                indent=2,
            )
        )


def _pooled(runs: list[Result]) -> Result:
    """One runner's rounds as one result: all their tokens over all their timed seconds."""
    peaks = [r.peak_memory_gib for r in runs if r.peak_memory_gib is not None]
    return Result(
        runs[0].name,
        sum(r.tokens for r in runs),
        sum(r.seconds for r in runs),
        sum(r.padding for r in runs) / len(runs),
        max(peaks) if peaks else None,
    )


if __name__ == "__main__":
    main()
