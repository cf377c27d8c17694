"""status.json in the run directory: what a run is doing, how far it got, and why it stopped.

`noesis-status RUN_DIR` prints it for people; restarts and the Modal entry read it too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from noesis_accel.rundir import RunDir

STATUS_FILE = "status.json"  # RunDir.status_file
STATES = ("running", "completed", "failed", "interrupted")


def write_status(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into status.json atomically (tmp + rename): a reader never sees half a file."""
    path = RunDir(Path(run_dir)).status_file
    status = read_status(run_dir) or {}
    status.update(fields)
    status["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    status["updated_unix"] = round(time.time(), 3)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    os.replace(tmp, path)
    return status


def read_status(run_dir: Path) -> dict[str, Any] | None:
    return RunDir(Path(run_dir)).status()


def format_status(status: dict[str, Any]) -> str:
    step, total = status.get("step", 0), status.get("total_steps") or 0
    percent = f" ({100 * step / total:.0f}%)" if total else ""
    lines = [
        f"state:       {status.get('state', 'unknown')}",
        f"progress:    step {step} / {total}{percent}",
        f"checkpoint:  {status.get('latest_checkpoint') or 'none yet'}",
        f"exit reason: {status.get('exit_reason') or '-'}",
    ]
    if status.get("error"):
        lines.append(f"error:       {status['error']}")
    lines.append(f"updated:     {status.get('updated_at', '-')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`noesis-status RUN_DIR`: print a run's status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: noesis-status RUN_DIR   (e.g. noesis-status runs/demo)", file=sys.stderr)
        return 2
    status = read_status(Path(args[0]))
    if status is None:
        print(f"error: {args[0]} has no readable {STATUS_FILE}; is it a run directory (run.root/run.name)?", file=sys.stderr)
        return 2
    print(format_status(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
