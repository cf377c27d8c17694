"""`noesis status` with no RUN_DIR: every run under a run root, one line each, newest first."""

from __future__ import annotations

import time
from pathlib import Path

from noesis_accel.rundir.layout import RunDir


def run_dirs(root: Path) -> list[RunDir]:
    """The run dirs directly under `root` (those holding a status.json or a config.yaml), newest update first."""
    if not root.is_dir():
        return []
    found = [RunDir(path) for path in root.iterdir() if path.is_dir()]
    found = [rundir for rundir in found if rundir.status_file.is_file() or rundir.config_file.is_file()]
    return sorted(found, key=_updated, reverse=True)


def _updated(rundir: RunDir) -> float:
    newest = [f.stat().st_mtime for f in (rundir.status_file, rundir.config_file) if f.is_file()]
    return max(newest, default=0.0)


def age_words(seconds: float) -> str:
    """`40 s ago`, `12 min ago`, `3.5 h ago`, `2 days ago`."""
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def runs_table(root: Path, now: float | None = None) -> str:
    """The runs under `root`: name, state, step, last update; or one line saying there are none."""
    rundirs = run_dirs(root)
    if not rundirs:
        return f"no runs under {root} (a run dir holds status.json; give another root with root=DIR)"
    now = time.time() if now is None else now
    rows = [("RUN", "STATE", "STEP", "UPDATED")]
    for rundir in rundirs:
        status = rundir.status() or {}
        step, total = status.get("step"), status.get("total_steps")
        steps = f"{step}/{total}" if step is not None and total else "-"
        rows.append(
            (rundir.path.name, str(status.get("state", "not started")), steps, age_words(now - _updated(rundir)))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"runs under {root} (noesis status RUN_DIR for one; noesis train RUN_DIR continues one):"]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3] for row in rows]
    return "\n".join(lines)
