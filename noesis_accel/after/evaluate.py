"""`noesis eval RUN_DIR [checkpoint=PATH] [overrides]`: held-out loss and perplexity by the trainer's own
function, greedy answers to a prompt file (or, on a run of other data than the demo's, to the run's
held-out records; prompts.py decides) scored by a pluggable judge (`eval.judge`), and base against
tuned in one table. Results go to RUN_DIR/eval/: generations.jsonl, summary.json and summary.md.

The config is conf/eval.yaml (model and data default to the run's own); `evaluate_after_training` is
the same evaluation on the model still in memory at the end of training (`eval.after_training`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from noesis_accel.after.judges import as_verdict, load_judge
from noesis_accel.after.prompts import EvalPrompts, PromptRecord, asks_heldout, from_file, from_heldout, read_prompts
from noesis_accel.config import CONF_DIR, Config, EvalConfig, EvalRunConfig, as_schema, register
from noesis_accel.config.overrides import ConfigTree, check_words
from noesis_accel.core.cli import Command, Option, command_line, parse
from noesis_accel.core.errors import ConfigError, UserError, exit_on_user_error, one_line, safe_for_pipes
from noesis_accel.rundir.layout import RunDir

EVAL_COMMAND = Command(
    name="eval",
    summary="Evaluate a run from its directory alone: held-out loss, judged generations, base against tuned.",
    options=(
        Option(
            "checkpoint",
            "evaluate this checkpoints/step-NNNNNN (a path or its name) instead of the final adapter",
            metavar="PATH",
            aliases=("--checkpoint",),
            is_override=True,  # a key of conf/eval.yaml
        ),
    ),
    overrides="conf/eval.yaml (judges: conf/judge/ or eval.judge._target_=your.module.judge)",
    examples=("noesis eval runs/demo judge=exact eval.prompts=my_prompts.jsonl eval.compare_base=false",),
)
_DEVICES = ("auto", "cpu", "cuda")
# Held-out records asked when they stand in for the demo's prompt file: each is a greedy answer per
# model, and the held-out split can hold data.max_eval_examples (512) records.
HELDOUT_PROMPTS = 64


# ---------------------------------------------------------------- config


def compose_eval(run_dir: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """conf/eval.yaml with the run's model and data sections as the default options, then `overrides`.

    A DictConfig, as Hydra composed it; `evaluate_run` types it (`EvalRunConfig`) before anything reads it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()  # eval.yaml names eval_schema and uses the resolvers
    rundir = RunDir(Path(run_dir)).require()
    saved = rundir.saved_config()
    for group in ("model", "data"):
        if not isinstance(saved.get(group), dict):
            raise UserError(f"{rundir.config_file} has no '{group}' section; it is not a config noesis-train wrote")
        # The run's own section, selectable like any file in conf/<group>/ (eval.yaml's default).
        ConfigStore.instance().store(group=group, name="run", node=saved[group])
    # The command line's words checked as noesis train's are: one line for a typo, the run's sections selectable.
    run_sections = (("model", "run"), ("data", "run"))
    tree = ConfigTree(schema=EvalRunConfig, primary="eval", extra_options=run_sections, command="noesis eval")
    words = check_words(list(overrides or []), tree)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="eval", overrides=[f"run_dir={rundir.path}", *words])
        OmegaConf.to_container(cfg, resolve=True)  # every ${...} resolves now, not halfway through
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"noesis-eval: {one_line(err)} (keys: conf/eval.yaml)") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def check_eval_config(eval_cfg: EvalConfig) -> None:
    """Every problem with the `eval` keys, in one error, before any model is loaded."""
    problems = []
    if eval_cfg.max_new_tokens <= 0:
        problems.append("eval.max_new_tokens: must be > 0")
    if eval_cfg.micro_batch_size is not None and eval_cfg.micro_batch_size <= 0:
        problems.append("eval.micro_batch_size: must be > 0 or null (the run's train.micro_batch_size)")
    if eval_cfg.device not in _DEVICES:
        problems.append(f"eval.device: {eval_cfg.device!r} is not one of {', '.join(_DEVICES)}")
    if not eval_cfg.heldout and not eval_cfg.prompts:
        problems.append("eval.prompts: null and eval.heldout: false leave nothing to evaluate; set one")
    if problems:
        raise ConfigError("; ".join(problems))


