"""The speed options' config contract on the CPU: Liger is refused without a GPU, the options reach the
model builder, a larger `architecture.vocab_size` builds the true shape, compilation keeps names, and
runs started before these keys existed still resume."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import typed
from omegaconf import OmegaConf

from noesis_accel.config import compose, differing_math_keys, fingerprint, validate
from noesis_accel.core.errors import ConfigError
from noesis_accel.processes.train import run
from noesis_accel.training import modeling


def test_liger_on_the_cpu_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose(["+experiment=tiny", "model.liger=true"]))  # tiny trains on train.device=cpu
    problems = [line for line in str(err.value).splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and problems[0].startswith("  - model.liger:") and "model.liger=false" in problems[0]


def test_liger_with_a_lora_on_lm_head_is_refused() -> None:
    cfg = compose(["model.liger=true", "train.device=auto", "peft.target_modules=[q_proj,lm_head]"])
    with pytest.raises(ConfigError, match="model.liger: the fused linear cross-entropy reads lm_head"):
        validate(cfg)


def test_liger_reaches_the_builder_and_needs_cuda_at_run_time(tmp_path) -> None:
    """`train.device=auto` passes validation; on a machine without CUDA the builder says why it cannot."""
    cfg = compose(
        ["+experiment=tiny", "train.device=auto", "model.liger=true", f"run.root={tmp_path}", "data.eval_fraction=0"]
    )
    validate(cfg)
    with pytest.raises(ConfigError, match="model.liger: Liger kernels run on CUDA GPUs only"):
        modeling.build_model(cfg.model, cfg.peft, 49152, device_is_cuda=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.liger: Liger kernels run on CUDA GPUs only"):
            run(cfg)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_liger_missing_is_a_clear_error() -> None:
    cfg = typed(["+experiment=tiny"])
    model = modeling.load_base_model(cfg.model, 256, device_is_cuda=False)
    with pytest.raises(ConfigError, match=r"model.liger: liger-kernel is not importable .*noesis-accel\[gpu\]"):
        modeling.apply_liger(model, device_is_cuda=True)


def test_packing_with_an_attention_that_cannot_separate_records_is_refused() -> None:
    """flex_attention is a valid attention, so the packing check is the one and only problem named."""
    validate(compose(["model.attn_implementation=flex_attention"]))
    with pytest.raises(ConfigError) as err:
        validate(compose(["data.packing=true", "model.attn_implementation=flex_attention"]))
    assert str(err.value) == (
        "invalid config:\n  - data.packing: attention 'flex_attention' cannot keep packed records apart; "
        "use model.attn_implementation=eager|sdpa|flash_attention_2 or data.packing=false"
    )


def test_architecture_vocab_size_builds_the_true_shape_and_never_less_than_the_tokenizer() -> None:
    cfg = typed(["+experiment=tiny", "+model.architecture.vocab_size=1000"])
    model = modeling.load_base_model(cfg.model, 300, device_is_cuda=False)
    assert model.get_input_embeddings().weight.shape[0] == 1000
    with pytest.raises(ConfigError, match="model.architecture.vocab_size: 1000 is smaller than the tokenizer's 4000"):
        modeling.load_base_model(cfg.model, 4000, device_is_cuda=False)
    default = modeling.load_base_model(typed(["+experiment=tiny"]).model, 300, device_is_cuda=False)
    assert default.get_input_embeddings().weight.shape[0] == 300


def test_compile_wraps_each_decoder_layer_in_place() -> None:
    cfg = typed(["+experiment=tiny"])
    plain = modeling.build_model(cfg.model, cfg.peft, 256, device_is_cuda=False)
    compiled = modeling.build_model(
        typed(["+experiment=tiny", "model.compile=true"]).model, cfg.peft, 256, device_is_cuda=False
    )
    layers = modeling.repeated_layers(compiled)
    assert layers is not None and len(layers) == cfg.model.architecture["num_hidden_layers"]
    assert all(layer._compiled_call_impl is not None for layer in layers)  # compiled lazily, at the first call
    assert modeling.repeated_layers(plain)[0]._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints and adapters keep their names


def test_runs_from_before_the_speed_keys_still_resume() -> None:
    """A config saved before `data.packing`, `model.liger` and `model.compile` existed has the same math."""
    current = compose([])
    saved = OmegaConf.to_container(current, resolve=True)
    for group, key in (("data", "packing"), ("model", "liger"), ("model", "compile")):
        del saved[group][key]
    assert differing_math_keys(saved, current) == []
    assert fingerprint(saved) == fingerprint(current)
    assert differing_math_keys(saved, compose(["data.packing=true"])) == ["data.packing"]


@pytest.mark.slow
def test_a_compiled_run_trains_the_same_losses(tmp_path) -> None:
    """Inductor fuses and reorders float32 arithmetic: the losses agree to 1e-5, not bitwise."""
    common = [
        "+experiment=tiny",
        "train.max_steps=3",
        "ckpt.every=3",
        "peft.dropout=0",
        "train.eval_every=0",
        "data.eval_fraction=0",
    ]
    plain = run(compose(common + [f"run.root={tmp_path / 'plain'}"]))
    compiled = run(compose(common + [f"run.root={tmp_path / 'compiled'}", "model.compile=true"]))
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-5)
