"""The run's history: every attempt that started, how far each got, and what each interruption cost.

Most tests read hand-made events.jsonl/metrics.jsonl as a restart finds them on a Volume (only what
was committed); one runs simulated Modal containers with no background commits and kills one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import write_jsonl
from helpers import REPO, kill_group, logged_step, wait_until

from noesis_accel.after.plots import marks
from noesis_accel.after.report import markdown, run_facts
from noesis_accel.rundir.history import (
    EVENT_TYPES,
    KILLED,
    CheckpointEvent,
    EventKind,
    PreviousAttempt,
    RunState,
    StartEvent,
    StartingEvent,
    StopEvent,
    append_event,
    attempt_starts,
    failed_starts,
    failed_starts_of,
    format_duration,
    history,
    history_of,
    lost_steps,
    lost_words,
    parse_event,
    parse_events,
    previous_attempt,
    read_events,
    read_status,
    record_stop,
    training_events,
    write_status,
)
from noesis_accel.rundir.layout import RunDir
from noesis_accel.rundir.status import format_status
from noesis_accel.rundir.status import main as status_main

T0 = 1_700_000_000.0


def _starting(t: float, attempt: int, previous: Any = None, durable: bool = False) -> dict[str, Any]:
    """A `starting` event as the trainer writes it before loading, its reading of the previous attempt included."""
    event = {
        "event": "starting",
        "time": t,
        "attempt": attempt,
        "processes": 1,
        "device": "cuda",
        "host": "h",
        "pid": 1,
        "every_step_durable": durable,
    }
    if previous is not None:
        event.update(
            previous_reached=previous.reached,
            previous_reached_exact=previous.exact,
            previous_exit=previous.exit,
            previous_last_seen=previous.last_seen,
        )
    return event


def _start(t: float, attempt: int, step: int, previous: Any = None) -> dict[str, Any]:
    """A `start` event as the trainer writes it once the checkpoint is loaded."""
    event = {
        "event": "start",
        "time": t,
        "attempt": attempt,
        "step": step,
        "resumed_from": f"step-{step:06d}" if step else None,
        "processes": 1,
        "device": "cuda",
        "host": "h",
    }
    if previous is not None:
        event["lost_steps"], event["lost_steps_exact"] = lost_steps(previous.reached, previous.exact, step)
    return event


def _metrics(first: int, last: int, t: float) -> list[dict[str, Any]]:
    return [{"step": s, "loss": 1.0, "time": t + s} for s in range(first, last + 1)]


def _checkpoint(t: float, step: int) -> dict[str, Any]:
    return {"event": "checkpoint", "time": t, "step": step, "reason": "interval", "name": f"step-{step:06d}"}


def _restart(
    events: list[dict[str, Any]],
    metrics: list[dict[str, Any]],
    t: float,
    resume_at: int,
    status: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """What the next attempt appends, reading the committed files as the trainer does."""
    previous = previous_attempt(events, metrics, status)
    attempt = 1 + len(attempt_starts(events))
    return events + [_starting(t, attempt, previous), _start(t + 1, attempt, resume_at, previous)]


def _first_attempt_killed_at_14() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Attempt 1: checkpoints every 6 steps, progress committed up to step 14, then SIGKILL."""
    events = [_starting(T0, 1), _start(T0 + 1, 1, 0), _checkpoint(T0 + 7, 6), _checkpoint(T0 + 13, 12)]
    return events, _metrics(1, 14, T0)


def test_a_kill_after_a_progress_commit_costs_at_least_the_committed_steps_beyond_the_checkpoint() -> None:
    events, metrics = _first_attempt_killed_at_14()
    events = _restart(events, metrics, T0 + 100, resume_at=12)
    starting, start = events[-2], events[-1]
    assert starting["previous_reached"] == 14 and starting["previous_reached_exact"] is False
    assert starting["previous_exit"] == KILLED and starting["previous_last_seen"] == T0 + 14
    assert (start["lost_steps"], start["lost_steps_exact"]) == (2, False)
    first, second = history_of(events)
    assert (first.first_step, first.last_step, first.reached_exact) == (0, 14, False)
    assert (first.lost_steps, first.lost_steps_exact, first.lost) == (2, False, "lost at least 2 step(s)")
    assert second.first_step == 12 and second.resumed_from == "step-000012"


