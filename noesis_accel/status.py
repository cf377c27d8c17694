"""status.json, the run's history told from events.jsonl, and `noesis-status`.

`noesis-status RUN_DIR` prints what a run is doing, how far it got, every attempt with what
stopped it and the steps that cost, GPU-hours and their price; `--verify` checks every kept
checkpoint file against its manifest. It reads files only: it works on a run dir on a Modal
Volume, from any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noesis_accel.errors import redact
from noesis_accel.rundir import RunDir

STATUS_FILE = "status.json"  # RunDir.status_file
STATES = ("running", "completed", "failed", "interrupted")


def write_status(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into status.json atomically (tmp + rename): a reader never sees half a file.

    On a full disk the new file may not fit; then the existing file is overwritten in place (its
    blocks are already allocated), and only if that fails too does the error reach the caller.
    """
    path = RunDir(Path(run_dir)).status_file
    status = read_status(run_dir) or {}
    status.update(fields)
    status["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    status["updated_unix"] = round(time.time(), 3)
    text = json.dumps(status, indent=2) + "\n"
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        compact = json.dumps(status, separators=(",", ":"))
        with open(path, "r+" if path.exists() else "w") as handle:
            handle.write(compact)
            handle.truncate()
    return status


def read_status(run_dir: Path) -> dict[str, Any] | None:
    return RunDir(Path(run_dir)).status()


def record_stop(rundir: RunDir, state: str, step: int, reason: str) -> None:
    """How a run stopped, in status.json and events.jsonl; if even that cannot be written, say so."""
    reason = redact(reason)
    try:
        write_status(rundir.path, state=state, step=step, exit_reason=reason,
                     error=reason if state == "failed" else None)
        rundir.append_event("stop", state=state, step=step, reason=reason)
    except OSError as err:
        print(f"warning: could not record the stop in {rundir.status_file} ({err.strerror or err}); "
              f"the run stopped as '{state}': {reason}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- history


@dataclass
class Attempt:
    """One start of the run, until it stopped (or until now, if it still runs)."""

    number: int
    started: float
    ended: float | None
    first_step: int
    last_step: int | None
    processes: int
    device: str
    host: str
    stop_state: str | None = None  # completed | interrupted | failed | None (killed, or still running)
    stop_reason: str | None = None
    lost_steps: int | None = None  # steps the next attempt had to redo

    @property
    def hours(self) -> float:
        return max(0.0, ((self.ended or self.started) - self.started) / 3600)

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.processes if self.device == "cuda" else 0.0


def history(rundir: RunDir) -> list[Attempt]:
    """The run's attempts from events.jsonl: each start, what ended it, and the steps that cost."""
    attempts: list[Attempt] = []
    for event in rundir.events():
        kind = event.get("event")
        if kind == "start":
            if attempts:
                previous = attempts[-1]
                if previous.ended is None:  # killed without a stop event: the next start saw its traces
                    previous.ended = event.get("previous_last_seen") or event["time"]
                    previous.stop_reason = previous.stop_reason or event.get("previous_exit")
                    previous.last_step = event.get("previous_reached", previous.last_step)
                previous.lost_steps = event.get("lost_steps")
            attempts.append(Attempt(
                number=int(event.get("attempt", len(attempts) + 1)), started=float(event["time"]), ended=None,
                first_step=int(event.get("step", 0)), last_step=None, processes=int(event.get("processes", 1)),
                device=str(event.get("device", "cpu")), host=str(event.get("host", "?")),
            ))
        elif attempts and kind == "checkpoint":
            attempts[-1].last_step = int(event.get("step", 0))
        elif attempts and kind == "stop":
            current = attempts[-1]
            current.ended, current.stop_state = float(event["time"]), event.get("state")
            current.stop_reason, current.last_step = event.get("reason"), int(event.get("step", 0))
    if attempts and attempts[-1].ended is None:
        status = rundir.status() or {}
        attempts[-1].ended = float(status.get("updated_unix", attempts[-1].started))
        attempts[-1].last_step = int(status.get("step", attempts[-1].first_step))
    return attempts


# ---------------------------------------------------------------- printing


def _duration(hours: float) -> str:
    seconds = int(round(hours * 3600))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_status(status: dict[str, Any], attempts: list[Attempt] | None = None,
                  price_per_gpu_hour: float | None = None) -> str:
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
    if attempts:
        interruptions = attempts[:-1]
        lost = sum(a.lost_steps or 0 for a in interruptions)
        lines.append(f"attempts:    {len(attempts)} ({len(interruptions)} interruption(s) survived, "
                     f"{lost} step(s) redone)")
        for attempt in attempts:
            ended = attempt.stop_reason or ("running" if attempt is attempts[-1] else "killed")
            cost = f"; lost {attempt.lost_steps} step(s)" if attempt.lost_steps is not None else ""
            lines.append(f"  #{attempt.number}: steps {attempt.first_step} -> {attempt.last_step if attempt.last_step is not None else '?'}, "
                         f"{_duration(attempt.hours)} on {attempt.processes} x {attempt.device} ({attempt.host}); "
                         f"{ended}{cost}")
        gpu_hours = sum(a.gpu_hours for a in attempts)
        price = f" (~${gpu_hours * price_per_gpu_hour:,.2f} at ${price_per_gpu_hour:g}/GPU-hour)" \
            if price_per_gpu_hour else ""
        lines.append(f"gpu-hours:   {gpu_hours:.2f}{price}")
    lines.append(f"updated:     {status.get('updated_at', '-')}")
    return "\n".join(lines)


def verify_checkpoints(rundir: RunDir) -> list[tuple[Path, str | None]]:
    """Every kept checkpoint with its problem (None when every file matches its checksum)."""
    from noesis_accel.checkpoint import checkpoint_problem

    return [(path, checkpoint_problem(path)) for _, path in rundir.step_dirs()]


def main(argv: list[str] | None = None) -> int:
    """`noesis-status RUN_DIR [--verify] [--price USD]`: print a run's status and history."""
    parser = argparse.ArgumentParser(prog="noesis-status", description="Print a run's state, progress and history.")
    parser.add_argument("run_dir", type=Path, help="the run directory, <run.root>/<run.name> (e.g. runs/demo)")
    parser.add_argument("--verify", action="store_true", help="check every kept checkpoint against its manifest")
    parser.add_argument("--price", type=float, default=None, metavar="USD",
                        help="price of one GPU-hour, for a cost estimate")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rundir = RunDir(args.run_dir)
    status = rundir.status()
    if status is None:
        print(f"error: {args.run_dir} has no readable {STATUS_FILE}; is it a run directory (run.root/run.name)?",
              file=sys.stderr)
        return 2
    print(format_status(status, history(rundir), args.price))
    if not args.verify:
        return 0
    results = verify_checkpoints(rundir)
    for path, problem in results:
        print(f"{path.name}: {'ok' if problem is None else 'DAMAGED: ' + problem}")
    if not results:
        print("no checkpoints kept")
    return 1 if any(problem for _, problem in results) else 0


if __name__ == "__main__":
    sys.exit(main())
