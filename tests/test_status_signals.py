"""status.json / noesis-status, and the preemption watcher's two-signal behaviour."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from noesis_accel.rundir.history import read_status, write_status
from noesis_accel.rundir.status import main as status_main


def test_noesis_status_prints_the_run_state(tmp_path, capsys) -> None:
    write_status(
        tmp_path,
        state="interrupted",
        step=58,
        total_steps=100,
        latest_checkpoint="checkpoints/step-000050",
        exit_reason="stopped by SIGTERM after a checkpoint; restart to resume",
    )
    assert status_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "interrupted" in out and "step 58 / 100 (58%)" in out and "step-000050" in out and "SIGTERM" in out
    assert read_status(tmp_path)["step"] == 58


def test_noesis_status_on_a_non_run_dir_is_a_clear_error(tmp_path, capsys) -> None:
    assert status_main([str(tmp_path / "nope")]) == 2
    assert "no readable status.json" in capsys.readouterr().err


def test_first_signal_asks_second_signal_stops_at_once() -> None:
    """In the process that trains (a single-process run, a Modal function's thread) the forced stop is
    an exception: the final commit and Modal's own output and exit-time commit still happen."""
    from noesis_accel.core.signals import ForcedStop, PreemptionWatcher

    recorded: list[int] = []
    watcher = PreemptionWatcher(on_forced_exit=recorded.append).install()
    try:
        # raise_signal runs the Python handler before it returns, in this thread: no wait for delivery.
        signal.raise_signal(signal.SIGTERM)
        assert watcher.requested and not recorded
        with pytest.raises(ForcedStop) as stopped:
            signal.raise_signal(signal.SIGTERM)
        assert stopped.value.exit_code == 128 + signal.SIGTERM and recorded == [signal.SIGTERM]
    finally:
        watcher.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler it replaced is back


def test_a_launched_process_ignores_direct_signals_and_counts_each_launcher_request_once() -> None:
    """A runtime that signals every process of a container reaches the launcher too, which forwards
    each signal once: taken directly as well, one preemption would count twice and force the exit."""
    script = textwrap.dedent("""
        import os, signal, time
        from noesis_accel.core.signals import PreemptionWatcher
        watcher = PreemptionWatcher(from_launcher=True).install()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.raise_signal(signum)  # delivered (and ignored) before it returns
        print("after direct signals: requested", watcher.requested, flush=True)
        watcher.request(signal.SIGINT)
        watcher.saving = True  # the checkpoint that was asked for is being written
        watcher.request(signal.SIGINT)
        print("while saving, a second request waits; requested", watcher.requested, flush=True)
        watcher.request(signal.SIGINT)
        print("still alive", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "after direct signals: requested False" in result.stdout
    assert "while saving, a second request waits; requested True" in result.stdout
    assert "still alive" not in result.stdout
    assert result.returncode == 128 + signal.SIGINT


@pytest.mark.parametrize("deadline_in_s, ends_as", [(-1.0, "SignalledAfterDeadline"), (60.0, "InputCancellation")])
def test_sigusr1_is_the_time_limit_at_or_after_the_deadline_and_a_cancellation_before(
    monkeypatch, deadline_in_s: float, ends_as: str
) -> None:
    """The signal's number cannot tell a cancellation from the timeout; its time against NOESIS_DEADLINE can."""
    from noesis_accel.cloud.modal_job import end_as_modal_expects
    from noesis_accel.core import signals
    from noesis_accel.core.protocol import DEADLINE_ENV

    monkeypatch.setenv(DEADLINE_ENV, str(time.time() + deadline_in_s))
    signals.forget_stop_signals()
    signals.note_stop_signal()
    try:
        with pytest.raises(BaseException) as ended:
            end_as_modal_expects(signals.InterruptedBySignal(signal.SIGUSR1), {})
    finally:
        signals.forget_stop_signals()
    assert type(ended.value).__name__ == ends_as
