"""Building the `Accelerator` for a process layout: precision, accumulation, DDP or DeepSpeed ZeRO-2.

The processes themselves are started by `launcher.py`; a process already started by `torchrun` or
`accelerate launch` is detected (by `WORLD_SIZE`) and used as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from noesis_accel.config import Config, accumulation_steps, uses_deepspeed
from noesis_accel.core.errors import ConfigError


def launched_world_size() -> int | None:
    """The world size a launcher (torchrun, accelerate launch, deepspeed) set, or None if none did."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_rendezvous() -> None:
    """The environment torchrun would set for a world of one, on a free local port."""
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        os.environ.setdefault(key, value)


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


def build_accelerator(cfg: Config, logging_dir: Path):  # -> accelerate.Accelerator
    """The Accelerator for this config: precision, accumulation, CPU/GPU, DDP or DeepSpeed, tracker."""
    import datetime

    import torch
    from accelerate import Accelerator
    from accelerate.utils import (
        DeepSpeedPlugin,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    world = launched_world_size() or 1
    accumulation = accumulation_steps(cfg, world)
    timeout = datetime.timedelta(seconds=cfg.distributed.collective_timeout_s)
    kwargs: dict[str, Any] = {
        "mixed_precision": cfg.train.mixed_precision,
        "gradient_accumulation_steps": accumulation,
        "cpu": cfg.train.device == "cpu",
        # We step the schedule once per optimizer step ourselves; Accelerate would otherwise step it
        # num_processes times per call (it assumes per-process schedules).
        "step_scheduler_with_optimizer": False,
        "project_config": ProjectConfiguration(project_dir=str(logging_dir.parent), logging_dir=str(logging_dir)),
        "log_with": None if cfg.train.tracker == "none" else cfg.train.tracker,
    }
    if uses_deepspeed(cfg):
        if launched_world_size() is None:
            _single_process_rendezvous()  # DeepSpeed always wants a process group, even of one
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, accumulation))
        if not torch.cuda.is_available():
            # DeepSpeed on the CPU: `cpu=True` would silently turn DeepSpeed off (MULTI_CPU), and with no
            # backend named Accelerate reports one process on every rank while torch.distributed runs
            # two; naming gloo makes both agree.
            kwargs["cpu"] = False
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
        else:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=timeout)]
    else:
        # LoRA on a model with gradient checkpointing has no unused parameters; searching costs a pass.
        kwargs["kwargs_handlers"] = [
            DistributedDataParallelKwargs(find_unused_parameters=False),
            InitProcessGroupKwargs(timeout=timeout),
        ]
    return Accelerator(**kwargs)