def test_an_attempt_killed_before_its_first_progress_commit_appears_with_an_unknown_cost() -> None:
    """The issue's case: attempt 2 resumed at 12, reached 14 and was killed before committing anything more."""
    events, metrics = _first_attempt_killed_at_14()
    events = _restart(events, metrics, T0 + 100, resume_at=12)
    # Attempt 2 truncated metrics.jsonl to step 12 and logged 13 and 14, none of it committed: the
    # Volume still holds attempt 1's records up to 14, which must not be taken for attempt 2's.
    events = _restart(events, metrics, T0 + 200, resume_at=12)
    assert events[-2]["previous_reached"] == 12 and events[-1]["lost_steps"] == 0
    assert events[-1]["lost_steps_exact"] is False
    attempts = history_of(events)
    assert [a.number for a in attempts] == [1, 2, 3]
    assert attempts[1].lost == "lost an unknown number of steps"
    text = format_status({"state": "running", "step": 12, "total_steps": 30}, attempts)
    assert "attempts:    3 (2 interruption(s) survived, at least 2 step(s) redone; 1 of unknown cost)" in text
    assert "  #1: steps 0 -> at least 14, 0m 14s on 1 x cuda (h); killed (no exit recorded" in text
    assert text.splitlines()[5].endswith("; lost at least 2 step(s)")
    assert "  #2: steps 12 -> at least 12, " in text
    assert text.splitlines()[6].endswith("; lost an unknown number of steps")


def test_an_attempt_killed_while_loading_still_counts() -> None:
    events, metrics = _first_attempt_killed_at_14()
    events = _restart(events, metrics, T0 + 100, resume_at=12)[:-1]  # `starting` only: killed while loading
    events = _restart(events, metrics, T0 + 200, resume_at=12)
    attempts = history_of(events)
    assert [a.number for a in attempts] == [1, 2, 3]
    assert attempts[0].lost == "lost at least 2 step(s)"  # redone by attempt 3, the next one to train
    assert (attempts[1].first_step, attempts[1].last_step, attempts[1].lost) == (
        None,
        None,
        "lost an unknown number of steps",
    )
    text = format_status({"state": "running", "step": 12}, attempts)
    assert "  #2: no step recorded, " in text
    found = marks(history_of(events), parse_events(events))
    assert [m["step"] for m in found["interruption"]] == [14, 12]
    assert found["resume"][-1] == {
        "step": 12,
        "from": "step-000012",
        "attempt": 3,
        "lost_steps": 2,
        "lost_steps_exact": False,
    }


def test_a_graceful_stop_costs_an_exact_count() -> None:
    events, metrics = _first_attempt_killed_at_14()
    events += [{"event": "stop", "time": T0 + 15, "state": "failed", "step": 14, "reason": "RuntimeError: boom"}]
    events = _restart(events, metrics, T0 + 100, resume_at=12)
    assert (events[-1]["lost_steps"], events[-1]["lost_steps_exact"]) == (2, True)
    first = history_of(events)[0]
    assert (first.last_step, first.stop_reason, first.lost) == (14, "RuntimeError: boom", "lost 2 step(s)")
    assert "(1 interruption(s) survived, 2 step(s) redone)" in format_status({}, history_of(events))


def test_a_kill_where_every_step_was_durable_as_written_is_exact() -> None:
    """A local run: metrics.jsonl is on disk the moment a step is logged, so the kill's cost is known."""
    events = [_starting(T0, 1, durable=True), _start(T0 + 1, 1, 0), _checkpoint(T0 + 4, 3)]
    events = _restart(events, _metrics(1, 5, T0), T0 + 100, resume_at=3)
    assert (events[-1]["lost_steps"], events[-1]["lost_steps_exact"]) == (2, True)
    assert history_of(events)[0].lost == "lost 2 step(s)"


