"""The money: attempts priced by the GPU each got, the budget's stop at a checkpoint, and an out-of-memory error
read as batch shape (a user error, not retried) or a crash (retried at most ckpt.oom_retries times)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MODAL_TINY, run_cli
from helpers import assert_same_adapter

from noesis_accel.config import compose
from noesis_accel.core.errors import UserError
from noesis_accel.processes.train import run
from noesis_accel.rundir.costs import attempt_usd, format_usd, spent_usd
from noesis_accel.rundir.history import history_of
from noesis_accel.rundir.layout import RunDir
from noesis_accel.rundir.status import format_status
from noesis_accel.rundir.status import main as status_main
from noesis_accel.training.oom import OutOfMemory, OutOfMemoryCrash
from noesis_accel.training.spend import Spend


def _events(*attempts: tuple[float, float, str | None, int]) -> list[dict]:
    """Two events per attempt (started, stopped) at these times, on this GPU, with this many processes."""
    events = []
    for number, (start, stop, gpu, processes) in enumerate(attempts, 1):
        starting = {"event": "starting", "time": start, "attempt": number, "processes": processes}
        starting |= {"device": "cuda", "gpu": gpu} if gpu else {"device": "cpu"}
        events += [starting, {"event": "stop", "time": stop, "state": "interrupted", "step": 1, "reason": "x"}]
    return events


def test_each_attempt_is_priced_by_the_gpu_it_got() -> None:
    attempts = history_of(_events((0, 3600, "NVIDIA H100 80GB HBM3", 8), (3600, 5400, "NVIDIA H200", 8)))
    assert attempt_usd(attempts[0], None) == pytest.approx(8 * 3.9492)
    assert attempt_usd(attempts[1], None) == pytest.approx(8 * 4.5396 / 2)
    assert spent_usd(attempts, None) == pytest.approx(8 * 3.9492 + 4 * 4.5396)
    assert spent_usd(attempts, 2.0) == pytest.approx(8 * 2.0 * 1.5)  # budget.gpu_hour_usd prices every attempt
    cpu = history_of(_events((0, 7200, None, 2)))
    assert attempt_usd(cpu[0], None) is None and attempt_usd(cpu[0], 0.5) == pytest.approx(2 * 2 * 0.5)


def test_an_amount_under_a_cent_is_never_shown_as_free() -> None:
    assert [format_usd(x) for x in (0.0, 0.0042, 0.01, 1234.5)] == ["$0.00", "$0.0042", "$0.01", "$1,234.50"]
    assert format_usd(0.00001) == "<$0.0001"


def test_a_stopped_runs_budget_line_is_its_history_not_its_last_progress_record() -> None:
    """status.json's spent_usd dates from the last progress record; once the run has ended, the attempts'
    own start and stop times are the whole bill."""
    attempts = history_of(_events((0, 3600, "NVIDIA H100 80GB HBM3", 1)))
    stale = {"state": "completed", "spent_usd": 0.5, "budget_usd": 10.0}
    assert "budget:      $3.95 spent of $10.00 (budget.usd)" in format_status(stale, attempts)
    running = {**stale, "state": "running"}  # while it runs, the last record is the newest figure there is
    assert "budget:      $0.50 spent of $10.00 (budget.usd)" in format_status(running, attempts)


def test_the_cap_allows_a_step_only_when_a_checkpoint_after_it_stays_under_it() -> None:
    spend = Spend(cap_usd=10.0, price=3600.0, devices=1, started=1000.0, previous_usd=4.0)  # $1 a second
    assert spend.spent(now=1005.0) == pytest.approx(9.0)
    assert not spend.would_pass_cap(0.9, now=1005.0)
    assert spend.would_pass_cap(1.1, now=1005.0)
    assert not Spend(None, 3600.0, 1, 0.0).would_pass_cap(1e9, now=1.0)  # no cap
    assert not Spend(1.0, None, 1, 0.0).would_pass_cap(1e9, now=1.0)  # no price for this device


def test_a_budget_stops_at_a_checkpoint_and_a_higher_budget_continues_exactly(
    tmp_path: Path, modal_tiny_reference: Path, monkeypatch, capsys
) -> None:
    # $1 a process-second, and steps of at least 1.5 s: the $18 cap runs out after a few steps.
    monkeypatch.setenv("NOESIS_STEP_DELAY_S", "1.5")
    capped = [*MODAL_TINY, f"run.root={tmp_path}", "budget.gpu_hour_usd=3600", "budget.usd=18"]
    stopped = run(compose(capped))
    status = RunDir(stopped.run_dir).status()
    assert stopped.state == "budget" and status["state"] == "budget"
    assert 0 < stopped.step < stopped.total_steps, stopped
    assert status["latest_checkpoint"].endswith(f"step-{stopped.step:06d}")
    assert status["spent_usd"] <= 18.0 and status["budget_usd"] == 18.0
    assert status_main([str(stopped.run_dir)]) == 0
    shown = capsys.readouterr().out
    assert "state:       budget" in shown and "budget:" in shown and "spent" in shown
    monkeypatch.delenv("NOESIS_STEP_DELAY_S")
    finished = run(compose([*capped[:-1], "budget.usd=100000"]))
    assert finished.state == "completed" and finished.step == finished.total_steps
    assert_same_adapter(finished.run_dir, modal_tiny_reference)


def test_an_out_of_memory_error_at_the_first_step_is_one_line_exit_2_and_failed(tmp_path: Path) -> None:
    result = run_cli(["+experiment=tiny", f"run.root={tmp_path}"], env={"NOESIS_FAULT": "oom:1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out of memory at step 1" in errors[0] and "micro_batch_size" in errors[0]
    status = RunDir(tmp_path / "tiny").status()
    assert status["state"] == "failed"


@pytest.mark.slow
def test_an_out_of_memory_error_after_the_first_step_is_retried_once_then_reported(tmp_path: Path, monkeypatch) -> None:
    overrides = ["+experiment=tiny", f"run.root={tmp_path}", "ckpt.every=0.25"]
    monkeypatch.setenv("NOESIS_FAULT", "term:12")  # a stop with a checkpoint: the next start resumes
    with pytest.raises(Exception, match="SIGTERM"):
        run(compose(overrides))
    monkeypatch.setenv("NOESIS_FAULT", "oom:20")
    with pytest.raises(OutOfMemoryCrash, match="retry 1 of ckpt.oom_retries=1"):
        run(compose(overrides))  # after the largest batch fitted: a crash, which a restart retries
    with pytest.raises(OutOfMemory, match="1 earlier attempt") as reported:
        run(compose(overrides))
    assert isinstance(reported.value, UserError)  # so Modal gets a result, not a failure to retry
    events = [json.loads(line) for line in (tmp_path / "tiny" / "events.jsonl").read_text().splitlines()]
    stops = [e for e in events if e["event"] == "stop"]
    assert [e.get("out_of_memory", False) for e in stops] == [False, True, True]
    assert RunDir(tmp_path / "tiny").status()["state"] == "failed"