# ---------------------------------------------------------------- entry points


def evaluate_run(
    run_dir: str | Path, overrides: list[str] | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Evaluate a run from its directory alone; writes RUN_DIR/eval/ and returns the summary.

    Args:
        run_dir: `<run.root>/<run.name>`.
        overrides: Hydra overrides of conf/eval.yaml, e.g. ["judge=exact", "checkpoint=step-000010"].
        log: where the table and progress lines go.
    """
    return run_evaluation(as_schema(compose_eval(run_dir, overrides), EvalRunConfig), log)


def run_evaluation(cfg: EvalRunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The evaluation a composed conf/eval.yaml describes. Cheap checks first, models last."""
    from noesis_accel.after.runmodel import load_run_model, run_config, weights_source

    rundir = RunDir(Path(cfg.run_dir)).require()
    check_eval_config(cfg.eval)
    ask_heldout = asks_heldout(cfg.eval.prompts, cfg.data.path)
    prompts = None if ask_heldout else from_file(cfg.eval.prompts)  # a bad file fails before any model loads
    source = weights_source(rundir, cfg.checkpoint)
    judge, judge_name = load_judge(cfg.eval.judge)
    run_cfg = replace(run_config(rundir), model=cfg.model, data=cfg.data)  # the run's own unless overridden
    loaded = load_run_model(run_cfg, source, device=cfg.eval.device)
    held_out = _heldout_set(run_cfg, loaded.tokenizer) if cfg.eval.heldout or ask_heldout else None
    if prompts is None:
        prompts = from_heldout(run_cfg.data, _locations(held_out, HELDOUT_PROMPTS))
    heldout = held_out if cfg.eval.heldout else None
    return evaluate_loaded(
        loaded.model,
        loaded.tokenizer,
        run_cfg,
        cfg.eval,
        prompts,
        (judge, judge_name),
        heldout,
        rundir,
        source.label,
        log,
    )


def evaluate_after_training(
    cfg: Config, model: Any, tokenizer: Any, heldout: Any, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """`eval.after_training`: the same evaluation on the trained model still in memory (main process)."""
    rundir = RunDir.of(cfg.run)
    check_eval_config(cfg.eval)
    if asks_heldout(cfg.eval.prompts, cfg.data.path):
        prompts = from_heldout(cfg.data, _locations(heldout, HELDOUT_PROMPTS))
    else:
        prompts = from_file(cfg.eval.prompts)
    judge = load_judge(cfg.eval.judge)
    held_out = heldout if (cfg.eval.heldout and heldout is not None and len(heldout)) else None
    return evaluate_loaded(
        model,
        tokenizer,
        cfg,
        cfg.eval,
        prompts,
        judge,
        held_out,
        rundir,
        rundir.final_weights_dir(cfg.peft.enabled).name,
        log,
    )


def check_ready(cfg: Config) -> None:
    """Before training with `eval.after_training`: the prompt file reads and the judge imports (no model loads)."""
    check_eval_config(cfg.eval)
    if cfg.eval.prompts and not asks_heldout(cfg.eval.prompts, cfg.data.path):
        read_prompts(cfg.eval.prompts)
    judge = cfg.eval.judge
    from noesis_accel.after.judges import import_target

    if not isinstance(judge, dict) or not judge.get("_target_"):
        raise ConfigError(
            "eval.judge: needs a _target_ naming a judge, e.g. eval.judge._target_=noesis_accel.after.judges.contains"
        )
    import_target(str(judge["_target_"]), "eval.judge._target_")


# ---------------------------------------------------------------- the evaluation


def _heldout_set(cfg: Config, tokenizer: Any) -> Any:
    """The held-out records exactly as the trainer split and tokenised them (same data, seed, tokenizer)."""
    from noesis_accel.training import data as data_mod

    return data_mod.prepare(cfg.data, tokenizer, cfg.train.seed).eval


def _locations(heldout: Any, most: int) -> list[str]:
    """Where the first `most` held-out records are in the data (the tokenised set keeps each one's location)."""
    if heldout is None or not len(heldout) or "location" not in heldout.column_names:
        return []
    return list(heldout.select(range(min(most, len(heldout))))["location"])


def _autocast(cfg: Config, device: Any) -> Callable[[], AbstractContextManager]:
    """The trainer's mixed precision for the held-out forward passes, so the loss is the same number."""
    import torch

    precision = cfg.train.mixed_precision
    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return functools.partial(torch.autocast, device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext


def evaluate_loaded(
    model: Any,
    tokenizer: Any,
    run_cfg: Config,
    eval_cfg: EvalConfig,
    asked: EvalPrompts,
    judge: tuple[Callable[..., Any], str],
    heldout: Any,
    rundir: RunDir,
    weights: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate `model` (and its base, with the adapter disabled), judge, write eval/, print the table."""
    from noesis_accel.training import data as data_mod
    from noesis_accel.training.generate import reply
    from noesis_accel.training.losses import heldout_loss

    judge_fn, judge_name = judge
    prompts = asked.records
    log(f"evaluating {rundir.path} ({weights}); judge {judge_name}")
    log(f"  prompts: {asked.source}" if asked.warning is None else f"  warning: {asked.warning}")
    device = next(model.parameters()).device
    micro = eval_cfg.micro_batch_size or run_cfg.train.micro_batch_size
    collate = data_mod.PaddingCollator(tokenizer.pad_token_id, run_cfg.data.pad_to_multiple_of)
    autocast = _autocast(run_cfg, device)
    model.config.use_cache = True  # generation; training switched it off
    variants: list[tuple[str, Any, Callable[[], AbstractContextManager]]] = []
    if eval_cfg.compare_base and hasattr(model, "disable_adapter"):
        variants.append(("base", model, model.disable_adapter))  # the same weights with LoRA switched off
    elif eval_cfg.compare_base:  # every weight trained: the base is a second model
        from noesis_accel.after.runmodel import load_base

        variants.append(("base", load_base(run_cfg, device), contextlib.nullcontext))
    variants.append(("tuned", model, contextlib.nullcontext))

    models: dict[str, dict[str, Any]] = {}
    rows = [{"prompt": p.prompt, "expected": p.expected, "tags": p.tags, "location": p.location} for p in prompts]
    for name, subject, context in variants:
        started = time.monotonic()
        result: dict[str, Any] = {}
        with context():
            if heldout is not None:
                loss = heldout_loss(subject, heldout, collate, micro, device, autocast=autocast)
                result.update(heldout_loss=loss, perplexity=math.exp(loss) if loss < 700 else float("inf"))
            answers = [reply(subject, tokenizer, p.prompt, eval_cfg.max_new_tokens) for p in prompts]
        for row, record, answer in zip(rows, prompts, answers):
            row[name] = _judged(judge_fn, judge_name, record, answer)
        failed = [row[name]["reason"] for row in rows if row[name]["reason"].startswith("judge raised")]
        if failed:
            log(
                f"  warning: the judge failed on {len(failed)} of {len(rows)} {name} answers (scored as none); "
                f"first: {failed[0]}"
            )
        result.update(_score_stats([row[name] for row in rows], prompts))
        result["seconds"] = round(time.monotonic() - started, 2)
        models[name] = result
        log(
            f"  {name}: "
            + (f"held-out loss {result['heldout_loss']:.4f}, " if "heldout_loss" in result else "")
            + f"{len(prompts)} answers in {result['seconds']:.0f}s"
        )

    status = rundir.status() or {}
    summary = {
        "run_dir": str(rundir.path),
        "weights": weights,
        "judge": judge_name,
        "prompts_file": asked.file,
        "prompts": asked.source,  # where they came from, in words
        "prompt_count": len(prompts),
        "heldout_records": len(heldout) if heldout is not None else 0,
        "micro_batch_size": micro,
        "trainer_logged": {
            "eval_loss_before": status.get("eval_loss_before"),
            "eval_loss_after": status.get("eval_loss_after"),
        },
        "models": models,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write(rundir.eval_dir, summary, rows)
    log(comparison_table(summary, rows))
    log(f"results: {rundir.eval_dir / 'summary.md'}, {rundir.eval_dir / 'generations.jsonl'}")
    return summary


def _judged(judge_fn: Callable[..., Any], judge_name: str, record: PromptRecord, answer: str) -> dict[str, Any]:
    try:
        score, reason = as_verdict(judge_fn(record.prompt, answer, record.expected, dict(record.record)), judge_name)
    except UserError:
        raise
    except Exception as err:  # one failing call (a judge's timeout, say) must not lose the other answers
        score, reason = None, f"judge raised {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return {"answer": answer, "score": score, "reason": reason}


def _score_stats(verdicts: list[dict[str, Any]], prompts: list[PromptRecord]) -> dict[str, Any]:
    def stats(items: list[dict[str, Any]]) -> dict[str, Any]:
        scores = [v["score"] for v in items if v["score"] is not None]
        return {
            "score_mean": sum(scores) / len(scores) if scores else None,
            "score_sum": sum(scores),
            "scored": len(scores),
        }

    by_tag: dict[str, list[dict[str, Any]]] = {}
    for verdict, record in zip(verdicts, prompts):
        for tag in record.tags:
            by_tag.setdefault(tag, []).append(verdict)
    return {**stats(verdicts), "by_tag": {tag: stats(items) for tag, items in sorted(by_tag.items())}}


# ---------------------------------------------------------------- output


def _write(out_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "generations.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(summary, rows))


def _fmt(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _clip(text: Any, width: int) -> str:
    text = " ".join(str(text if not isinstance(text, list) else " / ".join(text)).split()) if text is not None else "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def _score_text(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return ""
    return "-" if verdict["score"] is None else f"{verdict['score']:.2g}"


def comparison_table(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Base against tuned: the figures, then one line per prompt with both answers and their scores."""
    models = summary["models"]
    names = [n for n in ("base", "tuned") if n in models]
    count = summary["prompt_count"]
    lines = ["", f"{'':24}" + "".join(f"{n:>14}" for n in names)]
    if any("heldout_loss" in models[n] for n in names):
        lines.append(f"{'held-out loss':24}" + "".join(f"{_fmt(models[n].get('heldout_loss'), 4):>14}" for n in names))
        lines.append(f"{'perplexity':24}" + "".join(f"{_fmt(models[n].get('perplexity'), 2):>14}" for n in names))
    if count:
        lines.append(f"{'judge score (mean)':24}" + "".join(f"{_fmt(models[n]['score_mean'], 3):>14}" for n in names))
        lines.append(f"{'judged':24}" + "".join(f"{str(models[n]['scored']) + '/' + str(count):>14}" for n in names))
        tags = sorted({t for n in names for t in models[n]["by_tag"]})
        for tag in tags:
            lines.append(
                f"{'  tag ' + tag:24}"
                + "".join(f"{_fmt(models[n]['by_tag'].get(tag, {}).get('score_mean'), 3):>14}" for n in names)
            )
    lines.append(
        f"judge: {summary['judge']} · weights: {summary['weights']} · {summary['heldout_records']} held-out records"
    )
    if summary.get("prompts"):
        lines.append(f"prompts: {summary['prompts']}")
    if count:
        header = f"{'#':>3}  {'prompt':30}  {'expected':14}"
        for n in names:
            header += f"  {n + ' answer':34} {'score':>5}"
        lines += ["", header, "-" * len(header)]
        for i, row in enumerate(rows, start=1):
            line = f"{i:>3}  {_clip(row['prompt'], 30):30}  {_clip(row['expected'], 14):14}"
            for n in names:
                line += f"  {_clip(row[n]['answer'], 34):34} {_score_text(row[n]):>5}"
            lines.append(line)
    return "\n".join(lines)


def summary_markdown(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    from noesis_accel.after.report import evaluation_lines

    names = [n for n in ("base", "tuned") if n in summary["models"]]
    lines = [f"# Evaluation: {Path(summary['run_dir']).name}", ""] + evaluation_lines(summary) + [""]
    if rows:
        lines += [
            "| # | tags | prompt | expected | " + " | ".join(f"{n} answer | {n} score" for n in names) + " |",
            "| --- " * (4 + 2 * len(names)) + "|",
        ]
        for i, row in enumerate(rows, start=1):
            cells = [str(i), ", ".join(row["tags"]), _md(row["prompt"]), _md(row["expected"])]
            for n in names:
                cells += [_md(row[n]["answer"]), _score_text(row[n])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _md(text: Any) -> str:
    return _clip(text, 200).replace("|", "\\|")


@safe_for_pipes
@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`noesis eval RUN_DIR [checkpoint=PATH] [overrides]`."""
    args = parse(EVAL_COMMAND, command_line(argv))
    from noesis_accel.core.env import quiet_known_noise

    quiet_known_noise()
    evaluate_run(str(args.run_dir), args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
