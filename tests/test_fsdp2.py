"""FSDP2 (`distributed=fsdp2`) on 2 CPU processes (gloo): PyTorch's `fully_shard` with DCP checkpoints.

Proven here: 2 sharded processes track 1 unsharded process with the same global batch (LoRA and a full
fine-tune); a SIGKILL and a restart end bitwise equal to an uninterrupted run; a checkpoint written by
2 processes continues on 1 and the reverse with its optimizer state (resharded by DCP), where fresh
moments would differ; a held-out set that does not divide by the process count finishes; export and
eval read an fsdp2 run and its checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers import adapter_weights, assert_same_adapter, resumed_step, step_losses
from test_loss import TINY_HELDOUT_BEFORE  # one process's held-out loss of the untrained tiny model

from noesis_accel.rundir.history import read_status
from noesis_accel.rundir.layout import RunDir

STEPS = 8
FSDP2 = [
    "+experiment=tiny",
    f"train.max_steps={STEPS}",
    "ckpt.every=0.25",  # saves at steps 2, 4, 6, 8: a kill at step 5 resumes at 50%
    "train.eval_every=0",
    "peft.dropout=0",  # no per-rank dropout stream: runs on different process counts can agree
    "distributed=fsdp2",
]
TWO = ["distributed.num_processes=2"]
ONE = ["distributed.num_processes=1"]
# Float32 throughout; only the order in which the ranks' shares of a sum add up differs.
TRACKING = 1e-5


def _train(root: Path, extra: list[str], env: dict | None = None, expect_ok: bool = True):
    result = run_cli(FSDP2 + extra + [f"run.root={root}"], env=env)
    if expect_ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _assert_tracks(losses: dict[int, float], reference: dict[int, float], steps: range) -> float:
    """Every step's loss within TRACKING (relative) of the reference; the largest relative difference."""
    worst = 0.0
    for step in steps:
        difference = abs(losses[step] - reference[step]) / abs(reference[step])
        assert difference <= TRACKING, (step, losses[step], reference[step])
        worst = max(worst, difference)
    return worst


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory) -> Path:
    """The uninterrupted 2-process LoRA run; its first step's reduced gradients, gathered whole from the
    shards, are in probe_grads.pt beside it (NOESIS_PROBE_GRADS)."""
    root = tmp_path_factory.mktemp("fsdp2_ref")
    result = _train(root, TWO, env={"NOESIS_PROBE_GRADS": str(root / "probe_grads.pt")})
    assert "2 process(es) on cpu" in result.stdout and "distributed=fsdp2" in result.stdout
    checkpoint = root / "tiny" / "checkpoints" / "step-000004"
    assert sorted(p.name for p in (checkpoint / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "model.safetensors").exists()  # the weights live in the DCP shards only
    return root / "tiny"


def _killed_at_half(root: Path, processes: list[str]) -> Path:
    """The run SIGKILLed during step 5, after its step-4 checkpoint (50% of the run)."""
    crashed = _train(root, processes, env={"NOESIS_FAULT": "step:5"}, expect_ok=False)
    assert crashed.returncode != 0
    assert not (root / "tiny" / "checkpoints" / "step-000006").exists()
    return root / "tiny"


@pytest.fixture(scope="module")
def killed_on_two(tmp_path_factory) -> Path:
    return _killed_at_half(tmp_path_factory.mktemp("fsdp2_killed"), TWO)


def _resume_copy(killed: Path, root: Path, processes: list[str], extra: list[str] | None = None):
    """A copy of a killed run resumed on `processes`: its output and its run dir."""
    shutil.copytree(killed, root / "tiny")
    resumed = _train(root, processes + (extra or []))
    assert resumed_step(resumed.stdout) == 4
    assert read_status(root / "tiny")["state"] == "completed"
    return resumed, root / "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["lora", "none"])
def test_two_sharded_processes_track_one_process_with_the_same_global_batch(
    tmp_path, two_process_reference, peft: str
) -> None:
    """8 = 4 x 2 accumulation x 1 unsharded process against 8 = 4 x 1 x 2 FSDP2 processes, LoRA and full."""
    extra = [f"peft={peft}"]
    probe = tmp_path / "one_grads.pt"
    one = run_cli(
        FSDP2[:-1] + extra + ["distributed=single", f"run.root={tmp_path / 'one'}"],
        env={"NOESIS_PROBE_GRADS": str(probe)},
    )
    assert one.returncode == 0, one.stderr[-3000:]
    if peft == "lora":
        sharded_dir = two_process_reference
        # The first step's gradients too: each sharded gradient gathered whole equals the unsharded one.
        sharded, whole = torch.load(two_process_reference.parent / "probe_grads.pt"), torch.load(probe)
        assert sharded.keys() == whole.keys() and len(whole) > 0
        for name, expected in whole.items():
            assert float((sharded[name] - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), name
    else:
        _train(tmp_path / "two", extra + TWO)
        sharded_dir = tmp_path / "two" / "tiny"
        assert (sharded_dir / "model" / "model.safetensors").is_file()  # the gathered full model
    single, sharded = step_losses(tmp_path / "one" / "tiny"), step_losses(sharded_dir)
    assert sorted(single) == sorted(sharded) == list(range(1, STEPS + 1))
    worst = _assert_tracks(sharded, single, range(1, STEPS + 1))
    print(f"peft={peft}: largest relative loss difference over {STEPS} steps: {worst:.2e}")


@pytest.mark.slow
def test_sigkill_then_restart_ends_bitwise_equal_to_the_uninterrupted_run(
    tmp_path, killed_on_two, two_process_reference
) -> None:
    _, run_dir = _resume_copy(killed_on_two, tmp_path, TWO)
    assert_same_adapter(run_dir, two_process_reference)
    ours, reference = step_losses(run_dir), step_losses(two_process_reference)
    for step in range(5, STEPS + 1):
        assert ours[step] == reference[step], step  # every resumed step's loss is identical


@pytest.mark.slow
def test_a_checkpoint_continues_on_another_process_count_with_its_optimizer_state(
    tmp_path, killed_on_two, two_process_reference
) -> None:
    """Killed at 50% on 2 processes, resumed on 1 (and killed on 1, resumed on 2): the uninterrupted run's
    losses to TRACKING; the same resume with fresh optimizer moments misses them by far more."""
    reference = step_losses(two_process_reference)
    killed_on_one = _killed_at_half(tmp_path / "killed-on-1", ONE)
    runs = {}
    for name, killed, saved_by, then, extra in (
        ("2to1", killed_on_two, 2, ONE, []),
        ("1to2", killed_on_one, 1, TWO, []),
        ("2to1-reset", killed_on_two, 2, ONE, ["ckpt.on_world_size_change=reset_optimizer"]),
    ):
        resumed, run_dir = _resume_copy(killed, tmp_path / name, then, extra)
        carried = "optimizer moments started afresh" if extra else "optimizer state carried"
        assert f"a checkpoint written by {saved_by} ({carried}" in resumed.stdout
        start = [e for e in RunDir(run_dir).events() if e.get("event") == "start"][-1]
        assert (start["processes"], start["checkpoint_processes"]) == (3 - saved_by, saved_by)
        assert start["optimizer_reset"] is bool(extra)
        runs[name] = step_losses(run_dir)
    carried = [_assert_tracks(runs[name], reference, range(5, STEPS + 1)) for name in ("2to1", "1to2")]
    fresh = max(abs(runs["2to1-reset"][s] - reference[s]) / abs(reference[s]) for s in range(5, STEPS + 1))
    print(f"largest relative difference after resuming: carried {max(carried):.2e}, fresh moments {fresh:.2e}")
    assert fresh > 100 * max(max(carried), 1e-7)


def test_heldout_generation_and_after_training_work_with_sharded_weights(tmp_path) -> None:
    """18 held-out records in batches of 4 make 5 batches: 3 on one rank, 2 on the other. Each FSDP2 forward
    gathers weights from both ranks, so an unequal count left one waiting forever (bounded here). The sample
    answer is generated by both ranks together; the after-training evaluation gets a whole model."""
    short = ["train.max_steps=2", "train.eval_every=0.5", "ckpt.every=2"]

    result = run_cli(
        FSDP2
        + TWO
        + short
        + ["train.sample_prompt=Hello", "eval.after_training=true", "eval.max_new_tokens=4", f"run.root={tmp_path}"],
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sample: 'Hello' -> " in result.stdout
    status = read_status(tmp_path / "tiny")
    summary = (tmp_path / "tiny" / "eval" / "summary.json").read_text()
    # The padding batch is run, not counted: the held-out loss is one unsharded process's.
    assert status["eval_loss_before"] == pytest.approx(TINY_HELDOUT_BEFORE, abs=2e-5)
    # The evaluation after training scored the gathered model: its held-out loss is the trainer's.
    tuned = json.loads(summary)["models"]["tuned"]["heldout_loss"]
    assert tuned == pytest.approx(status["eval_loss_after"], abs=5e-5)


@pytest.mark.slow
def test_export_and_eval_read_an_fsdp2_run_and_its_checkpoints(tmp_path, two_process_reference) -> None:
    from transformers import AutoModelForCausalLM

    from noesis_accel.after import evaluate
    from noesis_accel.after.export import export_run
    from noesis_accel.after.runmodel import load_run_model, run_config, weights_source

    run_dir = RunDir(tmp_path / "tiny")
    shutil.copytree(two_process_reference, run_dir.path)
    ids = torch.tensor([[1, 520, 2040, 314, 346, 47]])
    for checkpoint in (None, "step-000008", "step-000004"):
        out = export_run(run_dir.path, checkpoint=checkpoint, out=tmp_path / f"export-{checkpoint}", log=lambda _: None)
        merged = AutoModelForCausalLM.from_pretrained(str(out))
        reference = load_run_model(run_config(run_dir), weights_source(run_dir, checkpoint)).model
        with torch.no_grad():
            ours, theirs = merged(ids).logits, reference(ids).logits
            with reference.disable_adapter():
                base = reference(ids).logits
        assert torch.allclose(ours, theirs, atol=1e-4) and not torch.allclose(ours, base, atol=1e-4), checkpoint
    # The last checkpoint's DCP shards hold exactly the final adapter's weights.
    final = adapter_weights(run_dir.path)
    from_checkpoint = load_run_model(run_config(run_dir), weights_source(run_dir, "step-000008")).model
    trained = {n: p for n, p in from_checkpoint.named_parameters() if "lora_" in n}
    assert len(trained) == len(final) > 0
    for name, tensor in final.items():
        match = next(p for n, p in trained.items() if n.replace(".default", "").endswith(name.split("model.", 1)[1]))
        assert torch.equal(match.detach(), tensor), name
    summary = evaluate.evaluate_run(run_dir.path, ["eval.prompts=null"])
    assert abs(summary["models"]["tuned"]["heldout_loss"] - read_status(run_dir.path)["eval_loss_after"]) < 5e-5
    summary = evaluate.evaluate_run(run_dir.path, ["eval.prompts=null", "checkpoint=step-000004"])
    assert summary["weights"] == "step-000004"
