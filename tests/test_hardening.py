"""The run dir under hostile conditions: a killed launcher, a full disk, a read-only root, SIGTERM to many processes.

(Silent corruption and two starts on one run dir are in test_checkpoint.py, beside the resume tests.)
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import run_cli, uninterrupted_run
from helpers import (
    alive,
    assert_same_adapter,
    children_of,
    kill_group,
    logged_step,
    read_only_dir,
    resize_tmpfs,
    resumed_step,
    start_cli,
    step_losses,
    tmpfs,
    wait_until,
)

from noesis_accel.rundir.checkpoint import checkpoint_problem
from noesis_accel.rundir.layout import RunDir

DDP = ["+experiment=tiny", "distributed=ddp", "distributed.num_processes=2", "train.eval_every=0"]


@pytest.mark.slow
def test_killing_the_launcher_leaves_no_training_process(tmp_path) -> None:
    """kill -9 of a 2-process launcher's process group: its workers (own session) follow within seconds."""
    command = DDP + ["train.max_steps=400", "ckpt.every=50", f"run.root={tmp_path}"]
    launcher = start_cli(command)
    try:
        wait_until(lambda: logged_step(tmp_path / "tiny") >= 2, 180, "two training steps")
        workers = children_of(launcher.pid)
        assert len(workers) == 2
        kill_group(launcher, signal.SIGKILL)
        launcher.wait(timeout=30)
        # Not a race with a tight budget: workers that outlived it would train on for 398 more steps.
        wait_until(lambda: not any(alive(pid) for pid in workers), 30, "the workers to exit after the launcher")
    finally:
        kill_group(launcher)
    # The dead launcher's lease (same host, process gone) is taken over at once by a restart.
    restarted = run_cli(DDP + ["train.max_steps=4", "ckpt.every=2", f"run.root={tmp_path}", "run.name=second"])
    assert restarted.returncode == 0, restarted.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_prints_one_line_and_exits_143(tmp_path) -> None:
    command = DDP + ["train.max_steps=400", "ckpt.every=50", f"run.root={tmp_path}"]
    launcher = start_cli(command)
    try:
        wait_until(lambda: logged_step(tmp_path / "tiny") >= 2, 180, "two training steps")
        launcher.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=120)
    finally:
        kill_group(launcher)
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err
    lines = [line for line in (out + err).splitlines() if line.startswith("interrupted:")]
    assert lines == ["interrupted: stopped by SIGTERM after a checkpoint; restart to resume"]
    status = RunDir(tmp_path / "tiny").status()
    assert status["state"] == "interrupted"
    newest = RunDir(tmp_path / "tiny").step_dirs()[0][1]
    assert checkpoint_problem(newest) is None and newest.name == f"step-{status['step']:06d}"


def test_read_only_run_root_is_one_line(tmp_path) -> None:
    root = tmp_path / "readonly"
    with read_only_dir(root) as why:
        if why is None:
            pytest.skip("no way to make a read-only directory here")
        result = run_cli(["+experiment=tiny", f"run.root={root / 'runs'}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: run.root: {root / 'runs'} is not writable ({why} at {root}); point run.root at a writable directory"
    ]


@pytest.fixture(scope="module")
def big_adapter_reference(tmp_path_factory) -> Path:
    return uninterrupted_run(tmp_path_factory.mktemp("reference"), _FULL_DISK)


# r=64 makes each checkpoint ~1.5 MB, so a 4 MB filesystem fills up within a few saves.
_FULL_DISK = [
    "+experiment=tiny",
    "train.max_steps=8",
    "ckpt.every=1",
    "ckpt.keep_last=8",
    "peft.r=64",
    "peft.alpha=128",
    "train.eval_every=0",
]


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_loses_nothing(tmp_path, big_adapter_reference) -> None:
    mount_point = tmp_path / "small"
    with tmpfs(mount_point, "4m") as mounted:
        root = mount_point if mounted else tmp_path / "plain"
        command = _FULL_DISK + [f"run.root={root}"]
        # Without a mount, the save of step 3 fails as a full disk makes it fail.
        full = run_cli(command, env={} if mounted else {"NOESIS_FAULT": "enospc:3"})
        assert full.returncode == 2, full.stderr[-3000:]
        errors = [line for line in full.stderr.splitlines() if line.strip()]
        assert (
            len(errors) == 1 and errors[0].startswith("error: checkpoint ") and "No space left on device" in errors[0]
        )
        assert "free there" in errors[0] and "restart the same command" in errors[0]
        assert "Traceback" not in full.stderr and "basic_ios" not in full.stderr
        run_dir = RunDir(root / "tiny")
        status = run_dir.status()
        assert status["state"] == "failed" and "No space left on device" in status["exit_reason"]
        assert not list(run_dir.checkpoints.glob("*.tmp"))  # our partial checkpoint is gone
        saved = run_dir.step_dirs()
        assert saved and all(checkpoint_problem(path) is None for _, path in saved)
        if mounted:
            resize_tmpfs(mount_point, "64m")  # the operator frees space
        resumed = run_cli(command)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert resumed_step(resumed.stdout) == saved[0][0]
        assert_same_adapter(run_dir.path, big_adapter_reference)
        ours, reference = step_losses(run_dir.path), step_losses(big_adapter_reference)
        assert all(ours[s] == reference[s] for s in range(saved[0][0] + 1, 9))


@pytest.mark.slow
def test_a_user_error_in_a_two_process_run_is_one_line_once(tmp_path) -> None:
    result = run_cli(DDP + ["train.max_steps=2", f"data.path={tmp_path / 'missing.jsonl'}", f"run.root={tmp_path}"])
    assert result.returncode == 2
    lines = [
        line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[")
    ]  # [time][logger] lines aside
    assert lines == [
        f"error: data.path: {tmp_path / 'missing.jsonl'} does not exist; point data.path at a "
        ".jsonl, .json or .parquet file or a directory of them"
    ]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
