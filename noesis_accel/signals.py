"""Stop requests: signals and the attempt's deadline ask for a checkpoint at the next step boundary.

The first SIGTERM, SIGINT or SIGUSR1 (Modal's timeout signal) asks for a checkpoint at the next step
boundary; a second one exits at once, except while that checkpoint is being written, when only a
third does (Modal sends SIGINT 30 s after SIGUSR1: it must not cut the save it asked for). The
checkpoint directory is atomic, so an exit at any moment leaves nothing half-written.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType
from typing import Any, Callable

# Preemption (SIGINT on Modal, SIGTERM elsewhere) and Modal's per-attempt timeout (SIGUSR1).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DEADLINE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped early on purpose, a retry continues


class PreemptionWatcher:
    """Records the first stop signal; the training loop polls `requested`."""

    SIGNALS = FORWARDED_SIGNALS

    def __init__(self, on_forced_exit: Callable[[int], None] | None = None) -> None:
        self.received: int | None = None
        self.saving = False  # set by the loop while the requested checkpoint is written
        self._repeats = 0  # signals after the first
        self._on_forced_exit = on_forced_exit
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            return
        self._repeats += 1
        if self.saving and self._repeats < 2:
            return  # let the checkpoint that was asked for finish
        if self._on_forced_exit is not None:
            self._on_forced_exit(signum)
        os._exit(128 + signum)

    def install(self) -> "PreemptionWatcher":
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()


def attempt_deadline() -> float | None:
    """`NOESIS_DEADLINE` (unix time): checkpoint and stop by then; the Modal entry sets it per attempt."""
    value = os.environ.get("NOESIS_DEADLINE")
    return float(value) if value else None


def deadline_reached(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline


class RunInterrupted(Exception):
    """The run stopped on purpose after a complete checkpoint; the same command resumes it."""

    exit_code = 1

    def outcome(self) -> dict[str, Any]:
        return {"kind": "interrupted", "message": str(self), "exit_code": self.exit_code}


class InterruptedBySignal(RunInterrupted):
    """Stopped by a signal after the checkpoint it asked for; exits 128 + signal, so supervisors retry."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after a checkpoint; restart to resume")
        self.signum = signum
        self.exit_code = 128 + signum

    def outcome(self) -> dict[str, Any]:
        return {**super().outcome(), "signum": self.signum}


class StoppedAtDeadline(RunInterrupted):
    """Stopped before the attempt's timeout after a checkpoint, so the timeout costs no steps."""

    exit_code = DEADLINE_EXIT_CODE

    def __init__(self) -> None:
        super().__init__("stopped before this attempt's time limit after a checkpoint; "
                         "restart (or let the retry run) to resume")

    def outcome(self) -> dict[str, Any]:
        return {**super().outcome(), "deadline": True}


def interruption_from_outcome(outcome: dict[str, Any]) -> RunInterrupted:
    """Rebuild a worker's interruption in the parent, so callers see one exception type."""
    if outcome.get("signum"):
        return InterruptedBySignal(int(outcome["signum"]))
    if outcome.get("deadline"):
        return StoppedAtDeadline()
    interruption = RunInterrupted(outcome.get("message", "stopped"))
    interruption.exit_code = int(outcome.get("exit_code", 1))
    return interruption
