"""`noesis-status`: a run's state and history, as status.json and events.jsonl tell it (rundir.history).

`noesis status RUN_DIR` (or `noesis-status`) prints what a run is doing, how far it got, every attempt with what
stopped it and the steps that cost, GPU-hours and their price; `verify=true` checks every kept
checkpoint file against its manifest. It reads files only: it works on a run dir on a Modal
Volume, from any machine.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from noesis_accel.core.cli import Command, Option, command_line, parse
from noesis_accel.core.errors import exit_on_user_error, safe_for_pipes
from noesis_accel.rundir.costs import attempt_usd, format_usd, spent_usd
from noesis_accel.rundir.history import Attempt, RunState, failed_starts, format_duration, history, redone_words
from noesis_accel.rundir.layout import RunDir
from noesis_accel.rundir.listing import runs_table

# ---------------------------------------------------------------- printing


def _steps(attempt: Attempt) -> str:
    """'steps 12 -> 14', 'steps 12 -> at least 14', or 'no step recorded' (it never got to train, as committed)."""
    if attempt.first_step is None and attempt.last_step is None:
        return "no step recorded"
    first = "?" if attempt.first_step is None else attempt.first_step
    last = "?" if attempt.last_step is None else attempt.last_step
    return f"steps {first} -> {'' if attempt.reached_exact else 'at least '}{last}"


def _device(attempt: Attempt, price_per_gpu_hour: float | None) -> str:
    """'0m 14s on 1 x cuda, NVIDIA H100 (host), $0.02': where a start ran, for how long, at what cost."""
    usd = attempt_usd(attempt, price_per_gpu_hour)
    device = f"{attempt.device}, {attempt.gpu}" if attempt.gpu else attempt.device
    return f"{format_duration(attempt.hours)} on {attempt.processes} x {device} ({attempt.host})" + (
        f", {format_usd(usd)}" if usd is not None else ""
    )


def _failed_start_lines(failed: list[Attempt], attempts: list[Attempt], price_per_gpu_hour: float | None) -> list[str]:
    """One line per failed start: which attempt it came before (or after), what it spent apart, and its error."""
    lines = []
    for start in failed:
        later = next((a for a in attempts if a.started >= start.started), None)
        where = f" before #{later.number}" if later else (f" after #{attempts[-1].number}" if attempts else "")
        reason = " ".join(str(start.stop_reason or "failed").split())  # one line, whatever the error's shape
        lines.append(f"  failed start{where}: {_device(start, price_per_gpu_hour)}; {reason}")
    return lines


def _money_lines(status: dict[str, Any], plan: dict[str, Any] | None, spent: float | None = None) -> list[str]:
    """Spent against the budget, the ETA and projected total from the measured step time, and the plan beside them.

    `spent`: the attempts' cost from the history. Once the run has stopped it is final, while
    status.json's figure dates from the last progress record before the end.
    """
    lines = []
    running = status.get("state") == "running"
    if not running and spent is not None:
        status = {**status, "spent_usd": spent}
    if status.get("spent_usd") is not None or status.get("budget_usd") is not None:
        cap = status.get("budget_usd")
        projected = status.get("projected_usd")
        lines.append(
            f"budget:      {format_usd(status.get('spent_usd') or 0)} spent"
            + (f" of {format_usd(cap)} (budget.usd)" if cap is not None else " (no budget.usd)")
            + (
                f"; ~{format_usd(projected)} projected in all"
                if projected is not None and status.get("state") == "running"
                else ""
            )
        )
    if status.get("eta_s") is not None and status.get("state") == "running":
        lines.append(f"eta:         {format_duration(status['eta_s'] / 3600)} at the measured step time")
    if plan and plan.get("gpus"):
        first = plan["gpus"][0]
        per_step, usd, memory = first.get("seconds_per_step"), first.get("usd"), first.get("total_bytes")
        planned = [
            f"{per_step:.2f} s/step" if per_step else "s/step unknown",
            f"{memory / 2**30:.2f} GiB per {first.get('device')}" if memory else "",
            format_usd(usd) if usd is not None else "",
        ]
        peak, measure = status.get("first_step_peak_memory_gib"), status.get("first_step_peak_memory_measure")
        actual = [
            f"{status['seconds_per_step']:.2f} s/step" if status.get("seconds_per_step") else "",
            f"first step peak {peak:.2f} GiB ({measure})" if peak is not None else "",
        ]
        lines.append(f"plan:        {', '.join(p for p in planned if p)} ({first.get('spec')})")
        if any(actual):
            lines.append(f"actual:      {', '.join(a for a in actual if a)}")
    return lines


def format_status(
    status: dict[str, Any],
    attempts: list[Attempt] | None = None,
    price_per_gpu_hour: float | None = None,
    plan: dict[str, Any] | None = None,
    failed: list[Attempt] | None = None,
) -> str:
    """What `noesis status` prints. `attempts` and their time and cost are training attempts only;
    `failed` (starts a user error ended before training) are counted and listed apart."""
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
    spent = spent_usd(attempts, price_per_gpu_hour) if attempts else None
    attempts, failed = attempts or [], failed or []
    if attempts or failed:
        interruptions = attempts[:-1]
        costs = [(a.lost_steps, a.lost_steps_exact) for a in interruptions if a.lost_steps is not None]
        survived = [f"{len(interruptions)} interruption(s) survived, {redone_words(costs)}"] if attempts else []
        if failed:
            survived.append(f"{len(failed)} failed start{'s' if len(failed) > 1 else ''} before training, not counted")
        lines.append(f"attempts:    {len(attempts)} ({'; '.join(survived)})")
        for attempt in attempts:
            ended = attempt.stop_reason or (RunState.RUNNING.value if attempt is attempts[-1] else "killed")
            cost = f"; {attempt.lost}" if attempt.lost else ""
            lines.append(
                f"  #{attempt.number}: {_steps(attempt)}, {_device(attempt, price_per_gpu_hour)}; {ended}{cost}"
            )
        lines += _failed_start_lines(failed, attempts, price_per_gpu_hour)
        gpu_hours = sum(a.gpu_hours for a in attempts)
        at_price = f" at ${price_per_gpu_hour:g}/hour" if price_per_gpu_hour else ""
        price = f" ({format_usd(spent)}{at_price})" if spent else ""
        lines.append(f"gpu-hours:   {gpu_hours:.2f}{price}")
    # The budget counts every start's machine time, a failed start's too: it was paid for.
    failed_usd = spent_usd(failed, price_per_gpu_hour) if failed else None
    lines += _money_lines(
        status, plan, None if spent is None and failed_usd is None else (spent or 0) + (failed_usd or 0)
    )
    lines.append(f"updated:     {status.get('updated_at', '-')}")
    return "\n".join(lines)


def _configured_price(rundir: RunDir) -> float | None:
    """The run's own `budget.gpu_hour_usd` (what priced its budget), when `price=` is not given."""
    if not rundir.config_file.is_file():  # a run dir written before its config (or by an older version)
        return None
    try:
        return (rundir.saved_config().get("budget") or {}).get("gpu_hour_usd")
    except (OSError, ValueError, AttributeError):
        return None