def test_status_json_counts_when_this_attempt_wrote_it() -> None:
    """The periodic progress commit writes status.json's step: with log_every > 1 it may be the furthest."""
    events, metrics = _first_attempt_killed_at_14()
    previous = previous_attempt(events, metrics, {"step": 15, "updated_unix": T0 + 15.5})
    assert (previous.reached, previous.last_seen) == (15, T0 + 15.5)
    stale = previous_attempt(events, metrics, {"step": 99, "updated_unix": T0 - 1})  # before it started
    assert stale.reached == 14


def test_old_events_without_the_new_keys_still_read() -> None:
    """Run dirs written before the `starting` event: one `start` per attempt held everything."""
    killed = "killed (no exit recorded: SIGKILL, a lost machine, or a preemption past its grace)"
    events = [
        {
            "event": "start",
            "time": T0,
            "attempt": 1,
            "step": 0,
            "resumed_from": None,
            "processes": 2,
            "device": "cuda",
            "host": "a",
            "pid": 1,
        },
        _checkpoint(T0 + 4, 3),
        {
            "event": "start",
            "time": T0 + 100,
            "attempt": 2,
            "step": 3,
            "resumed_from": "step-000003",
            "processes": 2,
            "device": "cuda",
            "host": "b",
            "pid": 2,
            "previous_reached": 5,
            "lost_steps": 2,
            "previous_exit": killed,
            "previous_last_seen": T0 + 6,
        },
        {"event": "stop", "time": T0 + 110, "state": "interrupted", "step": 6, "reason": "stopped by SIGTERM"},
        {
            "event": "start",
            "time": T0 + 200,
            "attempt": 3,
            "step": 6,
            "resumed_from": "step-000006",
            "processes": 2,
            "device": "cuda",
            "host": "c",
            "pid": 3,
            "previous_reached": 6,
            "lost_steps": 0,
            "previous_exit": "stopped by SIGTERM",
            "previous_last_seen": T0 + 110,
        },
    ]
    attempts = history_of(events, {"step": 8, "updated_unix": T0 + 250})
    assert [(a.first_step, a.last_step) for a in attempts] == [(0, 5), (3, 6), (6, 8)]
    # The old count of a kill came from committed files that may end before the kill: a lower bound.
    assert [a.lost for a in attempts] == ["lost at least 2 step(s)", "lost 0 step(s)", ""]
    assert [a.stop_reason for a in attempts[:2]] == [killed, "stopped by SIGTERM"]
    assert round(attempts[0].gpu_hours * 3600) == 12  # 6 s on 2 GPUs
    previous = previous_attempt(events[:2], [], None)  # an old start as the previous attempt's only record
    assert previous.reached == 3 and not previous.exact
    # The same run dir continued by this version: its attempt 4 reads attempt 3 from the old records.
    continued = _restart(events, _metrics(7, 8, T0 + 200), T0 + 300, resume_at=6)
    assert continued[-1]["attempt"] == 4 and continued[-2]["previous_reached"] == 8
    assert [a.lost for a in history_of(continued)] == [
        "lost at least 2 step(s)",
        "lost 0 step(s)",
        "lost at least 2 step(s)",
        "",
    ]


def test_a_start_that_failed_while_loading_trained_nothing() -> None:
    """A run dir written before failed starts were marked: its failed start still reads as an attempt."""
    events, metrics = _first_attempt_killed_at_14()
    events = _restart(events, metrics, T0 + 100, resume_at=12)[:-1]
    events.append({"event": "stop", "time": T0 + 101, "state": "failed", "step": 0, "reason": "data.path: bad"})
    events = _restart(events, metrics, T0 + 200, resume_at=12)
    failed = history_of(events)[1]
    assert (failed.first_step, failed.last_step, failed.stop_reason) == (None, None, "data.path: bad")
    assert failed.lost == "lost 0 step(s)"
    assert "  #2: no step recorded, 0m 01s on 1 x cuda (h); data.path: bad; lost 0 step(s)" in format_status(
        {}, history_of(events)
    )


def _failed_start(t: float, reason: str = "data.path: bad") -> dict[str, Any]:
    """The `stop` a user error writes before training started: a failed start."""
    return {"event": "stop", "time": t, "state": "failed", "step": 0, "reason": reason, "failed_start": True}


