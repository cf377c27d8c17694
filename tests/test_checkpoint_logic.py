"""The checkpoint manager's decisions, in-process and in milliseconds: when to save, what to keep, what to resume.

A stand-in accelerator writes two small files where Accelerate's `save_state` writes the model and
optimizer, so the manager's own logic (interval and stop reasons, atomic rename, manifest, pruning,
commits, resume selection) runs without a model. The end-to-end crash and resume runs that prove the
same decisions through a real training process are in tests/test_checkpoint.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import typed

from noesis_accel.core.errors import ResumeError
from noesis_accel.rundir.checkpoint import MANIFEST, CheckpointManager, checkpoint_problem
from noesis_accel.rundir.layout import RunDir, json_lines
from noesis_accel.rundir.logrestore import restore_cut_events, restore_cut_metrics
from noesis_accel.training.strategies.fsdp2 import Fsdp2
from noesis_accel.training.strategies.single import Single
from noesis_accel.training.strategies.zero2 import Zero2


class OneProcessAccelerator:
    """What the manager asks of Accelerate on one process; `save_state` writes stand-in files."""

    is_main_process = is_local_main_process = True
    num_processes = 1
    distributed_type = "NO"

    def save_state(self, output_dir: str) -> None:
        target = Path(output_dir)
        target.mkdir(parents=True, exist_ok=True)
        (target / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        (target / "optimizer.bin").write_bytes(b"moments" * 100)

    def wait_for_everyone(self) -> None:
        pass


class SecondMachineAccelerator(OneProcessAccelerator):
    """The local main process of a machine other than the first."""

    is_main_process = False


class RecordingCommitter:
    """What was the newest complete checkpoint at each commit, and which partial ones lay beside it."""

    def __init__(self, checkpoints: Path) -> None:
        self.checkpoints = checkpoints
        self.seen: list[tuple[str, str | None, list[str]]] = []

    def commit(self) -> None:
        newest = max(p for p in self.checkpoints.iterdir() if not p.name.endswith(".tmp"))
        partials = sorted(p.name for p in self.checkpoints.glob("*.tmp"))
        self.seen.append((newest.name, checkpoint_problem(newest), partials))


def _manager(run_dir: Path, total_steps: int, **ckpt: Any) -> CheckpointManager:
    overrides: dict[Any, Any] = {"commit_backoff_s": 0, **ckpt}
    run_cfg = typed(["+experiment=tiny"])
    cfg = replace(run_cfg.ckpt, **overrides)
    return CheckpointManager(
        OneProcessAccelerator(),
        RunDir(run_dir),
        cfg,
        total_steps,
        config_fingerprint="abc",
        committer=RecordingCommitter(run_dir / "checkpoints"),
        state=Single(run_cfg),
        loss_normalization="tokens",
    )


def _train(manager: CheckpointManager, steps: range) -> list[tuple[int, str]]:
    """Save after every step the manager says is due, as the trainer does; the (step, reason) of each save."""
    saved = []
    for step in steps:
        reason = manager.due(step, signal_received=False, minutes_due=False)
        if reason is not None:
            manager.save(step, reason, {"total_steps": manager.total_steps})
            saved.append((step, reason))
    return saved


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_the_reason_to_save_after_a_step() -> None:
    manager = _manager(Path("/nonexistent/run"), total_steps=20, every=0.25)
    assert manager.interval == 5
    assert [manager.due(s, False, False) for s in (1, 4, 5, 10, 19, 20)] == [
        None,
        None,
        "interval",
        "interval",
        None,
        "final",
    ]
    assert manager.due(3, signal_received=True, minutes_due=False, deadline_due=True) == "signal"  # signal first
    assert manager.due(3, False, False, deadline_due=True) == "deadline"
    assert manager.due(20, False, False, deadline_due=True) == "final"  # the last step is a normal end
    assert manager.due(3, False, minutes_due=True) == "interval"


def test_every_tenth_is_saved_complete_committed_after_its_rename_and_pruned(tmp_path) -> None:
    manager = _manager(tmp_path, total_steps=20, every=0.1, keep_last=3)
    saved = _train(manager, range(1, 21))
    assert saved == [(s, "interval") for s in range(2, 20, 2)] + [(20, "final")]
    assert isinstance(manager.committer, RecordingCommitter)
    seen = manager.committer.seen
    assert [name for name, _, _ in seen] == [f"step-{s:06d}" for s in range(2, 21, 2)]
    assert all(problem is None and partials == [] for _, problem, partials in seen)
    assert _names(tmp_path) == ["step-000016", "step-000018", "step-000020"]
    reasons = [json.loads((tmp_path / "checkpoints" / n / MANIFEST).read_text())["reason"] for n in _names(tmp_path)]
    assert reasons == ["interval", "interval", "final"]


def _train_logging(manager: CheckpointManager, run_dir: Path, steps: range) -> None:
    """`_train`, with a metrics record each step and an event each save, as the trainer writes them."""
    rundir = RunDir(run_dir)
    for step in steps:
        with rundir.metrics_file.open("a") as handle:
            handle.write(json.dumps({"step": step, "loss": 10.0 - step / 10}) + "\n")
        if _train(manager, range(step, step + 1)):
            with rundir.events_file.open("a") as handle:
                handle.write(json.dumps({"event": "checkpoint", "step": step}) + "\n")


def test_each_checkpoint_keeps_the_logs_and_a_start_restores_one_cut_short(tmp_path, caplog) -> None:
    manager = _manager(tmp_path, total_steps=8, every=0.25, keep_last=5)
    _train_logging(manager, tmp_path, range(1, 8))  # saves at 2, 4, 6; killed after step 7
    rundir = RunDir(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    newest = checkpoints / "step-000006"
    files = json.loads((newest / MANIFEST).read_text())["files"]
    assert {"history/metrics.jsonl", "history/events.jsonl"} <= files.keys()  # under the manifest's checksums
    assert [r["step"] for r in json_lines(newest / "history" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    whole_events = rundir.events()

    # Cut short as a commit that died mid-copy leaves them: nothing, and a first line torn.
    rundir.metrics_file.write_bytes(b"")
    rundir.events_file.write_bytes(rundir.events_file.read_bytes()[:20])
    assert restore_cut_events(rundir)  # when the run is opened
    assert rundir.events() == whole_events[:2]  # the copy predates the event of its own save
    assert restore_cut_metrics(rundir, newest)  # from the checkpoint the resume loads
    assert [r["step"] for r in rundir.metrics()] == [1, 2, 3, 4, 5, 6]  # step 7 was never saved anywhere
    assert "metrics.jsonl held 0 of the 6 records checkpoint step-000006 kept" in caplog.text

    # events.jsonl: a copy its manifest does not vouch for is passed over for the longest one that is.
    rundir.events_file.write_bytes(b"")
    copy = newest / "history" / "events.jsonl"
    copy.write_bytes(copy.read_bytes().replace(b"checkpoint", b"checkpoinT"))
    assert restore_cut_events(rundir)
    assert rundir.events() == whole_events[:1]  # step-000004's copy

    # metrics.jsonl: only the loaded checkpoint's copy counts (a newer one may be another trajectory's),
    # and a log as long as it, or one that disagrees with it, is left as it is.
    rundir.metrics_file.write_text(json.dumps({"step": 1, "loss": 9.9}) + "\n")
    assert restore_cut_metrics(rundir, checkpoints / "step-000002")
    assert [r["step"] for r in rundir.metrics()] == [1, 2]
    assert not restore_cut_metrics(rundir, checkpoints / "step-000002")
    rundir.metrics_file.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert not restore_cut_metrics(rundir, newest)
    assert rundir.metrics() == [{"step": 1, "loss": 1.0}]

    # A checkpoint of another run dir (ckpt.resume=PATH) holds that run's curve: a new run starts its own.
    other = RunDir(tmp_path / "other")
    assert not restore_cut_metrics(other, newest)
    assert other.metrics() == []


def test_another_machine_lists_its_own_files_never_a_history_copy(tmp_path) -> None:
    """With several machines a checkpoint is written in place, and another machine's view of it can hold
    the history an earlier attempt committed there: the main process's listing alone names `history/`."""
    manager = _manager(tmp_path, total_steps=4, every=0.5)
    target = tmp_path / "checkpoints" / "step-000002"
    (target / "history").mkdir(parents=True)
    (target / "history" / "events.jsonl").write_text("an earlier attempt's\n")
    (target / "pytorch_model_fsdp_1.bin").write_bytes(b"this machine's shard")
    assert set(manager._listing(target)) == {"history/events.jsonl", "pytorch_model_fsdp_1.bin"}
    manager.accelerator = SecondMachineAccelerator()
    assert set(manager._listing(target)) == {"pytorch_model_fsdp_1.bin"}


