"""What the benches need to time Hugging Face's Trainer as the baseline, shared by throughput.py and llama8b.py."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from noesis_accel.config import Config
from noesis_accel.training import data as data_mod
from noesis_accel.training import modeling
from noesis_accel.training.trainer import _reset_accelerate_state


class CountingCollator:
    """Wraps a collator and records, per collated batch in order, its real and padded token counts and lengths."""

    def __init__(self, collate: Callable[[list[dict]], dict[str, torch.Tensor]]) -> None:
        self.collate = collate
        self.batches: list[tuple[int, int, list[int]]] = []  # (real, padded, record lengths)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collate(rows)
        mask = batch["attention_mask"]
        self.batches.append((int(mask.sum()), mask.numel(), [len(r["input_ids"]) for r in rows]))
        return batch


class StepClock(TrainerCallback):
    """The wall-clock time at the end of each optimizer step (after the GPU has finished it)."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.at[state.global_step] = time.perf_counter()


def sampling_arguments(strategy: str) -> dict[str, Any]:
    """TrainingArguments for a batch order ("group_by_length" or "random"), under either name transformers uses."""
    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"train_sampling_strategy": strategy}
    return {"group_by_length": strategy == "group_by_length"}


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


@dataclasses.dataclass
class BaselineRun:
    batches: list[tuple[int, int, list[int]]]  # CountingCollator's record: every collated batch, in order
    step_end: dict[int, float]  # optimizer step -> wall-clock time at its end
    peak_memory_gib: float | None


def train_hf_baseline(cfg: Config, steps: int, output_dir: Path, strategy: str = "group_by_length") -> BaselineRun:
    """Hugging Face's Trainer for `steps` steps on `cfg`'s records, model, LoRA, batch, optimizer and schedule."""
    from transformers import Trainer

    on_cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    tokenizer = modeling.load_tokenizer(cfg.model)
    prepared = data_mod.prepare(cfg.data, tokenizer, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = modeling.build_model(cfg.model, cfg.peft, len(tokenizer), on_cuda)
    collate = CountingCollator(data_mod.PaddingCollator(tokenizer.pad_token_id, cfg.data.pad_to_multiple_of))
    clock = StepClock()
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.global_batch_size // cfg.train.micro_batch_size,
        max_steps=steps,
        learning_rate=cfg.optim.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(steps * cfg.optim.warmup_ratio)),
        max_grad_norm=cfg.optim.max_grad_norm,
        optim="adamw_bnb_8bit"
        if cfg.optim.name == "adamw8bit"
        else ("adamw_torch_fused" if on_cuda else "adamw_torch"),
        bf16=cfg.train.mixed_precision == "bf16",
        use_cpu=not on_cuda,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        seed=cfg.train.seed,
        disable_tqdm=True,
        **sampling_arguments(strategy),
    )
    trainer = Trainer(model=model, args=args, train_dataset=prepared.train, data_collator=collate, callbacks=[clock])
    try:
        reset_peak_memory()
        trainer.train()
        return BaselineRun(collate.batches, clock.at, peak_memory_gib())
    finally:
        del trainer, model
        _reset_accelerate_state()  # the Trainer's Accelerator set process-wide state our next run must not inherit
