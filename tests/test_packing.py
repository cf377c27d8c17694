"""Packed micro-batches (`data.packing=true`) train the same math as padded ones, and resume exactly.

The tiny model (eager attention, float32, no dropout) trains the same records padded and packed;
only the layout differs, so every difference is floating-point summation order. Tolerances:
per-step losses within 1e-6 relative; step-1 gradients within 2e-6 of each
tensor's largest entry (measured: 9e-8 and 1.7e-7).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_jsonl
from helpers import assert_same_adapter, typed

from noesis_accel.config import compose
from noesis_accel.processes.train import run
from noesis_accel.training.data import IGNORE_INDEX, PaddingCollator, label_count
from noesis_accel.training.metrics import read_metrics
from noesis_accel.training.modeling import build_model
from noesis_accel.training.packing import PackingCollator, build_collator, records_and_tokens

RECORDS = [
    {"input_ids": [11, 12, 13, 14, 15], "labels": [IGNORE_INDEX, IGNORE_INDEX, 13, 14, 15]},
    {"input_ids": [21, 22], "labels": [21, 22]},
    {"input_ids": [31, 32, 33], "labels": [IGNORE_INDEX, 32, 33]},
]
# Short and long answers side by side (no length buckets: mega_batch_factor=1), so padded
# micro-batches hold plenty of padding for the packed layout to drop.
COMMON = [
    "+experiment=tiny",
    "peft.dropout=0",
    "train.eval_every=0",
    "data.mega_batch_factor=1",
    "data.min_examples=1",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
]


def test_packing_collator_lays_records_end_to_end() -> None:
    batch = PackingCollator()(RECORDS)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: positions carry it
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15, 21, 22, 31, 32, 33]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2]]
    # Each record's first label is ignored: no token is trained to predict the next record.
    assert batch["labels"].tolist() == [[-100, -100, 13, 14, 15, -100, 22, -100, 32, 33]]
    assert records_and_tokens(batch) == (3, 10)
    padded = PaddingCollator(pad_token_id=0)(RECORDS)
    assert records_and_tokens(padded) == (3, 10)
    # The tokens that count in the loss (after the causal shift) are the padded batch's.
    counted = int((batch["labels"][0, 1:] != IGNORE_INDEX).sum())
    assert (
        counted
        == sum(label_count(r["labels"]) for r in RECORDS)
        == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    )


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_forward_matches_padded_per_record(attention: str) -> None:
    """Per-record logits and the summed token loss match the padded layout: attention never crosses records."""
    cfg = typed(["+experiment=tiny", f"model.attn_implementation={attention}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.peft, 256, device_is_cuda=False).eval()
    padded, packed = PaddingCollator(0)(RECORDS), PackingCollator()(RECORDS)
    with torch.no_grad():
        padded_out = model(**padded, num_items_in_batch=1)
        packed_out = model(**packed, num_items_in_batch=1)
    start = 0
    for i, record in enumerate(RECORDS):
        n = len(record["input_ids"])
        torch.testing.assert_close(
            packed_out.logits[0, start : start + n], padded_out.logits[i, :n], rtol=1e-5, atol=1e-5
        )
        start += n
    assert float(packed_out.loss) == pytest.approx(float(padded_out.loss), rel=1e-6)


def _varied_lengths(path: Path) -> Path:
    rng = random.Random(5)
    words = ("the model answers questions about checkpoints volumes and batches with care").split()
    records = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {
                    "role": "assistant",
                    "content": " ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 10, 30, 60]))),
                },
            ]
        }
        for i in range(40)
    ]
    return write_jsonl(path, records)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return _varied_lengths(tmp_path_factory.mktemp("data") / "varied.jsonl")


def _train(root: Path, data_path: Path, packing: bool, monkeypatch, steps: int = 3) -> tuple:
    probe = root / "grads.pt"
    monkeypatch.setenv("NOESIS_PROBE_GRADS", str(probe))
    cfg = compose(
        COMMON
        + [
            f"data.path={data_path}",
            f"run.root={root}",
            f"train.max_steps={steps}",
            f"ckpt.every={steps}",
            "data.eval_fraction=0",
            f"data.packing={packing}",
        ]
    )
    result = run(cfg)
    return result, torch.load(probe), [m for m in read_metrics(root / "tiny") if "loss" in m]


def test_packed_run_matches_padded_run(tmp_path, data_path, monkeypatch) -> None:
    padded, padded_grads, padded_metrics = _train(tmp_path / "padded", data_path, False, monkeypatch)
    packed, packed_grads, packed_metrics = _train(tmp_path / "packed", data_path, True, monkeypatch)
    assert packed.losses == pytest.approx(padded.losses, rel=1e-6)
    assert packed_grads.keys() == padded_grads.keys()
    assert any(g.abs().max() > 0 for g in padded_grads.values())
    for name, expected in padded_grads.items():
        difference = float((packed_grads[name] - expected).abs().max())
        assert difference <= 2e-6 * max(float(expected.abs().max()), 1e-12), (name, difference)
    # Same records, same real tokens: the counters agree; only the padded run paid for padding.
    for a, b in zip(padded_metrics, packed_metrics):
        assert (a["samples_seen"], a["tokens_seen"]) == (b["samples_seen"], b["tokens_seen"])


@pytest.mark.slow
def test_packed_run_killed_and_resumed_is_bitwise_exact(tmp_path, data_path, monkeypatch) -> None:
    monkeypatch.delenv("NOESIS_PROBE_GRADS", raising=False)
    command = COMMON + [
        f"data.path={data_path}",
        "train.max_steps=4",
        "ckpt.every=2",
        "data.eval_fraction=0",
        "data.packing=true",
    ]
    reference = run(compose(command + [f"run.root={tmp_path / 'reference'}"]))
    crashed = run_cli(command + [f"run.root={tmp_path / 'crash'}"], env={"NOESIS_FAULT": "step:3"})
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    resumed = run(compose(command + [f"run.root={tmp_path / 'crash'}"]))
    assert resumed.losses == reference.losses[2:]  # resumed from step 2: steps 3 and 4, exactly
    assert_same_adapter(tmp_path / "crash" / "tiny", tmp_path / "reference" / "tiny")


def test_build_collator_follows_the_config() -> None:
    assert isinstance(build_collator(typed(["data.packing=true"]).data, 0), PackingCollator)
    assert isinstance(build_collator(typed([]).data, 0), PaddingCollator)
