"""What a run's model costs in memory, counted on the meta device: no weights are loaded, no memory is used.

The model is built from its config on the meta device with the same code that trains it (LoRA from
peft, the optimizer's own state initialisation), so parameter, gradient and optimizer-state bytes are
counted from real tensors' shapes and dtypes, not from a formula. Activations are counted by running
the forward pass on the meta device and adding up what autograd saves for backward, layer by layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from noesis_accel.config import Config, ModelConfig, OptimConfig
from noesis_accel.core.errors import ConfigError
from noesis_accel.training import modeling, optim

# Hub models whose shape the project ships (conf/model/<file>.yaml `architecture`), so a plan needs
# neither the network nor a token for them. The shapes are the models' published config.json.
KNOWN_SHAPES = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama3_8b_arch",
    "meta-llama/Llama-3.1-8B": "llama3_8b_arch",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3_8b_arch",
    "meta-llama/Meta-Llama-3-8B": "llama3_8b_arch",
}

# bitsandbytes NF4 with double quantisation (modeling.load_base_model): half a byte a weight, one 8-bit
# absmax per 64 weights, and one float32 absmax per 256 of those.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class MemoryTerm:
    """One part of a device's memory in a plan: its name, bytes, and how they were counted."""

    name: str
    bytes: int
    detail: str


@dataclass
class ModelShape:
    """Where the plan's model shape came from, in words, and the transformers config itself."""

    config: Any  # transformers PretrainedConfig
    source: str


@dataclass
class ParameterBytes:
    """Parameters of the model as it trains (LoRA applied), by role."""

    base_params: int  # the base model's parameters (frozen under LoRA)
    trainable_params: int
    base_bytes: int  # as stored: the model dtype, or NF4 for model.load_in_4bit
    trainable_bytes: int
    trainable_tensors: int
    trainable_dtype: str
    largest_tensor_params: int = 0


@dataclass
class ActivationProfile:
    """Bytes autograd holds for backward for one micro-batch of `tokens` tokens (`rows` x `length`)."""

    rows: int
    length: int
    per_layer: list[int]  # saved by each decoder layer
    outside_layers: int  # embeddings, final norm, the LM head's input and the loss (logits)
    layer_input: int  # one layer's input hidden states: what gradient checkpointing keeps per layer
    logits: int  # the loss's float32 log-probabilities: vocab x tokens x 4 bytes

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    def saved(self, gradient_checkpointing: bool) -> int:
        """What is held at the start of backward: every layer's saved tensors, or with checkpointing
        each layer's input plus one layer recomputed at a time."""
        if not self.per_layer:
            return self.outside_layers
        if gradient_checkpointing:
            return self.layer_input * len(self.per_layer) + max(self.per_layer) + self.outside_layers
        return sum(self.per_layer) + self.outside_layers

    def peak(self, gradient_checkpointing: bool, liger: bool = False) -> int:
        """The step's activation peak: what backward starts from, plus the gradient of the
        log-probabilities and of the logits it creates at once (two more vocab x tokens float32
        tensors), unless Liger's fused loss never builds the logits."""
        if liger:
            return self.saved(gradient_checkpointing) - self.logits
        return self.saved(gradient_checkpointing) + 2 * self.logits


@dataclass
class Footprint:
    """Everything the plan reports about the model: shape, parameters, optimizer state, activations."""

    shape_source: str
    model_type: str
    layers: int
    hidden_size: int
    vocab_size: int
    params: ParameterBytes
    optimizer_state_bytes: int  # unsharded, as one process with every trainable tensor holds it
    optimizer_state_by: str  # how it was counted
    activations: ActivationProfile | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        activations = None
        if self.activations is not None:
            a = self.activations
            activations = {
                "rows": a.rows,
                "length": a.length,
                "per_layer": a.per_layer,
                "outside_layers": a.outside_layers,
                "layer_input": a.layer_input,
                "logits": a.logits,
            }
        return {
            "shape_source": self.shape_source,
            "model_type": self.model_type,
            "layers": self.layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "params": self.params.__dict__,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "optimizer_state_by": self.optimizer_state_by,
            "activations": activations,
        }


# ---------------------------------------------------------------- the model's shape


