"""Test probes: `NOESIS_PROBE_GRADS=PATH` saves the full gradients of the first optimizer step.

Used by the tests that prove the loss does not depend on how a global batch is split. Unset in
normal runs, where installing it costs one dictionary lookup per run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from noesis_accel.core.protocol import PROBE_GRADS_ENV


def install_gradient_probe(accelerator: Any, model: Any, is_deepspeed: bool) -> Callable[[int], None] | None:
    """A function the loop calls with the step number right before each optimizer step, or None.

    Under DeepSpeed, Accelerate's `backward` also runs the engine's step, so the probe wraps the
    engine's `step` instead and the returned function does nothing.
    """
    path = os.environ.get(PROBE_GRADS_ENV)
    if not path:
        return None
    state = {"step": 0}

    def dump() -> None:
        state["step"] += 1
        if state["step"] != 1:
            return
        grads = {}
        for name, param in accelerator.unwrap_model(model).named_parameters():
            if not param.requires_grad:
                continue
            if is_deepspeed:
                from deepspeed.utils import safe_get_full_grad

                grad = safe_get_full_grad(param)  # a collective: every rank assembles the partitions
            else:
                grad = param.grad
            grads[name] = grad.detach().float().cpu().clone()
        if accelerator.is_main_process:
            torch.save(grads, path)

    if is_deepspeed:
        engine_step = model.step

        def step_with_probe(*args: Any, **kwargs: Any) -> Any:
            if model.is_gradient_accumulation_boundary():
                dump()
            return engine_step(*args, **kwargs)

        model.step = step_with_probe
        return None
    return lambda _step: dump()
