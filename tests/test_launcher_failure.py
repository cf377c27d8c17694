"""The launcher's one line when its training processes fail: which rank's failure it reports, in-process.

The workers here are stand-ins (an exit code and the outcome file a worker writes), so every way a
group of processes can end is checked in milliseconds; tests/test_hardening.py and
tests/test_no_silent_surprises.py start real processes for the paths where the process boundary is the point.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from itertools import count
from pathlib import Path
from types import SimpleNamespace

import pytest

from noesis_accel.core.signals import InterruptedBySignal, StoppedAtDeadline
from noesis_accel.processes.launcher import Launcher, TrainingProcessFailed, WorkerUserError, _Worker
from noesis_accel.processes.worker import outcome_of
from noesis_accel.rundir.layout import RunDir

_launches = count()


def _launcher(tmp_path: Path, ends: Sequence[tuple[int, dict | None]], signals: list[int] | None = None) -> Launcher:
    """A launcher whose workers ended as `ends` says: (exit code, outcome written or None), by rank."""
    launcher = Launcher.__new__(Launcher)  # no lease, no temporary dir: only what `_failure` reads
    launcher.lease = None
    launcher.watch, launcher.peer_lost, launcher._first_failure = None, None, None  # one machine: no cluster watch
    launcher.signals_received = signals or []
    launcher.rundir = RunDir(tmp_path / "run")  # no checkpoint in it
    launcher.workers = []
    tmp_path = tmp_path / f"launch-{next(_launches)}"  # each launcher its own outcome files
    tmp_path.mkdir()
    for rank, (code, outcome) in enumerate(ends):
        outcome_file = tmp_path / f"outcome-{rank}.json"
        if outcome is not None:
            outcome_file.write_text(json.dumps(outcome))
        process = SimpleNamespace(returncode=code)
        launcher.workers.append(_Worker(rank, rank, process, outcome_file, lifeline=-1))  # type: ignore[arg-type]
    return launcher


def _outcome(stop: BaseException) -> dict:
    """What a worker stopped by `stop` writes to its outcome file."""
    return json.loads(outcome_of(stop).to_json())


def _error(at: float, message: str) -> dict:
    return {"kind": "error", "time": at, "message": message, "traceback": f"Traceback: {message}\n"}


def test_the_first_rank_to_fail_is_the_cause_and_its_traceback_is_printed(tmp_path, capsys) -> None:
    failure = _launcher(tmp_path, [(1, _error(20.0, "collective timed out")), (1, _error(10.0, "CUDA OOM"))])._failure()
    assert isinstance(failure, TrainingProcessFailed) and failure.signum is None
    assert str(failure).startswith("training process rank 1 exited with code 1 (CUDA OOM); restart the same command")
    assert capsys.readouterr().err == "Traceback: CUDA OOM\n"  # only the cause's


def test_an_error_outranks_a_rank_that_was_killed_without_a_word(tmp_path) -> None:
    failure = _launcher(tmp_path, [(-signal.SIGKILL, None), (1, _error(5.0, "bad batch"))])._failure()
    assert "rank 1 exited with code 1 (bad batch)" in str(failure)
    killed = _launcher(tmp_path, [(0, {}), (-signal.SIGKILL, None)])._failure()
    assert str(killed).startswith("training process rank 1 was killed by SIGKILL; restart")


def test_a_user_error_of_the_lowest_rank_is_the_line_with_its_exit_code(tmp_path) -> None:
    ends = [
        (1, _error(1.0, "crash")),
        (2, {"kind": "user_error", "message": "data.path: no such file", "exit_code": 2}),
        (2, {"kind": "user_error", "message": "other", "exit_code": 3}),
    ]
    failure = _launcher(tmp_path, ends)._failure()
    assert isinstance(failure, WorkerUserError)
    assert str(failure) == "data.path: no such file" and failure.exit_code == 2


def test_every_rank_interrupted_is_the_interruption_itself(tmp_path) -> None:
    by_signal = _outcome(InterruptedBySignal(signal.SIGTERM))
    failure = _launcher(tmp_path, [(143, by_signal), (143, by_signal)])._failure()
    assert isinstance(failure, InterruptedBySignal) and failure.exit_code == 143
    assert "before step 1; no checkpoint exists yet" in str(failure)  # the run dir holds none
    deadline = _outcome(StoppedAtDeadline())
    assert isinstance(_launcher(tmp_path, [(1, deadline), (1, deadline)])._failure(), StoppedAtDeadline)


def test_a_death_after_a_stop_signal_says_the_run_was_stopped_not_broken(tmp_path) -> None:
    ends = [(-signal.SIGKILL, None), (143, _outcome(InterruptedBySignal(signal.SIGTERM)))]
    failure = _launcher(tmp_path, ends, signals=[signal.SIGTERM])._failure()
    assert isinstance(failure, TrainingProcessFailed) and failure.signum == signal.SIGTERM
    assert str(failure).startswith("stopped by SIGTERM, but training process rank 0 was killed by SIGKILL before")


@pytest.mark.parametrize("code, words", [(-signal.SIGSEGV, "was killed by SIGSEGV"), (7, "exited with code 7")])
def test_how_a_process_ended_is_named(tmp_path, code: int, words: str) -> None:
    assert f"rank 0 {words}" in str(_launcher(tmp_path, [(code, None)])._failure())
