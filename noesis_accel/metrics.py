"""Per-step metrics: metrics.jsonl in the run directory, an Accelerate tracker, a rank-0 progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from noesis_accel.rundir import RunDir



def truncate_metrics_after(run_dir: Path, step: int) -> None:
    """Drop records logged after `step`: a resumed run re-does those steps and logs them again."""
    path = RunDir(Path(run_dir)).metrics_file
    if not path.is_file():
        return
    kept = [record for record in RunDir(Path(run_dir)).metrics() if record.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
    tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return RunDir(Path(run_dir)).metrics()


class MetricsLogger:
    """Writes metrics on the main process only; other ranks hold a logger that does nothing."""

    def __init__(self, accelerator: Any, run_dir: Path, total_steps: int, start_step: int, show_progress: bool) -> None:
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.path = RunDir(Path(run_dir)).metrics_file
        self.bar = None
        if self.enabled and show_progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._window_start = time.perf_counter()
        self._window_tokens = 0

    def count_tokens(self, tokens: int) -> None:
        self._window_tokens += tokens

    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self._window_start
        rate = self._window_tokens / elapsed if elapsed > 0 else 0.0
        self._window_start, self._window_tokens = time.perf_counter(), 0
        return rate

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values, "time": time.time()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def write(self, message: str) -> None:
        """A line for people, printed above the bar without breaking it."""
        if self.enabled:
            if self.bar is not None:
                self.bar.write(message)
            else:
                print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
