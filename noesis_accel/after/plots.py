"""The run report's figure: loss and held-out loss, learning rate, tokens/s and grad norm against step,
with every checkpoint, interruption and resume marked. Matplotlib with the Agg backend (no display)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from noesis_accel.rundir.history import (
    Attempt,
    CheckpointEvent,
    Event,
    RunState,
    StopEvent,
    history,
    lost_words,
    read_events,
    resumed_after,
    training_events,
)
from noesis_accel.rundir.layout import RunDir

# (metrics.jsonl key, panel title, y label); the held-out loss shares the loss panel.
PANELS = (
    ("loss", "Loss (held-out: dots; open dot: before training)", "loss"),
    ("lr", "Learning rate", "lr"),
    ("tokens_per_s", "Throughput", "tokens / s"),
    ("grad_norm", "Gradient norm (before clipping)", "grad norm"),
)
_COLORS = {
    "loss": "#1f77b4",
    "eval_loss": "#ff7f0e",
    "lr": "#2ca02c",
    "tokens_per_s": "#9467bd",
    "grad_norm": "#8c564b",
    "checkpoint": "#9a9a9a",
    "interruption": "#d62728",
    "resume": "#2ca02c",
}


def series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in metrics.jsonl order: exactly what is plotted."""
    points = [(int(m["step"]), float(m[key])) for m in metrics if isinstance(m.get(key), (int, float)) and "step" in m]
    return [s for s, _ in points], [v for _, v in points]


def marks(attempts: list[Attempt], events: list[Event]) -> dict[str, list[dict[str, Any]]]:
    """Checkpoints, interruptions (the step a stopped attempt had reached) and resumes.

    `attempts` is the run's history (rundir.history), so the figure and noesis-status agree;
    `events` are its events.jsonl records, for the checkpoints and the newest stop. A failed start
    trained nothing: its stop is no interruption, so its events are left out.
    """
    events = training_events(events)
    checkpoints = [
        {"step": e.step, "name": e.name, "reason": e.reason} for e in events if isinstance(e, CheckpointEvent)
    ]
    interruptions, resumes = [], []
    for i, attempt in enumerate(attempts[:-1]):
        after = resumed_after(attempts, i)
        reached = attempt.last_step if attempt.last_step is not None else (after.first_step if after else None)
        if reached is not None:
            interruptions.append(
                {
                    "step": int(reached),
                    "exit": attempt.stop_reason,
                    "attempt": attempt.number,
                    "resumed_at": after.first_step if after else None,
                }
            )
    for attempt in attempts[1:]:
        if attempt.first_step is None:
            continue
        # The attempts this resume followed: usually one, more when some died before training.
        redone = [a for i, a in enumerate(attempts[:-1]) if resumed_after(attempts, i) is attempt]
        costs = [(a.lost_steps or 0, a.lost_steps_exact) for a in redone]
        resumes.append(
            {
                "step": attempt.first_step,
                "from": attempt.resumed_from,
                "attempt": attempt.number,
                "lost_steps": sum(n for n, _ in costs),
                "lost_steps_exact": all(e for _, e in costs),
            }
        )
    # A run that is stopped now (its last event a stop that is not completion) shows that stop too.
    last = events[-1] if events else None
    if isinstance(last, StopEvent) and last.state is not RunState.COMPLETED:
        interruptions.append({"step": last.step, "exit": last.reason, "attempt": None, "resumed_at": None})
    return {"checkpoint": checkpoints, "interruption": interruptions, "resume": resumes}


def plotted_data(
    metrics: list[dict[str, Any]],
    attempts: list[Attempt],
    events: list[Event],
    eval_loss_before: float | None = None,
) -> dict[str, Any]:
    """Every series and mark the figure shows, as plain data (written beside the PNG).

    The held-out loss before training is not in metrics.jsonl (status.json has it); it is drawn at step 0.
    """
    data: dict[str, Any] = {}
    for key in [p[0] for p in PANELS] + ["eval_loss"]:
        steps, values = series(metrics, key)
        data[key] = {"step": steps, "value": values}
    before: list[float] = []
    if isinstance(eval_loss_before, (int, float)) and math.isfinite(eval_loss_before):
        before = [float(eval_loss_before)]
    data["eval_loss_before"] = {"step": [0] if before else [], "value": before}
    data["marks"] = marks(attempts, events)
    return data


