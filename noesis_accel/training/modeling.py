"""Loading the base model and tokenizer (hub id, local dir, GGUF), LoRA via peft, k-bit, checkpointing."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, cast

import torch

from noesis_accel.config import ModelConfig, PeftConfig
from noesis_accel.config.schema import PeftBias
from noesis_accel.core.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A Hugging Face causal LM: a transformers PreTrainedModel, or a peft PeftModel around one. Both reach
# `config`, `generate` and `save_pretrained` through attribute forwarding that torch's stubs type as
# `Tensor | Module`, and the two share no base class that declares them, so the name stands for Any.
CausalLM = Any


def hub_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    token = os.environ.get("HF_TOKEN")
    if token:  # gated models (Llama) need it; never stored in the config
        kwargs["token"] = token
    return kwargs


def _gguf_cache_dir(model_cfg: ModelConfig) -> Path:
    """Where the dequantised copy of a GGUF file lives; keyed by the file's path, size and mtime."""
    assert model_cfg.gguf_file, "only a GGUF model has a dequantised copy"
    gguf_path = Path(model_cfg.name_or_path) / model_cfg.gguf_file
    if not gguf_path.is_file():
        raise ConfigError(f"model.gguf_file: {gguf_path} does not exist; check model.name_or_path and model.gguf_file")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(os.path.expanduser(model_cfg.cache_dir)) / f"{gguf_path.stem}-{key}"


def materialize_gguf(model_cfg: ModelConfig, with_weights: bool = True) -> Path:
    """Dequantise a GGUF model once into plain safetensors + tokenizer files and return that dir.

    Training a model whose config still says GGUF-quantised is refused by transformers, and
    dequantising takes a while, so it happens once per file; a crash mid-write leaves only a
    `.tmp` dir that the next attempt replaces. Callers run this on the main process first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(model_cfg)
    tokenizer_dir, weights_dir = target / "tokenizer", target / "model"
    if not tokenizer_dir.is_dir():
        tmp = target / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.name_or_path, gguf_file=model_cfg.gguf_file)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, tokenizer_dir)
    if with_weights and not weights_dir.is_dir():
        tmp = target / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model: CausalLM = AutoModelForCausalLM.from_pretrained(
            model_cfg.name_or_path, gguf_file=model_cfg.gguf_file, dtype=torch.float32
        )
        # Drop the GGUF quantisation markers: the weights are plain floats now, and transformers
        # refuses to save (or train) a model it believes is still quantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        os.replace(tmp, weights_dir)
    return target


def gguf_materialized_config(model_cfg: ModelConfig) -> Path | None:
    """The config.json of the GGUF model's dequantised copy, if one was made (None: not yet)."""
    config = _gguf_cache_dir(model_cfg) / "model" / "config.json"
    return config if config.is_file() else None


def torch_dtype(name: str) -> torch.dtype:
    """`model.dtype`'s torch dtype: "bfloat16" -> torch.bfloat16."""
    return _DTYPES[name]


def tokenizer_source(model_cfg: ModelConfig) -> str:
    if model_cfg.gguf_file:
        return str(materialize_gguf(model_cfg, with_weights=False) / "tokenizer")
    return model_cfg.name_or_path


def load_tokenizer(model_cfg: ModelConfig):  # -> PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    source = tokenizer_source(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs(model_cfg))
    except OSError as err:
        raise _unloadable(source, err) from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss and attention, so any id works; eos is standard.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_cfg: ModelConfig, vocab_size: int, device_is_cuda: bool) -> CausalLM:
    """The base model: built from `architecture`, a GGUF file, a local dir or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _DTYPES[model_cfg.dtype]
    if model_cfg.architecture:
        arch = dict(model_cfg.architecture)  # a copy: model_type is taken out of it
        model_type = arch.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.architecture.model_type is required (e.g. llama) to build a model from config")
        arch["vocab_size"] = architecture_vocab_size(arch.get("vocab_size"), vocab_size)
        config = AutoConfig.for_model(model_type, **arch)
        config._attn_implementation = model_cfg.attn_implementation
        # Random weights are created where they train: an 8B model never passes through host memory.
        device = torch.device("cuda", torch.cuda.current_device()) if device_is_cuda else torch.device("cpu")
        with device:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)

    source = str(materialize_gguf(model_cfg) / "model") if model_cfg.gguf_file else model_cfg.name_or_path
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": model_cfg.attn_implementation}
    kwargs.update(hub_kwargs(model_cfg))
    if model_cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        if not device_is_cuda:
            raise ConfigError("model.load_in_4bit: 4-bit (QLoRA) needs a CUDA GPU; none is visible")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        # k-bit weights must sit on the GPU that trains them; each process owns one device.
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise _unloadable(source, err) from None
    # On a GPU the move to the device (accelerator.prepare) drops the mapping, and until then the
    # processes share the mapped pages: copying there would hold the model once per process.
    return model if device_is_cuda else _without_file_mappings(model)


def _without_file_mappings(model: torch.nn.Module) -> torch.nn.Module:
    """Weights in memory of their own, not views of the safetensors files they were read from.

    Loaded in the file's dtype on the CPU, safetensors hands out memory-mapped tensors, which keep
    the file open for the whole run; on a Modal Volume an open file makes every commit fail.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and not tensor.is_meta:
                tensor.data = tensor.data.clone()
    return model


