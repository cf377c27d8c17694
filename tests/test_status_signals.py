"""status.json / noesis-status, and the preemption watcher's two-signal behaviour."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

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
