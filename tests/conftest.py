"""Shared fixtures: the real config composed from conf/, a tiny model, local data only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from noesis_accel.config import compose
from noesis_accel.core import deprecations

# A deprecated API that our code calls is an error here, in this process and every process a test
# starts (they inherit the variable); the libraries' own deprecations are listed in core/deprecations.py.
os.environ[deprecations.ENV] = "error"
deprecations.apply_policy()

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "noesis_accel" / "assets" / "noesis_sample.jsonl"


def pytest_collection_finish(session: pytest.Session) -> None:
    # mypy runs for about a minute on one core: when its test is selected it starts now, beside the others.
    if any(item.name == "test_mypy_is_clean" for item in session.items):
        import test_tooling

        test_tooling.start_mypy()


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """The tiny experiment in a fresh run root: a 2-layer model, seconds per run."""
    return ["+experiment=tiny", f"run.root={tmp_path / 'runs'}"]


@pytest.fixture
def tiny_cfg(tiny_overrides: list[str]):
    return compose(tiny_overrides)


# The 12-step tiny run the Modal tests kill, signal and restart (tests/test_modal_sim.py, test_modal_runtime.py).
MODAL_TINY = ["+experiment=tiny", "train.max_steps=12", "ckpt.every=0.25", "train.eval_every=0", "modal.secret=null"]


@pytest.fixture(scope="session")
def modal_tiny_reference(tmp_path_factory) -> Path:
    """MODAL_TINY trained once, uninterrupted, as a plain local run: what every interrupted Modal run must equal."""
    return uninterrupted_run(tmp_path_factory.mktemp("modal-reference"), MODAL_TINY)


# Two processes: one machine with two ranks, or two machines with one each (the same global batch and data order).
MODAL_TINY_DDP = MODAL_TINY + ["distributed=ddp", "distributed.num_processes=2"]


@pytest.fixture(scope="session")
def modal_tiny_ddp_reference(tmp_path_factory) -> Path:
    """MODAL_TINY_DDP trained once, uninterrupted: what every interrupted two-process or cluster run must equal."""
    return uninterrupted_run(tmp_path_factory.mktemp("modal-ddp-reference"), MODAL_TINY_DDP)


# DeepSpeed ZeRO-2 with bitsandbytes AdamW8bit (r=64: LoRA matrices large enough for 8-bit state), 8 steps.
ZERO2_STEPS = 8
ZERO2 = [
    "+experiment=tiny",
    f"train.max_steps={ZERO2_STEPS}",
    "ckpt.every=0.25",
    "train.eval_every=0",
    "distributed=zero2",
    "optim=adamw8bit",
    "peft.r=64",
    "peft.alpha=128",
]


@pytest.fixture(scope="session")
def zero2_two_process_reference(tmp_path_factory) -> Path:
    """ZERO2 on two processes, uninterrupted, once: tests/test_zero2.py's reference and the ZeRO-2 checkpoints
    tests/test_after_training.py exports. Read-only for them."""
    root = tmp_path_factory.mktemp("zero2_ref")
    result = run_cli(ZERO2 + ["distributed.num_processes=2", f"run.root={root}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu, DistributedType.DEEPSPEED" in result.stdout  # really 2 ranks, not 2 x rank 0
    return root / "tiny"


@pytest.fixture(scope="session")
def demo_result(tmp_path_factory):
    """The real demo (SmolLM2-135M-Instruct + LoRA on the CPU), trained once for every slow test that reads it.

    Minutes on a CPU: the slow tests of test_demo.py and test_after_training.py share this one run
    instead of each training their own. Read-only for them, apart from eval/ and export/ beside it.
    """
    from noesis_accel.processes.train import run

    root = tmp_path_factory.mktemp("demo")
    result = run(compose(["+experiment=demo", f"run.root={root}", "train.progress_bar=false", "train.tracker=none"]))
    assert result.state == "completed"
    return result


def run_cli(
    args: list[str], timeout: int = 600, env: dict | None = None, module: str = "noesis_accel.processes.train"
) -> subprocess.CompletedProcess:
    """`python -m noesis_accel.processes.train ARGS` (or another `module`) in a subprocess, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def uninterrupted_run(root: Path, overrides: list[str]) -> Path:
    """Train `overrides` without interruption under `root`; the run dir, for comparison with an interrupted run."""
    result = run_cli(overrides + [f"run.root={root}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "tiny"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_records(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer number {i}."},
            ]
        }
        for i in range(n)
    ]
