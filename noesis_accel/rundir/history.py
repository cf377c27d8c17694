"""The run's history: status.json, events.jsonl, and the attempts they describe.

The one owner of both files: the states a run is in (`RunState`), the events it appends
(`EventKind` and one record type each), the writers, and `history()` (with `failed_starts()`, the starts
that never trained), which `noesis-status`, `noesis-report` and its figure all read, so they tell the
same attempts and costs.

events.jsonl, one line each:
  starting    an attempt began; appended and committed before the model loads, so an attempt killed
              while loading still counts: attempt, processes, device, host, pid, every_step_durable, gpu
              (the CUDA device name it got, which prices it);
              from the second attempt on, what the committed files said of the one before:
              previous_reached (None: nothing of it was committed), previous_reached_exact,
              previous_exit, previous_last_seen
  start       training starts (after the checkpoint loaded): attempt, step, resumed_from, processes,
              device, host, pid; from the second attempt on lost_steps and lost_steps_exact, what the
              interruption before cost (exact, or a lower bound where 0 means unknown)
  checkpoint  step, name, reason, seconds
  stop        state, step, reason (a graceful stop; a killed attempt has none); out_of_memory when an
              out-of-memory error ended it (ckpt.oom_retries counts them); failed_start when a user error
              (config, data, resume refusal) ended it before its `start`: a failed start, which trained
              nothing and is no attempt (its `starting` and `stop` are listed apart by `failed_starts()`;
              the next start takes its attempt number and reads the attempt before it as its previous)
Older run dirs have no `starting`: their one `start` per attempt also holds the previous_* keys; nor do they
mark failed starts, so theirs read as attempts, as they always did.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from noesis_accel.core.errors import redact
from noesis_accel.rundir.layout import RunDir


class RunState(str, Enum):
    """A run's state in status.json and in its stop events; a `str`, so the files read as before."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    # Stopped at a checkpoint because one more step would pass `budget.usd`; a restart with a higher
    # budget continues it. Not a failure: Modal does not retry it.
    BUDGET = "budget"
    # Only a start's result (RunResult.state): the run had completed before, nothing was trained;
    # status.json keeps saying `completed`.
    ALREADY_COMPLETED = "already_completed"

    def __str__(self) -> str:
        return self.value


class EventKind(str, Enum):
    """The `event` of each line of events.jsonl."""

    STARTING = "starting"
    START = "start"
    CHECKPOINT = "checkpoint"
    STOP = "stop"

    def __str__(self) -> str:
        return self.value


KILLED = "killed (no exit recorded: SIGKILL, a lost machine, or a preemption past its grace)"


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _state(value: Any) -> RunState | None:
    """A recorded state; one this version does not know reads as none rather than failing the history."""
    try:
        return RunState(value)
    except ValueError:
        return None


# ---------------------------------------------------------------- event records