def model_shape(model_cfg: ModelConfig, vocab_size: int | None = None) -> ModelShape:
    """The transformers config of `model.*`, read without loading a weight.

    `model.architecture` is the config itself; a local directory or a dequantised GGUF copy has a
    config.json; a GGUF file's header holds it; a hub id the project ships the shape of is read from
    conf/model/; any other hub id is asked of the hub (its config.json only).
    """
    from transformers import AutoConfig

    if model_cfg.architecture:
        arch = dict(model_cfg.architecture)
        return ModelShape(_config_from_fields(arch, vocab_size), "model.architecture")
    name = model_cfg.name_or_path
    if model_cfg.gguf_file:
        materialized = modeling.gguf_materialized_config(model_cfg)
        if materialized is not None:
            return ModelShape(AutoConfig.from_pretrained(str(materialized.parent)), f"{materialized}")
        return ModelShape(
            AutoConfig.from_pretrained(name, gguf_file=model_cfg.gguf_file), f"{model_cfg.gguf_file}'s header"
        )
    if (Path(name).expanduser() / "config.json").is_file():
        return ModelShape(AutoConfig.from_pretrained(str(Path(name).expanduser())), f"{name}/config.json")
    if name in KNOWN_SHAPES:
        from noesis_accel.config import CONF_DIR

        conf_file = CONF_DIR / "model" / f"{KNOWN_SHAPES[name]}.yaml"
        arch = dict(OmegaConf.to_container(OmegaConf.load(conf_file).architecture, resolve=True))  # type: ignore[arg-type]
        return ModelShape(_config_from_fields(arch, None), f"{name}'s published shape (conf/model/{conf_file.name})")
    try:
        return ModelShape(AutoConfig.from_pretrained(name, **modeling.hub_kwargs(model_cfg)), f"{name} (hub config)")
    except OSError as err:
        raise ConfigError(
            f"model.name_or_path: the plan needs {name}'s config.json and could not read it "
            f"({str(err).splitlines()[0] if str(err) else err.__class__.__name__}); "
            "use a local model directory, or export HF_TOKEN for a gated model"
        ) from None


def _config_from_fields(arch: dict[str, Any], vocab_size: int | None) -> Any:
    from transformers import AutoConfig

    model_type = arch.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model.architecture.model_type is required (e.g. llama) to build a model from config")
    if vocab_size is not None:
        arch["vocab_size"] = modeling.architecture_vocab_size(arch.get("vocab_size"), vocab_size)
    elif "vocab_size" not in arch:
        raise ConfigError("model.architecture: without vocab_size the model takes the tokenizer's length; set it")
    return AutoConfig.for_model(model_type, **arch)


@contextmanager
def _quiet_meta() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft and transformers warn about meta tensors they cannot initialise
        yield


