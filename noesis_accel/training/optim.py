"""Optimizer and schedule factories: bitsandbytes AdamW8bit or torch AdamW, cosine with warmup."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from noesis_accel.config import OptimConfig

# Norm weights and biases are not decayed: shrinking them toward zero only hurts.
_NO_DECAY_MARKERS = ("bias", "norm", "ln_", "layernorm")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed and non-decayed groups (norms, biases, 1-d tensors)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(marker in name.lower() for marker in _NO_DECAY_MARKERS):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, optim_cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optim_cfg.weight_decay)
    betas = (optim_cfg.betas[0], optim_cfg.betas[1])  # validated: exactly two
    if optim_cfg.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=optim_cfg.lr, betas=betas, eps=optim_cfg.eps)
    fused = on_cuda if optim_cfg.fused is None else optim_cfg.fused
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=betas, eps=optim_cfg.eps, fused=fused)


def warmup_steps(optim_cfg: OptimConfig, total_steps: int) -> int:
    if optim_cfg.warmup_steps is not None:
        return optim_cfg.warmup_steps
    return math.ceil(total_steps * optim_cfg.warmup_ratio)


class CosineWithWarmup:
    """lr multiplier: linear 0 -> 1 over warmup, then cosine 1 -> min_lr_ratio at the last step.

    A class, not a lambda, so the schedule's shape is visible in a checkpoint and picklable.
    """

    def __init__(self, warmup: int, total: int, min_lr_ratio: float) -> None:
        self.warmup, self.total, self.min_lr_ratio = warmup, total, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, total_steps: int) -> LambdaLR:
    schedule = CosineWithWarmup(warmup_steps(optim_cfg, total_steps), total_steps, optim_cfg.min_lr_ratio)
    return LambdaLR(optimizer, schedule)
