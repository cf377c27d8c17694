"""status.json, the run's history told from events.jsonl, and `noesis-status`.

`noesis-status RUN_DIR` prints what a run is doing, how far it got, every attempt with what
stopped it and the steps that cost, GPU-hours and their price; `--verify` checks every kept
checkpoint file against its manifest. It reads files only: it works on a run dir on a Modal
Volume, from any machine.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noesis_accel.core.cli import Command, Option, command_line, parse
from noesis_accel.core.errors import exit_on_user_error, redact, safe_for_pipes
from noesis_accel.rundir.layout import RunDir

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
        write_status(
            rundir.path, state=state, step=step, exit_reason=reason, error=reason if state == "failed" else None
        )
        rundir.append_event("stop", state=state, step=step, reason=reason)
    except OSError as err:
        print(
            f"warning: could not record the stop in {rundir.status_file} ({err.strerror or err}); "
            f"the run stopped as '{state}': {reason}",
            file=sys.stderr,
            flush=True,
        )


# ---------------------------------------------------------------- history
#
# events.jsonl, one line each:
#   starting    an attempt began; appended and committed before the model loads, so an attempt killed
#               while loading still counts: attempt, processes, device, host, pid, every_step_durable;
#               from the second attempt on, what the committed files said of the one before:
#               previous_reached (None: nothing of it was committed), previous_reached_exact,
#               previous_exit, previous_last_seen
#   start       training starts (after the checkpoint loaded): attempt, step, resumed_from, processes,
#               device, host, pid; from the second attempt on lost_steps and lost_steps_exact, what the
#               interruption before cost (exact, or a lower bound where 0 means unknown)
#   checkpoint  step, name, reason, seconds
#   stop        state, step, reason (a graceful stop; a killed attempt has none)
# Older run dirs have no `starting`: their one `start` per attempt also holds the previous_* keys.

KILLED = "killed (no exit recorded: SIGKILL, a lost machine, or a preemption past its grace)"


@dataclass
class PreviousAttempt:
    """How far the newest recorded attempt got and how it ended, as the committed files tell it."""

    reached: int | None  # the furthest step it is known to have finished; None: nothing of it was committed
    exact: bool  # `reached` is where it stopped, not a lower bound
    exit: str
    last_seen: float  # the time of its newest committed record (its start, if none)


def previous_attempt(
    events: list[dict[str, Any]], metrics: list[dict[str, Any]], status: dict[str, Any] | None
) -> PreviousAttempt | None:
    """What the newest attempt in these files reached; None when no attempt started yet.

    Its records are its events and the metrics and status.json written since it began (its own
    clock wrote both). With a `stop` event it stopped gracefully and the step is exact. Without one
    it was killed, and its newest committed record is a lower bound, unless it wrote every finished
    step to storage that needs no commit (`every_step_durable`).
    """
    starts = attempt_starts(events)
    if not starts:
        return None
    start, own = events[starts[-1]], events[starts[-1] + 1 :]
    stops = [e for e in own if e.get("event") == "stop"]
    if stops:
        stop = stops[-1]
        return PreviousAttempt(
            int(stop.get("step", 0)), True, str(stop.get("reason") or stop.get("state")), float(stop["time"])
        )
    since = float(start["time"])
    records = [e for e in [start, *own] if "step" in e]
    records += [m for m in metrics if "step" in m and float(m.get("time", 0)) >= since]
    if status and "step" in status and float(status.get("updated_unix", 0)) >= since:
        records.append({"step": status["step"], "time": status["updated_unix"]})
    steps = [int(r["step"]) for r in records if r["step"] is not None]
    times = [float(r["time"]) for r in records if "time" in r]
    return PreviousAttempt(
        max(steps, default=None), bool(start.get("every_step_durable", False)), KILLED, max(times, default=since)
    )


def attempt_starts(events: list[dict[str, Any]]) -> list[int]:
    """The index of each attempt's first event: its `starting`, or (older run dirs) its `start`."""
    starts, awaiting_start = [], False
    for i, event in enumerate(events):
        kind = event.get("event")
        if kind == "starting":
            starts.append(i)
            awaiting_start = True
        elif kind == "start":
            if not awaiting_start:  # no `starting` before it: an older run dir's attempt
                starts.append(i)
            awaiting_start = False
    return starts


def lost_steps(reached: int | None, exact: bool, resumed_at: int) -> tuple[int, bool]:
    """Steps finished before an interruption and trained again after resuming at `resumed_at`.

    Returns (count, exact); an inexact count is a lower bound, and an inexact 0 means unknown.
    """
    return max(0, (reached if reached is not None else resumed_at) - resumed_at), exact


