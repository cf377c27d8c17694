"""The closing table of a sweep: every job's overrides, state and held-out loss, read from its run dir.

Read from the run dirs, not from the launcher's return values, so it is the same table whichever
launcher ran the jobs (in-process, local processes) and whether a job finished now or in an earlier
try of the same sweep. Also written as `sweep.csv` beside the jobs, for a spreadsheet or pandas.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from noesis_accel.rundir.layout import RunDir


@dataclass(frozen=True)
class SweepRow:
    """One job of a sweep, as its run dir tells it."""

    run_dir: Path
    varied: dict[str, str]  # the job's values of the keys the sweep varies
    overrides: list[str]  # all of the job's overrides
    state: str
    step: int
    total_steps: int
    heldout_loss: float | None  # the newest held-out loss, after training when the job completed


def final_heldout_loss(rundir: RunDir) -> float | None:
    losses = [row["eval_loss"] for row in rundir.metrics() if isinstance(row.get("eval_loss"), (int, float))]
    return float(losses[-1]) if losses else None


def sweep_row(rundir: RunDir, overrides: Sequence[str], keys: Sequence[str]) -> SweepRow:
    status = rundir.status() or {}
    varied = {}
    for word in overrides:
        key, _, value = word.lstrip("+~").partition("=")
        if key in keys:
            varied[key] = value
    return SweepRow(
        rundir.path,
        varied,
        list(overrides),
        str(status.get("state", "not started")),
        int(status.get("step") or 0),
        int(status.get("total_steps") or 0),
        final_heldout_loss(rundir),
    )


def format_table(rows: Sequence[SweepRow], keys: Sequence[str]) -> str:
    """Aligned columns: run dir, each varied key, state, step, held-out loss; the lowest loss marked."""
    losses = [row.heldout_loss for row in rows if row.heldout_loss is not None and math.isfinite(row.heldout_loss)]
    best = min(losses) if losses else None
    header = ["RUN", *keys, "STATE", "STEP", "HELD-OUT LOSS"]
    table = [header]
    for row in rows:
        loss = "-" if row.heldout_loss is None else f"{row.heldout_loss:.4f}"
        if best is not None and row.heldout_loss == best and len(losses) > 1:
            loss += "  <- lowest"
        steps = f"{row.step}/{row.total_steps}" if row.total_steps else "-"
        table.append([row.run_dir.name, *(row.varied.get(k, "-") for k in keys), row.state, steps, loss])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


def write_csv(rows: Sequence[SweepRow], keys: Sequence[str], path: Path) -> None:
    """The table as CSV, atomically (a reader never sees half of it)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two sweeps ending at once: their own
    with partial.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["run_dir", *keys, "state", "step", "total_steps", "heldout_loss", "overrides"])
        for row in rows:
            loss = "" if row.heldout_loss is None else repr(row.heldout_loss)
            varied = [row.varied.get(k, "") for k in keys]
            writer.writerow(
                [str(row.run_dir), *varied, row.state, row.step, row.total_steps, loss, " ".join(row.overrides)]
            )
    os.replace(partial, path)


def remove_empty_job_dirs(sweep_dir: Path, jobs: int) -> None:
    """The job folders `0`..`jobs-1` Hydra made in `sweep_dir` and left empty, then `sweep_dir` if empty.

    Nothing else: `hydra.sweep.dir` may be any folder of the user's (`.`), where an empty folder is theirs.
    """
    for number in range(jobs):
        folder = sweep_dir / str(number)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if sweep_dir.is_dir() and not any(sweep_dir.iterdir()):
        sweep_dir.rmdir()
