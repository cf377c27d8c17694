"""Checkpoints that survive any crash, and a resume that ends bitwise where an uninterrupted run ends.

Crashes are real: `NOESIS_FAULT` makes the training process SIGKILL (or SIGTERM) itself at a
chosen step or in the middle of a save, and the test restarts the very same command.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, uninterrupted_run
from helpers import (
    assert_same_adapter,
    kill_group,
    mark_interrupted,
    resumed_step,
    start_cli,
    step_losses,
    wait_until,
)
from omegaconf import OmegaConf
from safetensors.torch import load_file

from noesis_accel.config import compose, differing_math_keys
from noesis_accel.core.cli import UsageError
from noesis_accel.core.errors import ConfigError
from noesis_accel.processes.train import run
from noesis_accel.rundir.checkpoint import MANIFEST, checkpoint_problem
from noesis_accel.rundir.history import read_status
from noesis_accel.rundir.layout import RunDir
from noesis_accel.rundir.lease import read_lease
from noesis_accel.rundir.status import main as status_main

STEPS = 12
BASE = ["+experiment=tiny", f"train.max_steps={STEPS}", "ckpt.every=0.25", "train.eval_every=0.5"]


def _reference(tmp_path_factory, extra: list[str]) -> Path:
    return uninterrupted_run(tmp_path_factory.mktemp("reference"), BASE + extra)


def _crash_and_resume(root: Path, extra: list[str], fault: str, expect_code: int) -> tuple[Path, str]:
    command = BASE + extra + [f"run.root={root}"]
    crashed = run_cli(command, env={"NOESIS_FAULT": fault})
    assert crashed.returncode == expect_code, crashed.stderr[-3000:]
    assert read_status(root / "tiny")["state"] != "completed"
    resumed = run_cli(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root / "tiny", resumed.stdout + resumed.stderr


def _assert_bitwise_equal(run_dir: Path, reference: Path, resumed_from: int, first_logged: int = 1) -> None:
    assert_same_adapter(run_dir, reference)
    ours_losses, ref_losses = step_losses(run_dir), step_losses(reference)
    assert sorted(ours_losses) == list(range(first_logged, STEPS + 1))
    for step in range(resumed_from + 1, STEPS + 1):
        assert ours_losses[step] == ref_losses[step], step  # exactly, not approximately


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    return _reference(tmp_path_factory, [])


def _copy_run(run_dir: Path, root: Path) -> Path:
    """A private copy of a module's shared run under `root`, for a test that damages, resumes or restarts it."""
    shutil.copytree(run_dir, root / run_dir.name)
    return root / run_dir.name


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])  # a second moment: slow suite
def test_sigkill_at_a_random_step_then_restart_is_bitwise_exact(tmp_path, reference_run, seed: int) -> None:
    kill_step = random.Random(seed).randint(2, STEPS - 1)
    run_dir, output = _crash_and_resume(tmp_path, [], f"step:{kill_step}", expect_code=-9)
    resumed_from = resumed_step(output)
    assert resumed_from <= kill_step and kill_step - resumed_from < 3  # at most one interval lost
    _assert_bitwise_equal(run_dir, reference_run, resumed_from)


@pytest.mark.slow
def test_sigkill_during_a_save_falls_back_to_the_previous_checkpoint(tmp_path, reference_run) -> None:
    run_dir, output = _crash_and_resume(tmp_path, [], "save:6", expect_code=-9)
    assert "removing incomplete checkpoint" in output and "step-000006.tmp" in output
    assert resumed_step(output) == 3
    _assert_bitwise_equal(run_dir, reference_run, 3)


