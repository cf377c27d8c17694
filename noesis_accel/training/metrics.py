"""Per-step metrics: metrics.jsonl in the run directory, an Accelerate tracker, a rank-0 progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from noesis_accel.core.errors import redact
from noesis_accel.rundir.layout import RunDir
from noesis_accel.training.trackers import TrackerRun


def truncate_metrics_after(rundir: RunDir, step: int) -> None:
    """Drop records logged after `step`: a resumed run re-does those steps and logs them again."""
    path = rundir.metrics_file
    if not path.is_file():
        return
    kept = [record for record in rundir.metrics() if record.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
    tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return RunDir(Path(run_dir)).metrics()


class MetricsLogger:
    """Writes metrics on the main process only; other ranks hold a logger that does nothing.

    On a terminal, progress is a bar; anywhere else (Modal's logs, nohup, a pipe), where a bar's
    redraws arrive as separate lines, it is one plain line every `print_every` steps.
    """

    def __init__(
        self,
        accelerator: Any,
        rundir: RunDir,
        total_steps: int,
        start_step: int,
        show_progress: bool,
        print_every: int | None = None,
        tracker_run: TrackerRun | None = None,
    ) -> None:
        self.accelerator = accelerator
        # The tracker run, on the main process; steps below its first_step reached it in an earlier start.
        self.tracker_run = tracker_run
        self.enabled = accelerator.is_main_process
        self.path = rundir.metrics_file
        self.total_steps, self.start_step = total_steps, start_step
        self.bar = None
        if self.enabled and show_progress and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.print_every = print_every or max(1, total_steps // 20)  # about 20 lines a run
        self._started = time.monotonic()
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
        self._send_to_tracker(step, values)

    def _send_to_tracker(self, step: int, values: dict[str, Any]) -> None:
        """Each step once per tracker run: a step re-done after a restart went to it before the kill
        (metrics.jsonl, truncated at the resume point, logs it again)."""
        run = self.tracker_run
        if run is None or step < run.first_step:
            return
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        run.sent(step)

    def progress(self, step: int, loss: float, lr: float, tokens_per_s: float, money: str = "") -> None:
        """The progress bar's numbers, or a plain line; `money`: what was spent and the projected total."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(
                {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
                | ({"spent": money.split(", ")[1]} if money else {}),
                refresh=False,
            )
            self.bar.refresh()
        elif self.enabled and (step % self.print_every == 0 or step == self.total_steps):
            print(
                f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%): loss {loss:.4f}, "
                f"lr {lr:.2e}, {tokens_per_s:,.0f} tok/s, ETA {self._eta(step)}{money}",
                flush=True,
            )

    def _eta(self, step: int) -> str:
        """The rest of the run at this attempt's pace so far."""
        done = step - self.start_step
        if done <= 0:
            return "?"
        seconds = int((time.monotonic() - self._started) / done * (self.total_steps - step))
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

    def write(self, message: str) -> None:
        """A line for people, printed above the bar without breaking it; secrets (a token in a path) never shown."""
        message = redact(message)
        if self.enabled:
            if self.bar is not None:
                self.bar.write(message)
            else:
                print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
