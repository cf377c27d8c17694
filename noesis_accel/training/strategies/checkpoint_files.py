"""What a checkpoint's files hold, by format: the names recorded in manifests, and the trainable-only
save/load hooks of the replicated format (shared by the strategies whose processes hold whole weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from noesis_accel.core.errors import ResumeError

# `state_format` in a checkpoint's manifest. A strategy continues only checkpoints of its own format.
REPLICATED = "replicated"  # Accelerate's save_state: trainable weights in model.safetensors, the whole optimizer
ZERO2 = "zero2"  # the ZeRO-2 engine's files: the module state and one optimizer partition per process
DCP = "dcp"  # torch.distributed.checkpoint: sharded tensors with their global layout, loadable on any count

DESCRIPTIONS = {
    REPLICATED: "whole trainable weights and optimizer state (Accelerate's save_state)",
    ZERO2: "ZeRO-2 engine files (one optimizer partition per process)",
    DCP: "a torch.distributed.checkpoint of sharded weights and optimizer state",
}


def describe(state_format: str) -> str:
    return DESCRIPTIONS.get(state_format, f"format {state_format!r}")


# The replicated format's weights: our trainable-only hook writes them as safetensors.
REPLICATED_WEIGHTS = "model.safetensors"


def register_trainable_only_hooks(accelerator: Any) -> None:
    """Make `save_state` store only trainable parameters (LoRA adapters), not the frozen base.

    Without this a LoRA checkpoint of SmolLM2-135M is ~600 MB of frozen weights it never needs:
    the base is reloaded from its source on every start. Parameters are saved under the unwrapped
    model's names, so a checkpoint written under DDP loads in a single process and vice versa.
    """
    from safetensors.torch import load_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models):
            if i < len(weights):
                weights[i] = trainable_state_dict(unwrap_replicated(accelerator, model))

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(list(models)):
            file = Path(input_dir) / (REPLICATED_WEIGHTS if i == 0 else f"model_{i}.safetensors")
            saved = load_file(str(file))
            unwrapped = unwrap_replicated(accelerator, model)
            params = {name: p for name, p in unwrapped.named_parameters() if p.requires_grad}
            check_same_names(file, params, saved)
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(saved[name].to(param.device, param.dtype))
        models.clear()  # loaded here; Accelerate must not load them again

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def unwrap_replicated(accelerator: Any, model: Any) -> Any:
    """`accelerator.unwrap_model` for a replicated model: one process's, or a DDP-wrapped one (either
    possibly compiled). unwrap_model imports DeepSpeed (1.3 s a process) only to test for its engine,
    so a model that prepare left unwrapped is returned as it is."""
    inner = getattr(model, "_orig_mod", model)
    if not isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return model
    return accelerator.unwrap_model(model)


def check_same_names(source: object, params: dict[str, Any], saved: dict[str, Any]) -> None:
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ResumeError(
            f"{source} does not match the model's trainable parameters (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]}); was it written with other peft settings?"
        )


def trainable_state_dict(model: Any) -> dict[str, Any]:
    """Only the parameters that train (the LoRA adapters): what a checkpoint must hold."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
