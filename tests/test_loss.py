"""The loss of a global batch does not depend on how it is split into micro-batches, steps and processes.

The same 16 variable-length examples form the first global batch of every run below (the sampler
plans global batches from the seed alone, and `data.mega_batch_factor=1` makes that batch a random
draw of lengths rather than a length bucket). Each run saves the reduced gradients of its first
optimizer step before clipping (`NOESIS_PROBE_GRADS`), and logs the step's loss.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_jsonl

from noesis_accel.training.metrics import read_metrics

GLOBAL = 16
COMMON = [
    "+experiment=tiny",
    "train.max_steps=1",
    "peft.dropout=0",
    "train.eval_every=0",
    "ckpt.every=1",
    f"train.global_batch_size={GLOBAL}",
    "data.mega_batch_factor=1",
    "data.min_examples=1",
    "data.eval_fraction=0",
]


def _varied_lengths(path: Path) -> Path:
    """Answers from one word to a few hundred: a micro-batch of short ones weighs its tokens differently."""
    rng = random.Random(3)
    words = ("the model answers questions about checkpoints volumes and batches with care").split()
    records = []
    for i in range(48):
        answer = " ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 5, 20, 60, 110])))
        records.append(
            {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}]}
        )
    return write_jsonl(path, records)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return _varied_lengths(tmp_path_factory.mktemp("data") / "varied.jsonl")


def _first_step(tmp_path: Path, data_path: Path, name: str, extra: list[str]) -> tuple[float, dict[str, torch.Tensor]]:
    probe = tmp_path / f"{name}.pt"
    result = run_cli(
        COMMON + [f"data.path={data_path}", f"run.root={tmp_path / name}", *extra],
        env={"NOESIS_PROBE_GRADS": str(probe)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loss = next(m["loss"] for m in read_metrics(tmp_path / name / "tiny") if m.get("step") == 1 and "loss" in m)
    return loss, torch.load(probe)


def _assert_same_gradients(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == reference.keys()
    assert any(g.abs().max() > 0 for g in reference.values())
    for name, expected in reference.items():
        scale = float(expected.abs().max())
        difference = float((grads[name] - expected).abs().max())
        assert difference <= 1e-5 * max(scale, 1e-12), (name, difference, scale)


@pytest.mark.slow
def test_single_process_splits_give_the_same_loss_and_gradients(tmp_path, data_path) -> None:
    reference_loss, reference = _first_step(tmp_path, data_path, "m16x1", ["train.micro_batch_size=16"])
    for micro in (4, 1):  # accumulation 4 and 16
        loss, grads = _first_step(tmp_path, data_path, f"m{micro}", [f"train.micro_batch_size={micro}"])
        assert loss == pytest.approx(reference_loss, rel=1e-6), micro
        _assert_same_gradients(grads, reference)


@pytest.mark.slow
def test_two_processes_give_the_same_loss_and_gradients_as_one(tmp_path, data_path) -> None:
    one_loss, one = _first_step(tmp_path, data_path, "one", ["train.micro_batch_size=4"])
    two_loss, two = _first_step(
        tmp_path, data_path, "ddp", ["train.micro_batch_size=2", "distributed=ddp", "distributed.num_processes=2"]
    )
    assert two_loss == pytest.approx(one_loss, rel=1e-6)
    _assert_same_gradients(two, one)


@pytest.mark.slow  # DeepSpeed on the CPU: with the other ZeRO-2 runs (tests/test_zero2.py) in the slow suite
def test_zero2_two_processes_give_the_same_loss_and_gradients_as_one(tmp_path, data_path) -> None:
    zero2 = ["distributed=zero2", "optim=adamw"]
    one_loss, one = _first_step(
        tmp_path, data_path, "z1", zero2 + ["distributed.num_processes=1", "train.micro_batch_size=4"]
    )
    two_loss, two = _first_step(
        tmp_path, data_path, "z2", zero2 + ["distributed.num_processes=2", "train.micro_batch_size=2"]
    )
    assert two_loss == pytest.approx(one_loss, rel=1e-6)
    _assert_same_gradients(two, one)


# The first losses of `+experiment=tiny` (global batch 8 = micro 4 x accumulation 2, dropout 0.1, seed 42),
# pinned: a change in the math (normalisation, masking, sampling, init, schedule) fails here even when
# two compared runs move together. Step 1 equals micro 8 x accumulation 1 (10.8003740 before the loss
# was token-weighted over the global batch; micro 4 x 2 then gave another value).
TINY_FIRST_LOSSES = [10.8003750, 10.8154602, 10.8020058, 10.7531662, 10.7416401, 10.6877728]
TINY_HELDOUT_BEFORE, TINY_HELDOUT_AFTER = 10.8008977, 10.6125765


def test_tiny_experiment_losses_are_pinned(tiny_cfg) -> None:
    from noesis_accel.processes.train import run

    result = run(tiny_cfg)
    assert result.losses[: len(TINY_FIRST_LOSSES)] == pytest.approx(TINY_FIRST_LOSSES, abs=2e-5)
    assert result.eval_loss_before == pytest.approx(TINY_HELDOUT_BEFORE, abs=2e-5)
    assert result.eval_loss_after == pytest.approx(TINY_HELDOUT_AFTER, abs=2e-5)


@pytest.mark.slow
def test_a_checkpoint_from_before_the_token_weighted_loss_resumes_with_a_warning(tmp_path) -> None:
    import json

    command = ["+experiment=tiny", "train.max_steps=4", "ckpt.every=2", f"run.root={tmp_path}"]
    stopped = run_cli(command, env={"NOESIS_FAULT": "term:2"})
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    manifest_path = tmp_path / "tiny" / "checkpoints" / "step-000002" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["loss_normalization"]  # as written before the change
    manifest["format"] = 1
    manifest_path.write_text(json.dumps(manifest))
    resumed = run_cli(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "resumed from" in output and "at step 2/4" in output
    assert "loss normalised as 'micro-batch mean (before format 2)'; continuing with" in output