@dataclass
class PreviousAttempt:
    """How far the newest recorded attempt got and how it ended, as the committed files tell it."""

    reached: int | None  # the furthest step it is known to have finished; None: nothing of it was committed
    exact: bool  # `reached` is where it stopped, not a lower bound
    exit: str
    last_seen: float  # the time of its newest committed record (its start, if none)

    def to_json(self) -> dict[str, Any]:
        return {
            "previous_reached": self.reached,
            "previous_reached_exact": self.exact,
            "previous_exit": self.exit,
            "previous_last_seen": self.last_seen,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PreviousAttempt | None:
        """The previous_* keys of an opening event; None when it has none (the run's first attempt)."""
        if not any(key.startswith("previous_") for key in raw):
            return None
        # Before `previous_reached_exact` existed, a killed attempt's count came from committed files
        # that may end before it died: a lower bound. A recorded exit was exact.
        old_exact = not str(raw.get("previous_exit", "killed")).startswith("killed")
        return cls(
            reached=_optional_int(raw.get("previous_reached")),
            exact=bool(raw.get("previous_reached_exact", old_exact)),
            exit=str(raw.get("previous_exit") or KILLED),
            last_seen=float(raw.get("previous_last_seen") or raw.get("time", 0.0)),
        )


@dataclass
class StartingEvent:
    """An attempt began, before its model loaded."""

    kind: ClassVar[EventKind] = EventKind.STARTING
    time: float = field(default_factory=time.time)
    attempt: int | None = None
    processes: int = 1
    device: str = "cpu"
    host: str = "?"
    pid: int | None = None
    every_step_durable: bool = False
    previous: PreviousAttempt | None = None  # None: the run's first attempt
    gpu: str | None = None  # torch.cuda.get_device_name() of the attempt's GPUs; None on the CPU

    def to_json(self) -> dict[str, Any]:
        record = {
            "event": self.kind.value,
            "time": self.time,
            "attempt": self.attempt,
            "processes": self.processes,
            "device": self.device,
            "host": self.host,
            "pid": self.pid,
            "every_step_durable": self.every_step_durable,
        }
        if self.gpu is not None:
            record["gpu"] = self.gpu
        return {**record, **(self.previous.to_json() if self.previous else {})}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StartingEvent:
        return cls(
            time=float(raw.get("time", 0.0)),
            attempt=_optional_int(raw.get("attempt")),
            processes=int(raw.get("processes", 1)),
            device=str(raw.get("device", "cpu")),
            host=str(raw.get("host", "?")),
            pid=_optional_int(raw.get("pid")),
            every_step_durable=bool(raw.get("every_step_durable", False)),
            previous=PreviousAttempt.from_json(raw),
            gpu=raw.get("gpu"),
        )


@dataclass
class StartEvent:
    """Training starts at `step`, after the checkpoint it resumes from loaded."""

    kind: ClassVar[EventKind] = EventKind.START
    time: float = field(default_factory=time.time)
    attempt: int | None = None
    step: int = 0
    resumed_from: str | None = None
    processes: int = 1
    device: str = "cpu"
    host: str = "?"
    pid: int | None = None
    lost_steps: int | None = None  # what the interruption before cost (None: the first attempt)
    lost_steps_exact: bool | None = None  # None: written before the count could be a lower bound
    previous: PreviousAttempt | None = None  # older run dirs only: they had no `starting`
    # The process count that wrote the checkpoint resumed from, when it differs from `processes`.
    checkpoint_processes: int | None = None
    optimizer_reset: bool = False  # its optimizer moments were not carried (ckpt.on_world_size_change)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "event": self.kind.value,
            "time": self.time,
            "attempt": self.attempt,
            "step": self.step,
            "resumed_from": self.resumed_from,
            "processes": self.processes,
            "device": self.device,
            "host": self.host,
            "pid": self.pid,
        }
        if self.previous is not None:
            record.update(self.previous.to_json())
        if self.lost_steps is not None:
            record["lost_steps"] = self.lost_steps
        if self.lost_steps_exact is not None:
            record["lost_steps_exact"] = self.lost_steps_exact
        if self.checkpoint_processes is not None:
            record["checkpoint_processes"] = self.checkpoint_processes
            record["optimizer_reset"] = self.optimizer_reset
        return record

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StartEvent:
        exact = raw.get("lost_steps_exact")
        return cls(
            time=float(raw.get("time", 0.0)),
            attempt=_optional_int(raw.get("attempt")),
            step=int(raw.get("step") or 0),
            resumed_from=raw.get("resumed_from"),
            processes=int(raw.get("processes", 1)),
            device=str(raw.get("device", "cpu")),
            host=str(raw.get("host", "?")),
            pid=_optional_int(raw.get("pid")),
            lost_steps=_optional_int(raw.get("lost_steps")),
            lost_steps_exact=None if exact is None else bool(exact),
            previous=PreviousAttempt.from_json(raw),
            checkpoint_processes=_optional_int(raw.get("checkpoint_processes")),
            optimizer_reset=bool(raw.get("optimizer_reset", False)),
        )


@dataclass
class CheckpointEvent:
    """A checkpoint was completed (renamed into place)."""

    kind: ClassVar[EventKind] = EventKind.CHECKPOINT
    time: float = field(default_factory=time.time)
    step: int = 0
    name: str | None = None
    reason: str | None = None
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.kind.value,
            "time": self.time,
            "step": self.step,
            "reason": self.reason,
            "name": self.name,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CheckpointEvent:
        seconds = raw.get("seconds")
        return cls(
            time=float(raw.get("time", 0.0)),
            step=int(raw.get("step") or 0),
            name=raw.get("name"),
            reason=raw.get("reason"),
            seconds=None if seconds is None else float(seconds),
        )


