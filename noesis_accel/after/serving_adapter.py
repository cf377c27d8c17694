"""`noesis export RUN_DIR adapter=true`: the run's LoRA adapter as a folder vLLM's and TGI's LoRA loaders take.

What the engines accept, read from their loaders: vLLM's `PEFTHelper` (vllm/lora/peft_helper.py)
requires `r`, `lora_alpha` and `target_modules` in adapter_config.json and refuses `modules_to_save`,
DoRA, a bias other than "none", and a rank above the server's `--max-lora-rank` (16 unless raised).
Both engines apply LoRA to the attention and MLP projections of Llama-family models (vLLM packs them as
qkv_proj and gate_up_proj), not to the embeddings or the output head. An adapter outside that is
refused here with the reason, rather than failing when the server loads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from noesis_accel.config import Config
from noesis_accel.core.errors import UserError

REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")  # vLLM's PEFTHelper: a missing one is a load error
SERVABLE_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_DEFAULT_MAX_RANK = 16
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
ADAPTER_CONFIG = "adapter_config.json"


def serving_problems(adapter_config: dict[str, Any]) -> list[str]:
    """Why a serving engine would refuse this adapter_config.json; empty when vLLM and TGI load it."""
    problems = [f"{key} is missing" for key in REQUIRED_FIELDS if key not in adapter_config]
    if adapter_config.get("modules_to_save"):
        problems.append(
            f"modules_to_save={adapter_config['modules_to_save']} (fully trained copies of those modules); "
            "vLLM loads only modules_to_save=None"
        )
    if adapter_config.get("use_dora"):
        problems.append("use_dora=true; vLLM and TGI do not load DoRA adapters")
    if adapter_config.get("bias", "none") != "none":
        problems.append(f"bias={adapter_config['bias']!r}; the engines load adapters with bias 'none' (peft.bias=none)")
    targets = adapter_config.get("target_modules") or []
    if isinstance(targets, str):
        problems.append(f"target_modules={targets!r} is a pattern; the engines need the module names")
    else:
        unservable = sorted(set(module_names(targets)) - SERVABLE_MODULES)
        if unservable:
            problems.append(
                f"target_modules include {', '.join(unservable)}; the engines apply LoRA to "
                f"{', '.join(sorted(SERVABLE_MODULES))} only (set peft.target_modules to those)"
            )
    return problems


def module_names(targets: list[str]) -> list[str]:
    """The module names of target_modules given as full paths (`model.layers.0.self_attn.q_proj` -> q_proj).

    The engines match LoRA weights by the module's own name; peft matches a name as a path suffix, so
    the short list loads the same weights (a layer the paths left out gets B = 0, which adds nothing).
    """
    return sorted({str(target).rsplit(".", 1)[-1] for target in targets})


def max_lora_rank_flag(rank: int) -> str:
    """The vLLM flag a rank above its default needs ('' when the default serves it)."""
    if rank <= VLLM_DEFAULT_MAX_RANK:
        return ""
    return f" --max-lora-rank {next((r for r in VLLM_RANKS if r >= rank), rank)}"


def export_adapter(
    rundir: Any, cfg: Config, source: Any, target: Path, base_name: str, shown_as: Path, log: Any = print
) -> Path:
    """Write `target` (a new folder: the caller moves it into place): the adapter, checked, with the base
    model named; `shown_as` is where it will end up (RUN_DIR/export/adapter by default), the path the
    printed serving command names. A refused adapter leaves nothing behind.

    `source` is the final adapter or a checkpoint (`runmodel.weights_source`); a checkpoint's LoRA weights
    are loaded into the base model and saved as peft saves an adapter.
    """
    if not cfg.peft.enabled:
        raise UserError(
            f"adapter=true: {rundir.path} trained every weight (peft.enabled=false); it has no adapter; "
            "export the merged model (noesis export RUN_DIR) instead"
        )
    if source.is_checkpoint:
        from noesis_accel.after.runmodel import load_run_model

        # for_merge: a QLoRA base loads unquantised on the CPU; only the LoRA weights are saved.
        load_run_model(cfg, source, device="cpu", for_merge=True).model.save_pretrained(str(target))
    else:
        shutil.copytree(source.path, target)
    config_file = target / ADAPTER_CONFIG
    adapter_config = json.loads(config_file.read_text())
    problems = serving_problems(adapter_config)
    if problems:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(f"adapter=true: vLLM and TGI would not load this adapter: {'; '.join(problems)}")
    adapter_config["target_modules"] = module_names(adapter_config["target_modules"])
    adapter_config["base_model_name_or_path"] = base_name
    config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    flag = max_lora_rank_flag(int(adapter_config["r"]))
    targets = ", ".join(adapter_config["target_modules"])
    log(f"adapter for serving: {shown_as} (r={adapter_config['r']}, targets {targets})")
    log(f"  vLLM: vllm serve {base_name} --enable-lora{flag} --lora-modules {rundir.path.name}={shown_as}")
    return target
