"""status.json / noesis-status, and the preemption watcher's two-signal behaviour."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from noesis_accel.status import main as status_main
from noesis_accel.status import read_status, write_status


def test_noesis_status_prints_the_run_state(tmp_path, capsys) -> None:
    write_status(tmp_path, state="interrupted", step=58, total_steps=100, latest_checkpoint="checkpoints/step-000050",
                 exit_reason="stopped by SIGTERM after a checkpoint; restart to resume")
    assert status_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "interrupted" in out and "step 58 / 100 (58%)" in out and "step-000050" in out and "SIGTERM" in out
    assert read_status(tmp_path)["step"] == 58


def test_noesis_status_on_a_non_run_dir_is_a_clear_error(tmp_path, capsys) -> None:
    assert status_main([str(tmp_path / "nope")]) == 2
    assert "no readable status.json" in capsys.readouterr().err


def test_first_signal_asks_second_signal_exits_at_once() -> None:
    script = textwrap.dedent("""
        import os, signal, time
        from noesis_accel.signals import PreemptionWatcher
        watcher = PreemptionWatcher().install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        print("requested", watcher.requested, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("still alive", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "requested True" in result.stdout
    assert "still alive" not in result.stdout
    assert result.returncode == 128 + signal.SIGTERM