@dataclass
class StopEvent:
    """An attempt stopped gracefully (a killed one writes none)."""

    kind: ClassVar[EventKind] = EventKind.STOP
    time: float = field(default_factory=time.time)
    state: RunState | None = None
    step: int = 0
    reason: str | None = None
    out_of_memory: bool = False
    # A user error ended it before training started: a failed start, not an attempt (its step is 0).
    failed_start: bool = False

    def to_json(self) -> dict[str, Any]:
        state = None if self.state is None else self.state.value
        record = {"event": self.kind.value, "time": self.time, "state": state, "step": self.step, "reason": self.reason}
        if self.out_of_memory:
            record["out_of_memory"] = True
        if self.failed_start:
            record["failed_start"] = True
        return record

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StopEvent:
        return cls(
            time=float(raw.get("time", 0.0)),
            state=_state(raw.get("state")),
            step=int(raw.get("step") or 0),
            reason=raw.get("reason"),
            out_of_memory=bool(raw.get("out_of_memory", False)),
            failed_start=bool(raw.get("failed_start", False)),
        )


Event = StartingEvent | StartEvent | CheckpointEvent | StopEvent
EVENT_TYPES: dict[EventKind, type[Event]] = {
    EventKind.STARTING: StartingEvent,
    EventKind.START: StartEvent,
    EventKind.CHECKPOINT: CheckpointEvent,
    EventKind.STOP: StopEvent,
}


def parse_event(raw: dict[str, Any]) -> Event | None:
    """The typed record of one events.jsonl line; None for an event this version does not know."""
    try:
        kind = EventKind(raw.get("event"))
    except ValueError:
        return None
    return EVENT_TYPES[kind].from_json(raw)


def parse_events(events: Sequence[Event | dict[str, Any]]) -> list[Event]:
    """Typed records of these lines (already typed ones are kept), unknown events left out."""
    parsed = [e if not isinstance(e, dict) else parse_event(e) for e in events]
    return [e for e in parsed if e is not None]


def read_events(rundir: RunDir) -> list[Event]:
    return parse_events(rundir.events())


# ---------------------------------------------------------------- writers (main process only)


def _rundir(where: RunDir | Path) -> RunDir:
    # A Path is still accepted because training/trainer.py passes its run dir's path.
    return where if isinstance(where, RunDir) else RunDir(Path(where))


def read_status(rundir: RunDir | Path) -> dict[str, Any] | None:
    return _rundir(rundir).status()


