"""Optimizer parameter groups, AdamW8bit on the CPU, and the cosine schedule with warmup."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from helpers import typed

from noesis_accel.training import optim


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)
        self.norm = torch.nn.LayerNorm(64)
        self.frozen = torch.nn.Linear(64, 64)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def test_norms_and_biases_are_not_decayed_and_frozen_params_are_left_out() -> None:
    groups = optim.parameter_groups(Block(), weight_decay=0.1)
    decayed, plain = groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [torch.Size([64, 64])]
    assert len(plain["params"]) == 3  # proj.bias, norm.weight, norm.bias
    assert sum(len(g["params"]) for g in groups) == 4  # frozen.* excluded


def test_adamw8bit_trains_on_the_cpu_with_8bit_state() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
    cfg = replace(typed().optim, name="adamw8bit", lr=1e-2)
    optimizer = optim.build_optimizer(model, cfg, on_cuda=False)
    assert type(optimizer).__name__ == "AdamW8bit"
    x, y = torch.randn(256, 128), torch.randn(256, 1)
    first = None
    for _ in range(50):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.5 * first
    state = optimizer.state[model[0].weight]
    assert state["state1"].dtype == torch.uint8  # 8-bit moments for tensors >= 4096 elements


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    schedule = optim.CosineWithWarmup(warmup=10, total=100, min_lr_ratio=0.1)
    values = [schedule(s) for s in range(100)]
    assert values[0] < values[5] < values[9] <= 1.0
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert math.isclose(schedule(100), 0.1) and values[10] == 1.0
    cfg = replace(typed().optim, warmup_ratio=0.1)
    assert optim.warmup_steps(cfg, 95) == 10


def test_torch_adamw_is_fused_only_on_gpu_unless_the_config_says() -> None:
    # Asserted as `is True` / `is False`: torch's own default is None, which a plain `not` would accept.
    def fused(on_cuda: bool, setting: bool | None) -> object:
        cfg = replace(typed().optim, fused=setting)
        optimizer = optim.build_optimizer(torch.nn.Linear(4, 4), cfg, on_cuda=on_cuda)
        assert isinstance(optimizer, torch.optim.AdamW)
        return optimizer.defaults["fused"]

    assert fused(on_cuda=False, setting=None) is False
    assert fused(on_cuda=True, setting=None) is True  # built on CPU tensors: torch checks devices at step()
    assert fused(on_cuda=True, setting=False) is False
    assert fused(on_cuda=False, setting=True) is True
