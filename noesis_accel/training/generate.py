"""Greedy replies from a base or fine-tuned model: the demo's before/after check, and a smoke test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from noesis_accel.config import Config
from noesis_accel.training import modeling


def reply(
    model: modeling.CausalLM, tokenizer: Any, question: str, max_new_tokens: int = 24, synced: bool = False
) -> str:
    """The model's greedy answer to one user turn, rendered with the tokenizer's chat template.

    `synced`: every rank generates together (sharded weights): each keeps running forward passes until
    all have finished, so none waits alone in a collective.
    """
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    inputs = {k: v.to(next(model.parameters()).device) for k, v in inputs.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced,
        )
    model.train(was_training)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def load_finetuned(cfg: Config, adapter_dir: Path | None) -> tuple[modeling.CausalLM, Any]:
    """The base model of `cfg`, with the LoRA adapter from `adapter_dir` applied when given."""
    from peft import PeftModel

    tokenizer = modeling.load_tokenizer(cfg.model)
    model = modeling.load_base_model(cfg.model, len(tokenizer), device_is_cuda=False)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.config.use_cache = True
    return model, tokenizer
