"""`distributed=zero2`: DeepSpeed ZeRO-2 through Accelerate: the optimizer state and the gradients are
partitioned across processes, the weights replicated. The one module that knows DeepSpeed."""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from noesis_accel.config import Config, accumulation_steps
from noesis_accel.core.errors import ConfigError
from noesis_accel.training import footprint as fp
from noesis_accel.training.distributed import launched_world_size, single_process_rendezvous
from noesis_accel.training.strategies import checkpoint_files
from noesis_accel.training.strategies.base import Strategy

# The engine's module state, frozen parameters excluded (`exclude_frozen_parameters`), under its tag.
ENGINE_WEIGHTS = "pytorch_model/mp_rank_00_model_states.pt"


class Zero2(Strategy):
    """ZeRO-2: for LoRA (and small full fine-tunes) up to what fits with the whole base on every GPU."""

    name = "zero2"
    state_format = checkpoint_files.ZERO2

    def accelerator_kwargs(self, timeout: datetime.timedelta) -> dict[str, Any]:
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        if launched_world_size() is None:
            single_process_rendezvous()  # DeepSpeed always wants a process group, even of one
        world = launched_world_size() or 1
        kwargs: dict[str, Any] = {
            "deepspeed_plugin": DeepSpeedPlugin(
                hf_ds_config=deepspeed_config(self.cfg, accumulation_steps(self.cfg, world))
            )
        }
        if not torch.cuda.is_available():
            # DeepSpeed on the CPU: `cpu=True` would silently turn DeepSpeed off (MULTI_CPU), and with no
            # backend named Accelerate reports one process on every rank while torch.distributed runs
            # two; naming gloo makes both agree.
            kwargs["cpu"] = False
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
        else:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=timeout)]
        return kwargs

    def register_checkpoint_hooks(self, accelerator: Any) -> None:
        """None: the engine saves its own module state, frozen parameters left out at save time."""

    def full_gradient(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(parameter)  # a collective: every rank assembles the partitions

    def before_optimizer_step(self, model: Any, hook: Callable[[], None]) -> Callable[[int], None] | None:
        """Accelerate's `backward` runs the engine's step too, so the hook goes into the engine's `step`."""
        engine_step = model.step

        def step_with_hook(*args: Any, **kwargs: Any) -> Any:
            if model.is_gradient_accumulation_boundary():
                hook()
            return engine_step(*args, **kwargs)

        model.step = step_with_hook
        return None

    def unwrap(self, accelerator: Any, model: Any) -> Any:
        return accelerator.unwrap_model(model)  # the DeepSpeed engine's module

    def save_state(self, accelerator: Any, target: Path) -> None:
        accelerator.save_state(str(target), exclude_frozen_parameters=True)

    def load_state(self, accelerator: Any, path: Path, manifest: Mapping[str, Any], reset_optimizer: bool) -> None:
        load_kwargs: dict[str, Any] = {"load_module_strict": False}  # the frozen base is not in the file
        if reset_optimizer:
            load_kwargs["load_optimizer_states"] = False
        accelerator.load_state(str(path), **load_kwargs)

    def resume_refusal(self, manifest: Mapping[str, Any], world_size: int) -> str | None:
        saved_world = int(manifest.get("world_size", 1))
        if saved_world == world_size:
            return None
        return (
            f"it was written by {saved_world} DeepSpeed process(es) and this run has {world_size}: ZeRO "
            "partitions the optimizer state per process, so it cannot be restored exactly here. Resume with "
            f"distributed.num_processes={saved_world} (x num_machines), or set "
            "ckpt.on_world_size_change=reset_optimizer to continue with fresh optimizer moments"
        )

    @classmethod
    def wrote_before_formats_were_named(cls, manifest: Mapping[str, Any]) -> bool:
        return "DEEPSPEED" in str(manifest.get("distributed_type", ""))

    @classmethod
    def weights_location(cls, path: Path) -> Path:
        return path / ENGINE_WEIGHTS

    @classmethod
    def read_trainable_weights(cls, path: Path) -> dict[str, torch.Tensor]:
        # Tensors and plain Python values only: no pickled code runs.
        state = torch.load(str(cls.weights_location(path)), map_location="cpu", weights_only=True)
        return dict(state["module"])

    # ------------------------------------------------------------ the plan

    def weight_terms(self, model: fp.Footprint, world: int, optimizer: str) -> list[fp.MemoryTerm]:
        if world == 1:
            return super().weight_terms(model, world, optimizer)
        # DeepSpeed casts the module to bf16 and keeps a float32 master copy, its gradients and the
        # optimizer's state for this rank's 1/world partition; reduced gradients wait in a bucket.
        params = model.params
        partition = math.ceil(params.trainable_params / world)
        bucket = min(_reduce_bucket_elements(self.cfg), params.trainable_params) * 2
        return [
            self.base_weights_term(model),
            fp.MemoryTerm(
                "trainable weights",
                params.trainable_params * 2,
                f"{params.trainable_params:,} parameters, bf16 (DeepSpeed casts the module)",
            ),
            fp.MemoryTerm("fp32 master (ZeRO-2)", partition * 4, f"1/{world} partition, float32"),
            fp.MemoryTerm("gradients", partition * 6 + bucket, f"1/{world} partition bf16 + float32, reduce bucket"),
            fp.MemoryTerm(
                "optimizer state",
                math.ceil(model.optimizer_state_bytes / world),
                f"{optimizer}, 1/{world} partition (ZeRO-2)",
            ),
        ]

    def checkpoint_bytes(self, model: fp.Footprint, world: int) -> int:
        """ZeRO-2 adds its float32 master copy, in every rank's partition."""
        if world == 1:
            return super().checkpoint_bytes(model, world)
        return model.params.trainable_params * (2 + 4) + model.optimizer_state_bytes


def deepspeed_config(cfg: Config, accumulation: int) -> dict[str, Any]:
    """The DeepSpeed JSON from conf/ with batch, accumulation, clipping and precision filled in.

    The train config is the one source of truth: a value in the JSON that disagrees is an error
    rather than a silent override.
    """
    if not cfg.distributed.deepspeed_config:  # validate() refuses zero2 without one
        raise ConfigError("distributed.deepspeed_config: zero2 needs a DeepSpeed JSON (conf/deepspeed/zero2.json)")
    path = Path(cfg.distributed.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"distributed.deepspeed_config: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    derived = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.train.global_batch_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
    }
    for key, value in derived.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(
                f"{path}: '{key}' is {ds[key]} but the train config gives {value}; set it to \"auto\" "
                "(the train/optim config is the one source of truth)"
            )
        ds[key] = value
    bf16 = cfg.train.mixed_precision == "bf16"
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds.pop("fp16", None)
    return ds


def _reduce_bucket_elements(cfg: Config) -> int:
    try:
        with open(cfg.distributed.deepspeed_config or "") as handle:  # none: the default below
            return int(json.load(handle).get("zero_optimization", {}).get("reduce_bucket_size", 5e8))
    except (OSError, ValueError, TypeError):
        return int(5e8)
