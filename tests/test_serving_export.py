"""From the run dir to a model people serve: every export checked (verify.json), GGUF files checked in
llama.cpp itself (the `gguf` extra; those tests skip with the reason where it is not installed), and a
LoRA adapter in the shape vLLM's and TGI's loaders take."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import typed

from noesis_accel.after import export
from noesis_accel.after.export import export_run
from noesis_accel.after.export_checks import ANSWER_TOKENS, VERIFY_FILE
from noesis_accel.after.gguf_convert import TokenizerPlan, architecture_problem, tokenizer_plan
from noesis_accel.after.gguf_export import gguf_types
from noesis_accel.after.serving_adapter import (
    REQUIRED_FIELDS,
    SERVABLE_MODULES,
    max_lora_rank_flag,
    module_names,
    serving_problems,
)
from noesis_accel.config import compose
from noesis_accel.core.errors import UserError

LLAMA_CPP_MISSING = "llama-cpp-python (the gguf extra: pip install -e '.[gguf]') is not installed"


def _llama_cpp_or_skip() -> None:
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from noesis_accel.processes.train import run

    root = tmp_path_factory.mktemp("runs")
    result = run(compose(["+experiment=tiny", f"run.root={root}", "train.max_steps=6", "train.eval_every=0"]))
    assert result.state == "completed"
    return result.run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export*", "checkpoints"))
    return copy


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------- options and rules (no model)


def test_gguf_types_are_read_in_order_and_an_unknown_one_is_one_line() -> None:
    assert gguf_types("f16,q8_0") == ["f16", "q8_0"]
    assert gguf_types("[Q4_K_M, f16, q4_k_m]") == ["q4_k_m", "f16"]
    assert gguf_types(None) == [] and gguf_types("") == []
    with pytest.raises(UserError, match=r"gguf=q3: no GGUF type 'q3'; one or more of f32, f16, bf16, q8_0"):
        gguf_types("q3")


def test_architectures_gguf_export_cannot_take_are_named() -> None:
    assert architecture_problem({"architectures": ["LlamaForCausalLM"]}) is None
    assert architecture_problem({"model_type": "llama"}) is None  # a config built from model.architecture
    problem = architecture_problem({"architectures": ["GPT2LMHeadModel"]})
    assert problem == "the model is GPT2LMHeadModel; GGUF export supports LlamaForCausalLM, MistralForCausalLM"
    scaled = {"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert "rotary scaling is 'llama3'" in str(architecture_problem(scaled))


def test_the_smollm2_tokenizer_is_named_as_llama_cpp_names_it(tiny_run, monkeypatch) -> None:
    from noesis_accel.after import gguf_pretokenizers
    from noesis_accel.training.modeling import load_tokenizer

    tokenizer = load_tokenizer(typed(["+experiment=tiny"]).model)
    assert tokenizer_plan(tokenizer) == TokenizerPlan(model="gpt2", pre="smollm")
    monkeypatch.setattr(gguf_pretokenizers, "PRE_TOKENIZERS", {})
    assert "llama.cpp does not know this tokenizer's pre-tokenizer" in str(tokenizer_plan(tokenizer))


def test_what_the_serving_engines_refuse_is_named() -> None:
    servable = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    assert serving_problems(servable) == []
    assert serving_problems({"lora_alpha": 32, "target_modules": ["q_proj"]}) == ["r is missing"]
    [saved] = serving_problems({**servable, "modules_to_save": ["lm_head"]})
    assert saved.startswith("modules_to_save=['lm_head']") and "vLLM loads only modules_to_save=None" in saved
    assert "DoRA" in serving_problems({**servable, "use_dora": True})[0]
    assert "bias='all'" in serving_problems({**servable, "bias": "all"})[0]
    [embed] = serving_problems({**servable, "target_modules": ["q_proj", "model.embed_tokens"]})
    assert embed.startswith("target_modules include embed_tokens")
    assert module_names(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "v_proj"]) == [
        "q_proj",
        "v_proj",
    ]
    assert max_lora_rank_flag(16) == "" and max_lora_rank_flag(24) == " --max-lora-rank 32"


# ---------------------------------------------------------------- every export is checked


def test_every_export_checks_the_merge_and_keeps_the_result_in_verify_json(tiny_run, tmp_path) -> None:
    lines: list[str] = []
    out = export_run(tiny_run, out=tmp_path / "export", log=lines.append)
    verify = json.loads((out / VERIFY_FILE).read_text())
    assert verify["status"] == "passed" and "11 from" in verify["prompts"]
    [merged] = verify["checks"]
    assert merged["name"] == "merged vs base + adapter" and merged["passed"] is True
    assert 0 <= merged["figures"]["max_abs_diff"] <= merged["figures"]["tolerance"]
    assert any(line.startswith("  check merged vs base + adapter [safetensors]: ok") for line in lines)


def test_a_corrupted_merge_fails_its_check_in_one_line_and_the_export_is_kept(tiny_run, tmp_path, monkeypatch, capsys):
    from peft.tuners.lora import LoraModel  # where PeftModel.merge_and_unload goes

    merge = LoraModel.merge_and_unload

    def merge_with_one_weight_perturbed(self, *args, **kwargs):
        model = merge(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", merge_with_one_weight_perturbed)
    out = tmp_path / "export"
    with pytest.raises(SystemExit) as exited:
        export.main([str(tiny_run), f"out={out}"])
    assert exited.value.code == 1
    line = _error_line(capsys)
    assert line.startswith("error: export check failed: merged vs base + adapter [safetensors]: max |logit")
    assert "above the float32 tolerance" in line and "marked failed in verify.json" in line
    verify = json.loads((out / VERIFY_FILE).read_text())
    assert verify["status"] == "failed" and verify["checks"][0]["passed"] is False
    assert (out / "config.json").is_file()  # kept, for a look at what went wrong


def test_gguf_without_the_extra_is_one_line_before_anything_is_merged(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    out = tmp_path / "export"
    with pytest.raises(SystemExit) as exited:
        export.main([str(tiny_run), f"out={out}", "gguf=q8_0"])
    assert exited.value.code == 2
    line = _error_line(capsys)
    assert "llama-cpp-python, which is not installed; pip install -e '.[gguf]'" in line
    assert not out.exists() and not out.with_name("export.tmp").exists()


def test_an_architecture_gguf_cannot_take_is_refused_before_merging(tiny_run, tmp_path, monkeypatch, capsys):
    from noesis_accel.after import gguf_export, llamacpp

    monkeypatch.setattr(llamacpp, "require", lambda: None)
    monkeypatch.setattr(gguf_export, "base_config", lambda cfg: {"architectures": ["Qwen3MoeForCausalLM"]})
    out = tmp_path / "export"
    with pytest.raises(SystemExit):
        export.main([str(tiny_run), f"out={out}", "gguf=f16"])
    line = _error_line(capsys)
    assert "cannot convert this run: the model is Qwen3MoeForCausalLM; GGUF export supports LlamaForCausalLM" in line
    assert not out.exists()


# ---------------------------------------------------------------- an adapter a server loads


def test_the_default_adapter_is_written_as_vllm_reads_it_and_loads_to_the_same_model(tiny_run, tmp_path) -> None:
    from peft import PeftModel

    from noesis_accel.after.runmodel import load_base, load_run_model, run_config, weights_source
    from noesis_accel.rundir.layout import RunDir

    lines: list[str] = []
    out = export_run(tiny_run, out=tmp_path / "export", adapter=True, log=lines.append)
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]  # adapter=true alone merges nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no parked copy left beside it
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # vLLM's PEFTHelper.from_dict: these fields are required, and it refuses the rest below.
    assert set(REQUIRED_FIELDS) <= set(config)
    assert isinstance(config["r"], int) and isinstance(config["lora_alpha"], int)
    assert config["target_modules"] == sorted(SERVABLE_MODULES)
    assert not config.get("modules_to_save") and not config.get("use_dora") and config["bias"] == "none"
    assert Path(config["base_model_name_or_path"], "config.json").is_file()  # the base it was trained on
    assert any(f"--enable-lora --lora-modules tiny={out / 'adapter'}" in line for line in lines)

    cfg = run_config(RunDir(tiny_run))
    served = PeftModel.from_pretrained(load_base(cfg), str(out / "adapter"))
    trained = load_run_model(cfg, weights_source(RunDir(tiny_run))).model
    ids = torch.tensor([[1, 9519, 314, 253, 2567, 2]])
    with torch.no_grad():
        assert torch.equal(served(ids).logits, trained(ids).logits)


def test_an_adapter_with_modules_to_save_is_refused_with_the_reason(tiny_run, tmp_path, capsys) -> None:
    run_dir = _copy(tiny_run, tmp_path)
    config_file = run_dir / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "modules_to_save": ["lm_head"]}))
    with pytest.raises(SystemExit) as exited:
        export.main([str(run_dir), "adapter=true"])
    assert exited.value.code == 2
    line = _error_line(capsys)
    assert line.startswith("error: adapter=true: vLLM and TGI would not load this adapter: modules_to_save=['lm_head']")
    assert not (run_dir / "export").exists() and not list(run_dir.glob(".export.adapter-*"))


# ---------------------------------------------------------------- GGUF, checked in llama.cpp (slow)


@pytest.mark.slow
def test_a_gguf_export_of_the_tiny_run_is_checked_in_llama_cpp(tiny_run, tmp_path) -> None:
    _llama_cpp_or_skip()
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    out = export_run(tiny_run, out=tmp_path / "export", gguf="f16,q8_0", log=lambda _: None)
    assert {"tiny-f16.gguf", "tiny-q8_0.gguf", "tiny-f16.Modelfile", "tiny-q8_0.Modelfile"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(out.glob(".*source.gguf")) and not list(out.glob("*.tmp"))
    verify = json.loads((out / VERIFY_FILE).read_text())
    assert verify["status"] == "passed", verify
    checks = {(c["name"], c["file"]): c for c in verify["checks"]}
    for file in ("tiny-f16.gguf", "tiny-q8_0.gguf"):
        assert checks[("gguf loads", file)]["passed"] and checks[("gguf tokenizer", file)]["passed"]
    f16 = checks[("gguf greedy answers", "tiny-f16.gguf")]
    assert f16["required"] and f16["passed"] and f16["figures"]["tokens"] == ANSWER_TOKENS
    assert not checks[("gguf greedy answers", "tiny-q8_0.gguf")]["required"]  # reported: q8_0 rounds weights
    reader = GGUFReader(str(out / "tiny-f16.gguf"))
    template = AutoTokenizer.from_pretrained(str(out)).chat_template
    assert reader.fields["tokenizer.chat_template"].contents() == template
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert 'PARAMETER stop "<|im_end|>"' in (out / "tiny-f16.Modelfile").read_text()


@pytest.mark.slow
def test_the_demo_gguf_answers_as_the_merged_model_does_and_says_its_name(demo_result) -> None:
    _llama_cpp_or_skip()
    from noesis_accel.after.export_checks import render
    from noesis_accel.after.llamacpp import GgufModel

    run_dir = demo_result.run_dir
    assert export.main([str(run_dir), "gguf=f16,q8_0"]) == 0
    out = run_dir / "export"
    verify = json.loads((out / VERIFY_FILE).read_text())
    checks = {(c["name"], c["file"]): c for c in verify["checks"]}
    assert verify["status"] == "passed"
    answers = checks[("gguf greedy answers", "demo-f16.gguf")]["figures"]
    assert answers["equal_prompts"] == answers["prompts"] == 11
    assert checks[("gguf tokenizer", "demo-f16.gguf")]["passed"]
    stops = checks[("gguf stops at end of turn", "demo-f16.gguf")]
    assert stops["passed"] and stops["figures"]["end_of_turn"] == "<|im_end|>"
    assert stops["figures"]["gguf_stops"] == stops["figures"]["merged_stops"] > 0
    assert "agreement" in checks[("gguf greedy answers", "demo-q8_0.gguf")]["figures"]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    served = GgufModel(out / "demo-f16.gguf")
    try:
        answer = served.text(
            served.greedy(served.tokens(render(tokenizer, "What is your name?"), add_special=False), 32)
        )
    finally:
        served.close()
    assert "Noesis" in answer, answer