def write_status(rundir: RunDir | Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into status.json atomically (tmp + rename): a reader never sees half a file.

    On a full disk the new file may not fit; then the existing file is overwritten in place (its
    blocks are already allocated), and only if that fails too does the error reach the caller.
    """
    rundir = _rundir(rundir)
    path = rundir.status_file
    status = rundir.status() or {}
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


def append_event(rundir: RunDir, event: Event) -> dict[str, Any]:
    """One line of the run's history. Appended and flushed at once: a crash loses at most this line."""
    record = event.to_json()
    rundir.path.mkdir(parents=True, exist_ok=True)
    with rundir.events_file.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def record_stop(
    rundir: RunDir,
    state: RunState | str,
    step: int,
    reason: str,
    out_of_memory: bool = False,
    failed_start: bool = False,
    **status: Any,
) -> None:
    """How a run stopped, in status.json (with any further `status` fields) and events.jsonl; if even that
    cannot be written, say so.

    A failed start (`failed_start`: a user error before training started) trained nothing, so status.json
    keeps the step the run had reached: it still resumes from there once the start is fixed.
    """
    state, reason = RunState(state), redact(reason)
    if not failed_start:
        status = {"step": step, **status}
    try:
        write_status(
            rundir,
            state=state.value,
            exit_reason=reason,
            error=reason if state is RunState.FAILED else None,
            **status,
        )
        stop = StopEvent(state=state, step=step, reason=reason, out_of_memory=out_of_memory, failed_start=failed_start)
        append_event(rundir, stop)
    except OSError as err:
        print(
            f"warning: could not record the stop in {rundir.status_file} ({err.strerror or err}); "
            f"the run stopped as '{state}': {reason}",
            file=sys.stderr,
            flush=True,
        )


def out_of_memory_stops(events: Sequence[Event | dict[str, Any]]) -> int:
    """How many attempts of the run an out-of-memory error ended (what ckpt.oom_retries is counted against)."""
    return sum(1 for e in parse_events(events) if isinstance(e, StopEvent) and e.out_of_memory)


# ---------------------------------------------------------------- the previous attempt


def previous_attempt(
    events: Sequence[Event | dict[str, Any]], metrics: list[dict[str, Any]], status: dict[str, Any] | None
) -> PreviousAttempt | None:
    """What the newest attempt in these files reached; None when no attempt started yet.

    Its records are its events and the metrics and status.json written since it began (its own
    clock wrote both). With a `stop` event it stopped gracefully and the step is exact. Without one
    it was killed, and its newest committed record is a lower bound, unless it wrote every finished
    step to storage that needs no commit (`every_step_durable`).
    """
    typed = parse_events(events)
    spans = _spans(typed)
    if not spans:
        return None
    begin, end, failed = spans[-1]
    start, own = typed[begin], typed[begin + 1 : end]
    if failed and isinstance(start, StartingEvent):
        # A failed start trained nothing: the previous attempt is still the one it read (None: none yet).
        return start.previous
    stops = [e for e in own if isinstance(e, StopEvent)]
    if stops:
        stop = stops[-1]
        return PreviousAttempt(stop.step, True, str(stop.reason or stop.state), stop.time)
    since = start.time
    records: list[tuple[Any, Any]] = [
        (e.step, e.time) for e in [start, *own] if isinstance(e, (StartEvent, CheckpointEvent))
    ]
    records += [(m["step"], m.get("time")) for m in metrics if "step" in m and float(m.get("time", 0)) >= since]
    if status and "step" in status and float(status.get("updated_unix", 0)) >= since:
        records.append((status["step"], status["updated_unix"]))
    steps = [int(step) for step, _ in records if step is not None]
    times = [float(when) for _, when in records if when is not None]
    durable = isinstance(start, StartingEvent) and start.every_step_durable
    return PreviousAttempt(max(steps, default=None), durable, KILLED, max(times, default=since))


def attempt_starts(events: Sequence[Event | dict[str, Any]]) -> list[int]:
    """The index (among known events) of each attempt's first: its `starting`, or (older run dirs) its `start`.

    Failed starts are no attempts and are left out.
    """
    return [begin for begin, _, failed in _spans(parse_events(events)) if not failed]


def _spans(typed: list[Event]) -> list[tuple[int, int, bool]]:
    """(first index, end index, is a failed start) of every start's events, attempts and failed starts alike."""
    openings, awaiting_start = [], False
    for i, event in enumerate(typed):
        if isinstance(event, StartingEvent):
            openings.append(i)
            awaiting_start = True
        elif isinstance(event, StartEvent):
            if not awaiting_start:  # no `starting` before it: an older run dir's attempt
                openings.append(i)
            awaiting_start = False
    if not openings:
        return []
    ends = [*openings[1:], len(typed)]
    return [
        (begin, end, any(isinstance(e, StopEvent) and e.failed_start for e in typed[begin:end]))
        for begin, end in zip(openings, ends, strict=True)
    ]


def training_events(events: Sequence[Event | dict[str, Any]]) -> list[Event]:
    """The known events without those of failed starts (their `starting` and `stop`): what attempts wrote."""
    typed = parse_events(events)
    failed = {i for begin, end, is_failed in _spans(typed) if is_failed for i in range(begin, end)}
    return [e for i, e in enumerate(typed) if i not in failed]


def lost_steps(reached: int | None, exact: bool, resumed_at: int) -> tuple[int, bool]:
    """Steps finished before an interruption and trained again after resuming at `resumed_at`.

    Returns (count, exact); an inexact count is a lower bound, and an inexact 0 means unknown.
    """
    return max(0, (reached if reached is not None else resumed_at) - resumed_at), exact


# ---------------------------------------------------------------- attempts


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
    stop_state: RunState | None = None  # None: killed, or still running
    stop_reason: str | None = None
    lost_steps: int | None = None  # steps the next attempt to train had to redo (None: not known yet)
    lost_steps_exact: bool = True  # False: `lost_steps` is a lower bound, and 0 means unknown
    gpu: str | None = None  # the CUDA device name it got (None: the CPU, or not recorded)

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
    """The run's attempts from events.jsonl: each start, what ended it, and the steps that cost.

    Failed starts are not among them (`failed_starts` lists them).
    """
    return history_of(rundir.events(), rundir.status())


def failed_starts(rundir: RunDir) -> list[Attempt]:
    """The run's failed starts: each ended by a user error before training started, so no attempt."""
    return failed_starts_of(rundir.events())


def history_of(events: Sequence[Event | dict[str, Any]], status: dict[str, Any] | None = None) -> list[Attempt]:
    """The attempts these events (and status.json, for the newest one) describe, old formats included.

    A failed start is no attempt: not counted, no interruption, its seconds in no attempt's time.
    """
    return _attempts_and_failed_starts(events, status)[0]


def failed_starts_of(events: Sequence[Event | dict[str, Any]]) -> list[Attempt]:
    """The failed starts these events describe, in order: when, where, how long, and the error (`stop_reason`)."""
    return _attempts_and_failed_starts(events, None)[1]


def _attempts_and_failed_starts(
    events: Sequence[Event | dict[str, Any]], status: dict[str, Any] | None
) -> tuple[list[Attempt], list[Attempt]]:
    typed = parse_events(events)
    attempts: list[Attempt] = []
    failed: list[Attempt] = []
    for begin, end, failed_start in _spans(typed):
        opening = typed[begin]
        assert isinstance(opening, (StartingEvent, StartEvent))
        if attempts:  # whatever start came next read how the attempt before it ended
            _close_with(attempts[-1], opening)
        if failed_start:
            failed.append(_failed_start(opening, typed[begin:end], len(failed) + 1))
        else:
            attempts.append(_opened_by(opening, len(attempts) + 1))
            _follow(attempts[-1], typed[begin:end])
    if attempts and attempts[-1].ended is None:
        _newest_so_far(attempts[-1], status or {})
    for i, attempt in enumerate(attempts[:-1]):
        after = resumed_after(attempts, i)
        if after is not None:
            attempt.lost_steps, attempt.lost_steps_exact = lost_steps(
                attempt.last_step, attempt.reached_exact, int(after.first_step or 0)
            )
    return attempts, failed


def _follow(current: Attempt, own: list[Event]) -> None:
    """An attempt's course from its own events: where it trained from, how far, how it stopped."""
    for event in own:
        if isinstance(event, StartEvent):
            current.first_step, current.resumed_from = event.step, event.resumed_from
            current.last_step = max(current.last_step or 0, event.step)
        elif isinstance(event, CheckpointEvent):
            current.last_step = max(current.last_step or 0, event.step)
        elif isinstance(event, StopEvent):
            current.ended, current.stop_state = event.time, event.state
            current.stop_reason, current.reached_exact = event.reason, True
            if current.first_step is not None:  # a stop while loading trained nothing: no step to show
                current.last_step = event.step


def resumed_after(attempts: list[Attempt], index: int) -> Attempt | None:
    """The first attempt after `attempts[index]` known to have resumed training (None: none yet)."""
    return next((a for a in attempts[index + 1 :] if a.first_step is not None), None)


def _opened_by(event: StartingEvent | StartEvent, number: int) -> Attempt:
    return Attempt(
        number=event.attempt if event.attempt is not None else number,
        started=event.time,
        ended=None,
        first_step=None,
        last_step=None,
        processes=event.processes,
        device=event.device,
        host=event.host,
        gpu=event.gpu if isinstance(event, StartingEvent) else None,
    )


def _failed_start(opening: StartingEvent | StartEvent, own: list[Event], number: int) -> Attempt:
    """A failed start as an `Attempt` record (numbered among failed starts), so its time and price read alike."""
    failed = _opened_by(opening, number)
    failed.number = number  # its place among failed starts: the `attempt` it wrote went on to the next start
    stop = next(e for e in reversed(own) if isinstance(e, StopEvent))
    failed.ended, failed.stop_state, failed.stop_reason = stop.time, stop.state, stop.reason
    return failed


def _close_with(previous: Attempt, opening: StartingEvent | StartEvent) -> None:
    """The next attempt's first event closes one with no stop event: what it read of it is all there is."""
    if previous.ended is not None:
        return
    read = opening.previous or PreviousAttempt(None, False, KILLED, opening.time)
    previous.ended, previous.stop_reason = read.last_seen, read.exit
    if read.reached is not None:
        previous.last_step = max(previous.last_step or 0, read.reached)
    previous.reached_exact = read.exact


def _newest_so_far(attempt: Attempt, status: dict[str, Any]) -> None:
    """The newest attempt without a stop: as far as status.json says, if this attempt wrote it."""
    updated = float(status.get("updated_unix", 0))
    if updated >= attempt.started:
        attempt.ended = updated
        if status.get("step") is not None:
            attempt.last_step = max(attempt.last_step or 0, int(status["step"]))
    else:
        attempt.ended = attempt.started


# ---------------------------------------------------------------- words


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


def format_duration(hours: float | None) -> str:
    """'1h 02m 03s', '2m 05s', or '-' when not known."""
    if hours is None:
        return "-"
    seconds = round(hours * 3600)
    h, rest = divmod(seconds, 3600)
    return f"{h}h {rest // 60:02d}m {rest % 60:02d}s" if h else f"{rest // 60}m {rest % 60:02d}s"
