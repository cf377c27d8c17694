"""Checkpoint cost: overhead at `ckpt.every=0.1` as % of training wall time, and restart latency.

    python bench/checkpoint.py                     # the demo (SmolLM2-135M + LoRA, CPU)
    python bench/checkpoint.py +experiment=tiny    # seconds, for a smoke run

1. Trains the run once with a checkpoint every 10% and times every save (save_state, manifest,
   fsync, rename, prune, commit) against the wall time of the whole training loop.
2. Restarts from an early and a late checkpoint in a fresh process and measures the time from the
   command's start to its first resumed optimizer step. Skipping consumed batches is an index,
   so the late restart must not take longer than the early one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from noesis_accel.config import compose, validate
from noesis_accel.training.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def train_and_time_saves(overrides: list[str]) -> tuple[float, list[float], Path, int]:
    trainer = Trainer.for_config(validate(compose(overrides)))
    save_times: list[float] = []
    save = trainer.checkpoints.save

    def timed_save(*args, **kwargs):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        path = save(*args, **kwargs)
        save_times.append(time.perf_counter() - started)
        return path

    trainer.checkpoints.save = timed_save  # type: ignore[method-assign]
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return wall, save_times, trainer.rundir.path, trainer.total_steps


def restart_latency(overrides: list[str], checkpoint: Path, root: Path) -> float:
    """Seconds from launching a resume of `checkpoint` to its first resumed optimizer step."""
    step = int(checkpoint.name.split("-")[1])
    run_dir = root / "restart"
    metrics = run_dir / "metrics.jsonl"
    command = [
        sys.executable,
        "-m",
        "noesis_accel.processes.train",
        *overrides,
        f"run.root={root}",
        "run.name=restart",
        f"ckpt.resume={checkpoint}",
    ]
    started = time.time()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        while process.poll() is None:
            if metrics.is_file():
                for line in metrics.read_text().splitlines():
                    record = json.loads(line)
                    if "loss" in record and record["step"] > step:
                        return record["time"] - started
            time.sleep(0.05)
        raise SystemExit(f"the restart exited ({process.returncode}) before its first step")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", default=["+experiment=demo"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overrides = [
            *args.overrides,
            "ckpt.every=0.1",
            "ckpt.keep_last=20",
            "train.tracker=none",
            "train.progress_bar=false",
            "train.eval_every=0",
            "train.sample_prompt=null",
        ]
        wall, saves, run_dir, total = train_and_time_saves(overrides + [f"run.root={root / 'train'}"])
        checkpoints = sorted((run_dir / "checkpoints").iterdir())
        early, late = checkpoints[0], checkpoints[-2]  # the last is the final one: nothing left to resume
        latencies = {c.name: restart_latency(overrides, c, root / f"resume-{c.name}") for c in (early, late)}
        size_mb = sum(f.stat().st_size for f in early.rglob("*") if f.is_file()) / 1e6
    overhead = 100 * sum(saves) / wall
    print(f"\ncheckpoint bench: {' '.join(args.overrides)}, {total} steps, every=0.1 -> {len(saves)} saves")
    print(f"{'training wall time':<34}{wall:>10.1f} s")
    print(
        f"{'time in checkpoints (all saves)':<34}{sum(saves):>10.2f} s   "
        f"(mean {sum(saves) / len(saves):.3f} s, {size_mb:.1f} MB each)"
    )
    print(f"{'checkpoint overhead':<34}{overhead:>10.2f} %   (target <= 2%)")
    for name, seconds in latencies.items():
        print(f"{'restart -> first step from ' + name:<34}{seconds:>10.1f} s")
    ratio = latencies[late.name] / latencies[early.name]
    print(f"late / early restart latency: {ratio:.2f}x  (must not grow with the step)")


if __name__ == "__main__":
    main()
