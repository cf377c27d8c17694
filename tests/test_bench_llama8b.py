"""The 8B bench's code path on the CPU (2 layers), and the 8B shape it builds on the GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from noesis_accel.config import compose

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import llama8b

LLAMA3_8B_PARAMETERS = 8_030_261_248  # Meta's Llama-3-8B


def test_the_8b_config_is_llama3_8b_and_n_counts_its_matmuls() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = OmegaConf.to_container(compose(["model=llama3_8b_arch"]).model.architecture)
    with torch.device("meta"):  # the shape without the 16 GB
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch))
    assert sum(p.numel() for p in model.parameters()) == LLAMA3_8B_PARAMETERS
    embedding, norms = 128256 * 4096, (2 * 32 + 1) * 4096
    assert llama8b.matmul_parameters(model) == LLAMA3_8B_PARAMETERS - embedding - norms
    # 4·N per token plus causal attention (6·L·d·l² per record): one 2048-token record.
    assert llama8b.step_flops([2048], 10, 32, 4096) == 4 * 10 * 2048 + 6 * 32 * 4096 * 2048**2


def test_cpu_smoke_runs_ours_and_the_trainer_on_the_same_records(tmp_path, capsys) -> None:
    out = tmp_path / "llama8b.json"
    rows = llama8b.main(["--cpu-smoke", "--json", str(out), "--only", "hf-gc,ours-nogc-packing,ours-nogc-liger"])
    by_name = {r.variant: r for r in rows}
    hf, packed = by_name["HF Trainer (gc on)"], by_name["ours (gc off, packing)"]
    assert hf.status == packed.status == "ok", (hf.status, packed.status)
    assert by_name["ours (gc off, liger)"].status == "skipped: Liger needs CUDA"
    # Both timed their second epoch: the same records, so the same tokens and the same model FLOPs.
    assert hf.tokens == packed.tokens > 0
    assert hf.flops == packed.flops > 0
    assert packed.padding == 0.0 and hf.seconds > 0 and packed.seconds > 0
    assert hf.mfu == hf.flops / hf.seconds / llama8b.PEAK_BF16_FLOPS
    capsys.readouterr()
    reread = llama8b.main(["--table-from", str(out)])
    assert [r.variant for r in reread] == [r.variant for r in rows]
    printed = capsys.readouterr().out
    assert "HF Trainer (gc on)" in printed and "ours / HF Trainer" not in printed  # no gc-on pair of ours here


def test_record_puts_the_recipes_configuration_in_the_table_the_plan_reads(tmp_path, monkeypatch) -> None:
    """`--record`: the measured time replaces the plan's FLOPs estimate for this shape on this device."""
    from noesis_accel.training import plan

    table = tmp_path / "throughput.json"
    rows = llama8b.main(["--cpu-smoke", "--only", "ours-gc", "--record", str(table)])
    measured = next(r for r in rows if r.variant == "ours (gc on)")
    assert measured.status == "ok"
    (row,) = json.loads(table.read_text())
    assert row["device"] == "cpu" and row["shape"].startswith("llama-L2-h64-") and row["shape"].endswith("-lora16")
    assert row["tokens_per_s_per_device"] == round(measured.tokens_per_s / (1 - measured.padding), 2)
    assert row["source"].startswith("bench/llama8b.py on cpu, ours (gc on)")
    monkeypatch.setattr(plan, "THROUGHPUT_TABLE", table)
    assert plan.measured_throughput(row["shape"], "cpu") == row