def test_pruning_drops_damaged_older_ones_and_never_the_newest_complete_or_a_save_in_progress(tmp_path) -> None:
    manager = _manager(tmp_path, total_steps=8, every=0.25, keep_last=3)
    _train(manager, range(1, 7))  # steps 2, 4, 6
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-000004" / "optimizer.bin").unlink()  # damaged, older than the newest complete
    (checkpoints / "step-000008.tmp").mkdir()  # a save in progress
    manager.prune()
    assert _names(tmp_path) == ["step-000002", "step-000006", "step-000008.tmp"]
    # The newest damaged: kept (nothing complete is newer), and the newest complete one stays too.
    (checkpoints / "step-000006" / "model.safetensors").write_bytes(b"short")
    manager.cfg.keep_last = 1
    manager.prune()
    assert _names(tmp_path) == ["step-000002", "step-000006", "step-000008.tmp"]


def test_resume_auto_takes_the_newest_complete_and_skips_damaged_ones(tmp_path, caplog) -> None:
    manager = _manager(tmp_path, total_steps=8, every=0.25, keep_last=5)
    _train(manager, range(1, 9))
    newest = tmp_path / "checkpoints" / "step-000008"
    victim = newest / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF  # same size: only the checksum finds it
    victim.write_bytes(bytes(data))
    chosen = manager.select_for_resume("auto")
    assert chosen is not None and chosen.step == 6 and chosen.manifest["reason"] == "interval"
    assert f"skipping checkpoint {newest}: model.safetensors" in caplog.text
    assert _manager(tmp_path / "empty", total_steps=8).select_for_resume("auto") is None


