"""Test probes: `NOESIS_PROBE_GRADS=PATH` saves the full gradients of the first optimizer step.

Used by the tests that prove the loss does not depend on how a global batch is split. Unset in
normal runs, where installing it costs one dictionary lookup per run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from noesis_accel.core.protocol import PROBE_GRADS_ENV

if TYPE_CHECKING:
    from noesis_accel.training.strategies import Strategy


def install_gradient_probe(accelerator: Any, model: Any, strategy: Strategy) -> Callable[[int], None] | None:
    """A function the loop calls with the step number right before each optimizer step, or None (the
    strategy then runs the probe inside its engine's own step)."""
    path = os.environ.get(PROBE_GRADS_ENV)
    if not path:
        return None
    state = {"step": 0}

    def dump() -> None:
        state["step"] += 1
        if state["step"] != 1:
            return
        grads = {}
        for name, param in strategy.unwrap(accelerator, model).named_parameters():
            if param.requires_grad:  # the same order on every rank: gathering a gradient is a collective
                grads[name] = strategy.full_gradient(param).detach().float().cpu().clone()
        if accelerator.is_main_process:
            torch.save(grads, path)

    return strategy.before_optimizer_step(model, dump)
