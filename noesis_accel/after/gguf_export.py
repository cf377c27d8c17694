"""`noesis export RUN_DIR gguf=f16,q8_0`: the merged folder as GGUF files for llama.cpp and Ollama, each checked.

Float files (f32, f16, bf16) are written by `gguf_convert`; quantised ones by llama.cpp's own quantiser
from a temporary file at the model's precision, removed afterwards. Each file gets a Modelfile beside
it and the llama.cpp checks of `export_checks`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from noesis_accel.config import Config
from noesis_accel.core.errors import UserError

from .export_checks import EXACT_TYPES, Check, Reference, gguf_checks


def gguf_types(spec: str | None) -> list[str]:
    """The GGUF types a `gguf=` value asks for, in order, checked: one line naming the unknown one."""
    from noesis_accel.after.gguf_convert import FLOAT_TYPES
    from noesis_accel.after.llamacpp import QUANT_TYPES

    if spec is None or not str(spec).strip():
        return []
    known = (*FLOAT_TYPES, *QUANT_TYPES)
    wanted = [word.strip().lower() for word in str(spec).strip("[]").split(",") if word.strip()]
    for word in wanted:
        if word not in known:
            raise UserError(f"gguf={spec}: no GGUF type '{word}'; one or more of {', '.join(known)} (comma-separated)")
    return list(dict.fromkeys(wanted))


def base_config(cfg: Config) -> dict[str, Any]:
    """The base model's config.json as a dict, without loading its weights."""
    from noesis_accel.training import modeling

    model_cfg = cfg.model
    if model_cfg.architecture:
        return dict(model_cfg.architecture)  # typed already: a plain dict of config.json's keys
    if model_cfg.gguf_file:
        return json.loads((modeling.materialize_gguf(model_cfg) / "model" / "config.json").read_text())
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_cfg.name_or_path, **modeling.hub_kwargs(model_cfg))
    return dict(config.to_dict())


def check_convertible(cfg: Config) -> None:
    """Refuse, in one line and before merging, an export llama.cpp or our converter cannot take."""
    from noesis_accel.after.gguf_convert import architecture_problem, tokenizer_plan
    from noesis_accel.after.llamacpp import require
    from noesis_accel.training import modeling

    require()
    problem = architecture_problem(base_config(cfg))
    if problem is None:
        plan = tokenizer_plan(modeling.load_tokenizer(cfg.model))
        problem = plan if isinstance(plan, str) else None
    if problem:
        raise UserError(f"gguf=: cannot convert this run: {problem}; the merged export (without gguf=) still works")


def write_ggufs(
    cfg: Config, export_dir: Path, quants: list[str], reference: Reference, log: Any = print
) -> list[Check]:
    """Write `<run.name>-<type>.gguf` and its Modelfile in `export_dir` for each type; the checks of each."""
    from noesis_accel.after.gguf_convert import FLOAT_TYPES, write_gguf
    from noesis_accel.after.llamacpp import quantize
    from noesis_accel.after.ollama import write_modelfile

    name = cfg.run.name
    template, system = _template_and_system(export_dir)
    # Quantised files start from the weights as merged: f32 for a float32 model, its own 16-bit type otherwise.
    source_type = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(cfg.model.dtype, "f32")
    source: Path | None = None
    checks: list[Check] = []
    try:
        for quant in quants:
            path = export_dir / f"{name}-{quant}.gguf"
            log(f"writing {path.name}")
            try:
                if quant in FLOAT_TYPES:
                    write_gguf(export_dir, path, quant, template, name)
                else:
                    if source is None:
                        source = export_dir / f".{name}-{source_type}.source.gguf"
                        write_gguf(export_dir, source, source_type, template, name)
                    quantize(source, path, quant)
            except Exception as err:  # a failed conversion is this file's result; the others and verify.json go on
                path.unlink(missing_ok=True)
                checks.append(Check("gguf written", path.name, False, f"{type(err).__name__}: {err}"))
                continue
            path.chmod(0o644)
            write_modelfile(path, template, reference.end_of_turn_text, system)
            checks += gguf_checks(path, quant, reference, exact=quant in EXACT_TYPES)
    finally:
        if source is not None:
            source.unlink(missing_ok=True)
    return checks


def _template_and_system(export_dir: Path) -> tuple[str | None, str | None]:
    """The exported tokenizer's chat template (the one training used) and the system prompt it slips in."""
    from transformers import AutoTokenizer

    from noesis_accel.training.templates import default_system_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    system = default_system_prompt(tokenizer, template) if template else None
    return template, system