def test_a_failed_start_then_a_full_attempt_is_one_attempt_and_one_failed_start() -> None:
    refusal = "data.path: only 162 usable training records; data.min_examples is 1000.\nAdd data."
    events = [_starting(T0, 1), _failed_start(T0 + 2, refusal)]
    assert previous_attempt(events, [], {"state": "failed", "updated_unix": T0 + 2}) is None
    assert attempt_starts(events) == [] and history_of(events) == []
    events = _restart(events, [], T0 + 600, resume_at=0)  # the fixed command, ten minutes later
    assert events[-2]["attempt"] == 1 and "previous_exit" not in events[-2] and "lost_steps" not in events[-1]
    events += [
        _checkpoint(T0 + 610, 4),
        {"event": "stop", "time": T0 + 611, "state": "completed", "step": 4, "reason": "completed"},
    ]
    (attempt,) = history_of(events)
    assert (attempt.number, attempt.first_step, attempt.last_step, attempt.lost) == (1, 0, 4, "")
    assert (attempt.started, round(attempt.hours * 3600)) == (T0 + 600, 11)  # not the minutes spent fixing
    (failed,) = failed_starts_of(events)
    assert (failed.number, failed.first_step, failed.stop_reason) == (1, None, refusal)
    assert (failed.stop_state, round(failed.gpu_hours * 3600)) == (RunState.FAILED, 2)  # kept apart, not lost
    text = format_status({"state": "completed", "step": 4}, [attempt], failed=[failed])
    assert "attempts:    1 (0 interruption(s) survived, 0 step(s) redone; 1 failed start before training, not " in text
    assert "  #1: steps 0 -> 4, 0m 11s on 1 x cuda (h); completed" in text
    assert (
        "  failed start before #1: 0m 02s on 1 x cuda (h); data.path: only 162 usable training records; "
        "data.min_examples is 1000. Add data." in text
    )
    assert [e.kind for e in training_events(events)] == ["starting", "start", "checkpoint", "stop"]
    assert marks([attempt], parse_events(events))["interruption"] == []


def test_a_failed_start_after_a_kill_hands_on_its_reading_of_the_killed_attempt() -> None:
    """The next start reads the killed attempt, not the failed start, as the one before it."""
    events, metrics = _first_attempt_killed_at_14()
    events = _restart(events, metrics, T0 + 100, resume_at=12)[:-1] + [_failed_start(T0 + 101)]
    events = _restart(events, metrics, T0 + 200, resume_at=12)
    starting, start = events[-2], events[-1]
    assert starting["attempt"] == 2 and (starting["previous_reached"], starting["previous_last_seen"]) == (14, T0 + 14)
    assert (start["lost_steps"], start["lost_steps_exact"]) == (2, False)
    first, second = history_of(events)
    assert (first.ended, first.lost, second.number, second.first_step) == (T0 + 14, "lost at least 2 step(s)", 2, 12)
    text = format_status({"state": "running", "step": 12}, [first, second], failed=failed_starts_of(events))
    assert "attempts:    2 (1 interruption(s) survived, at least 2 step(s) redone; 1 failed start before " in text
    assert "  failed start before #2: 0m 01s on 1 x cuda (h); data.path: bad" in text
    again = events + [_starting(T0 + 300, 3), _failed_start(T0 + 301), _starting(T0 + 400, 3), _failed_start(T0 + 401)]
    assert "; 3 failed starts before training, not counted)" in format_status(
        {}, history_of(again), failed=failed_starts_of(again)
    )
    assert format_status({}, history_of(again), failed=failed_starts_of(again)).count("failed start after #2:") == 2


