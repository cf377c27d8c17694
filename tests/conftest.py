"""Shared fixtures: the real config composed from conf/, a tiny model, local data only."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from filelock import FileLock

from noesis_accel.config import compose
from noesis_accel.core import deprecations

# pytest-xdist's worker name ("gw0", ...) when the suite runs on several processes (README command 2, .ci/run).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER is not None:
    # A worker per core: one thread each, and in every process they start (the variable is inherited).
    # With torch's default of a thread per core, two workers on 2 cores took 9.8 CPU-minutes for the
    # default suite instead of 6.3: threads waiting for the cores the other worker held.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# A deprecated API that our code calls is an error here, in this process and every process a test
# starts (they inherit the variable); the libraries' own deprecations are listed in core/deprecations.py.
os.environ[deprecations.ENV] = "error"
deprecations.apply_policy()

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")
SAMPLE = REPO / "noesis_accel" / "assets" / "noesis_sample.jsonl"


# Under `--dist loadfile` (pyproject.toml) a module's tests run whole on one worker, so its module-scoped
# runs train once; the session-scoped ones are built once for every worker (`once_per_session`). Modules
# are handed out in collection order: the longest first (measured; the demo module trains the demo run
# the others read), then the rest by size, so no worker is left alone with a long module at the end.
FIRST_MODULES = [
    "test_demo",
    "test_modal_runtime",
    "test_modal_sim",
    "test_after_training",
    "test_checkpoint",
    "test_fsdp2",
    "test_tooling",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if XDIST_WORKER is None:
        return
    sizes: dict[str, int] = {}
    for item in items:
        sizes[item.path.stem] = sizes.get(item.path.stem, 0) + 1

    def order(item: pytest.Item) -> tuple[int, int, str]:
        module = item.path.stem
        first = FIRST_MODULES.index(module) if module in FIRST_MODULES else len(FIRST_MODULES)
        return (first, -sizes[module], module)

    items.sort(key=order)  # stable: a module's tests keep their order (the same on every worker)


def pytest_collection_finish(session: pytest.Session) -> None:
    # mypy runs for about a minute on one core: when its test is selected it starts now, beside the others.
    # (Under xdist every worker collects every test; there the test starts it when it runs.)
    if XDIST_WORKER is None and any(item.name == "test_mypy_is_clean" for item in session.items):
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


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """`build(a fresh folder)` once per test session, even when several xdist workers ask for it: the first
    builds under a file lock, the others wait for it and read its pickled result."""
    if XDIST_WORKER is None:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / name  # the session's folder, above every worker's own
    result_file = shared / ".session-result.pickle"
    with FileLock(f"{shared}.lock"):
        if result_file.exists():
            return pickle.loads(result_file.read_bytes())
        shutil.rmtree(shared, ignore_errors=True)  # a worker's failed build: built again, from nothing
        shared.mkdir()
        result = build(shared)
        result_file.write_bytes(pickle.dumps(result))
        return result


@pytest.fixture(scope="session")
def modal_tiny_reference(tmp_path_factory) -> Path:
    """MODAL_TINY trained once, uninterrupted, as a plain local run: what every interrupted Modal run must equal."""
    return once_per_session(tmp_path_factory, "modal-reference", lambda root: uninterrupted_run(root, MODAL_TINY))


# Two processes: one machine with two ranks, or two machines with one each (the same global batch and data order).
MODAL_TINY_DDP = MODAL_TINY + ["distributed=ddp", "distributed.num_processes=2"]


@pytest.fixture(scope="session")
def modal_tiny_ddp_reference(tmp_path_factory) -> Path:
    """MODAL_TINY_DDP trained once, uninterrupted: what every interrupted two-process or cluster run must equal."""
    return once_per_session(
        tmp_path_factory, "modal-ddp-reference", lambda root: uninterrupted_run(root, MODAL_TINY_DDP)
    )


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

    def train(root: Path) -> Path:
        result = run_cli(ZERO2 + ["distributed.num_processes=2", f"run.root={root}"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 process(es) on cpu, DistributedType.DEEPSPEED" in result.stdout  # really 2 ranks, not 2 x rank 0
        return root / "tiny"

    return once_per_session(tmp_path_factory, "zero2_ref", train)


@pytest.fixture(scope="session")
def demo_result(tmp_path_factory):
    """The real demo (SmolLM2-135M-Instruct + LoRA on the CPU), trained once for every slow test that reads it.

    Minutes on a CPU: the slow tests of test_demo.py and test_after_training.py share this one run
    instead of each training their own. Read-only for them, apart from eval/ (test_after_training.py)
    and export/ (test_serving_export.py) beside it, each written by one test.
    """
    from noesis_accel.processes.train import run

    def train(root: Path):
        result = run(
            compose(["+experiment=demo", f"run.root={root}", "train.progress_bar=false", "train.tracker=none"])
        )
        assert result.state == "completed"
        return result

    return once_per_session(tmp_path_factory, "demo", train)


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
