"""A run's trained model rebuilt from its run directory alone: the base model of its config.yaml plus
the final adapter, or the LoRA weights of any complete checkpoint. Used by export and eval."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from noesis_accel.config import Config, ModelConfig, to_config
from noesis_accel.core.errors import UserError
from noesis_accel.rundir.continuing import saved_config
from noesis_accel.rundir.layout import RunDir
from noesis_accel.training import modeling, strategies


@dataclass(frozen=True)
class WeightsSource:
    """Where the trained weights come from: the final adapter/model dir, or one checkpoint dir."""

    path: Path
    label: str  # "adapter", "model" or "step-000123"
    is_checkpoint: bool
    step: int | None = None
    weights_file: Path | None = None  # a checkpoint's file (or directory) holding the trained parameters
    reader: type[strategies.Strategy] | None = None  # a checkpoint's: the strategy whose format it is in


@dataclass
class LoadedRun:
    cfg: Config  # the run's config (model/data possibly overridden for evaluation)
    model: modeling.CausalLM  # a PeftModel for LoRA runs, the full model otherwise
    tokenizer: Any
    source: WeightsSource


def run_config(rundir: RunDir) -> Config:
    """The config the run was trained with (config.yaml), typed by the schema."""
    return to_config(saved_config(rundir.require(), "it cannot be read back for export or evaluation"))


def weights_source(rundir: RunDir, checkpoint: str | os.PathLike | None = None) -> WeightsSource:
    """The final weights, or the checkpoint `checkpoint` names (a path, or a step-NNNNNN name in the run).

    Raises a one-line UserError for a run without final weights, or a checkpoint that is incomplete
    or holds no trained parameters.
    """
    from noesis_accel.rundir.checkpoint import checkpoint_problem, read_manifest

    if checkpoint is None:
        final = rundir.final_weights()
        return WeightsSource(final, final.name, is_checkpoint=False)
    path = Path(os.path.expanduser(str(checkpoint)))
    if not path.is_dir() and (rundir.checkpoints / str(checkpoint)).is_dir():
        path = rundir.checkpoints / str(checkpoint)
    if not path.is_dir():
        known = ", ".join(p.name for _, p in rundir.step_dirs()) or "none"
        raise UserError(f"checkpoint={checkpoint}: no such directory; checkpoints of {rundir.path}: {known}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} is incomplete ({problem}); choose a complete one from {path.parent}")
    manifest = read_manifest(path)
    reader = strategies.reader_of(path, manifest)  # which files hold what: the strategy's
    weights = reader.weights_location(path)
    if not weights.exists():
        raise UserError(
            f"checkpoint {path} has no {weights.relative_to(path)} (the trained weights); "
            "it cannot be loaded; choose another checkpoint"
        )
    return WeightsSource(
        path,
        path.name,
        is_checkpoint=True,
        step=int(manifest.get("step", 0)) or None,
        weights_file=weights,
        reader=reader,
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _seeded_base(cfg: Config, model_cfg: ModelConfig, vocab_size: int, on_cuda: bool) -> modeling.CausalLM:
    """The base model; one built from `model.architecture` is drawn after `set_seed(train.seed)`.

    That is how the trainer drew it, so the weights are the same.
    """
    if model_cfg.architecture:
        from accelerate.utils import set_seed

        set_seed(cfg.train.seed)
    return modeling.load_base_model(model_cfg, vocab_size, device_is_cuda=on_cuda)


def load_base(cfg: Config, device: torch.device | str = "cpu") -> modeling.CausalLM:
    """The run's base model alone, in eval mode: the "before" of a run that trained every weight."""
    target = torch.device(device)
    model = _seeded_base(cfg, cfg.model, len(modeling.load_tokenizer(cfg.model)), target.type == "cuda")
    if not cfg.model.load_in_4bit:
        model.to(target)
    model.eval()
    model.config.use_cache = True
    return model


def load_run_model(cfg: Config, source: WeightsSource, device: str = "cpu", for_merge: bool = False) -> LoadedRun:
    """The base model of `cfg` with the run's trained weights applied, in eval mode on `device`.

    `for_merge` loads a 4-bit (QLoRA) base in its unquantised dtype, since merged weights are saved
    in the base dtype. A base built from `model.architecture` (random weights, the tests' tiny model)
    is rebuilt after seeding with `train.seed`, as the trainer built it.
    """
    target = resolve_device(device)
    model_cfg = cfg.model
    if for_merge and model_cfg.load_in_4bit:
        model_cfg = replace(model_cfg, load_in_4bit=False)
    tokenizer = modeling.load_tokenizer(model_cfg)
    peft_enabled = cfg.peft.enabled
    model: modeling.CausalLM
    if not peft_enabled and not source.is_checkpoint:  # a full fine-tune's final model/ is complete in itself
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=getattr(torch, model_cfg.dtype))
    else:
        model = _seeded_base(cfg, model_cfg, len(tokenizer), target.type == "cuda")
        if peft_enabled and source.is_checkpoint:
            model = modeling.apply_lora(model, model_cfg, cfg.peft)
            _load_trainable(model, source)
        elif peft_enabled:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(source.path))
        else:
            _load_trainable(model, source)
    if not model_cfg.load_in_4bit:  # a k-bit model already sits on its GPU
        model.to(target)
    model.eval()
    model.config.use_cache = True
    return LoadedRun(cfg, model, tokenizer, source)


def _load_trainable(model: torch.nn.Module, source: WeightsSource) -> None:
    """Copy a checkpoint's trainable parameters (saved under the unwrapped model's names) into `model`.

    The strategy that wrote the checkpoint reads it. A ZeRO-2 file may also hold frozen tensors (a tied
    lm_head); they equal the base and are skipped.
    """
    assert source.reader is not None, "a checkpoint source names the strategy that reads it"
    file = source.weights_file
    saved = source.reader.read_trainable_weights(source.path)
    params = dict(model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    unexpected = sorted(set(saved) - set(model.state_dict()))
    missing = sorted(trainable - set(saved))
    saved = {name: tensor for name, tensor in saved.items() if name in trainable}
    if unexpected or missing:
        raise UserError(
            f"{file} does not match the run's model (unexpected: {unexpected[:2]}, missing: {missing[:2]}); "
            "was config.yaml edited after the run, or the checkpoint copied from another run?"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