def test_a_failed_start_keeps_the_step_status_json_had_and_draws_no_interruption(tmp_path: Path) -> None:
    events = [_starting(T0, 1), _start(T0 + 1, 1, 0), _checkpoint(T0 + 7, 6)]
    events.append({"event": "stop", "time": T0 + 10, "state": "interrupted", "step": 9, "reason": "stopped by SIGTERM"})
    rundir = _run_dir(tmp_path, events, _metrics(1, 9, T0), state="interrupted", step=9, total_steps=20)
    append_event(rundir, StartingEvent(time=T0 + 100, attempt=2, previous=previous_attempt(events, [], None)))
    record_stop(rundir, RunState.FAILED, 0, "data.path: bad", failed_start=True)
    status = read_status(rundir)
    assert status is not None and (status["state"], status["step"], status["error"]) == ("failed", 9, "data.path: bad")
    assert rundir.events()[-1]["failed_start"] is True
    (attempt,) = history(rundir)
    assert (attempt.stop_state, attempt.last_step) == (RunState.INTERRUPTED, 9)
    assert [f.stop_reason for f in failed_starts(rundir)] == ["data.path: bad"]
    found = marks(history(rundir), read_events(rundir))
    assert [(m["step"], m["exit"]) for m in found["interruption"]] == [(9, "stopped by SIGTERM")]  # not step 0
    assert previous_attempt(rundir.events(), [], status) == PreviousAttempt(9, True, "stopped by SIGTERM", T0 + 10)


def test_noesis_status_report_and_plots_tell_the_same_costs(tmp_path: Path, capsys) -> None:
    events, metrics = _first_attempt_killed_at_14()
    events = _restart(events, metrics, T0 + 100, resume_at=12)
    events = _restart(events, metrics, T0 + 200, resume_at=12)
    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    write_jsonl(rundir.events_file, events)
    write_jsonl(rundir.metrics_file, metrics)
    status = {"state": "running", "step": 12, "total_steps": 30, "updated_unix": T0 + 201}
    rundir.status_file.write_text(json.dumps(status))
    assert [a.lost for a in history(rundir)][:2] == ["lost at least 2 step(s)", "lost an unknown number of steps"]
    assert status_main([str(rundir.path)]) == 0
    assert "lost at least 2 step(s)" in capsys.readouterr().out
    facts = run_facts(rundir)
    assert [a["start_step"] for a in facts["attempts"]] == [0, 12, 12]
    text = markdown(rundir, facts, None, None)
    assert (
        "| 1 | killed (no exit recorded: SIGKILL, a lost machine, or a preemption past its grace) | "
        "at least 14 | step-000012 | 12 | at least 2 |" in text
    )
    assert "| 12 | unknown |" in text
    assert "2 interruption(s); at least 2 step(s) done twice in all; 1 of unknown cost." in text
    assert [lost_words(*c) for c in [(3, True), (3, False), (0, False), (None, True)]] == [
        "lost 3 step(s)",
        "lost at least 3 step(s)",
        "lost an unknown number of steps",
        "",
    ]


# ---------------------------------------------------------------- history() on hand-written run dirs


def _run_dir(tmp_path: Path, events: list[dict[str, Any]], metrics: list[dict[str, Any]], **status: Any) -> RunDir:
    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    write_jsonl(rundir.events_file, events)
    write_jsonl(rundir.metrics_file, metrics)
    if status:
        rundir.status_file.write_text(json.dumps(status))
    return rundir


def test_a_clean_run_is_one_attempt_with_nothing_lost(tmp_path: Path) -> None:
    rundir = _run_dir(tmp_path, [], [])
    append_event(rundir, StartingEvent(time=T0, attempt=1, device="cuda", host="h", pid=1))
    append_event(rundir, StartEvent(time=T0 + 1, attempt=1, step=0, device="cuda", host="h", pid=1))
    append_event(rundir, CheckpointEvent(time=T0 + 6, step=5, name="step-000005", reason="interval", seconds=0.5))
    append_event(rundir, CheckpointEvent(time=T0 + 11, step=10, name="step-000010", reason="final", seconds=0.5))
    write_status(rundir, state=RunState.RUNNING, step=10, total_steps=10)
    record_stop(rundir, RunState.COMPLETED, 10, "completed")
    (attempt,) = history(rundir)
    assert (attempt.first_step, attempt.last_step, attempt.reached_exact) == (0, 10, True)
    assert (attempt.stop_state, attempt.stop_reason, attempt.lost) == (RunState.COMPLETED, "completed", "")
    status = read_status(rundir)
    assert status is not None and (status["state"], status["error"]) == ("completed", None)
    assert '"state": "completed"' in rundir.status_file.read_text()  # the enum is written as its plain value
    assert rundir.events()[-1] == {
        "event": "stop",
        "time": rundir.events()[-1]["time"],
        "state": "completed",
        "step": 10,
        "reason": "completed",
    }
    text = format_status(status, history(rundir))
    assert "attempts:    1 (0 interruption(s) survived, 0 step(s) redone)" in text
    assert "  #1: steps 0 -> 10, " in text and text.splitlines()[-3].endswith("; completed")
    assert marks(history(rundir), parse_events(rundir.events()))["interruption"] == []


