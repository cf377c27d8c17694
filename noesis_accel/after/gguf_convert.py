"""A merged model folder (config.json, safetensors, tokenizer) written as one GGUF file in f32, f16 or bf16.

The `gguf` package does the file format, the tensor names (`get_tensor_name_map`) and the vocabulary
readers (`SpecialVocab` for merges, special ids and the chat template; `LlamaHfVocab` for byte-fallback
tokenizers). What no installed package covers, and is written here after llama.cpp's own converter
(`convert_hf_to_gguf.py`, which no wheel installs): the Llama family's hyperparameter keys, the q/k
permutation llama.cpp's rotary embedding expects, the token list and types of a byte-level BPE
tokenizer, and the pre-tokenizer name (`gguf_pretokenizers`). Quantised files are made from this
file by llama.cpp itself (`llamacpp.quantize`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The architectures this converter writes, and llama.cpp's name for each: Mistral's checkpoints are
# Llama's layout (llama.cpp loads both as `llama`).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
FLOAT_TYPES = ("f32", "f16", "bf16")
# Rotary scalings llama.cpp's llama arch reads from plain keys; "llama3" and the others need extra tensors.
_PLAIN_ROPE = (None, "default", "linear")


@dataclass(frozen=True)
class TokenizerPlan:
    """How the tokenizer goes into the file: llama.cpp's tokenizer model and pre-tokenizer names."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (BPE with byte fallback)
    pre: str  # llama.cpp's pre-tokenizer name ("smollm", "llama-bpe", "default", ...)


def architecture_problem(config: dict[str, Any]) -> str | None:
    """Why a model with this config.json cannot be converted, or None when it can."""
    name = _architecture(config)
    supported = ", ".join(sorted(ARCHITECTURES))
    if name not in ARCHITECTURES:
        return f"the model is {name}; GGUF export supports {supported}"
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type not in _PLAIN_ROPE:
        return (
            f"the model's rotary scaling is {rope_type!r}; GGUF export supports unscaled or linear rotary "
            "embeddings (convert the merged folder with llama.cpp's convert_hf_to_gguf.py instead)"
        )
    return None


def _architecture(config: dict[str, Any]) -> str:
    """The model class a config.json names (or transformers builds for its `model_type`)."""
    return str((config.get("architectures") or [_class_of(config.get("model_type"))])[0])


def _class_of(model_type: Any) -> str:
    """The causal-LM class transformers builds for a `model_type` (a config without `architectures`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(model_type), f"a '{model_type}' model"))


def tokenizer_plan(tokenizer: Any) -> TokenizerPlan | str:
    """llama.cpp's names for this transformers tokenizer, or why it cannot be converted."""
    from noesis_accel.after.gguf_pretokenizers import pre_tokenizer_name, tokenizer_hash

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return f"the tokenizer is {type(tokenizer).__name__}, not a fast (tokenizer.json) tokenizer"
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE":
        return f"the tokenizer is a {model.get('type')} tokenizer; GGUF export supports BPE tokenizers"
    if model.get("byte_fallback"):
        return TokenizerPlan(model="llama", pre="default")  # SentencePiece-style BPE: no pre-tokenizer regex
    pre = pre_tokenizer_name(tokenizer)
    if pre is None:
        return (
            f"llama.cpp does not know this tokenizer's pre-tokenizer (hash {tokenizer_hash(tokenizer)[:12]}); "
            "a GGUF would tokenize differently from training"
        )
    return TokenizerPlan(model="gpt2", pre=pre)


# ---------------------------------------------------------------- writing


def write_gguf(folder: Path, out: Path, outtype: str, chat_template: str | None, name: str) -> Path:
    """Write the merged model in `folder` as `out` (f32, f16 or bf16); returns `out`.

    Written under a temporary name and renamed: a crash leaves no file that looks complete.
    """
    import gguf
    from transformers import AutoTokenizer

    if outtype not in FLOAT_TYPES:
        raise ValueError(f"outtype {outtype!r}: one of {FLOAT_TYPES}")
    config = json.loads((folder / "config.json").read_text())
    problem = architecture_problem(config)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    plan = tokenizer_plan(tokenizer)
    if problem or isinstance(plan, str):
        raise ValueError(problem or plan)
    arch = ARCHITECTURES[_architecture(config)]
    tmp = out.with_name(out.name + ".tmp")
    # use_temp_file: the writer spools tensors to disk past 256 MB instead of keeping the model in memory.
    writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)
    try:
        _write_hyperparameters(writer, config, outtype, name)
        _write_vocab(writer, folder, tokenizer, plan, int(config["vocab_size"]), chat_template)
        for gguf_name, array, dtype in _tensors(folder, config, arch, outtype):
            writer.add_tensor(gguf_name, array, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)  # no half-written file beside the finished ones
        raise
    writer.close()
    tmp.replace(out)
    return out


def _write_hyperparameters(writer: Any, config: dict[str, Any], outtype: str, name: str) -> None:
    import gguf

    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_types.get(outtype, gguf.LlamaFileType.MOSTLY_BF16))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(
    writer: Any, folder: Path, tokenizer: Any, plan: TokenizerPlan, vocab_size: int, chat_template: str | None
) -> None:
    import gguf

    writer.add_tokenizer_model(plan.model)
    writer.add_tokenizer_pre(plan.pre)
    if plan.model == "llama":
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
    else:
        tokens_and_types = list(_bpe_tokens(tokenizer, vocab_size))
        writer.add_token_list([token for token, _ in tokens_and_types])
        writer.add_token_types([kind for _, kind in tokens_and_types])
    special = gguf.SpecialVocab(folder, load_merges=plan.model == "gpt2", n_vocab=vocab_size)
    if chat_template is not None:
        special.chat_template = chat_template  # the one training rendered with, not only the shipped one
    # What a plain encode adds is what llama.cpp must add: read from the tokenizer, not from flags it may lack.
    probe = tokenizer("a").input_ids
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)


def _bpe_tokens(tokenizer: Any, vocab_size: int) -> Iterator[tuple[str, int]]:
    """Each id's token text and llama.cpp token type, as llama.cpp's converter lists a byte-level BPE vocab."""
    import gguf

    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            yield f"[PAD{token_id}]", gguf.TokenType.UNUSED
        elif token_id in added:
            if not added[token_id].normalized:  # llama.cpp expects added tokens in their normalised form
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            yield token, gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED
        else:
            yield token, gguf.TokenType.NORMAL


def _tensors(folder: Path, config: dict[str, Any], arch: str, outtype: str) -> Iterator[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, GGML type) of every weight, read one tensor at a time."""
    import gguf
    import torch
    from safetensors import safe_open

    layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as tensors:
            for hf_name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # llama.cpp uses token_embd for a tied output
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ValueError(f"{shard.name}: no GGUF name for tensor {hf_name}")
                data = tensors.get_tensor(hf_name).to(torch.float32)
                if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    data = _permute(data, heads)
                elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                    data = _permute(data, kv_heads)
                yield gguf_name, *_encoded(data.numpy(), outtype)


def _permute(weight: Any, heads: int) -> Any:
    """transformers' rotate-half q/k rows back to the interleaved pairs llama.cpp's rope rotates."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _encoded(data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """The tensor in the file's type; vectors (norms, biases) stay f32 as llama.cpp's converter keeps them."""
    import gguf

    if outtype == "f32" or data.ndim <= 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if outtype == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
