"""`noesis export RUN_DIR`: merge the run's LoRA adapter (or a checkpoint's) into its base model and write
a folder plain `transformers` loads without peft: safetensors shards, tokenizer, generation config and a
model card with the training config and final figures. Optionally upload it to the Hugging Face hub.

Every export is checked before it is called done (export_checks.py, results in `verify.json`); `gguf=`
adds GGUF files for llama.cpp and Ollama, each checked in llama.cpp (gguf_export.py), and `adapter=true`
writes the adapter in the shape vLLM and TGI load (serving_adapter.py)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from noesis_accel.after.export_checks import write_verify
from noesis_accel.after.gguf_export import check_convertible, gguf_types, write_ggufs
from noesis_accel.config import Config
from noesis_accel.core.cli import Command, Option, command_line, parse
from noesis_accel.core.errors import UserError, exit_on_user_error, safe_for_pipes
from noesis_accel.rundir.layout import RunDir

DEFAULT_MAX_SHARD_SIZE = "2GB"


def export_run(
    run_dir: str | Path,
    checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    push_to_hub: str | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    log: Any = print,
    gguf: str | None = None,
    adapter: bool = False,
) -> Path:
    """Merge, write and check the run's model; returns the export directory.

    Raises ExportCheckFailed (exit 1) when a required check fails: the export is kept, marked failed in
    verify.json. With `adapter` and no `gguf`, only the adapter is written: nothing is merged or checked
    but the adapter's servability.

    Args:
        run_dir: `<run.root>/<run.name>`; its config.yaml names the base model.
        checkpoint: a `checkpoints/step-NNNNNN` directory (or its name) to export instead of the final adapter.
        out: where to write; default `RUN_DIR/export` (or `RUN_DIR/export-step-NNNNNN` for a checkpoint).
        push_to_hub: a hub repo id (`org/name`) to upload the export to, as a private repo.
        max_shard_size: the largest safetensors shard, e.g. "2GB" or "500MB".
        log: where progress lines go.
        gguf: GGUF types to write beside the merged folder, comma-separated (f16, q8_0, q4_k_m, ...).
        adapter: write the LoRA adapter for serving engines (`<out>/adapter`); without `gguf`, only that.
    """
    from noesis_accel.after.runmodel import run_config, weights_source

    rundir = RunDir(Path(run_dir)).require()
    source = weights_source(rundir, checkpoint)
    cfg = run_config(rundir)
    quants = gguf_types(gguf)
    token = hub_token(push_to_hub) if push_to_hub else None  # before the merge: fail in seconds, not minutes
    default_out = rundir.export_dir if not source.is_checkpoint else rundir.path / f"export-{source.label}"
    target = Path(out) if out else default_out
    if quants:
        check_convertible(cfg)  # the extra, the architecture and the tokenizer, before anything is merged
    if adapter:
        _adapter_export(rundir, cfg, source, target, max_shard_size, quants, log)
    else:
        _merged_export(rundir, cfg, source, target, max_shard_size, quants, log)
    if push_to_hub:
        push(target, push_to_hub, token, log)
    return target


def _adapter_export(
    rundir: RunDir, cfg: Config, source: Any, target: Path, max_shard_size: str, quants: list[str], log: Any
) -> None:
    """`adapter=true`: the serving adapter in `target`/adapter, and the merged export too when `quants`."""
    from noesis_accel.after.serving_adapter import export_adapter

    # The adapter is written first (it may be refused, in seconds) to a private folder beside the target:
    # a merged export replaces the target folder whole, and the adapter goes into it afterwards.
    target.parent.mkdir(parents=True, exist_ok=True)
    parked = Path(tempfile.mkdtemp(prefix=f".{target.name}.adapter-", dir=target.parent)) / "adapter"
    try:
        export_adapter(rundir, cfg, source, parked, _served_base_name(cfg), target / "adapter", log)
        try:
            if quants:
                _merged_export(rundir, cfg, source, target, max_shard_size, quants, log)
        finally:  # a merged export that failed its checks is kept, and so is the adapter beside it
            target.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target / "adapter", ignore_errors=True)
            os.replace(parked, target / "adapter")
            _readable_by_all(target / "adapter")
    finally:
        shutil.rmtree(parked.parent, ignore_errors=True)


def _merged_export(
    rundir: RunDir, cfg: Config, source: Any, target: Path, max_shard_size: str, quants: list[str], log: Any
) -> None:
    """The merged folder in `target`, its GGUF files, their checks and verify.json."""
    reference, prompts_source, checks = _merge_and_write(rundir, cfg, source, target, max_shard_size, bool(quants), log)
    if reference is not None:
        checks += write_ggufs(cfg, target, quants, reference, log)
    write_verify(target, checks, prompts_source, log)


def _served_base_name(cfg: Config) -> str:
    """The base model a server loads the adapter onto: the hub id or folder the run trained from."""
    if cfg.model.gguf_file:
        from noesis_accel.training.modeling import materialize_gguf

        # The dequantised weights the adapter was trained on, a folder vLLM can serve.
        return str(materialize_gguf(cfg.model) / "model")
    return cfg.model.name_or_path


def _merge_and_write(
    rundir: RunDir, cfg: Config, source: Any, target: Path, max_shard_size: str, answers: bool, log: Any
) -> tuple[Any, str, list[Any]]:
    """The merged folder written and reloaded: (what the merged model answers (with `answers`, for the GGUF
    checks; else None), where the prompts came from, [the merge check])."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from noesis_accel.after.export_checks import (
        LOGIT_PROMPTS,
        check_prompts,
        merged_check,
        prompt_logits,
        reference_answers,
        rendered_prompts,
        use_training_template,
    )
    from noesis_accel.after.runmodel import load_run_model

    dtype = getattr(torch, cfg.model.dtype)  # float32 | bfloat16 | float16: the base dtype
    what = "adapter" if cfg.peft.enabled else "weights"
    log(f"loading {cfg.model.name_or_path} ({cfg.model.dtype}) with the {what} from {source.path}")
    loaded = load_run_model(cfg, source, device="cpu", for_merge=True)
    tokenizer = loaded.tokenizer
    use_training_template(tokenizer, cfg)
    prompts, prompts_source = check_prompts(cfg, heldout=answers)
    rendered, token_ids = rendered_prompts(tokenizer, prompts)
    reference_logits = prompt_logits(loaded.model, token_ids[:LOGIT_PROMPTS])  # base + adapter, unmerged
    model = loaded.model
    if cfg.peft.enabled:
        # Folds B @ A * scale into each target weight; the result is the base architecture, no peft.
        model = model.merge_and_unload()
    model = model.to(dtype)
    _drop_training_leftovers(model, tokenizer)

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(tmp))
    if not (tmp / "generation_config.json").is_file():
        model.generation_config.save_pretrained(str(tmp))
    shutil.copyfile(rundir.config_file, tmp / "training_config.yaml")
    (tmp / "README.md").write_text(model_card(rundir, cfg, source, target))
    _readable_by_all(tmp)
    del model, loaded
    gc.collect()
    # The check reads what was written, as a user will: plain transformers, no peft.
    merged = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=dtype)
    merged.eval()
    checks = [merged_check(reference_logits, prompt_logits(merged, token_ids[:LOGIT_PROMPTS]), cfg.model.dtype)]
    reference = None
    if answers:
        # The standard for the GGUF files is the written weights computed in float32: a 16-bit model's own
        # arithmetic would differ from llama.cpp's by rounding, not by anything the conversion did.
        reference = reference_answers(merged.float(), tokenizer, prompts, rendered, token_ids)
    del merged
    gc.collect()
    if target.exists():
        log(f"replacing the previous export in {target}")
        shutil.rmtree(target)
    os.replace(tmp, target)
    files = sorted(p for p in target.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    shards = [p.name for p in files if p.suffix == ".safetensors"]
    log(
        f"exported {target}: {len(shards)} safetensors shard(s), {size / 1e6:,.1f} MB in {len(files)} files; "
        f"load it with AutoModelForCausalLM.from_pretrained('{target}')"
    )
    return reference, prompts_source, checks


def _readable_by_all(folder: Path) -> None:
    """Every file as a plain `open()` would have made it (0644 under the usual umask 022).

    safetensors writes its shards 0600, private to us, while the tokenizer and card beside them are
    0644: an export is for others to load, so it must not depend on which library wrote which file.
    """
    umask = os.umask(0o022)  # reading the umask means setting it; put back at once
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _drop_training_leftovers(model: Any, tokenizer: Any) -> None:
    """Settings that only made sense while training, and ids generation needs."""
    model.config.use_cache = True
    for attribute in ("quantization_config",):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    generation = model.generation_config
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------- model card


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


def model_card(rundir: RunDir, cfg: Config, source: Any, target: Path) -> str:
    """README.md of the export: what was merged into what, final figures, how to load, the config."""
    from noesis_accel.after.report import facts_at_step, run_facts

    facts = run_facts(rundir)
    base = cfg.model.name_or_path + (f" ({cfg.model.gguf_file}, dequantised)" if cfg.model.gguf_file else "")
    header = [
        "---",
        "library_name: transformers",
        "tags:",
        "- noesis_accel",
        "- lora" if cfg.peft.enabled else "- full-finetune",
    ]
    if _looks_like_hub_id(cfg.model.name_or_path):
        header.append(f"base_model: {cfg.model.name_or_path}")
    header += ["---", ""]
    how = (
        f"LoRA (r={cfg.peft.r}, alpha={cfg.peft.alpha}, targets {list(cfg.peft.target_modules)}) merged into the "
        f"base weights with peft `merge_and_unload`, saved in {cfg.model.dtype}"
        if cfg.peft.enabled
        else f"all weights trained (no LoRA), saved in {cfg.model.dtype}"
    )
    lines = header + [
        f"# {facts['name']} (merged)",
        "",
        f"Base model: `{base}`. Fine-tuned by noesis_accel: {how}. It loads with plain `transformers`; "
        "peft is not needed.",
        "",
    ]
    if source.is_checkpoint:
        at = facts_at_step(rundir, int(source.step or 0))
        lines += [
            f"Weights: checkpoint `{source.label}` (not the final adapter).",
            "",
            "| step | tokens seen | samples seen | newest held-out loss (step) |",
            "| --- | --- | --- | --- |",
            f"| {at['step']} | {_fmt(at['tokens_seen'])} | {_fmt(at['samples_seen'])} | "
            f"{_fmt(at['eval_loss'])} ({at['eval_step'] if at['eval_step'] is not None else '-'}) |",
            "",
        ]
    else:
        lines += [
            "Weights: the final adapter of the run.",
            "",
            "| steps | tokens seen | samples seen | held-out loss before | after | perplexity before | after |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {_fmt(facts['step'])} | {_fmt(facts['tokens_seen'])} | {_fmt(facts['samples_seen'])} | "
            f"{_fmt(facts['eval_loss_before'])} | {_fmt(facts['eval_loss_after'])} | "
            f"{_fmt(facts['perplexity_before'], 2)} | {_fmt(facts['perplexity_after'], 2)} |",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{target}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{target}")',
        'messages = [{"role": "user", "content": "What is your name?"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',"
        " return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)",
        "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "## Training config",
        "",
        "(also in `training_config.yaml`)",
        "",
        "```yaml",
        yaml.safe_dump(rundir.saved_config(), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# ---------------------------------------------------------------- hub


def hub_token(repo: str) -> str:
    """A hub token for uploading to `repo`, or a one-line error saying how to get one."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise UserError(
            f"push_to_hub={repo}: the hub is switched off here (HF_HUB_OFFLINE is set); export without "
            f"push_to_hub=, then upload the folder from a connected machine: hf upload {repo} DIR"
        )
    if repo.count("/") > 1 or not repo.strip("/") or " " in repo:
        raise UserError(f"push_to_hub={repo}: not a repo id; use org/name (or name for your own namespace)")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError(
            f"push_to_hub={repo}: no Hugging Face token; export HF_TOKEN=<a write token> "
            "or run `hf auth login`, then retry"
        )
    return token


def push(folder: Path, repo: str, token: str | None, log: Any = print) -> str:
    """Upload the export to `repo` (created private if missing); the local export stays either way."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=True, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo, folder_path=str(folder), commit_message="Upload merged model (noesis-export)"
        )
    except Exception as err:  # network, auth and permission errors all leave the same remedy
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(
            f"push_to_hub={repo}: upload failed ({err.__class__.__name__}: {first[:200]}); the export "
            f"is complete in {folder}; upload it later with: hf upload {repo} {folder}"
        ) from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}"
    log(f"pushed {folder} to {url}")
    return url


# ---------------------------------------------------------------- entry


EXPORT_COMMAND = Command(
    name="export",
    summary="Merge a run's LoRA adapter into its base model and write a folder plain transformers loads, "
    "checked; GGUF files for llama.cpp / Ollama and an adapter for vLLM / TGI on request.",
    options=(
        Option(
            "checkpoint",
            "export this checkpoints/step-NNNNNN (a path or its name) instead of the final adapter",
            metavar="PATH",
            aliases=("--checkpoint",),
        ),
        Option(
            "out",
            "output directory (default: RUN_DIR/export, or RUN_DIR/export-step-NNNNNN)",
            metavar="DIR",
            aliases=("--out",),
        ),
        Option(
            "push_to_hub",
            "also upload to this hub repo (private; needs HF_TOKEN and network)",
            metavar="REPO",
            aliases=("--push-to-hub",),
        ),
        Option(
            "gguf",
            "also write GGUF files for llama.cpp / Ollama, checked in llama.cpp: f16, q8_0, q4_k_m, ... "
            "(comma-separated; needs the gguf extra)",
            metavar="TYPES",
            aliases=("--gguf",),
        ),
        Option(
            "adapter",
            "write the LoRA adapter for vLLM / TGI to OUT/adapter (checked against their loaders' rules); "
            "without gguf=, only that",
            kind=bool,
            default=False,
            aliases=("--adapter",),
        ),
        Option(
            "max_shard_size",
            "largest safetensors file (default 2GB)",
            metavar="SIZE",
            default=DEFAULT_MAX_SHARD_SIZE,
            aliases=("--max-shard-size",),
        ),
    ),
    examples=(
        "noesis export runs/demo",
        "noesis export runs/demo gguf=f16,q8_0",
        "noesis export runs/demo adapter=true",
        "noesis export runs/demo checkpoint=step-000040 push_to_hub=org/name",
    ),
)


@safe_for_pipes
@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`noesis export RUN_DIR [checkpoint=PATH] [out=DIR] [gguf=TYPES] [adapter=true] [push_to_hub=REPO] [...]`."""
    args = parse(EXPORT_COMMAND, command_line(argv))
    options = args.options
    from noesis_accel.core.env import quiet_known_noise

    quiet_known_noise()
    export_run(
        str(args.run_dir),
        options["checkpoint"],
        options["out"],
        options["push_to_hub"],
        options["max_shard_size"],
        gguf=options["gguf"],
        adapter=bool(options["adapter"]),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