def lost_words(lost: int | None, exact: bool) -> str:
    """'lost 3 step(s)', 'lost at least 3 step(s)' or 'lost an unknown number of steps' ('' if not known yet)."""
    if lost is None:
        return ""
    if exact:
        return f"lost {lost} step(s)"
    return f"lost at least {lost} step(s)" if lost else "lost an unknown number of steps"


def redone_words(losses: list[tuple[int, bool]], done: str = "redone") -> str:
    """What interruptions cost together: '4 step(s) redone', 'at least 4 step(s) redone; 1 of unknown cost'."""
    total, unknown = sum(n for n, _ in losses), sum(1 for n, exact in losses if not exact and n == 0)
    if all(exact for _, exact in losses):
        return f"{total} step(s) {done}"
    return f"at least {total} step(s) {done}" + (f"; {unknown} of unknown cost" if unknown else "")


@dataclass
class Attempt:
    """One start of the run, until it stopped (or until now, if it still runs)."""

    number: int
    started: float
    ended: float | None
    first_step: int | None  # where it trained from; None: it never got that far, as far as committed files show
    last_step: int | None  # the furthest step it is known to have finished
    processes: int
    device: str
    host: str
    resumed_from: str | None = None  # the checkpoint it loaded (None: from scratch, or not known)
    reached_exact: bool = True  # False: `last_step` is a lower bound (it was killed)
    stop_state: str | None = None  # completed | interrupted | failed | None (killed, or still running)
    stop_reason: str | None = None
    lost_steps: int | None = None  # steps the next attempt to train had to redo (None: not known yet)
    lost_steps_exact: bool = True  # False: `lost_steps` is a lower bound, and 0 means unknown

    @property
    def hours(self) -> float:
        return max(0.0, ((self.ended or self.started) - self.started) / 3600)

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.processes if self.device == "cuda" else 0.0

    @property
    def lost(self) -> str:
        return lost_words(self.lost_steps, self.lost_steps_exact)


def history(rundir: RunDir) -> list[Attempt]:
    """The run's attempts from events.jsonl: each start, what ended it, and the steps that cost."""
    return history_of(rundir.events(), rundir.status())


def history_of(events: list[dict[str, Any]], status: dict[str, Any] | None = None) -> list[Attempt]:
    """The attempts these events (and status.json, for the newest one) describe, old formats included."""
    attempts: list[Attempt] = []
    starts = set(attempt_starts(events))
    for i, event in enumerate(events):
        kind = event.get("event")
        if i in starts:
            if attempts:
                _close_with(attempts[-1], event)
            attempts.append(_opened_by(event, len(attempts) + 1))
        if not attempts:
            continue
        if kind == "start":
            _started_training(attempts[-1], event)
        elif kind == "checkpoint":
            attempts[-1].last_step = max(attempts[-1].last_step or 0, int(event.get("step", 0)))
        elif kind == "stop":
            current = attempts[-1]
            current.ended, current.stop_state = float(event["time"]), event.get("state")
            current.stop_reason, current.reached_exact = event.get("reason"), True
            if current.first_step is not None:  # a stop while loading trained nothing: no step to show
                current.last_step = int(event.get("step", 0))
    if attempts and attempts[-1].ended is None:
        _newest_so_far(attempts[-1], status or {})
    for i, attempt in enumerate(attempts[:-1]):
        after = resumed_after(attempts, i)
        if after is not None:
            attempt.lost_steps, attempt.lost_steps_exact = lost_steps(
                attempt.last_step, attempt.reached_exact, int(after.first_step or 0)
            )
    return attempts


def resumed_after(attempts: list[Attempt], index: int) -> Attempt | None:
    """The first attempt after `attempts[index]` known to have resumed training (None: none yet)."""
    return next((a for a in attempts[index + 1 :] if a.first_step is not None), None)


def _opened_by(event: dict[str, Any], number: int) -> Attempt:
    return Attempt(
        number=int(event.get("attempt", number)),
        started=float(event["time"]),
        ended=None,
        first_step=None,
        last_step=None,
        processes=int(event.get("processes", 1)),
        device=str(event.get("device", "cpu")),
        host=str(event.get("host", "?")),
    )


def _started_training(attempt: Attempt, event: dict[str, Any]) -> None:
    attempt.first_step = int(event.get("step", 0))
    attempt.resumed_from = event.get("resumed_from")
    attempt.last_step = max(attempt.last_step or 0, attempt.first_step)


