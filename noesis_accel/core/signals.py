"""Stop requests: signals and the attempt's deadline ask for a checkpoint at the next step boundary.

The first SIGTERM, SIGINT or SIGUSR1 (Modal's timeout and cancellation signal) asks for a
checkpoint at the next step boundary; a second one stops at once, except while that checkpoint is
being written, when only a third does (Modal sends SIGINT 30 s after SIGUSR1: it must not cut the
save it asked for). The checkpoint directory is atomic, so a stop at any moment leaves nothing
half-written.

Who receives the requests depends on the process:
- the process that runs the training itself (a single-process run, the Modal function's own
  thread) takes them from its signal handlers; a forced stop raises `ForcedStop`, so the caller's
  `finally` blocks (the final commit, Modal's own output and exit-time commit) still run;
- a training process started by the launcher ignores these signals and takes requests from its
  launcher only (`PreemptionWatcher.request`), so a signal sent to every process of a container
  (as a container runtime may do) counts once, not once directly and once forwarded. There a
  forced stop exits at once: the process may be blocked in a collective with a dead peer.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from types import FrameType

from noesis_accel.core.protocol import DEADLINE_ENV

# Preemption (SIGINT on Modal, SIGTERM elsewhere) and Modal's per-attempt timeout (SIGUSR1).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DEADLINE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped early on purpose, a retry continues


# When this process first received a stop request (its own signal, or its launcher's request): one at or
# after the attempt's deadline is its time limit, whatever its number (a run that overran its deadline
# must be retried, not read as cancelled), and commits after it get only the stop's share of the grace.
_first_stop_signal_at: float | None = None


def note_stop_signal() -> None:
    """Called by every receiver of a stop request in this process (the first one's time is kept)."""
    global _first_stop_signal_at
    if _first_stop_signal_at is None:
        _first_stop_signal_at = time.time()


def first_stop_signal_at() -> float | None:
    return _first_stop_signal_at


def forget_stop_signals() -> None:
    """A new run in the same process (an in-process sweep job, a test) starts with none."""
    global _first_stop_signal_at
    _first_stop_signal_at = None


def signalled_after_deadline() -> bool:
    """Whether this process's first stop signal came at or after NOESIS_DEADLINE (now, if none yet)."""
    deadline = attempt_deadline()
    received = _first_stop_signal_at if _first_stop_signal_at is not None else time.time()
    return deadline is not None and received >= deadline


class ForcedStop(BaseException):
    """A second stop request before the checkpoint: the run stops now, at its newest complete checkpoint.

    A BaseException, so no `except Exception` on the way (a commit retry loop, a cleanup) swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(
            f"{signal.Signals(signum).name} again: stopped at once, before a checkpoint; "
            "restart to resume from the newest complete checkpoint"
        )
        self.signum = signum
        self.exit_code = 128 + signum


class PreemptionWatcher:
    """Records the first stop request; the training loop polls `requested`.

    `from_launcher=False`: requests are this process's signals (its handlers are installed while
    the run lasts). `from_launcher=True`: the signals are ignored and the launcher's requests come
    through `request()` (from the thread that reads the launcher's channel).
    """

    SIGNALS = FORWARDED_SIGNALS

    def __init__(self, on_forced_exit: Callable[[int], None] | None = None, from_launcher: bool = False) -> None:
        self.received: int | None = None
        self.saving = False  # set by the loop while the requested checkpoint is written
        self.from_launcher = from_launcher
        self._repeats = 0  # requests after the first
        self.on_forced_exit = on_forced_exit  # records the stop before it happens
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def request(self, signum: int) -> None:
        """One stop request: the first asks for a checkpoint, a later one forces the stop."""
        note_stop_signal()
        if self.received is None:
            self.received = signum
            return
        self._repeats += 1
        if self.saving and self._repeats < 2:
            return  # let the checkpoint that was asked for finish
        if self.on_forced_exit is not None:
            self.on_forced_exit(signum)
        if self.from_launcher:
            os._exit(128 + signum)
        raise ForcedStop(signum)  # from a signal handler: raised in the main thread, where training runs

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.request(signum)

    def install(self) -> PreemptionWatcher:
        handler = signal.SIG_IGN if self.from_launcher else self._handle
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, handler)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()


def attempt_deadline() -> float | None:
    """`DEADLINE_ENV` (unix time): checkpoint and stop by then; the Modal entry sets it per attempt."""
    value = os.environ.get(DEADLINE_ENV)
    return float(value) if value else None


def deadline_reached(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline


# Ctrl-C before the trainer's own handler is in place (imports, composing, loading): what `noesis train` says.
STARTUP_INTERRUPTED = (
    "interrupted: stopped by SIGINT during start-up, before step 1; no checkpoint was written by this command "
    "(run it again to start)"
)


class RunInterrupted(Exception):
    """The run stopped on purpose after a complete checkpoint; the same command resumes it."""

    exit_code = 1


class InterruptedBySignal(RunInterrupted):
    """Stopped by a signal after the checkpoint it asked for; exits 128 + signal, so supervisors retry."""

    def __init__(self, signum: int, checkpointed: bool = True) -> None:
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after a checkpoint; restart to resume"
            if checkpointed
            # A stop before the first step of a fresh run: nothing was saved, so nothing may claim it was.
            else f"stopped by {name} before step 1; no checkpoint exists yet, so the same command starts over"
        )
        self.signum, self.checkpointed = signum, checkpointed
        self.exit_code = 128 + signum

    def __reduce__(self) -> tuple:  # it crosses process boundaries pickled (sweep jobs)
        return (InterruptedBySignal, (self.signum, self.checkpointed))


class SignalledAfterDeadline(RuntimeError):
    """A stop signal at or after the attempt's deadline: the attempt's time limit, not a cancellation or a
    preemption. Raised to Modal as a failure, so the input is retried and resumes from the checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(
            f"{signal.Signals(signum).name} at or after this attempt's deadline (modal.timeout_s less "
            "modal.deadline_margin_s): its time limit, not a cancellation; the retry resumes from the checkpoint"
        )
        self.exit_code = DEADLINE_EXIT_CODE


class StoppedAtDeadline(RunInterrupted):
    """Stopped before the attempt's timeout after a checkpoint, so the timeout costs no steps."""

    exit_code = DEADLINE_EXIT_CODE

    def __init__(self) -> None:
        super().__init__(
            "stopped before this attempt's time limit after a checkpoint; restart (or let the retry run) to resume"
        )
