"""`noesis-report RUN_DIR`: the run's figures and a markdown summary (config, duration, tokens, GPU-hours,
checkpoints, interruptions survived and what each cost, failed starts apart, held-out loss, judge scores)
in `report/`.

`run_facts` is also what the export's model card quotes, so both say the same numbers.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from noesis_accel.core.cli import Command, Option, command_line, parse
from noesis_accel.core.errors import exit_on_user_error, safe_for_pipes
from noesis_accel.rundir.history import (
    Attempt,
    CheckpointEvent,
    failed_starts,
    format_duration,
    history,
    read_events,
    redone_words,
    resumed_after,
)
from noesis_accel.rundir.layout import RunDir


def attempt_rows(found: list[Attempt], status: dict[str, Any]) -> list[dict[str, Any]]:
    """Every attempt as facts.json lists it: when it started and ended, and how it ended."""
    return [
        {
            "number": a.number,
            "started": a.started,
            "ended": a.ended,
            "start_step": a.first_step,  # None: it never got to train, as far as the committed files show
            "processes": a.processes,
            "device": a.device,
            "exit": a.stop_reason or f"{status.get('state', 'unknown')} (no stop recorded yet)",
        }
        for a in found
    ]


def failed_start_rows(failed: list[Attempt]) -> list[dict[str, Any]]:
    """Every failed start (a user error before training): no attempt, but its seconds were spent."""
    return [
        {
            "started": f.started,
            "ended": f.ended,
            "seconds": round(f.hours * 3600, 3),
            "processes": f.processes,
            "device": f.device,
            "reason": f.stop_reason,
        }
        for f in failed
    ]


def interruptions(found: list[Attempt]) -> list[dict[str, Any]]:
    """Every attempt that a later one followed: how it ended, how far it got, and what resuming cost."""
    rows = []
    for i, attempt in enumerate(found[:-1]):
        after = resumed_after(found, i)
        rows.append(
            {
                "attempt": attempt.number,
                "exit": attempt.stop_reason,
                "reached": attempt.last_step,
                "reached_exact": attempt.reached_exact,
                "resumed_from": after.resumed_from if after else None,
                "resumed_at": after.first_step if after else None,
                "lost_steps": attempt.lost_steps,
                "lost_steps_exact": attempt.lost_steps_exact,
            }
        )
    return rows


def run_facts(rundir: RunDir) -> dict[str, Any]:
    """The figures a person asks about a run, from its files alone.

    Its times and GPU-hours are the training attempts'; failed starts are listed apart.
    """
    status, metrics = rundir.status() or {}, rundir.metrics()
    steps = [m for m in metrics if "loss" in m]
    runs = history(rundir)
    eval_losses = [m for m in metrics if "eval_loss" in m]
    started = runs[0].started if runs else None
    ended = max((a.ended for a in runs if a.ended), default=None)
    gpu_hours = sum(a.gpu_hours for a in runs)
    before, after = status.get("eval_loss_before"), status.get("eval_loss_after")
    return {
        "name": rundir.path.name,
        "state": status.get("state", "unknown"),
        "step": status.get("step", steps[-1]["step"] if steps else 0),
        "total_steps": status.get("total_steps"),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "perplexity_before": _exp(before),
        "perplexity_after": _exp(after),
        "last_eval": {"step": eval_losses[-1]["step"], "eval_loss": eval_losses[-1]["eval_loss"]}
        if eval_losses
        else None,
        "tokens_seen": steps[-1].get("tokens_seen") if steps else None,
        "samples_seen": steps[-1].get("samples_seen") if steps else None,
        "final_loss": steps[-1].get("loss") if steps else None,
        "started": started,
        "ended": ended,
        "wall_hours": (ended - started) / 3600 if started and ended else None,
        "train_hours": sum(a.hours for a in runs),
        "gpu_hours": gpu_hours,
        "devices": sorted({f"{a.processes} x {a.device}" for a in runs}),
        "attempts": attempt_rows(runs, status),
        "checkpoints": [
            {"step": e.step, "name": e.name, "reason": e.reason, "seconds": e.seconds, "time": e.time}
            for e in read_events(rundir)
            if isinstance(e, CheckpointEvent)
        ],
        "interruptions": interruptions(runs),
        "failed_starts": failed_start_rows(failed_starts(rundir)),
    }


def _exp(loss: Any) -> float | None:
    return math.exp(loss) if isinstance(loss, (int, float)) and loss < 700 else None


def facts_at_step(rundir: RunDir, step: int) -> dict[str, Any]:
    """Steps, tokens and the newest held-out loss at or before `step` (a checkpoint's figures)."""
    metrics = rundir.metrics()
    at = [m for m in metrics if "loss" in m and int(m["step"]) <= step]
    evals = [m for m in metrics if "eval_loss" in m and int(m["step"]) <= step]
    return {
        "step": step,
        "tokens_seen": at[-1].get("tokens_seen") if at else None,
        "samples_seen": at[-1].get("samples_seen") if at else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_step": evals[-1]["step"] if evals else None,
    }


# ---------------------------------------------------------------- markdown


def _when(unix: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix)) if unix else "-"


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _reached(interruption: dict[str, Any]) -> str:
    """The step an interrupted attempt reached: '14', or 'at least 14' when it was killed."""
    exact = interruption.get("reached_exact", True) or interruption["reached"] is None
    return _num(interruption["reached"]) if exact else f"at least {_num(interruption['reached'])}"