def test_sigterm_saves_at_the_next_step_and_noesis_train_run_dir_continues_it_bitwise(
    tmp_path, reference_run, capsys
) -> None:
    """SIGTERM: a checkpoint at the next step, nothing lost; `noesis train RUN_DIR` continues the run from its
    own config.yaml (no retyped command; the SIGKILL test above retypes it) to the uninterrupted run's adapter."""
    command = BASE + [f"run.root={tmp_path}"]
    stopped = run_cli(command, env={"NOESIS_FAULT": "term:5"})
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    run_dir = tmp_path / "tiny"
    status = read_status(run_dir)
    assert status["state"] == "interrupted" and status["step"] == 5 and "SIGTERM" in status["exit_reason"]
    manifest = json.loads((run_dir / "checkpoints" / "step-000005" / MANIFEST).read_text())
    assert manifest["reason"] == "signal"
    assert json.loads((run_dir / "command.json").read_text())[2:] == command  # the command that started it
    continued = run_cli(["train", str(run_dir)], module="noesis_accel")  # `python -m noesis_accel` is `noesis`
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert resumed_step(continued.stdout + continued.stderr) == 5
    _assert_bitwise_equal(run_dir, reference_run, 5)
    assert json.loads((run_dir / "command.json").read_text())[2:] == command  # still the starting command
    # `noesis status root=...` in-process: what it lists is the point here, not another interpreter's start-up.
    assert status_main([f"root={tmp_path}"]) == 0
    listing = capsys.readouterr().out
    assert "tiny" in listing and "completed" in listing and f"{STEPS}/{STEPS}" in listing


def test_train_run_dir_refuses_an_override_that_changes_the_math(tmp_path) -> None:
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(OmegaConf.to_container(compose(BASE), resolve=True)))
    from noesis_accel.rundir.continuing import config_of_run_dir

    # The override reaches the config, where the trainer's guard finds a math key changed and refuses it.

    cfg = config_of_run_dir(run_dir, ["optim.lr=0.005"])
    assert cfg.optim.lr == 0.005 and cfg.run.root == str(tmp_path.resolve()) and cfg.run.name == "tiny"
    assert cfg.ckpt.resume == "auto"  # continuing resumes the newest checkpoint, whatever the first start said
    assert differing_math_keys(yaml.safe_load((run_dir / "config.yaml").read_text()), _resolved(cfg)) == ["optim.lr"]
    with pytest.raises(UsageError, match="a group cannot be swapped in"):
        config_of_run_dir(run_dir, ["data=jsonl"])
    with pytest.raises(ConfigError, match="did you mean train.epochs"):
        config_of_run_dir(run_dir, ["train.num_train_epochs=2"])


