"""The layout of a run directory and the readers that need no Accelerator.

    <run.root>/<run.name>/
      config.yaml        resolved config of the run (a restart compares its math keys against it;
                         `noesis train RUN_DIR` continues the run from it)
      command.json       the command line that started the run, shown by `noesis status`
      status.json        state, progress, newest checkpoint, exit reason
      events.jsonl       one line per attempt starting, start, checkpoint and stop: the run's history
      metrics.jsonl      per-step loss, lr, tokens/s, grad norm; held-out loss
      lease/             the one process allowed to write here, with its heartbeat (newest 0000000000NN.json)
      tracker.json       the tracker run this run logs to (W&B or MLflow run id) and the newest step sent
      checkpoints/step-000123/   accelerate save_state output, history/ (copies of events.jsonl and
                         metrics.jsonl as they were) + manifest.json (written last)
      adapter/ or model/ final LoRA adapter (or full weights) + tokenizer
      eval/ export/ report/      written by noesis-eval, noesis-export and noesis-report
      logs/              the tracker's files (TensorBoard events, W&B's wandb/); MLflow's store is <run.root>/mlruns

The trainer, `noesis-status`, `noesis-eval`, `noesis-export` and `noesis-report` all find files
through `RunDir`, so the layout is written down once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from noesis_accel.config.schema import RunConfig
from noesis_accel.core.errors import UserError, redact

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every readable record; a line torn by a crash mid-write is skipped, never fatal."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# The command line that starts a run, as a JSON list of words: set by `noesis train` (and by each job of a
# sweep), read where config.yaml is written; an environment variable, so launched processes see it too.
COMMAND_VARIABLE = "NOESIS_COMMAND"


def runs_root(run: RunConfig) -> Path:
    """`run.root`, with `~` expanded: the directory that holds every run dir."""
    return Path(os.path.expanduser(run.root))


@dataclass(frozen=True)
class RunDir:
    """One run's directory: where each file lives, and readers for the small ones."""

    path: Path

    @classmethod
    def of(cls, run: RunConfig) -> RunDir:
        """The run dir a config's `run` section names: `<run.root>/<run.name>[-<run.tag>]`."""
        name = f"{run.name}-{run.tag}" if run.tag else run.name
        return cls(runs_root(run) / name)

    # ------------------------------------------------------------ where things are

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def command_file(self) -> Path:
        return self.path / "command.json"

    @property
    def events_file(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def history_logs(self) -> tuple[Path, Path]:
        """The logs that only grow between resumes: each checkpoint keeps a copy (rundir/logrestore.py)."""
        return self.events_file, self.metrics_file

    @property
    def lease_dir(self) -> Path:
        return self.path / "lease"

    @property
    def tracker_file(self) -> Path:
        return self.path / "tracker.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def full_model(self) -> Path:
        return self.path / "model"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    def final_weights_dir(self, peft_enabled: bool) -> Path:
        """Where the final weights go: the LoRA adapter, or the whole model for a full fine-tune."""
        return self.adapter if peft_enabled else self.full_model

    # ------------------------------------------------------------ readers

    def exists(self) -> bool:
        return self.path.is_dir()

    def require(self) -> RunDir:
        """This run dir, or a one-line error naming what a run dir looks like."""
        if not self.config_file.is_file() and not self.status_file.is_file():
            raise UserError(
                f"{self.path} is not a run directory (no config.yaml or status.json); pass "
                "<run.root>/<run.name>, e.g. runs/demo"
            )
        return self

    def saved_config(self) -> dict[str, Any]:
        """The resolved config the run was started with, as plain data."""
        try:
            saved = yaml.safe_load(self.config_file.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.config_file} is missing; is {self.path} a run directory?") from None
        except yaml.YAMLError as err:
            raise UserError(
                f"{self.config_file} is unreadable ({str(err).splitlines()[0]}); restore it "
                "from the first start or delete it to accept the next start's config"
            ) from None
        if not isinstance(saved, dict):
            raise UserError(f"{self.config_file} does not hold a config mapping; restore it or delete it")
        return saved

    def command(self) -> list[str] | None:
        """The command line that started the run (None: started before runs recorded it, or not by `noesis`)."""
        try:
            words = json.loads(self.command_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return [str(word) for word in words] if isinstance(words, list) else None

    def write_command(self) -> None:
        """The starting command (from COMMAND_VARIABLE) beside config.yaml, atomically; nothing if none was set."""
        words = os.environ.get(COMMAND_VARIABLE)
        if not words:
            return
        tmp = self.command_file.with_suffix(".json.tmp")
        tmp.write_text(redact(words) + "\n")
        os.replace(tmp, self.command_file)

    def status(self) -> dict[str, Any] | None:
        try:
            status = json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return status if isinstance(status, dict) else None

    def metrics(self) -> list[dict[str, Any]]:
        return json_lines(self.metrics_file)

    def events(self) -> list[dict[str, Any]]:
        return json_lines(self.events_file)

    def step_dirs(self) -> list[tuple[int, Path]]:
        """Finished (renamed) checkpoint directories, newest first; completeness not yet checked."""
        if not self.checkpoints.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.checkpoints.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
        ]
        return sorted(found, reverse=True)

    def partial_checkpoints(self) -> list[Path]:
        """`step-*.tmp` directories: saves that never finished (a killed process leaves them)."""
        return sorted(self.checkpoints.glob("step-*.tmp")) if self.checkpoints.is_dir() else []

    def final_weights(self) -> Path:
        """The final adapter (or full model) directory, or a one-line error saying why there is none."""
        for candidate in (self.adapter, self.full_model):
            if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
                return candidate
        state = (self.status() or {}).get("state", "unknown")
        raise UserError(
            f"{self.path} has no final adapter/ or model/ (run state: {state}); finish the run by restarting "
            "its command, or pass --checkpoint with one of its checkpoints/step-NNNNNN directories"
        )

    # ------------------------------------------------------------ writers (main process only)

    def append_event(self, event: str, **fields: Any) -> dict[str, Any]:
        """One line of the run's history. Appended and flushed at once: a crash loses at most this line."""
        record = {"event": event, "time": time.time(), **fields}
        self.path.mkdir(parents=True, exist_ok=True)
        with self.events_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        return record


def this_host() -> str:
    return socket.gethostname()