def meta_model(cfg: Config, shape: ModelShape) -> torch.nn.Module:
    """The model as training builds it (dtype, attention, LoRA), on the meta device: shapes only."""
    from transformers import AutoModelForCausalLM

    config = shape.config
    config._attn_implementation = cfg.model.attn_implementation
    config.use_cache = False
    dtype = modeling.torch_dtype(cfg.model.dtype)
    with _quiet_meta(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if cfg.peft.enabled:
            # k-bit preparation needs real weights; the 4-bit base is counted by its storage formula instead.
            model = modeling.apply_lora(model, replace(cfg.model, load_in_4bit=False), cfg.peft)
    return model


# ---------------------------------------------------------------- parameters and optimizer state


def parameter_bytes(model: torch.nn.Module, load_in_4bit: bool = False) -> ParameterBytes:
    """Parameter counts and bytes by role; a 4-bit base counts its quantised linear weights as NF4."""
    base_params = trainable = base_bytes = trainable_bytes = tensors = largest = 0
    dtypes = set()
    quantised = _quantised_weight_names(model) if load_in_4bit else set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            trainable += param.numel()
            trainable_bytes += param.numel() * param.element_size()
            tensors += 1
            largest = max(largest, param.numel())
            dtypes.add(str(param.dtype).removeprefix("torch."))
            continue
        base_params += param.numel()
        if name in quantised:
            base_bytes += math.ceil(param.numel() * NF4_BYTES_PER_WEIGHT)
        else:
            base_bytes += param.numel() * param.element_size()
    return ParameterBytes(
        base_params, trainable, base_bytes, trainable_bytes, tensors, "/".join(sorted(dtypes)) or "-", largest
    )


def _quantised_weight_names(model: torch.nn.Module) -> set[str]:
    """The frozen linear weights bitsandbytes would store in 4 bits: every nn.Linear but the LM head."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not module_name.endswith("lm_head") and ".lora_" not in module_name:
            names.add(f"{module_name}.weight")
    return names


def optimizer_state_bytes(model: torch.nn.Module, optim_cfg: OptimConfig) -> tuple[int, str]:
    """The optimizer's state for the model's trainable tensors, as the optimizer itself lays it out.

    bitsandbytes' AdamW8bit is asked to initialise its state on the meta parameters (8-bit moments,
    their block maxima, the shared quantisation maps; small tensors stay float32). torch's AdamW
    creates two moments in the parameter's dtype and a float32 step counter per tensor.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optim_cfg.name == "adamw8bit":
        optimizer = optim.build_optimizer(model, optim_cfg, on_cuda=False)
        for group_index, group in enumerate(optimizer.param_groups):
            for param_index, param in enumerate(group["params"]):
                optimizer.init_state(group, param, group_index, param_index)  # type: ignore[attr-defined]
        return _unique_tensor_bytes(optimizer.state.values()), "AdamW8bit's own state initialisation"
    moments = sum(2 * p.numel() * p.element_size() for p in trainable)
    return moments + 4 * len(trainable), "AdamW: two moments in the parameters' dtype + a float32 step per tensor"


def _unique_tensor_bytes(states: Any) -> int:
    """Bytes of the tensors in optimizer states, a tensor shared between parameters counted once."""
    seen: dict[int, int] = {}
    for state in states:
        for value in state.values():
            if torch.is_tensor(value):
                seen[id(value)] = value.numel() * value.element_size()
    return sum(seen.values())


def actual_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The same count on a real optimizer after a step (each storage once): what the plan is checked against."""
    seen: dict[tuple[str, int], int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storage = value.untyped_storage()
                seen[(value.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------- activations


class _FusedAttention(torch.autograd.Function):
    """What the fused attention kernels (flash and memory-efficient, CUDA's and the CPU's) keep for the
    backward: q, k, v, the output, a float32 log-sum-exp per query row, and a boolean mask converted to
    the query's dtype (a new tensor at each layer). On the meta device torch falls back to the math
    kernel, which would keep the rows x heads x L x L probabilities: 1 GiB a layer for the 8B recipe,
    that no fused kernel stores."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any) -> torch.Tensor:
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        kept = [query, key, value, out, log_sum_exp]
        if mask is not None:
            kept.append(mask.new_empty(mask.shape, dtype=query.dtype) if mask.dtype == torch.bool else mask)
        ctx.save_for_backward(*kept)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # never run: the profile only counts what is saved
        raise NotImplementedError


def _fused_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, *_: Any, **__: Any
) -> torch.Tensor:
    return _FusedAttention.apply(query, key, value, attn_mask)


class _FusedDropout(torch.autograd.Function):
    """CUDA's dropout (native_dropout) keeps a one-byte boolean mask for the backward; the CPU's, and
    the meta device's, multiply by a mask in the input's dtype (4 bytes a value for LoRA's float32
    input). With dropout on all seven LoRA modules of a Llama layer that is 0.5 GiB a layer apart."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(value.new_empty(value.shape, dtype=torch.bool))
        return value.new_empty(value.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # never run: the profile only counts what is saved
        raise NotImplementedError


def _cuda_dropout(value: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    if not training or p == 0.0:
        return value
    return _FusedDropout.apply(value)


@contextmanager
def _kernels_on_meta(model: torch.nn.Module, gpu: bool) -> Iterator[None]:
    """The meta device runs torch's reference kernels; the saved tensors are counted as the kernels of
    the device that trains keep them: sdpa as the fused attention kernels (both devices; eager
    attention does keep its probabilities), and dropout with CUDA's boolean mask when `gpu`."""
    functional = torch.nn.functional
    originals = {"scaled_dot_product_attention": functional.scaled_dot_product_attention, "dropout": functional.dropout}
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "eager") == "sdpa":
        functional.scaled_dot_product_attention = _fused_attention
    if gpu:
        functional.dropout = _cuda_dropout  # type: ignore[assignment]
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(functional, name, original)