def test_a_graceful_interruption_costs_exactly_the_steps_past_the_checkpoint(tmp_path: Path) -> None:
    events = [_starting(T0, 1), _start(T0 + 1, 1, 0), _checkpoint(T0 + 7, 6)]
    events.append({"event": "stop", "time": T0 + 10, "state": "interrupted", "step": 9, "reason": "stopped by SIGTERM"})
    events = _restart(events, _metrics(1, 9, T0), T0 + 100, resume_at=6)
    rundir = _run_dir(tmp_path, events, _metrics(1, 9, T0), state="running", step=6, updated_unix=T0 + 101)
    first, second = history(rundir)
    assert (first.stop_state, first.stop_reason, first.last_step) == (RunState.INTERRUPTED, "stopped by SIGTERM", 9)
    assert (first.lost_steps, first.lost_steps_exact, first.lost) == (3, True, "lost 3 step(s)")
    assert (second.first_step, second.resumed_from, second.stop_state) == (6, "step-000006", None)
    assert round(first.hours * 3600) == 10


def test_a_sigkill_costs_at_least_the_committed_steps_past_the_checkpoint(tmp_path: Path) -> None:
    events = [_starting(T0, 1), _start(T0 + 1, 1, 0), _checkpoint(T0 + 7, 6)]
    metrics = _metrics(1, 9, T0)  # committed up to step 9; the kill may have come later
    events = _restart(events, metrics, T0 + 100, resume_at=6)
    first, _ = history(_run_dir(tmp_path, events, metrics))
    assert (first.stop_state, first.stop_reason, first.reached_exact) == (None, KILLED, False)
    assert first.lost_steps is not None and first.lost_steps >= 3 and not first.lost_steps_exact
    assert first.lost == "lost at least 3 step(s)"


def test_an_attempt_killed_before_its_first_commit_shows_with_an_unknown_cost(tmp_path: Path) -> None:
    events = [_starting(T0, 1), _start(T0 + 1, 1, 0), _checkpoint(T0 + 7, 6)]
    metrics = _metrics(1, 8, T0)
    events = _restart(events, metrics, T0 + 100, resume_at=6)  # attempt 2: killed, nothing of it committed
    events = _restart(events, metrics, T0 + 200, resume_at=6)
    rundir = _run_dir(tmp_path, events, metrics)
    attempts = history(rundir)
    assert [a.number for a in attempts] == [1, 2, 3]
    assert (attempts[1].first_step, attempts[1].last_step, attempts[1].reached_exact) == (6, 6, False)
    assert attempts[1].lost == "lost an unknown number of steps"
    assert attempts[0].lost == "lost at least 2 step(s)"
    text = format_status({"state": "running"}, attempts)
    assert "(2 interruption(s) survived, at least 2 step(s) redone; 1 of unknown cost)" in text


def test_an_old_events_file_without_the_newer_fields_still_reads(tmp_path: Path) -> None:
    """No `starting`, no pid, processes, device, host, lost_steps_exact or checkpoint seconds."""
    events = [
        {"event": "start", "time": T0, "step": 0},
        {"event": "checkpoint", "time": T0 + 4, "step": 3},
        {"event": "start", "time": T0 + 50, "step": 3, "previous_reached": 4, "lost_steps": 1},
        {"event": "a-future-event", "time": T0 + 51},
        {"event": "stop", "time": T0 + 60, "state": "a-future-state", "step": 5},
    ]
    first, second = history(_run_dir(tmp_path, events, []))
    assert (first.number, first.processes, first.device, first.host) == (1, 1, "cpu", "?")
    assert (first.last_step, first.stop_reason, first.lost) == (4, KILLED, "lost at least 1 step(s)")
    assert (second.number, second.first_step, second.last_step) == (2, 3, 5)
    assert (second.stop_state, second.stop_reason) == (None, None)
    assert parse_event(events[1]) == CheckpointEvent(time=T0 + 4, step=3)
    assert parse_event(events[3]) is None
    assert previous_attempt(events, [], None) == PreviousAttempt(5, True, "None", T0 + 60)


