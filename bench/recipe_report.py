"""A finished run's speed, memory and LoRA checkpoint figures, read from its run dir alone.

    python bench/recipe_report.py runs/noesis --json recipe.json     # after noesis-train ... +debug=gpu

Used by bench/gpu_checks.sh after the noesis recipe's 20 steps on the 8B shape. Tokens per second
come from consecutive steps' `tokens_seen` and `time` in metrics.jsonl, leaving out the first
`--skip` steps (start-up) and every step that follows a checkpoint or a held-out evaluation (its
time includes them). Checkpoint figures come from events.jsonl (the seconds of save, manifest,
fsync, rename, prune and commit) and the checkpoint directories on disk. Targets: a LoRA checkpoint
(adapter + 8-bit moments) of at most 300 MB, saved in at most 5 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from noesis_accel.rundir.history import EventKind
from noesis_accel.rundir.layout import RunDir

MAX_CHECKPOINT_MB, MAX_SAVE_S = 300, 5.0


def report(run_dir: Path, skip: int = 2) -> dict[str, Any]:
    rundir = RunDir(run_dir)
    metrics = rundir.metrics()
    steps = {m["step"]: m for m in metrics if "loss" in m}
    evaluated = {m["step"] for m in metrics if "eval_loss" in m}
    checkpoints = [e for e in rundir.events() if e.get("event") == EventKind.CHECKPOINT]
    interrupted = evaluated | {int(e["step"]) for e in checkpoints}
    rates, tokens, seconds = [], 0, 0.0
    for step in sorted(steps):
        before = steps.get(step - 1)
        if step <= skip or before is None or (step - 1) in interrupted:
            continue
        step_tokens, step_seconds = (
            steps[step]["tokens_seen"] - before["tokens_seen"],
            steps[step]["time"] - before["time"],
        )
        if step_seconds > 0:
            rates.append(step_tokens / step_seconds)
            tokens, seconds = tokens + step_tokens, seconds + step_seconds
    saved = []
    for event in checkpoints:
        path = rundir.checkpoints / event["name"]
        files = {p.name: p.stat().st_size for p in path.iterdir()} if path.is_dir() else {}
        saved.append(
            {
                "name": event["name"],
                "seconds": event.get("seconds"),
                "bytes": sum(files.values()) or None,
                "adapter_bytes": files.get("model.safetensors"),
                "optimizer_bytes": files.get("optimizer.bin"),
            }
        )
    sizes = [s["bytes"] for s in saved if s["bytes"]]
    times = [s["seconds"] for s in saved if s["seconds"] is not None]
    status = rundir.status() or {}
    return {
        "run_dir": str(run_dir),
        "state": status.get("state"),
        "steps": len(steps),
        "losses": [round(steps[s]["loss"], 4) for s in sorted(steps)],
        "tokens_per_s": tokens / seconds if seconds else None,
        "tokens_per_s_median": statistics.median(rates) if rates else None,
        "timed_steps": len(rates),
        "peak_memory_gib": max((m.get("peak_memory_gib", 0) for m in steps.values()), default=None) or None,
        "checkpoints": saved,
        "checkpoint_mb": max(sizes) / 1e6 if sizes else None,
        "save_seconds": max(times) if times else None,
        "checkpoint_ok": bool(sizes) and max(sizes) / 1e6 <= MAX_CHECKPOINT_MB,
        "save_ok": bool(times) and max(times) <= MAX_SAVE_S,
    }


def describe(result: dict[str, Any]) -> str:
    def number(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    lines = [
        f"{result['run_dir']}: {result['state']}, {result['steps']} steps, losses {result['losses'][:3]} ... "
        f"{result['losses'][-2:]}",
        f"non-pad tokens/s {number(result['tokens_per_s'], ',.0f')} over {result['timed_steps']} steps "
        f"(median step {number(result['tokens_per_s_median'], ',.0f')}); "
        f"peak memory {number(result['peak_memory_gib'], '.1f')} GiB",
    ]
    for c in result["checkpoints"]:
        parts = [
            f"adapter {c['adapter_bytes'] / 1e6:.1f} MB" if c["adapter_bytes"] else None,
            f"optimizer {c['optimizer_bytes'] / 1e6:.1f} MB" if c["optimizer_bytes"] else None,
        ]
        total = f"{c['bytes'] / 1e6:.1f} MB" if c["bytes"] else "pruned"
        lines.append(
            f"checkpoint {c['name']}: {total} ({', '.join(p for p in parts if p)}), saved in "
            f"{number(c['seconds'], '.2f')} s"
        )
    lines.append(
        f"largest checkpoint {number(result['checkpoint_mb'], '.1f')} MB (target <= {MAX_CHECKPOINT_MB}: "
        f"{'met' if result['checkpoint_ok'] else 'NOT met'}); slowest save {number(result['save_seconds'], '.2f')} s "
        f"(target <= {MAX_SAVE_S:g}: {'met' if result['save_ok'] else 'NOT met'})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of tokens/s (start-up)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = report(args.run_dir, args.skip)
    print(describe(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
