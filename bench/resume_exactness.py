"""Kill a run with SIGKILL mid-training, restart it, and compare with uninterrupted runs bit for bit.

    python bench/resume_exactness.py +experiment=tiny                          # CPU
    python bench/resume_exactness.py --kill-step 7 distributed=zero2 optim=adamw8bit train.mixed_precision=bf16 ...

Two uninterrupted reference runs first show whether the platform is deterministic at all (GPU
kernels may not be); then a run is SIGKILLed after `--kill-step` and restarted with the same
command. Printed: the resume step, the largest difference of the final trainable weights and of
the per-step losses after the resume point, for resumed-vs-reference and reference-vs-reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


def _train(overrides: list[str], root: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if fault:
        env["NOESIS_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "noesis_accel.processes.train", *overrides, f"run.root={root}", "run.name=r"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else run_dir / "model" / "model.safetensors"))


def compare(a: Path, b: Path, after_step: int) -> dict[str, float]:
    wa, wb = _weights(a), _weights(b)
    weight_diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    la, lb = _losses(a), _losses(b)
    loss_diff = max(abs(la[s] - lb[s]) for s in la if s > after_step)
    bitwise = all(torch.equal(wa[k], wb[k]) for k in wa) and all(la[s] == lb[s] for s in la if s > after_step)
    return {"max_weight_diff": weight_diff, "max_loss_diff": loss_diff, "bitwise_equal": bitwise}


def check(overrides: list[str], kill_step: int, workdir: Path) -> dict:
    for name in ("ref_a", "ref_b"):
        result = _train(overrides, workdir / name)
        if result.returncode != 0:
            raise SystemExit(f"reference run failed:\n{result.stderr[-4000:]}")
    crashed = _train(overrides, workdir / "crash", fault=f"step:{kill_step}")
    resumed = _train(overrides, workdir / "crash")
    if resumed.returncode != 0:
        raise SystemExit(f"resumed run failed:\n{resumed.stderr[-4000:]}")
    line = next(text for text in resumed.stdout.splitlines() if "resumed from" in text)
    resume_step = int(line.split("at step ")[1].split("/")[0])
    return {
        "kill_step": kill_step,
        "crash_exit_code": crashed.returncode,
        "resume_step": resume_step,
        "resumed_vs_reference": compare(workdir / "crash" / "r", workdir / "ref_a" / "r", resume_step),
        "reference_vs_reference": compare(workdir / "ref_b" / "r", workdir / "ref_a" / "r", 0),
        "overrides": overrides,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-step", type=int, default=7)
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = args.overrides or ["+experiment=tiny", "train.max_steps=12", "ckpt.every=0.25"]
    with tempfile.TemporaryDirectory() as tmp:
        report = check(overrides, args.kill_step, Path(tmp))
    print(json.dumps(report, indent=2))
    verdict = report["resumed_vs_reference"]["bitwise_equal"]
    print(
        f"killed at step {report['kill_step']}, resumed at {report['resume_step']}: "
        f"{'BITWISE EQUAL' if verdict else 'DIFFERENT'} to the uninterrupted run "
        f"(platform determinism: reference vs reference bitwise={report['reference_vs_reference']['bitwise_equal']})"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