def build_figure(data: dict[str, Any], title: str):  # -> matplotlib.figure.Figure
    """A 2x2 figure of the four panels; each line's gid is its metrics key, each mark's gid its kind."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(11, 7), dpi=80, layout="constrained")
    axes = figure.subplots(2, 2, sharex=True).ravel()
    for ax, (key, panel_title, ylabel) in zip(axes, PANELS):
        steps, values = data[key]["step"], data[key]["value"]
        ax.plot(steps, values, color=_COLORS[key], linewidth=1.4, gid=key, label=key.replace("_", " "))
        if key == "loss" and data["eval_loss"]["step"]:
            ax.plot(
                data["eval_loss"]["step"],
                data["eval_loss"]["value"],
                color=_COLORS["eval_loss"],
                marker="o",
                markersize=6,
                linestyle="--",
                linewidth=1,
                gid="eval_loss",
                label="held-out loss",
            )
        if key == "loss" and data["eval_loss_before"]["step"]:
            ax.plot(
                data["eval_loss_before"]["step"],
                data["eval_loss_before"]["value"],
                color=_COLORS["eval_loss"],
                marker="o",
                markersize=6,
                markerfacecolor="white",
                linestyle="none",
                gid="eval_loss_before",
            )
        if not steps:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="#777777")
        _draw_marks(ax, data["marks"])
        ax.set_title(panel_title, fontsize=11)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.25)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes[2:]:
        ax.set_xlabel("optimizer step")
    handles = [
        Line2D([], [], color=_COLORS["loss"], label="training loss"),
        Line2D([], [], color=_COLORS["eval_loss"], marker="o", linestyle="--", label="held-out loss"),
        Line2D([], [], color=_COLORS["checkpoint"], linestyle=":", label="checkpoint"),
        Line2D([], [], color=_COLORS["interruption"], linewidth=2, label="interrupted (step reached)"),
        Line2D([], [], color=_COLORS["resume"], linestyle="--", linewidth=2, label="resumed from checkpoint"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncol=5, frameon=False, fontsize=10)
    figure.suptitle(title, fontsize=13)
    return figure


def _draw_marks(ax: Any, found: dict[str, list[dict[str, Any]]]) -> None:
    for mark in found["checkpoint"]:
        ax.axvline(mark["step"], color=_COLORS["checkpoint"], linestyle=":", linewidth=0.9, gid="checkpoint", zorder=0)
    for stop in found["interruption"]:
        resumed_at = stop.get("resumed_at")
        if resumed_at is not None and resumed_at < stop["step"]:
            # The steps between the checkpoint resumed from and the step reached were done twice.
            ax.axvspan(resumed_at, stop["step"], color=_COLORS["interruption"], alpha=0.12, gid="lost", zorder=0)
        ax.axvline(stop["step"], color=_COLORS["interruption"], linewidth=1.8, gid="interruption", zorder=1)
    for resume in found["resume"]:
        ax.axvline(resume["step"], color=_COLORS["resume"], linestyle="--", linewidth=1.8, gid="resume", zorder=1)
    top = ax.get_xaxis_transform()
    for i, resume in enumerate(found["resume"]):
        lost, exact = resume.get("lost_steps"), resume.get("lost_steps_exact", True)
        note = f"resume {i + 1}" + (f": {lost_words(lost, exact)}" if lost or not exact else "")
        ax.text(
            resume["step"],
            0.98,
            " " + note,
            transform=top,
            color=_COLORS["resume"],
            fontsize=8,
            va="top",
            ha="left",
            gid="resume_label",
        )


def write_figure(
    metrics: list[dict[str, Any]],
    rundir: RunDir,
    out_dir: Path,
    title: str,
    eval_loss_before: float | None = None,
) -> Path:
    """training.png and the data it plots (plotted.json) in `out_dir`, marks from `rundir`'s history."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = plotted_data(metrics, history(rundir), read_events(rundir), eval_loss_before)
    figure = build_figure(data, title)
    png = out_dir / "training.png"
    figure.savefig(png)
    (out_dir / "plotted.json").write_text(json.dumps(data, indent=1) + "\n")
    return png
