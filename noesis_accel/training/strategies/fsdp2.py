"""`distributed=fsdp2`: PyTorch's FSDP2 (`fully_shard`): weights, gradients and optimizer state all sharded.

For bases that do not fit whole on every GPU (a 70B model in bf16 is 140 GB) and for full fine-tunes
(`peft=none`). Each decoder layer is one FSDP unit, gathered for its forward and backward and freed
after; checkpoints go through `torch.distributed.checkpoint` (DCP), which records every tensor's global
layout, so a run resumes on any process count with its optimizer state.

`fully_shard` is called directly rather than through Accelerate's FSDP plugin, for two reasons found
in accelerate 1.16's source: its state turns FSDP on only for accelerator devices (`state.py` leaves
`MULTI_CPU` out), so the code the CPU tests run would not be the code a GPU runs; and its `save_state`
writes the whole model (the frozen base included) into every checkpoint. Accelerate still owns the
process group, accumulation, the schedule, RNG and the registered objects of a checkpoint.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from noesis_accel.config import Config
from noesis_accel.training import footprint as fp
from noesis_accel.training import modeling
from noesis_accel.training.distributed import launched_world_size, single_process_rendezvous
from noesis_accel.training.strategies import checkpoint_files
from noesis_accel.training.strategies.base import OptimizerFactory, SchedulerFactory, Strategy, forget_moments

log = logging.getLogger(__name__)
DCP_DIR = "dcp"  # in a checkpoint: the sharded trainable weights ("model.*") and optimizer state ("optimizer.*")


class Fsdp2(Strategy):
    """FSDP2: every process holds 1/world of every weight; a layer is gathered whole only while it runs."""

    name = "fsdp2"
    state_format = checkpoint_files.DCP
    forward_is_collective = True

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.model: Any = None

    def accelerator_kwargs(self, timeout: datetime.timedelta) -> dict[str, Any]:
        from accelerate.utils import InitProcessGroupKwargs

        if launched_world_size() is None:
            single_process_rendezvous()  # sharding needs a process group, even of one
        return {"kwargs_handlers": [InitProcessGroupKwargs(timeout=timeout)]}

    # ------------------------------------------------------------ training

    def prepare(
        self, accelerator: Any, model: torch.nn.Module, optimizer: OptimizerFactory, scheduler: SchedulerFactory
    ) -> tuple[Any, Any, Any]:
        """Shard the model (each decoder layer, then the rest), then build the optimizer over the shards.

        The model and optimizer are not handed to `accelerator.prepare`: it would wrap the sharded model
        in DDP, and its `save_state` would pickle each rank's shards as if they were whole tensors.
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        if accelerator.mixed_precision == "bf16":
            # Float32 masters for what trains (FSDP2 wants one dtype per unit's trainable weights);
            # forward and backward run in bf16 and gradients are reduced in float32.
            for param in model.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        for layer in modeling.repeated_layers(model) or []:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)  # embeddings, final norm and LM head: one more unit
        # `generate` calls the inner model's forward: registered, it gathers the outer unit first as well.
        register_fsdp_forward_method(model, "generate")
        self.model, self.optimizer = model, optimizer(model)
        return model, self.optimizer, accelerator.prepare(scheduler(self.optimizer))

    def register_checkpoint_hooks(self, accelerator: Any) -> None:
        """None: the weights and optimizer state go through DCP (`save_state` below)."""

    @contextmanager
    def accumulate(self, accelerator: Any, model: Any) -> Iterator[None]:
        # Accelerate's accumulate knows DDP's no_sync, not FSDP2: gradients are reduce-scattered only on
        # the last micro-batch of a step, as DDP would.
        with accelerator.accumulate(model):
            model.set_requires_gradient_sync(accelerator.sync_gradients)
            yield

    def clip_grad_norm(self, accelerator: Any, parameters: list[torch.nn.Parameter], max_norm: float) -> float | None:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)  # a collective over the shards
        return float(_whole(norm))

    def full_gradient(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        assert parameter.grad is not None, "called right before an optimizer step"
        return _whole(parameter.grad)  # a collective: every rank gathers the shards

    def unwrap(self, accelerator: Any, model: Any) -> Any:
        return model  # the peft/transformers model itself, its forward now a collective

    # ------------------------------------------------------------ checkpoints

    def _sharded_state(self) -> dict[str, Any]:
        """The trainable weights' and the optimizer's shards, by the unwrapped model's parameter names."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        weights = {name: t for name, t in get_model_state_dict(self.model).items() if name in trainable}
        return {"model": weights, "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}

    def save_state(self, accelerator: Any, target: Path) -> None:
        import torch.distributed.checkpoint as dcp

        accelerator.save_state(str(target))  # schedule, RNG, sampler, progress: no model or optimizer is registered
        dcp.save(self._sharded_state(), checkpoint_id=str(target / DCP_DIR))

    def load_state(self, accelerator: Any, path: Path, manifest: Mapping[str, Any], reset_optimizer: bool) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        accelerator.load_state(str(path))
        # Loaded into this run's own layout: DCP reads the slices each rank now owns, whatever the count
        # that wrote them.
        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=False))
        if reset_optimizer:
            forget_moments(self.optimizer)  # also the zero moments `_sharded_state` created to load into
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])

    # Resharding: any process count continues a DCP checkpoint (base's resume_refusal: None).

    @classmethod
    def weights_location(cls, path: Path) -> Path:
        return path / DCP_DIR

    @classmethod
    def read_trainable_weights(cls, path: Path) -> dict[str, torch.Tensor]:
        """The whole trainable weights of a DCP checkpoint, in one process without a process group."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        reader = dcp.FileSystemReader(str(cls.weights_location(path)))
        layout = reader.read_metadata().state_dict_metadata
        state = {
            key: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in layout.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
        }
        dcp.load(state, storage_reader=reader, no_dist=True)
        return {key.removeprefix("model."): tensor for key, tensor in state.items()}

    # ------------------------------------------------------------ after training

    def _gather_trainable(self, accelerator: Any, model: Any) -> dict[str, torch.Tensor] | None:
        """Every trainable parameter gathered whole, one at a time, kept on the main process's CPU."""
        gathered = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                whole = _whole(param.detach())  # every rank takes part, in the same order
                if accelerator.is_main_process:
                    gathered[name] = whole.cpu()
        return gathered if accelerator.is_main_process else None

    def save_final(self, accelerator: Any, model: Any, target: Path) -> None:
        gathered = self._gather_trainable(accelerator, model)
        if gathered is not None:
            # peft keeps the adapter's entries of the given state dict; transformers writes it as it is.
            model.save_pretrained(str(target), state_dict=gathered, safe_serialization=True)

    def main_process_model(self, accelerator: Any, model: Any, rebuild: Callable[[], torch.nn.Module]) -> Any:
        """A whole copy on the main process: the base rebuilt from its source with the gathered weights."""
        gathered = self._gather_trainable(accelerator, model)
        if gathered is None:
            return None
        whole = rebuild()
        params = dict(whole.named_parameters())
        trainable = {name: p for name, p in params.items() if p.requires_grad}
        checkpoint_files.check_same_names("the gathered final weights", trainable, gathered)
        with torch.no_grad():
            for name, tensor in gathered.items():
                params[name].copy_(tensor.to(params[name].dtype))
        return _onto(whole, accelerator.device)

    # ------------------------------------------------------------ the plan

    def weight_terms(self, model: fp.Footprint, world: int, optimizer: str) -> list[fp.MemoryTerm]:
        """1/world of everything, plus the units gathered whole at once: the outer one (embeddings and LM
        head, kept for the whole forward and backward) and two decoder layers (the running one, the next)."""
        params = model.params
        base = self.base_weights_term(model)
        masters, master_dtype = self._masters(model)
        bf16 = self.cfg.train.mixed_precision == "bf16"
        gathered_dtype_bytes = 2 if bf16 else base.bytes / max(1, params.base_params)
        outer = min(2 * model.vocab_size * model.hidden_size, params.base_params)  # tied tables counted twice
        layer = (params.base_params + params.trainable_params - outer) / max(1, model.layers)
        gathered = int((outer + 2 * layer) * gathered_dtype_bytes)
        return [
            fp.MemoryTerm("base weights", -(-base.bytes // world), f"{base.detail}, 1/{world} shard"),
            fp.MemoryTerm(
                "trainable weights",
                -(-masters // world),
                f"{params.trainable_params:,} parameters, {master_dtype}, 1/{world} shard",
            ),
            fp.MemoryTerm("gathered units (FSDP2)", gathered, "embeddings and LM head, and two decoder layers, whole"),
            fp.MemoryTerm("gradients", -(-masters // world), f"1/{world} shard, {master_dtype}, reduce-scattered"),
            fp.MemoryTerm("optimizer state", -(-model.optimizer_state_bytes // world), f"{optimizer}, 1/{world} shard"),
        ]

    def checkpoint_bytes(self, model: fp.Footprint, world: int) -> int:
        """The trainable weights (float32 masters under bf16) and the optimizer state, in shards."""
        return self._masters(model)[0] + model.optimizer_state_bytes

    def _masters(self, model: fp.Footprint) -> tuple[int, str]:
        """The trainable weights' bytes and dtype as they train: under bf16, float32 masters (`prepare`),
        and so are their gradients."""
        params = model.params
        if self.cfg.train.mixed_precision == "bf16":
            return params.trainable_params * 4, "float32"
        return params.trainable_bytes, params.trainable_dtype


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank (a collective); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _onto(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The rebuilt model on the main process's GPU where it fits beside this rank's shards (an evaluation on
    the CPU would keep every GPU of the machine paid for meanwhile); on the CPU where it does not."""
    if device.type == "cpu":
        return model
    try:
        return model.to(device)
    except torch.OutOfMemoryError:
        model.to("cpu")
        torch.cuda.empty_cache()
        log.warning("the whole model does not fit on %s beside its shards: evaluating it on the CPU", device)
        return model
