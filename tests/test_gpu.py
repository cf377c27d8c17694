"""GPU checks (skipped without CUDA): ZeRO-2 + AdamW8bit in bf16, killed and resumed, bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_zero2_adamw8bit_bf16_resume_is_exact_on_gpu(tmp_path) -> None:
    from resume_exactness import check

    report = check(
        [
            "+experiment=tiny",
            "train.device=auto",
            "train.max_steps=12",
            "ckpt.every=0.25",
            "distributed=zero2",
            "distributed.num_processes=1",
            "optim=adamw8bit",
            "train.mixed_precision=bf16",
            "train.global_batch_size=16",
            "train.micro_batch_size=4",
            "peft.r=64",
            "peft.alpha=128",
        ],
        kill_step=7,
        workdir=tmp_path,
    )
    assert report["resume_step"] == 6
    if report["reference_vs_reference"]["bitwise_equal"]:
        assert report["resumed_vs_reference"]["bitwise_equal"]
    else:  # non-deterministic kernels: the resumed run must be as close as two identical runs are
        assert (
            report["resumed_vs_reference"]["max_weight_diff"] <= 2 * report["reference_vs_reference"]["max_weight_diff"]
        )
