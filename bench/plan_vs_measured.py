"""Memory: what `noesis plan` says one step holds, against one real optimizer step of the same run.

    python bench/plan_vs_measured.py --experiment tiny                                     # CPU, seconds
    python bench/plan_vs_measured.py --experiment demo model.gradient_checkpointing=true   # CPU, a minute
    python bench/plan_vs_measured.py --experiment noesis model=llama3_8b_arch +debug=gpu   # a GPU (gpu_checks.sh)

Builds the trainer in a fresh run root, makes the plan from the data and tokenizer it loaded, and trains
exactly one optimizer step: the sampler trains the epoch's largest micro-batch first, the one the plan
sizes. Measured: the step's peak growth of allocated tensor bytes. On a GPU that is
torch.cuda.max_memory_allocated() less what was allocated before; on the CPU the running sum of the
profiler's allocation events (profile_memory=True), the same quantity for the CPU allocator (process
RSS would add Python, the libraries and the allocator's caches). Compared with it: the plan's
activations + logits + gradients + optimizer state; parameters and optimizer state are also compared
one by one. On a GPU, also the plan's total per GPU (less its allowance for the CUDA context, which the
allocator does not count) against the step's absolute peak: PASS within 15%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from noesis_accel.config import compose, validate
from noesis_accel.training.footprint import actual_state_bytes
from noesis_accel.training.plan import make_plan
from noesis_accel.training.trainer import Trainer

TOLERANCE = 0.15  # the plan's total per GPU against torch.cuda.max_memory_allocated
STEP_TERMS = ("activations", "logits", "gradients", "optimizer state")  # what the first step allocates
CUDA_ALLOWANCE = "CUDA context and workspace"  # plan.cuda_overhead_gib: outside the allocator's count


def one_step_peak(trainer: Trainer) -> tuple[int, int | None]:
    """(peak growth of allocated bytes, absolute peak on a GPU or None) over one optimizer step."""
    trainer.total_steps = 1
    trainer.model.train()
    if trainer.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
        allocated_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer._train_epoch()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return peak - allocated_before, peak
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer._train_epoch()
    events = [event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        running += event.nbytes()  # an allocation is positive, a free negative
        peak = max(peak, running)
    return peak, None


def parameter_bytes(trainer: Trainer) -> tuple[int, int]:
    """(frozen, trainable) bytes of the model as it trains."""
    frozen = trainable = 0
    for param in trainer.accelerator.unwrap_model(trainer.model).parameters():
        nbytes = param.numel() * param.element_size()
        if param.requires_grad:
            trainable += nbytes
        else:
            frozen += nbytes
    return frozen, trainable


def row(name: str, planned: int, measured: int | None) -> str:
    ratio = f"{planned / measured:.3f}" if measured else "-"
    shown = f"{measured:,}" if measured is not None else "-"
    return f"| {name} | {planned:,} | {shown} | {ratio} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="tiny, demo or noesis (conf/experiment/)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. model.gradient_checkpointing=true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        cfg = validate(
            compose(
                [
                    f"+experiment={args.experiment}",
                    "train.tracker=none",
                    "train.progress_bar=false",
                    "train.eval_every=0",
                    "train.sample_prompt=null",
                    *args.overrides,
                    f"run.root={root}",
                    "run.name=plan-vs-measured",
                ]
            )
        )
        trainer = Trainer.for_config(cfg)
        try:
            plan = make_plan(cfg, prepared=trainer.data, vocab_size=len(trainer.tokenizer))
            growth, peak = one_step_peak(trainer)
            frozen, trainable = parameter_bytes(trainer)
            state = actual_state_bytes(trainer.optimizer)
        finally:
            trainer.session.close()
    gpu = plan.gpus[0]
    terms = {term.name: term.bytes for term in gpu.terms}
    measured = {"base weights": frozen, "trainable weights": trainable, "optimizer state": state}
    step_plan = sum(terms.get(name, 0) for name in STEP_TERMS)
    device = "cuda" if peak is not None else "cpu"
    how = "torch.cuda.max_memory_allocated" if peak is not None else "profiler allocation events (CPU)"
    print(
        f"\nplan vs measured: +experiment={args.experiment} {' '.join(args.overrides)}; one step of "
        f"{plan.data.micro_batch_rows} x {plan.data.micro_batch_length} tokens on {device}; measured by {how}"
    )
    print("| term | plan, bytes | measured, bytes | plan / measured |\n| --- | --- | --- | --- |")
    for term in gpu.terms:
        print(row(term.name, term.bytes, measured.get(term.name)))
    print(row("activations + logits + gradients + optimizer state (step's peak growth)", step_plan, growth))
    if peak is None:
        return 0
    # max_memory_allocated counts tensors only: the CUDA context and the allocator's slack, the plan's
    # allowance, never pass through it, so the plan's tensors alone are compared with it.
    tensors = gpu.total_bytes - terms.get(CUDA_ALLOWANCE, 0)
    ratio = tensors / peak
    verdict = "PASS" if abs(ratio - 1) <= TOLERANCE else "FAIL"
    print(row(f"total per GPU less the {CUDA_ALLOWANCE!r} allowance (max_memory_allocated)", tensors, peak))
    print(f"total per GPU: plan / measured {ratio:.3f}: {verdict} (within {TOLERANCE:.0%})")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