def test_resume_never_and_explicit_paths_refuse_what_would_mix_runs(tmp_path) -> None:
    manager = _manager(tmp_path, total_steps=8, every=0.25, keep_last=5)
    assert _manager(tmp_path, total_steps=8).select_for_resume("never") is None  # nothing saved yet
    _train(manager, range(1, 9))
    with pytest.raises(ResumeError, match="ckpt.resume=never but .* already holds checkpoints"):
        manager.select_for_resume("never")
    with pytest.raises(ResumeError, match="cannot resume from it: no such directory"):
        manager.select_for_resume(str(tmp_path / "nowhere"))
    with pytest.raises(ResumeError, match=r"already holds later checkpoints \(step-000008, step-000006\)"):
        manager.select_for_resume(str(tmp_path / "checkpoints" / "step-000004"))
    elsewhere = _manager(tmp_path / "other", total_steps=8)
    chosen = elsewhere.select_for_resume(str(tmp_path / "checkpoints" / "step-000004"))
    assert chosen is not None and chosen.step == 4


def test_a_checkpoint_from_other_math_another_format_or_another_zero_world_is_refused_by_name(tmp_path) -> None:
    manager = _manager(tmp_path, total_steps=8, every=0.25)
    _train(manager, range(1, 3))
    checkpoint = manager.select_for_resume("auto")
    assert checkpoint is not None
    manager.check_compatible(checkpoint)  # its own config, its own format: fine
    manager.config_fingerprint = "other"
    with pytest.raises(ResumeError, match="different training config .*fingerprint abc != other"):
        manager.check_compatible(checkpoint)
    manager.config_fingerprint, manager.state = "abc", Zero2(typed(["distributed=zero2"]))
    with pytest.raises(
        ResumeError,
        match="holds whole trainable weights .* and distributed=zero2 reads ZeRO-2 engine files.*"
        "resume it with distributed=ddp or single",
    ):
        manager.check_compatible(checkpoint)
    # A ZeRO checkpoint of 2 processes met by 1: refused, or continued with fresh moments on request.
    zero = checkpoint.__class__(checkpoint.path, checkpoint.step, {**checkpoint.manifest, "world_size": 2})
    with pytest.raises(ResumeError, match=r"written by 2 DeepSpeed process\(es\) and this run has 1.*num_processes=2"):
        manager._reset_optimizer(zero)
    manager.cfg.on_world_size_change = "reset_optimizer"
    assert manager._reset_optimizer(zero) is True
    # Whole optimizer state, or DCP's global layout: any count continues them (moments reset only on request).
    manager.cfg.on_world_size_change = "refuse"
    for resharding in (Single(typed([])), Fsdp2(typed(["distributed=fsdp2"]))):
        manager.state = resharding
        assert manager._reset_optimizer(zero) is False


