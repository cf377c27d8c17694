"""What a Modal entry stands on: commits from every process layout, the parent's exact config in the
workers, `+debug=` winning in any order, and a task function that returns instead of exiting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from helpers import typed

from noesis_accel.config import compose
from noesis_accel.processes.train import run
from noesis_accel.rundir.checkpoint import checkpoint_problem
from noesis_accel.rundir.history import read_status
from noesis_accel.rundir.layout import RunDir
from noesis_accel.training.metrics import read_metrics
from noesis_accel.training.optim import CosineWithWarmup

DDP = ["+experiment=tiny", "distributed=ddp", "distributed.num_processes=2", "train.eval_every=0"]


class CheckpointCommitRecorder:
    """Records, at each commit, every checkpoint directory and whether it was complete."""

    def __init__(self, checkpoints: Path) -> None:
        self.checkpoints = checkpoints
        self.seen: list[dict[str, str | None]] = []

    def commit(self) -> None:
        dirs = sorted(self.checkpoints.iterdir()) if self.checkpoints.is_dir() else []
        self.seen.append({p.name: checkpoint_problem(p) for p in dirs})


@pytest.mark.slow
def test_a_two_process_run_commits_every_checkpoint_through_the_caller(tmp_path) -> None:
    """The committer handed to run() holds the Volume; with 2 processes it must still see every checkpoint."""
    cfg = compose(DDP + ["train.max_steps=4", "ckpt.every=2", f"run.root={tmp_path}"])
    recorder = CheckpointCommitRecorder(tmp_path / "tiny" / "checkpoints")
    run(cfg, recorder)
    complete_at_commit = [{name for name, problem in seen.items() if problem is None} for seen in recorder.seen]
    assert {"step-000002"} in complete_at_commit  # committed as soon as it was complete
    assert complete_at_commit[-1] == {"step-000002", "step-000004"}  # and once more at exit
    assert read_status(tmp_path / "tiny")["state"] == "completed"


@pytest.mark.slow
def test_workers_train_the_parents_exact_config(tmp_path) -> None:
    """A config changed in code (as the Modal entry or a sweeper may) is what every process trains."""
    cfg = compose(DDP + ["train.max_steps=3", "ckpt.every=3", f"run.root={tmp_path}", "optim.warmup_ratio=0"])
    cfg.optim.lr = 0.0123  # not expressible as a command-line override of this process
    run(cfg)
    saved = yaml.safe_load((tmp_path / "tiny" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.0123
    lrs = [m["lr"] for m in read_metrics(tmp_path / "tiny") if "lr" in m]
    schedule = CosineWithWarmup(warmup=0, total=3, min_lr_ratio=0.0)
    assert lrs == pytest.approx([0.0123 * schedule(step) for step in (1, 2, 3)])


def test_debug_wins_whatever_its_place_on_the_command_line() -> None:
    a = compose(["+experiment=noesis", "+debug=gpu"])
    b = compose(["+debug=gpu", "+experiment=noesis"])
    assert a == b
    assert a.distributed.num_processes == 1 and a.train.global_batch_size == 8 and a.train.max_steps == 20


def test_the_cli_applies_debug_last_too(tmp_path) -> None:
    printed = run_cli(["+debug=gpu", "+experiment=noesis", "--cfg", "job", "-p", "train"])
    assert printed.returncode == 0, printed.stderr[-3000:]
    train = yaml.safe_load(printed.stdout)
    assert train["global_batch_size"] == 8 and train["max_steps"] == 20


def test_a_debug_run_never_uses_the_production_run_dir() -> None:
    production, debug = typed(["+experiment=noesis"]), typed(["+experiment=noesis", "+debug=cpu"])
    assert RunDir.of(production.run).path.name == "noesis" and RunDir.of(debug.run).path.name == "noesis-debug"


@pytest.mark.slow
def test_a_sweep_survives_a_failing_job_and_reports_it(tmp_path) -> None:
    """The task raises instead of exiting: the next job still runs, and the failure is named per job."""
    good = tmp_path / "good.jsonl"
    good.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
            )
            + "\n"
            for i in range(60)
        )
    )
    result = run_cli(
        [
            "--multirun",
            "+experiment=tiny",
            "train.max_steps=2",
            "ckpt.every=1",
            f"data.path={tmp_path / 'missing.jsonl'},{good}",
            f"run.root={tmp_path / 'runs'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ]
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "job 0 (" in result.stderr and "missing.jsonl does not exist" in result.stderr
    states = {
        p.name.split("path-")[1]: read_status(p)["state"]  # tiny-path-missing.jsonl: the file names it
        for p in (tmp_path / "runs").iterdir()
        if (p / "status.json").is_file()
    }
    assert sorted(states.values()) == ["completed", "failed"]  # the second job ran after the first failed


@pytest.mark.slow
def test_a_sweep_on_the_modal_launcher_returns_each_jobs_held_out_loss(tmp_path) -> None:
    """`noesis-train -m ... hydra/launcher=modal`, its jobs run as local processes: same requests as on Modal."""
    result = run_cli(
        [
            "--multirun",
            "+experiment=tiny",
            "train.max_steps=2",
            "ckpt.every=1",
            "optim.lr=0.001,0.002",
            f"run.root={tmp_path}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra/launcher=modal",
            "hydra.launcher.backend=local",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in tmp_path.iterdir() if (p / "status.json").is_file())
    assert runs == ["tiny-lr0.001", "tiny-lr0.002"]  # a stable dir per job, named by what the sweep varies
    # The two jobs ran side by side: each line of theirs carries the job's name.
    assert "[lr0.001] " in result.stdout + result.stderr and "[lr0.002] " in result.stdout + result.stderr
    for name in runs:
        status = read_status(tmp_path / name)
        assert status["state"] == "completed" and status["eval_loss_after"] is not None
