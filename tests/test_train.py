"""The loop end to end on the tiny model: one process, and 2-process CPU DDP against 1 process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers import step_losses
from safetensors.torch import load_file

from noesis_accel.processes.train import run
from noesis_accel.rundir.history import read_status
from noesis_accel.rundir.layout import RunDir
from noesis_accel.training.metrics import read_metrics


def test_tiny_run_trains_and_writes_everything(tiny_cfg) -> None:
    result = run(tiny_cfg)
    run_dir = result.run_dir
    assert result.state == "completed" and result.step == 20
    assert result.eval_loss_after < result.eval_loss_before
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "tokenizer.json").is_file()
    assert (run_dir / "config.yaml").is_file()
    status = read_status(run_dir)
    assert status["state"] == "completed" and status["step"] == 20
    metrics = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all({"lr", "tokens_per_s", "grad_norm"} <= m.keys() for m in metrics)
    # Warmup then cosine: the lr peaks early and ends near zero.
    lrs = [m["lr"] for m in metrics]
    assert max(lrs) == pytest.approx(tiny_cfg.optim.lr, rel=0.05) and lrs[-1] < 0.05 * max(lrs)


@pytest.mark.slow
def test_restarting_a_completed_run_does_nothing(tiny_overrides) -> None:
    first = run_cli(tiny_overrides + ["train.max_steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli(tiny_overrides + ["train.max_steps=4"])
    assert again.returncode == 0
    assert "already completed at step 4; nothing to do" in again.stdout


@pytest.mark.slow
def test_restart_with_changed_math_is_refused_listing_keys(tiny_overrides) -> None:
    first = run_cli(tiny_overrides + ["train.max_steps=4", "ckpt.every=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    status_file = Path(tiny_overrides[1].split("=", 1)[1]) / "tiny" / "status.json"
    status = json.loads(status_file.read_text())
    status["state"] = "interrupted"  # pretend it died, so the restart tries to resume
    status_file.write_text(json.dumps(status))
    changed = run_cli(tiny_overrides + ["train.max_steps=4", "optim.lr=0.5", "train.seed=7", "ckpt.every=1"])
    assert changed.returncode == 2
    assert "optim.lr: 0.001 -> 0.5" in changed.stderr and "train.seed: 42 -> 7" in changed.stderr
    assert "ckpt.every" not in changed.stderr  # cadence may change
    assert "Traceback" not in changed.stderr


def _losses(run_dir: Path) -> list[float]:
    return list(step_losses(run_dir).values())


@pytest.mark.slow  # two full runs, one of two processes; the fast suite trains two processes in test_foundation.py
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    """8 = 4 x 2 accumulation x 1 process against 8 = 4 x 1 x 2 processes (gloo).

    Same samples per optimizer step (the sampler plans global batches), same init, no dropout:
    only the floating-point order of the gradient reduction differs. Tolerance: 1e-4 relative
    on every step's loss and 1e-4 absolute on the final LoRA weights (float32).
    """
    common = ["+experiment=tiny", "train.max_steps=8", "peft.dropout=0", "ckpt.every=4", "train.eval_every=0"]
    single = run_cli(common + [f"run.root={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli(common + [f"run.root={tmp_path / 'two'}", "distributed=ddp", "distributed.num_processes=2"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es) on cpu, DistributedType.MULTI_CPU" in ddp.stdout
    one_losses, two_losses = _losses(tmp_path / "one" / "tiny"), _losses(tmp_path / "two" / "tiny")
    assert len(one_losses) == len(two_losses) == 8
    assert one_losses == pytest.approx(two_losses, rel=1e-4)
    one = load_file(str(tmp_path / "one" / "tiny" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "tiny" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-4)


# The slow suite: test_foundation.py's sweeps (a failing job, the Modal launcher) give each job its own run dir too.
@pytest.mark.slow
def test_multirun_sweep_gives_each_job_its_own_run_dir(tmp_path: Path) -> None:
    result = run_cli(
        [
            "--multirun",
            "+experiment=tiny",
            "train.max_steps=2",
            "ckpt.every=1",
            "optim.lr=0.001,0.002",
            f"run.root={tmp_path}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = sorted(p.name for p in tmp_path.iterdir() if (p / "status.json").is_file())
    assert len(run_dirs) == 2 and sorted(run_dirs) == ["tiny-lr0.001", "tiny-lr0.002"]
    assert all(read_status(tmp_path / d)["state"] == "completed" for d in run_dirs)


@pytest.mark.slow
def test_a_run_dir_without_checkpoints_takes_the_new_config(tmp_path) -> None:
    """A start that failed on bad data must not pin its config: nothing there is worth protecting."""
    from conftest import chat_records, write_jsonl

    bad = write_jsonl(tmp_path / "bad.jsonl", chat_records(60) + ["{not json"])
    good = write_jsonl(tmp_path / "good.jsonl", chat_records(60))
    command = ["+experiment=tiny", "train.max_steps=2", "ckpt.every=1", f"run.root={tmp_path / 'runs'}"]
    failed = run_cli(command + [f"data.path={bad}"])
    assert failed.returncode == 2 and "bad.jsonl:61" in failed.stderr
    fixed = run_cli(command + [f"data.path={good}"])
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "holds no complete checkpoint, so this start's config replaces" in fixed.stdout
    assert str(good) in (tmp_path / "runs" / "tiny" / "config.yaml").read_text()
    events = [e["event"] for e in RunDir(tmp_path / "runs" / "tiny").events()]
    assert events[-1] == "stop" and "start" in events and "checkpoint" in events