def _plan(rundir: RunDir) -> dict[str, Any] | None:
    import json

    try:
        return json.loads((rundir.path / "plan.json").read_text())
    except (OSError, ValueError):
        return None


def command_lines(rundir: RunDir, status: dict[str, Any]) -> list[str]:
    """The command that started the run, and the one that continues it when it has not completed."""
    words = rundir.command()
    lines = [f"command:     {shlex.join(words)}"] if words else []
    if status.get("state") not in (RunState.COMPLETED, RunState.RUNNING):
        lines.append(f"continue:    noesis train {shlex.quote(str(rundir.path))}")
    return lines


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
        Option("root", "with no RUN_DIR, list the runs under this directory (run.root)", str, "DIR", "runs"),
    ),
    run_dir_optional=True,
    examples=("noesis status", "noesis status runs/demo", "noesis status runs/demo verify=true price=3.95"),
)


@safe_for_pipes
@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`noesis status RUN_DIR [verify=true] [price=USD]`: print a run's status and history."""
    parsed = parse(STATUS_COMMAND, command_line(argv))
    if parsed.run_dir is None:
        print(runs_table(Path(os.path.expanduser(parsed.options["root"]))))
        return 0
    run_dir = Path(str(parsed.run_dir))
    rundir = RunDir(run_dir)
    status = rundir.status()
    if status is None:
        print(
            f"error: {run_dir} has no readable {rundir.status_file.name}; is it a run directory (run.root/run.name)?",
            file=sys.stderr,
        )
        return 2
    price = parsed.options["price"] or _configured_price(rundir)
    print(format_status(status, history(rundir), price, _plan(rundir), failed_starts(rundir)))
    for line in command_lines(rundir, status):
        print(line)
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