def test_every_state_and_event_kind_round_trips() -> None:
    for state in RunState:
        assert RunState(state.value) is state and str(state) == f"{state}" == state.value
        assert json.loads(json.dumps({"state": state})) == {"state": state.value}
    assert set(EVENT_TYPES) == set(EventKind)
    previous = PreviousAttempt(14, False, KILLED, T0 + 14)
    records = [
        StartingEvent(time=T0, attempt=2, processes=2, device="cuda", host="h", pid=7, previous=previous),
        StartEvent(time=T0 + 1, attempt=2, step=12, resumed_from="step-000012", pid=7, lost_steps=2),
        CheckpointEvent(time=T0 + 2, step=18, name="step-000018", reason="interval", seconds=0.25),
        *[StopEvent(time=T0 + 3, state=state, step=18, reason="why") for state in RunState],
        StopEvent(time=T0 + 4, state=RunState.FAILED, reason="data.path: bad", failed_start=True),
    ]
    for record in records:
        assert record.kind in EventKind and type(record) is EVENT_TYPES[record.kind]
        line = json.dumps(record.to_json())
        assert parse_event(json.loads(line)) == record
    # The trainer's lines, key for key in its order, are what the records write back.
    raw = _starting(T0, 2, previous)
    assert list(parse_event(raw).to_json().items()) == list(raw.items())


def test_one_duration_format() -> None:
    assert [format_duration(h) for h in (14 / 3600, 3723 / 3600, 0.0, None)] == ["0m 14s", "1h 02m 03s", "0m 00s", "-"]


class _ProgressCommitsFail:
    """A committer whose commits fail until a checkpoint exists: the start's progress commits fail."""

    def __init__(self, run_dir: Path) -> None:
        self.checkpoints, self.calls, self.failed = RunDir(run_dir).checkpoints, 0, 0

    def commit(self) -> None:
        self.calls += 1
        if not RunDir(self.checkpoints.parent).step_dirs():
            self.failed += 1
            raise OSError("volume temporarily unavailable")


def test_a_failed_progress_commit_is_a_warning_and_training_goes_on(tmp_path, caplog) -> None:
    from noesis_accel.config import compose
    from noesis_accel.processes.train import run

    cfg = compose(["+experiment=tiny", "train.max_steps=2", "ckpt.every=2", f"run.root={tmp_path}"])
    committer = _ProgressCommitsFail(tmp_path / "tiny")
    with caplog.at_level("WARNING", logger="noesis_accel.training.session"):
        assert run(cfg, committer).state == "completed"
    assert committer.failed == 2  # at `starting` and at `start`, before any checkpoint
    assert sum("could not commit the run's progress files" in r.getMessage() for r in caplog.records) == 2
    events = RunDir(tmp_path / "tiny").events()
    assert [e["event"] for e in events] == ["starting", "start", "checkpoint", "stop"]
    assert events[0]["every_step_durable"] is False  # what it writes lasts only once committed


# ---------------------------------------------------------------- a simulated Modal container, killed

STEPS = 12
# A checkpoint at step 6 (and the final one at 12); progress committed every 0.2 s, about every step.
TINY = [
    "+experiment=tiny",
    f"train.max_steps={STEPS}",
    "ckpt.every=0.5",
    "train.eval_every=0",
    "modal.secret=null",
    "ckpt.progress_commit_s=0.2",
]