def test_a_commit_still_running_when_its_time_is_up_is_given_up_on_and_the_next_waits_for_it() -> None:
    """A Volume commit that hangs must not hold a stop past Modal's grace; it goes on in the background,
    and a later commit does not start over it."""
    import threading

    from noesis_accel.rundir.volumes import CommitStillRunning, commit_within

    class Slow:
        def __init__(self) -> None:
            self.release, self.done = threading.Event(), []

        def commit(self) -> None:
            self.release.wait(10)
            self.done.append(True)

    slow = Slow()
    with pytest.raises(CommitStillRunning, match="still running after 0 s"):
        commit_within(slow, 0.2)
    with pytest.raises(CommitStillRunning, match="an earlier commit is still running"):
        commit_within(slow, 0.1)  # the first one has not finished: no second commit over it
    slow.release.set()
    commit_within(slow, 5.0)  # waits for the first, then commits again
    assert slow.done == [True, True]


def test_a_held_out_pass_gives_up_at_the_next_batch_when_asked_to_stop() -> None:
    from noesis_accel.training.losses import heldout_loss, heldout_loss_unless_stopped

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.batches = 0

        def forward(self, input_ids, labels=None, **_):
            self.batches += 1
            return type("Out", (), {"loss": torch.tensor(float(input_ids.sum()))})()

    rows = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "length": 4, "label_count": 3} for _ in range(6)]
    dataset = {"length": [4] * 6}

    class Rows(dict):
        def __getitem__(self, key):
            return dataset[key] if isinstance(key, str) else rows[key]

    def collate(batch):
        return {k: torch.tensor([row[k] for row in batch]) for k in ("input_ids", "labels")}

    model = Model()
    full = heldout_loss(model, Rows(), collate, 2, "cpu")
    assert model.batches == 3 and full > 0
    asked: list[bool] = []

    def stop_after_one() -> bool:
        asked.append(True)
        return len(asked) > 1

    model.batches = 0
    assert heldout_loss_unless_stopped(model, Rows(), collate, 2, "cpu", stop=stop_after_one) is None
    assert model.batches == 1  # the batch under way finished; the next one never started
    model.batches = 0
    assert heldout_loss_unless_stopped(model, Rows(), collate, 2, "cpu", stop=lambda: False) == full