def _close_with(previous: Attempt, start: dict[str, Any]) -> None:
    """The next attempt's first event closes one with no stop event: what it read of it is all there is."""
    if previous.ended is not None:
        return
    previous.ended = start.get("previous_last_seen") or float(start["time"])
    previous.stop_reason = start.get("previous_exit") or KILLED
    reached = start.get("previous_reached")
    if reached is not None:
        previous.last_step = max(previous.last_step or 0, int(reached))
    # Before `previous_reached_exact` existed, a killed attempt's count came from committed files
    # that may end before it died: a lower bound. A recorded exit was exact.
    previous.reached_exact = bool(
        start.get("previous_reached_exact", not str(start.get("previous_exit", "killed")).startswith("killed"))
    )


def _newest_so_far(attempt: Attempt, status: dict[str, Any]) -> None:
    """The newest attempt without a stop: as far as status.json says, if this attempt wrote it."""
    updated = float(status.get("updated_unix", 0))
    if updated >= attempt.started:
        attempt.ended = updated
        if status.get("step") is not None:
            attempt.last_step = max(attempt.last_step or 0, int(status["step"]))
    else:
        attempt.ended = attempt.started


# ---------------------------------------------------------------- printing


def _duration(hours: float) -> str:
    seconds = int(round(hours * 3600))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _steps(attempt: Attempt) -> str:
    """'steps 12 -> 14', 'steps 12 -> at least 14', or 'no step recorded' (it never got to train, as committed)."""
    if attempt.first_step is None and attempt.last_step is None:
        return "no step recorded"
    first = "?" if attempt.first_step is None else attempt.first_step
    last = "?" if attempt.last_step is None else attempt.last_step
    return f"steps {first} -> {'' if attempt.reached_exact else 'at least '}{last}"


def format_status(
    status: dict[str, Any], attempts: list[Attempt] | None = None, price_per_gpu_hour: float | None = None
) -> str:
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
        costs = [(a.lost_steps, a.lost_steps_exact) for a in interruptions if a.lost_steps is not None]
        lines.append(
            f"attempts:    {len(attempts)} ({len(interruptions)} interruption(s) survived, {redone_words(costs)})"
        )
        for attempt in attempts:
            ended = attempt.stop_reason or ("running" if attempt is attempts[-1] else "killed")
            cost = f"; {attempt.lost}" if attempt.lost else ""
            lines.append(
                f"  #{attempt.number}: {_steps(attempt)}, "
                f"{_duration(attempt.hours)} on {attempt.processes} x {attempt.device} ({attempt.host}); "
                f"{ended}{cost}"
            )
        gpu_hours = sum(a.gpu_hours for a in attempts)
        price = (
            f" (~${gpu_hours * price_per_gpu_hour:,.2f} at ${price_per_gpu_hour:g}/GPU-hour)"
            if price_per_gpu_hour
            else ""
        )
        lines.append(f"gpu-hours:   {gpu_hours:.2f}{price}")
    lines.append(f"updated:     {status.get('updated_at', '-')}")
    return "\n".join(lines)


def verify_checkpoints(rundir: RunDir) -> list[tuple[Path, str | None]]:
    """Every kept checkpoint with its problem (None when every file matches its checksum)."""
    from noesis_accel.rundir.checkpoint import checkpoint_problem

    return [(path, checkpoint_problem(path)) for _, path in rundir.step_dirs()]


STATUS_COMMAND = Command(
    name="status",
    summary="Print a run's state, progress and history.",
    options=(
        Option("verify", "check every kept checkpoint against its manifest", bool, "true", False, ("--verify",)),
        Option("price", "price of one GPU-hour, for a cost estimate", float, "USD", None, ("--price",)),
    ),
    examples=("noesis status runs/demo", "noesis status runs/demo verify=true price=3.95"),
)


@safe_for_pipes
@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`noesis status RUN_DIR [verify=true] [price=USD]`: print a run's status and history."""
    parsed = parse(STATUS_COMMAND, command_line(argv))
    run_dir = Path(str(parsed.run_dir))
    rundir = RunDir(run_dir)
    status = rundir.status()
    if status is None:
        print(
            f"error: {run_dir} has no readable {STATUS_FILE}; is it a run directory (run.root/run.name)?",
            file=sys.stderr,
        )
        return 2
    print(format_status(status, history(rundir), parsed.options["price"]))
    if not parsed.options["verify"]:
        return 0
    results = verify_checkpoints(rundir)
    for path, problem in results:
        print(f"{path.name}: {'ok' if problem is None else 'DAMAGED: ' + problem}")
    if not results:
        print("no checkpoints kept")
    return 1 if any(problem for _, problem in results) else 0


if __name__ == "__main__":
    sys.exit(main())