def activation_profile(model: torch.nn.Module, rows: int, length: int, gpu: bool = False) -> ActivationProfile:
    """Run one training forward on the meta device and count, per decoder layer, what autograd saves
    (as the kernels of a GPU, `gpu`, or of the CPU keep it: `_kernels_on_meta`).

    Parameters saved for backward (a linear layer keeps its weight) are not activations and are left
    out; views of one tensor count once. The loss runs as in training (labels given), so the float32
    log-probabilities the cross-entropy keeps are counted too.
    """
    layers = modeling.repeated_layers(model)
    layer_list = list(layers) if layers is not None else []
    params = {id(p) for p in model.parameters()}
    current: list[int | None] = [None]
    saved: dict[int, tuple[int | None, int]] = {}
    kept: list[Any] = []  # the outputs and the saved tensors, alive until counted: a freed one could reuse an id

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in params and id(tensor) not in params and id(base) not in saved:
            saved[id(base)] = (current[0], base.numel() * base.element_size())
            kept.append(base)  # its Python object alive: a tensor made inside a kernel could free it and reuse its id
        return tensor

    handles = []
    for index, layer in enumerate(layer_list):
        handles.append(layer.register_forward_pre_hook(lambda _m, _a, i=index: current.__setitem__(0, i)))
        handles.append(layer.register_forward_hook(lambda _m, _a, _o: current.__setitem__(0, None)))
    ids = torch.zeros(rows, length, dtype=torch.long, device="meta")
    try:
        model.train()
        with (
            _quiet_meta(),
            _kernels_on_meta(model, gpu),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            kept.append(model(input_ids=ids, labels=ids, **_mask_for(model, ids)))
    finally:
        for handle in handles:
            handle.remove()
    per_layer = [0] * len(layer_list)
    outside = 0
    for layer_index, nbytes in saved.values():
        if layer_index is None:
            outside += nbytes
        else:
            per_layer[layer_index] += nbytes
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0))
    vocab = int(getattr(config, "vocab_size", 0))
    # The hidden states are in the model's dtype (the frozen weights'; LoRA's float32 adapters add to it).
    dtype_bytes = next(p for p in model.parameters() if not p.requires_grad).element_size() if params else 4
    return ActivationProfile(
        rows=rows,
        length=length,
        per_layer=per_layer,
        outside_layers=outside,
        layer_input=rows * length * hidden * dtype_bytes,
        logits=rows * length * vocab * 4,
    )


def _mask_for(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The attention mask a padded batch brings: eager attention builds (and keeps) a float mask from
    the 2-D one; the fused kernels get the 4-D boolean mask transformers would build, given as such,
    because the checks that would build it read values, which the meta device does not have."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "eager") == "eager":
        return {"attention_mask": torch.ones_like(ids)}
    rows, length = ids.shape
    return {"attention_mask": torch.ones(rows, 1, length, length, dtype=torch.bool, device=ids.device)}


# ---------------------------------------------------------------- all of it


def footprint(cfg: Config, rows: int, length: int, vocab_size: int | None = None, gpu: bool = False) -> Footprint:
    """The model of `cfg` counted on the meta device, with activations for one `rows` x `length` micro-batch
    as a GPU (`gpu`) or the CPU trains it."""
    shape = model_shape(cfg.model, vocab_size)
    model = meta_model(cfg, shape)
    params = parameter_bytes(model, cfg.model.load_in_4bit)
    state, how = optimizer_state_bytes(model, cfg.optim)
    config = shape.config
    return Footprint(
        shape_source=shape.source,
        model_type=str(config.model_type),
        layers=int(getattr(config, "num_hidden_layers", 0)),
        hidden_size=int(getattr(config, "hidden_size", 0)),
        vocab_size=int(getattr(config, "vocab_size", 0)),
        params=params,
        optimizer_state_bytes=state,
        optimizer_state_by=how,
        activations=activation_profile(model, rows, length, gpu) if rows and length else None,
    )


def dump(fp: Footprint) -> str:
    return json.dumps(fp.to_json(), indent=2)