def architecture_vocab_size(requested: int | None, tokenizer_size: int) -> int:
    """The embedding rows: the tokenizer's length, or a larger `architecture.vocab_size` (a real model's
    shape, e.g. Llama-3's 128256, trained with a smaller tokenizer for speed checks)."""
    if requested is None:
        return tokenizer_size
    if int(requested) < tokenizer_size:
        raise ConfigError(
            f"model.architecture.vocab_size: {requested} is smaller than the tokenizer's "
            f"{tokenizer_size} tokens; raise it or remove it to use the tokenizer's length"
        )
    return int(requested)


def _unloadable(source: str, err: Exception) -> ConfigError:
    first_line = str(err).splitlines()[0] if str(err) else ""
    return ConfigError(
        f"model.name_or_path: could not load '{source}' ({err.__class__.__name__}: {first_line}). "
        "Use a local model directory, a hub id reachable from here (export HF_TOKEN for gated models), "
        "or model=smollm2_135m for the offline default."
    )


def apply_lora(model: torch.nn.Module, model_cfg: ModelConfig, peft_cfg: PeftConfig) -> torch.nn.Module:
    """Wrap the base model with LoRA adapters (and prepare a k-bit base for training)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model_cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_cfg.gradient_checkpointing)
    targets = list(peft_cfg.target_modules)
    lora = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias=cast(PeftBias, peft_cfg.bias),  # one of PeftBias: validate() checked it
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError(f"peft.target_modules: {err}") from None


def enable_activation_checkpointing(model: Any) -> None:
    """Gradient (activation) checkpointing on every decoder layer, by its current name.

    Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
    transformers renamed `gradient_checkpointing_enable` (deprecated, removed in v6); releases before
    the rename have only the old name.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, vocab_size: int, device_is_cuda: bool) -> torch.nn.Module:
    model = load_base_model(model_cfg, vocab_size, device_is_cuda)
    # The KV cache is useless in training, clashes with checkpointing, and (present) hides packed
    # records from transformers' mask builder, which only reads positions when there is no cache.
    model.config.use_cache = False
    if model_cfg.liger:
        apply_liger(model, device_is_cuda)  # before LoRA: it patches the base model's own forward
    if model_cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if peft_cfg.enabled:
        model = apply_lora(model, model_cfg, peft_cfg)
    if model_cfg.compile:
        compile_repeated_layers(model)
    return model


def apply_liger(model: CausalLM, device_is_cuda: bool) -> None:
    """Liger's kernels in place on `model`: RMSNorm, RoPE, SwiGLU, fused linear + cross-entropy.

    The fused loss keeps our loss definition: liger's patched forward passes `num_items_in_batch`
    on to `LigerForCausalLMLoss`, which then sums the token losses and divides by it (liger-kernel
    0.8.5, `transformers/model/loss_utils.py`), as transformers' own `ForCausalLMLoss` does.
    """
    if not device_is_cuda:
        raise ConfigError("model.liger: Liger kernels run on CUDA GPUs only and none is visible; set model.liger=false")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as err:
        raise ConfigError(
            f"model.liger: liger-kernel is not importable ({err}); "
            "pip install 'noesis-accel[gpu]' or set model.liger=false"
        ) from None
    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        # liger itself would only log this and train without its kernels.
        raise ConfigError(
            f"model.liger: liger-kernel has no kernels for model type '{model_type}'; set model.liger=false"
        )
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](model=model)


def repeated_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The longest ModuleList whose children are all of one class: a transformer's decoder layers."""
    best = None
    for module in model.modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) > 1
            and len({type(child) for child in module}) == 1
            and (best is None or len(module) > len(best))
        ):
            best = module
    return best


def compile_repeated_layers(model: torch.nn.Module) -> int:
    """`torch.compile` every decoder layer in place (regional compilation); returns how many.

    One layer's code compiles once and the others reuse it, so start-up stays short; in place,
    so parameter names, checkpoints and saved adapters are unchanged. Dynamic shapes, because
    every micro-batch has another length.
    """
    layers = repeated_layers(model)
    if layers is None:
        raise ConfigError("model.compile: found no repeated layers to compile in this model; set model.compile=false")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