def _resolved(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.slow
def test_adamw8bit_resume_is_bitwise_exact(tmp_path, tmp_path_factory) -> None:
    # r=64 makes LoRA matrices of 4096 elements, so bitsandbytes keeps their state in 8 bits.
    extra = ["optim=adamw8bit", "peft.r=64", "peft.alpha=128"]
    reference = _reference(tmp_path_factory, extra)
    run_dir, output = _crash_and_resume(tmp_path, extra, "step:8", expect_code=-9)
    _assert_bitwise_equal(run_dir, reference, resumed_step(output))
    optimizer_state = torch.load(run_dir / "checkpoints" / f"step-{STEPS:06d}" / "optimizer.bin", weights_only=False)
    quantised = [s["__bnb_optimizer_quant_state__"] for s in optimizer_state["state"].values()]
    assert any(q["state1"].dtype == torch.uint8 for q in quantised)  # the 8-bit state round-tripped


DDP = ["distributed=ddp", "distributed.num_processes=2"]


@pytest.fixture(scope="module")
def ddp_killed_at_step_7(tmp_path_factory) -> Path:
    """A two-process run whose rank SIGKILLs itself at step 7 (the launcher exits 1): resumed on two
    processes and on one by the tests below, each from its own copy."""
    root = tmp_path_factory.mktemp("ddp-killed")
    crashed = run_cli(BASE + DDP + [f"run.root={root}"], env={"NOESIS_FAULT": "step:7"})
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    assert read_status(root / "tiny")["state"] != "completed"
    return root / "tiny"


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_is_bitwise_exact(tmp_path, tmp_path_factory, ddp_killed_at_step_7) -> None:
    reference = _reference(tmp_path_factory, DDP)
    run_dir = _copy_run(ddp_killed_at_step_7, tmp_path)
    resumed = run_cli(BASE + DDP + [f"run.root={tmp_path}"])  # the very same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_bitwise_equal(run_dir, reference, resumed_step(resumed.stdout + resumed.stderr))


# ---------------------------------------------------------------- damage, retention, commits, size


@pytest.mark.slow
def test_logs_cut_short_after_a_kill_come_back_from_the_checkpoint(tmp_path, reference_run) -> None:
    """A commit that dies while it copies a log (or a crash before its rename reached the disk) leaves
    it empty on the Volume: the restart restores the loss curve and the attempt history it lost."""
    command = BASE + [f"run.root={tmp_path}"]
    crashed = run_cli(command, env={"NOESIS_FAULT": "step:7"})  # checkpoints at 3 and 6 are complete
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    run_dir = RunDir(tmp_path / "tiny")
    run_dir.metrics_file.write_bytes(b"")
    run_dir.events_file.write_bytes(run_dir.events_file.read_bytes()[:40])  # a first line, torn
    resumed = run_cli(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "metrics.jsonl" in output and "restored" in output
    assert resumed_step(output) == 6
    _assert_bitwise_equal(run_dir.path, reference_run, 6)  # every step's loss, 1 to 12, logged once
    starts = [e for e in run_dir.events() if e["event"] == "start"]
    assert [e["attempt"] for e in starts] == [1, 2]  # the restart knows the attempt before it (and its cost)


# End to end through a restart: the slow suite. That a damaged newest checkpoint (a byte flip only the
# checksum finds) is skipped for the one before is checked in-process by tests/test_checkpoint_logic.py.
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, reference_run, damage: str, capsys) -> None:
    command = BASE + [f"run.root={tmp_path}"]
    run_dir = _copy_run(reference_run, tmp_path)  # the finished run, with checkpoints at 6, 9 and 12
    mark_interrupted(run_dir)
    newest = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    if damage == "flip":
        # Silent corruption: 256 bytes inverted inside the adapter weights, the file's size unchanged.
        victim = newest / "model.safetensors"
        data = bytearray(victim.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 256] = bytes(b ^ 0xFF for b in data[middle : middle + 256])
        victim.write_bytes(bytes(data))
        assert status_main([str(run_dir), "--verify"]) == 1
        assert "step-000012: DAMAGED: model.safetensors does not match its checksum" in capsys.readouterr().out
    else:
        victim = newest / "optimizer.bin"
        if damage == "truncate":
            victim.write_bytes(victim.read_bytes()[:100])
        else:
            victim.unlink()
    resumed = run_cli(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert f"skipping checkpoint {newest}: {victim.name}" in output
    assert resumed_step(output) == 9
    assert checkpoint_problem(newest) is None  # rewritten by the resumed run's final save


@pytest.mark.slow
def test_a_second_start_on_the_same_run_dir_is_refused_and_the_first_is_unharmed(tmp_path, reference_run) -> None:
    command = BASE + [f"run.root={tmp_path}"]
    first = start_cli(command)
    try:
        wait_until(lambda: step_losses(tmp_path / "tiny") != {}, 120, "the first start's first step")
        # Held (SIGSTOP) mid-run while the second tries: alive and holding its lease, however slow the machine.
        kill_group(first, signal.SIGSTOP)
        try:
            second = run_cli(command)
        finally:
            kill_group(first, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "is in use by pid" in second.stderr and "two starts must not train one run" in second.stderr
        assert "Traceback" not in second.stderr
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    _assert_bitwise_equal(tmp_path / "tiny", reference_run, 0)
    assert read_lease(RunDir(tmp_path / "tiny")) is None  # released at exit


class RecordingCommitter:
    """Records what is on disk at each commit; fails the first `failures` calls."""

    def __init__(self, checkpoints: Path, failures: int = 0) -> None:
        self.checkpoints, self.failures, self.calls, self.seen = checkpoints, failures, 0, []

    def commit(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError("volume temporarily unavailable")
        newest = max(p for p in self.checkpoints.iterdir() if not p.name.endswith(".tmp"))
        self.seen.append(
            (newest.name, checkpoint_problem(newest), sorted(p.name for p in self.checkpoints.glob("*.tmp")))
        )


# Twenty steps end to end: the slow suite. The same cadence, commits and pruning are checked in
# milliseconds by tests/test_checkpoint_logic.py; the exit's commit by the commit tests below.
@pytest.mark.slow
def test_every_tenth_of_the_run_is_saved_committed_and_pruned(tmp_path) -> None:
    # Progress commits off: this counts the commits of checkpoints.
    cfg = compose(
        [
            "+experiment=tiny",
            "train.max_steps=20",
            "ckpt.every=0.1",
            "ckpt.keep_last=3",
            f"run.root={tmp_path}",
            "train.eval_every=0",
            "ckpt.progress_commit_s=0",
        ]
    )
    committer = RecordingCommitter(tmp_path / "tiny" / "checkpoints")
    run(cfg, committer)
    # Ten checkpoints, one per tenth of the run (the tenth is the final one), each committed once,
    # after its rename, complete on disk at commit time, with no partial directory beside it; and
    # one more commit as the run exits (status.json and the adapter reach the storage too).
    assert committer.calls == 11
    assert [name for name, _, _ in committer.seen] == [f"step-{s:06d}" for s in range(2, 21, 2)] + ["step-000020"]
    assert all(problem is None and partials == [] for _, problem, partials in committer.seen)
    remaining = sorted(p.name for p in (tmp_path / "tiny" / "checkpoints").iterdir())
    assert remaining == ["step-000016", "step-000018", "step-000020"]
    reasons = [json.loads((tmp_path / "tiny" / "checkpoints" / n / MANIFEST).read_text())["reason"] for n in remaining]
    assert reasons == ["interval", "interval", "final"]


@pytest.mark.slow
def test_a_commit_that_fails_twice_then_succeeds_loses_nothing(tmp_path) -> None:
    # Progress commits off: the two failures must hit the first checkpoint's commit.
    cfg = compose(
        [
            "+experiment=tiny",
            "train.max_steps=4",
            "ckpt.every=2",
            "ckpt.commit_backoff_s=0",
            f"run.root={tmp_path}",
            "ckpt.progress_commit_s=0",
        ]
    )
    committer = RecordingCommitter(tmp_path / "tiny" / "checkpoints", failures=2)
    result = run(cfg, committer)
    assert result.state == "completed"
    assert committer.calls == 5  # 3 attempts for step 2, 1 for step 4, 1 at exit
    assert [name for name, _, _ in committer.seen] == ["step-000002", "step-000004", "step-000004"]


@pytest.mark.slow
def test_a_commit_that_never_succeeds_is_reported_and_keeps_every_checkpoint(tmp_path, capsys) -> None:
    """A commit failing past its budget must not end the run (on Modal a Volume can refuse a reload
    while its commit went through): each failure is one warning, and no checkpoint is deleted."""
    cfg = compose(
        [
            "+experiment=tiny",
            "train.max_steps=4",
            "ckpt.every=2",
            "ckpt.commit_backoff_s=0",
            "ckpt.commit_retries=1",
            f"run.root={tmp_path}",
            "ckpt.progress_commit_s=0",
        ]
    )
    committer = RecordingCommitter(tmp_path / "tiny" / "checkpoints", failures=100)
    assert run(cfg, committer).state == "completed"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert [w.split(" is saved")[0] for w in warnings] == [
        "warning: checkpoint step-000002",
        "warning: checkpoint step-000004",
        "warning: the run dir's final state",
    ]
    assert all("volume temporarily unavailable" in w for w in warnings)
    assert committer.calls == 6  # two attempts each: commit_retries=1
    assert sorted(p.name for p in (tmp_path / "tiny" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert read_status(tmp_path / "tiny")["state"] == "completed"


def test_a_commit_retries_within_its_time_budget() -> None:
    from noesis_accel.rundir.volumes import commit_with_retry

    class Failing:
        def commit(self) -> None:
            raise OSError("reload refused: open files")

    waits: list[float] = []
    with pytest.raises(OSError):
        commit_with_retry(Failing(), retries=10, backoff_s=1.0, sleep=waits.append, budget_s=20.0)
    assert waits == [1.0, 2.0, 4.0, 8.0]  # 15 s waited; the next 16 s wait would pass the 20 s budget


def test_lora_checkpoint_holds_adapter_and_optimizer_not_the_base(tmp_path) -> None:
    cfg = compose(
        ["+experiment=tiny", "train.max_steps=2", "ckpt.every=2", "peft.r=64", "peft.alpha=128", f"run.root={tmp_path}"]
    )
    run(cfg)
    checkpoint = tmp_path / "tiny" / "checkpoints" / "step-000002"
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.iterdir())
    adapter = load_file(str(checkpoint / "model.safetensors"))
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    optimizer_bytes = sum(
        t.numel() * t.element_size() for s in optimizer["state"].values() for t in s.values() if torch.is_tensor(t)
    )
    assert all("lora_" in name for name in adapter)  # no frozen base weight
    assert checkpoint_bytes <= 3 * (adapter_bytes + optimizer_bytes)


@pytest.mark.slow
def test_resume_never_refuses_a_run_dir_with_checkpoints(tmp_path) -> None:
    command = BASE[:1] + ["train.max_steps=2", "ckpt.every=1", f"run.root={tmp_path}"]
    assert run_cli(command).returncode == 0
    config_before = (tmp_path / "tiny" / "config.yaml").read_text()
    refused = run_cli(command + ["ckpt.resume=never", "optim.lr=0.5"])
    assert refused.returncode == 2 and "ckpt.resume=never" in refused.stderr and "Traceback" not in refused.stderr
    # A refused start leaves the run it found untouched.
    assert (tmp_path / "tiny" / "config.yaml").read_text() == config_before
    assert read_status(tmp_path / "tiny")["state"] == "completed"


@pytest.mark.slow
def test_resume_from_an_explicit_checkpoint_path(tmp_path, reference_run) -> None:
    source = tmp_path / "a"
    _copy_run(reference_run, source)  # a finished run: the later refusal marks it interrupted
    checkpoint = source / "tiny" / "checkpoints" / "step-000009"
    resumed = run_cli(BASE + [f"run.root={tmp_path / 'b'}", f"ckpt.resume={checkpoint}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_step(resumed.stdout) == 9
    _assert_bitwise_equal(tmp_path / "b" / "tiny", source / "tiny", 9, first_logged=10)
    bad = run_cli(BASE + [f"run.root={tmp_path / 'c'}", f"ckpt.resume={tmp_path / 'nowhere'}"])
    assert bad.returncode == 2 and "cannot resume from it: no such directory" in bad.stderr
    # Resuming an older checkpoint into the run dir that holds newer ones would mix two trajectories.
    mark_interrupted(source / "tiny")
    mixed = run_cli(BASE + [f"run.root={source}", f"ckpt.resume={checkpoint}"])
    assert mixed.returncode == 2 and "already holds later checkpoints (step-000012)" in mixed.stderr


@pytest.mark.slow
def test_ddp_checkpoint_resumes_on_fewer_processes(tmp_path, ddp_killed_at_step_7) -> None:
    """2 -> 1 process under DDP: the checkpoint holds the full optimizer state and the data position is
    counted in global batches, so the run continues with the same global batch (accumulation 1 -> 2)."""
    _copy_run(ddp_killed_at_step_7, tmp_path)
    one = BASE + [f"run.root={tmp_path}"]
    resumed = run_cli(one)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_step(resumed.stdout) == 6
    assert "1 process(es)" in resumed.stdout and "accumulation 2" in resumed.stdout
    assert read_status(tmp_path / "tiny")["state"] == "completed"
