"""`Strategy`: everything that differs between ways of spreading a run over processes, in one class each.

The trainer, the checkpoint manager, the probes and the export path ask the run's strategy instead of
testing which one it is. The default behaviour here is a replicated model (one process or DDP) saved
through Accelerate's `save_state`, trainable parameters only.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch

from noesis_accel.config import Config
from noesis_accel.core.errors import ResumeError
from noesis_accel.training import footprint as fp
from noesis_accel.training.strategies import checkpoint_files

# Built by the trainer: the optimizer over a (possibly sharded) model, the schedule over that optimizer.
OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class Strategy:
    """One distributed strategy, built once per run from `distributed.*` (see `build_strategy`).

    `name` is `distributed.type` (conf/distributed/NAME.yaml); `state_format` names what its
    checkpoints hold, recorded in every manifest so a restart knows which strategies can read them.
    """

    name: ClassVar[str]
    state_format: ClassVar[str] = checkpoint_files.REPLICATED
    # A forward pass that is itself a collective (sharded weights are gathered inside it): every rank must
    # run the same number of them, in evaluation and generation as in training.
    forward_is_collective: ClassVar[bool] = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.optimizer: Any = None  # set by `prepare`

    # ------------------------------------------------------------ the Accelerator

    def accelerator_kwargs(self, timeout: datetime.timedelta) -> dict[str, Any]:
        """The `Accelerator(...)` arguments that belong to this strategy: plugins and process-group handlers."""
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        # LoRA on a model with gradient checkpointing has no unused parameters; searching costs a pass.
        return {
            "kwargs_handlers": [
                DistributedDataParallelKwargs(find_unused_parameters=False),
                InitProcessGroupKwargs(timeout=timeout),
            ]
        }

    # ------------------------------------------------------------ training

    def prepare(
        self, accelerator: Any, model: torch.nn.Module, optimizer: OptimizerFactory, scheduler: SchedulerFactory
    ) -> tuple[Any, Any, Any]:
        """The model, optimizer and schedule ready to train (wrapped, sharded, registered for checkpointing)."""
        built = optimizer(model)
        prepared = accelerator.prepare(model, built, scheduler(built))
        self.register_checkpoint_hooks(accelerator)
        self.optimizer = prepared[1]
        return prepared

    def register_checkpoint_hooks(self, accelerator: Any) -> None:
        """`save_state` stores only trainable parameters (the LoRA adapters), not the frozen base."""
        checkpoint_files.register_trainable_only_hooks(accelerator)

    def accumulate(self, accelerator: Any, model: Any) -> AbstractContextManager:
        """The context of one micro-batch: gradients are synchronised on the last one of a step only."""
        return accelerator.accumulate(model)

    def clip_grad_norm(self, accelerator: Any, parameters: list[torch.nn.Parameter], max_norm: float) -> float | None:
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
        return float(norm) if norm is not None else None

    def full_gradient(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        """A trainable parameter's whole reduced gradient, on every rank (a collective where it is sharded)."""
        assert parameter.grad is not None, "called right before an optimizer step"
        return parameter.grad

    def before_optimizer_step(self, model: Any, hook: Callable[[], None]) -> Callable[[int], None] | None:
        """Run `hook` right before each optimizer step: returned for the loop to call, or installed inside
        the engine where the step happens during `backward` (then None is returned)."""
        return lambda _step: hook()

    def unwrap(self, accelerator: Any, model: Any) -> Any:
        """The model as transformers and peft built it, for evaluation and generation on this rank."""
        return checkpoint_files.unwrap_replicated(accelerator, model)

    # ------------------------------------------------------------ checkpoints

    def save_state(self, accelerator: Any, target: Path) -> None:
        """Write this rank's part of a checkpoint into `target` (every rank calls it)."""
        accelerator.save_state(str(target))

    def load_state(self, accelerator: Any, path: Path, manifest: Mapping[str, Any], reset_optimizer: bool) -> None:
        """Restore everything `save_state` wrote (every rank calls it); `reset_optimizer`: all but the
        optimizer's moments, which start afresh as at step 0."""
        accelerator.load_state(str(path))
        if reset_optimizer:
            forget_moments(self.optimizer)

    def resume_refusal(self, manifest: Mapping[str, Any], world_size: int) -> str | None:
        """Why a checkpoint of this strategy's format cannot be continued exactly on `world_size` processes,
        or None. A replicated checkpoint holds the whole optimizer state: any process count loads it."""
        return None

    def check_format(self, path: Path, manifest: Mapping[str, Any]) -> None:
        """Refuse, in one line, a checkpoint another strategy's format wrote."""
        from noesis_accel.training.strategies import saved_format, strategies_reading

        saved = saved_format(manifest)
        if saved != self.state_format:
            readers = strategies_reading(saved)
            raise ResumeError(
                f"checkpoint {path} holds {checkpoint_files.describe(saved)} and distributed={self.name} "
                f"reads {checkpoint_files.describe(self.state_format)}; resume it with "
                f"distributed={' or '.join(readers) or '?'}"
            )

    @classmethod
    def wrote_before_formats_were_named(cls, manifest: Mapping[str, Any]) -> bool:
        """Whether a manifest without `state_format` (an older checkpoint) is this strategy's."""
        return False

    @classmethod
    def weights_location(cls, path: Path) -> Path:
        """The file (or directory) of a checkpoint of this format that holds the trained parameters."""
        return path / checkpoint_files.REPLICATED_WEIGHTS

    @classmethod
    def read_trainable_weights(cls, path: Path) -> dict[str, torch.Tensor]:
        """A checkpoint's trained parameters, whole, under the unwrapped model's names (one process, no
        process group: export and eval read them)."""
        from safetensors.torch import load_file

        return load_file(str(cls.weights_location(path)))

    # ------------------------------------------------------------ after training

    def save_final(self, accelerator: Any, model: Any, target: Path) -> None:
        """The final adapter (LoRA) or model, written by the main process; every rank calls it."""
        if accelerator.is_main_process:
            self.unwrap(accelerator, model).save_pretrained(str(target), safe_serialization=True)

    def main_process_model(self, accelerator: Any, model: Any, rebuild: Callable[[], torch.nn.Module]) -> Any:
        """A whole model the main process can save, generate with and evaluate alone (None elsewhere)."""
        return self.unwrap(accelerator, model) if accelerator.is_main_process else None

    # ------------------------------------------------------------ the plan (bytes per device)

    def base_weights_term(self, model: fp.Footprint) -> fp.MemoryTerm:
        params = model.params
        dtype = "NF4 4-bit" if self.cfg.model.load_in_4bit else self.cfg.model.dtype
        return fp.MemoryTerm("base weights", params.base_bytes, f"{params.base_params:,} parameters, {dtype}")

    def weight_terms(self, model: fp.Footprint, world: int, optimizer: str) -> list[fp.MemoryTerm]:
        """Weights, gradients and optimizer state on one device, as this strategy lays them out."""
        params, ddp = model.params, world > 1
        return [
            self.base_weights_term(model),
            fp.MemoryTerm(
                "trainable weights",
                params.trainable_bytes,
                f"{params.trainable_params:,} parameters, {params.trainable_dtype}",
            ),
            fp.MemoryTerm(
                "gradients",
                params.trainable_bytes * (2 if ddp else 1),
                "same dtype" + (" + DDP's bucket copy" if ddp else ""),
            ),
            fp.MemoryTerm("optimizer state", model.optimizer_state_bytes, f"{optimizer} ({model.optimizer_state_by})"),
        ]

    def checkpoint_bytes(self, model: fp.Footprint, world: int) -> int:
        """One checkpoint: the trainable weights and the optimizer's state (RNG and sampler state aside)."""
        return model.params.trainable_bytes + model.optimizer_state_bytes


def forget_moments(optimizer: Any) -> None:
    """Empty an optimizer's per-parameter state: torch's AdamW and bitsandbytes' create it again, fresh,
    at the next step."""
    getattr(optimizer, "optimizer", optimizer).state.clear()
