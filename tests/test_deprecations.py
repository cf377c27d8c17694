"""A deprecated API called by our code fails the tests while it is still a warning; the libraries' own
deprecations are theirs, listed with a reason, and never fail a run."""

from __future__ import annotations

import warnings

import pytest
import torch

from noesis_accel.core import deprecations


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _call_from(module_name: str, model: torch.nn.Module) -> None:
    """`model.gradient_checkpointing_enable()` (deprecated in transformers 5) as code of `module_name` calls it."""
    code = compile("model.gradient_checkpointing_enable()\n", f"<{module_name}>", "exec")
    exec(code, {"__name__": module_name, "model": model})


def test_a_deprecated_transformers_api_called_from_noesis_accel_is_an_error() -> None:
    with pytest.raises(FutureWarning, match="gradient_checkpointing_enable` is deprecated"):
        _call_from("noesis_accel.training.probe", _tiny_llama())


def test_the_same_call_from_elsewhere_stays_a_warning() -> None:
    with pytest.warns(FutureWarning, match="gradient_checkpointing_enable` is deprecated"):
        _call_from("someone_elses_code", _tiny_llama())


def test_a_library_calling_its_own_deprecated_api_on_our_behalf_is_theirs() -> None:
    """peft's get_peft_model reads transformers' deprecated `is_gradient_checkpointing`: called from our
    apply_lora, but by peft; silenced by name in deprecations.SILENCED, and no error."""
    from omegaconf import OmegaConf

    from noesis_accel.training import modeling

    model_cfg = OmegaConf.create({"load_in_4bit": False, "gradient_checkpointing": True})
    peft_cfg = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"], "bias": "none"})
    model = _tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # so a warning that were ours would fail here, not pass silently
        deprecations.silence_library_warnings()
        modeling.enable_activation_checkpointing(model)
        modeling.apply_lora(model, model_cfg, peft_cfg)


def test_the_policy_is_on_in_the_suite_and_in_every_process_it_starts() -> None:
    import os

    assert os.environ[deprecations.ENV] == "error" and warnings.warn is deprecations._strict_warn
    assert all(entry.reason for entry in deprecations.SILENCED)
