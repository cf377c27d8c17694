"""What the benches need to time Hugging Face's Trainer as the baseline, shared by throughput.py and llama8b.py."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch
from transformers import TrainerCallback, TrainingArguments


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