def _container(view: Path, remote: Path, env: dict[str, str]) -> subprocess.Popen:
    """One simulated container (tests/modal_sim.py) with no background commits: only explicit ones count."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "modal_sim.py"), str(view), str(remote), *TINY],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "NOESIS_SIM_BACKGROUND_S": "0", **env},
    )


@pytest.mark.slow
def test_a_container_killed_after_a_progress_commit_reports_at_least_the_committed_steps(tmp_path, capsys) -> None:
    view, remote = tmp_path / "container", tmp_path / "remote"
    run_dir, committed = view / "runs" / "tiny", RunDir(remote / "runs" / "tiny")
    container = _container(view, remote, {"NOESIS_STEP_DELAY_S": "0.3"})
    try:
        wait_until(lambda: logged_step(run_dir) >= 8 or container.poll() is not None, 240, "step 8")
    finally:
        kill_group(container, signal.SIGKILL)  # the container dies: nothing more is committed
    out, err = container.communicate(timeout=60)
    assert logged_step(run_dir) >= 8, (out + err)[-3000:]
    checkpoint = committed.step_dirs()[0][0]
    reached = max(m["step"] for m in committed.metrics() if "loss" in m)
    assert checkpoint == 6 and reached > checkpoint  # the progress commits carried steps past the checkpoint
    restarted = _container(view, remote, {})
    out, err = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, (out + err)[-3000:]
    start = [e for e in committed.events() if e["event"] == "start"][-1]
    assert start["attempt"] == 2 and start["step"] == checkpoint
    assert (start["lost_steps"], start["lost_steps_exact"]) == (reached - checkpoint, False)
    assert status_main([str(committed.path)]) == 0
    printed = capsys.readouterr().out
    assert f"  #1: steps 0 -> at least {reached}, " in printed
    assert f"; lost at least {reached - checkpoint} step(s)" in printed
    assert f"attempts:    2 (1 interruption(s) survived, at least {reached - checkpoint} step(s) redone)" in printed


# ---------------------------------------------------------------- a start refused before training, then fixed


def test_a_start_refused_on_its_data_then_trained_is_one_attempt_and_one_failed_start(tmp_path, capsys) -> None:
    """The refused start is listed apart: no interruption, no resume at step 0, no step lost."""
    from noesis_accel.config import compose
    from noesis_accel.core.errors import DataError
    from noesis_accel.processes.train import run

    command = ["+experiment=tiny", "train.max_steps=2", "ckpt.every=2", "train.eval_every=0", f"run.root={tmp_path}"]
    with pytest.raises(DataError, match="data.min_examples"):
        run(compose([*command, "data.min_examples=100000"]))
    rundir = RunDir(tmp_path / "tiny")
    refused = read_status(rundir)
    assert refused is not None and refused["state"] == "failed" and "data.min_examples" in refused["error"]
    assert history(rundir) == []
    assert status_main([str(rundir.path)]) == 0
    printed = capsys.readouterr().out
    assert (
        "state:       failed" in printed and "attempts:    0 (1 failed start before training, not counted)" in printed
    )
    assert "  failed start: " in printed
    assert run(compose(command)).state == "completed"

    status = read_status(rundir)
    assert status is not None and (status["state"], status["error"]) == ("completed", None)
    starting = [e for e in rundir.events() if e["event"] == "starting"]
    assert [e["attempt"] for e in starting] == [1, 1]  # the refused start was no attempt
    assert not any(key.startswith("previous_") for key in starting[-1])
    start = next(e for e in rundir.events() if e["event"] == "start")
    assert start["step"] == 0 and "lost_steps" not in start
    (attempt,) = history(rundir)
    (failed,) = failed_starts(rundir)
    assert (attempt.number, attempt.first_step, attempt.last_step, attempt.lost) == (1, 0, 2, "")
    assert failed.first_step is None and "data.min_examples" in str(failed.stop_reason)

    assert status_main([str(rundir.path)]) == 0
    printed = capsys.readouterr().out
    counted = (
        "attempts:    1 (0 interruption(s) survived, 0 step(s) redone; 1 failed start before training, not counted)"
    )
    assert counted in printed
    assert "  #1: steps 0 -> 2, " in printed and "; completed" in printed
    (line,) = [line for line in printed.splitlines() if line.startswith("  failed start")]
    assert line.startswith("  failed start before #1: ") and "data.min_examples is 100000" in line
    facts = run_facts(rundir)
    assert len(facts["attempts"]) == 1 and facts["interruptions"] == []
    assert [f["reason"] for f in facts["failed_starts"]] == [failed.stop_reason]
    assert facts["started"] == attempt.started  # the wall time leaves out the minutes spent fixing the command
    found = marks(history(rundir), read_events(rundir))
    assert (found["interruption"], found["resume"]) == ([], [])
