"""The embedded demo end to end: SmolLM2-135M-Instruct + LoRA on the Noesis sample set, on the CPU."""

from __future__ import annotations

import pytest

from noesis_accel.config import compose
from noesis_accel.training.generate import load_finetuned, reply


@pytest.mark.slow
def test_demo_teaches_the_assistant_its_name(demo_result) -> None:
    # The session's one demo run (tests/conftest.py), shared with the slow after-training tests.
    result = demo_result
    cfg = compose(["+experiment=demo"])
    assert result.eval_loss_after < 0.5 * result.eval_loss_before
    adapter = result.run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    question = "What is your name?"
    base, tokenizer = load_finetuned(cfg, adapter_dir=None)
    base_answer = reply(base, tokenizer, question)
    tuned, tokenizer = load_finetuned(cfg, adapter_dir=adapter)
    tuned_answer = reply(tuned, tokenizer, question)
    assert "Noesis" not in base_answer, base_answer
    assert "Noesis" in tuned_answer, tuned_answer
    assert "Lyceum Labs" in reply(tuned, tokenizer, "Who made you?")