def _lost(interruption: dict[str, Any]) -> str:
    """The steps lost column: '2', 'at least 2', 'unknown', or '-' when no attempt resumed after it yet."""
    lost, exact = interruption["lost_steps"], interruption.get("lost_steps_exact", True)
    if lost is None or exact:
        return _num(lost)
    return f"at least {_num(lost)}" if lost else "unknown"


def markdown(rundir: RunDir, facts: dict[str, Any], figure: str | None, evaluation: dict[str, Any] | None) -> str:
    lines = [f"# Run report: {facts['name']}", ""]
    lines += [
        f"`{rundir.path}` · state **{facts['state']}** at step {facts['step']} / {facts['total_steps'] or '?'}",
        "",
    ]
    if figure:
        lines += [f"![training curves]({figure})", ""]
    gpu = (
        f"{facts['gpu_hours']:.3f}"
        if any(a["device"] == "cuda" for a in facts["attempts"])
        else "0 (no GPU: trained on " + ", ".join(facts["devices"] or ["-"]) + ")"
    )
    lines += [
        "## Run",
        "",
        "| started | ended | wall time | training time | attempts | processes x device | GPU-hours |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {_when(facts['started'])} | {_when(facts['ended'])} | {format_duration(facts['wall_hours'])} | "
        f"{format_duration(facts['train_hours'])} | {len(facts['attempts'])} | "
        f"{', '.join(facts['devices']) or '-'} | {gpu} |",
        "",
        "| steps | tokens seen | samples seen | final training loss | held-out loss before | after "
        "| perplexity before | after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {_num(facts['step'])} | {_num(facts['tokens_seen'])} | {_num(facts['samples_seen'])} | "
        f"{_num(facts['final_loss'])} | {_num(facts['eval_loss_before'])} | {_num(facts['eval_loss_after'])} | "
        f"{_num(facts['perplexity_before'], 2)} | {_num(facts['perplexity_after'], 2)} |",
        "",
    ]
    lines += ["## Interruptions survived", ""]
    if facts["interruptions"]:
        lines += [
            "| attempt | how it ended | step reached | resumed from | resumed at | steps lost |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for i in facts["interruptions"]:
            lines.append(
                f"| {i['attempt']} | {i['exit'] or '-'} | {_reached(i)} | {i['resumed_from'] or 'start'} | "
                f"{_num(i['resumed_at'])} | {_lost(i)} |"
            )
        costs = [
            (int(i["lost_steps"]), i.get("lost_steps_exact", True))
            for i in facts["interruptions"]
            if i["lost_steps"] is not None
        ]
        lines += ["", f"{len(facts['interruptions'])} interruption(s); {redone_words(costs, 'done twice in all')}."]
    else:
        lines.append("None: the run trained in one attempt.")
    lines += [
        "",
        "## Attempts",
        "",
        "| # | started | ended | from step | processes x device | how it ended |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for a in facts["attempts"]:
        first = "-" if a["start_step"] is None else a["start_step"]  # it never got to train, as committed
        lines.append(
            f"| {a['number']} | {_when(a['started'])} | {_when(a['ended'])} | {first} | "
            f"{a['processes']} x {a['device']} | {a['exit']} |"
        )
    failed = facts["failed_starts"]
    if failed:
        lines += ["", f"{len(failed)} failed start(s) before training, not counted as attempts:", ""]
        lines += [
            f"- {_when(f['started'])}, {f['seconds']:.0f} s on {f['processes']} x {f['device']}: "
            + " ".join(str(f["reason"] or "failed").split())
            for f in failed
        ]
    lines += ["", "## Checkpoints", ""]
    if facts["checkpoints"]:
        lines += ["| step | name | reason | seconds to save |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {c['step']} | {c['name']} | {c['reason']} | {_num(c['seconds'], 3)} |" for c in facts["checkpoints"]
        ]
    else:
        lines.append("None written.")
    lines += ["", "## Evaluation", ""]
    lines += (
        evaluation_lines(evaluation)
        if evaluation
        else [f"No `eval/summary.json` yet: run `noesis-eval {rundir.path}` for judge scores."]
    )
    try:
        config = yaml.safe_dump(rundir.saved_config(), sort_keys=False).rstrip()
    except Exception:  # a report must still be written for a run whose config.yaml is damaged
        config = f"(unreadable {rundir.config_file})"
    lines += ["", "## Config", "", "```yaml", config, "```", ""]
    return "\n".join(lines)


def evaluation_lines(summary: dict[str, Any]) -> list[str]:
    """The eval summary (eval/summary.json) as a markdown table: base against tuned."""
    models = summary.get("models", {})
    names = [n for n in ("base", "tuned") if n in models]
    lines = [
        # `prompts` says where they came from (a file, or the run's held-out records); older summaries name the file.
        f"Judge `{summary.get('judge')}` on {summary.get('prompts') or summary.get('prompts_file')} "
        f"({summary.get('prompt_count')} prompts), weights `{summary.get('weights')}`.",
        "",
        "| | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    rows = [
        ("held-out loss", "heldout_loss", 4),
        ("perplexity", "perplexity", 2),
        ("judge score (mean)", "score_mean", 3),
    ]
    for label, key, digits in rows:
        lines.append(f"| {label} | " + " | ".join(_num(models[n].get(key), digits) for n in names) + " |")
    lines.append(
        "| judged | "
        + " | ".join(f"{models[n].get('scored', 0)} of {summary.get('prompt_count')}" for n in names)
        + " |"
    )
    tags = sorted({t for n in names for t in models[n].get("by_tag", {})})
    for tag in tags:
        lines.append(
            f"| tag `{tag}` | "
            + " | ".join(_num(models[n]["by_tag"].get(tag, {}).get("score_mean"), 3) for n in names)
            + " |"
        )
    return lines


# ---------------------------------------------------------------- entry


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write training.png, plotted.json, facts.json and report.md into `out` (default RUN_DIR/report/).

    Returns the path of report.md.
    """
    from noesis_accel.after import plots

    rundir = RunDir(Path(run_dir)).require()
    out_dir = Path(out) if out else rundir.report_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = run_facts(rundir)
    metrics = rundir.metrics()
    figure = None
    if metrics:
        title = f"{facts['name']}: {facts['state']} at step {facts['step']}/{facts['total_steps'] or '?'}"
        png = plots.write_figure(metrics, rundir, out_dir, title, facts["eval_loss_before"])
        figure = png.name
    summary_file = rundir.eval_dir / "summary.json"
    evaluation = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    (out_dir / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    report = out_dir / "report.md"
    report.write_text(markdown(rundir, facts, figure, evaluation))
    return report


REPORT_COMMAND = Command(
    name="report",
    summary="Plots and a markdown summary of a run.",
    options=(Option("out", "where to write (default: RUN_DIR/report/)", metavar="DIR", aliases=("--out",)),),
    examples=("noesis report runs/demo", "noesis report runs/demo out=/tmp/demo-report"),
)


@safe_for_pipes
@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`noesis report RUN_DIR [out=DIR]`."""
    args = parse(REPORT_COMMAND, command_line(argv))
    report = write_report(str(args.run_dir), args.options["out"])
    print(f"wrote {report} and {report.parent / 'training.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
