"""The `noesis-train` entry: compose the config with Hydra, then `run(cfg)`.

`run(cfg, committer)` is the one entry that the CLI, Hydra multirun sweeps (any launcher) and the
Modal functions all call. The Hydra task function returns the final held-out loss (so a sweeper
can optimise it) and raises on failure (so a launcher or sweeper survives it); only `main()`, the
console script, turns an outcome into an exit code.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from noesis_accel import config as _config  # registers the schema and resolvers  # noqa: F401
from noesis_accel.config import RESTART_SAFE_PREFIXES, order_overrides, validate
from noesis_accel.errors import UserError, redact
from noesis_accel.launcher import TrainingProcessFailed, launch, needs_launch
from noesis_accel.rundir import runs_root
from noesis_accel.signals import ForcedStop, RunInterrupted
from noesis_accel.trainer import RunResult, Trainer
from noesis_accel.volumes import Committer, commit_or_report, default_committer

log = logging.getLogger(__name__)

# What stops a run in a way a person can act on: printed as one line, mapped to an exit code.
STOPS = (UserError, RunInterrupted, ForcedStop, TrainingProcessFailed)


def run(cfg: DictConfig, committer: Committer | None = None) -> RunResult:
    """Train `cfg` to completion, resuming if its run dir holds checkpoints.

    With `distributed.num_processes > 1` and no launcher around us, this starts the processes and
    supervises them; either way it returns the run's result or raises one of `STOPS`.
    """
    quiet_known_noise()
    validate(cfg)
    committer = committer or default_committer()
    try:
        if needs_launch(cfg):
            return RunResult.from_dict(launch(cfg, committer))
        return Trainer(cfg, committer).run()
    finally:
        # What reached the run dir (status.json included) is made durable on every exit path; a
        # failure is reported, never raised over the error that ended the run.
        commit_or_report(committer, cfg.ckpt, "the run dir's final state")


def stop_line(stop: BaseException) -> str:
    """The one line a person reads when a run stops early."""
    kind = "interrupted" if isinstance(stop, (RunInterrupted, ForcedStop)) else "error"
    return redact(f"{kind}: {stop}")


class JobStopped(CompactHydraException):
    """A Hydra job that stopped: Hydra prints its message alone (no traceback) when it ends the app.

    `retryable`: the job stopped after a checkpoint or crashed (not a user error), so running it
    again resumes it; a Modal sweep job raises it to get Modal's retry. `signum`: the stop signal,
    when a signal stopped it (a Modal sweep job then ends the way Modal expects for that signal).
    """

    def __init__(self, line: str, exit_code: int = 1, retryable: bool = False, signum: int | None = None) -> None:
        super().__init__(line)
        self.exit_code, self.retryable, self.signum = exit_code, retryable, signum

    @classmethod
    def of(cls, stop: BaseException) -> "JobStopped":
        return cls(stop_line(stop), int(getattr(stop, "exit_code", 1)), not isinstance(stop, UserError),
                   getattr(stop, "signum", None))

    def __reduce__(self) -> tuple:  # sweep jobs send it back pickled
        return (JobStopped, (str(self), self.exit_code, self.retryable, self.signum))


_stops: list[JobStopped] = []  # what the jobs of this process raised, for main()'s exit code


def _name_sweep_job(cfg: DictConfig) -> None:
    """In a multirun sweep each job needs its own stable run dir, or the jobs would resume each other.

    Unless the sweep sets run.name itself, the job's overrides name it: stable across restarts of
    the same sweep (unlike the job number), and readable. Keys a restart may change (where files
    go, checkpoint cadence, process layout) are left out, so changing them still resumes.
    """
    hydra_cfg = HydraConfig.get()
    task = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode != RunMode.MULTIRUN or any(o.startswith("run.name=") for o in task):
        return
    parts = []
    for override in sorted(task):
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(RESTART_SAFE_PREFIXES) or key.startswith(("hydra.", "modal.")):
            continue
        # Only characters that need no quoting in an override or a path.
        parts.append(re.sub(r"[^A-Za-z0-9._-]+", "-", override.lstrip("+~")).strip("-"))
    if parts:
        cfg.run.name = f"{cfg.run.name}__{'_'.join(parts)}"


def task(cfg: DictConfig) -> float | None:
    """The Hydra task: train; return the final held-out loss (the last training loss if none is held out).

    In a sweep a stop raises `JobStopped`, so the launcher and sweeper record that job as failed and
    go on. In a single run the stop is remembered and `main()` prints its one line and exit code
    (raising would make Hydra add its own lines around ours).
    """
    _name_sweep_job(cfg)
    try:
        result = run(cfg)
    except STOPS as stop:
        stopped = JobStopped.of(stop)
        _stops.append(stopped)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        print(f"job {HydraConfig.get().job.num} ({' '.join(HydraConfig.get().overrides.task)}): "
              f"{stop_line(stop)}", file=sys.stderr, flush=True)
        raise stopped from None
    if result.eval_loss_after is not None:
        return result.eval_loss_after
    return result.losses[-1] if result.losses else None


hydra_task = hydra.main(version_base=None, config_path=str(_config.CONF_DIR), config_name="config")(task)


def quiet_known_noise() -> None:
    """Silence warnings that say nothing actionable to a user of this tool."""
    # bitsandbytes looks for an optional CPU 4-bit kernel package we never use.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Accelerate narrates every file of every save_state; our own line per checkpoint says enough.
    for name in ("accelerate.checkpointing", "accelerate.accelerator", "accelerate.state"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()  # "Saving the dataset" bars for a few-ms cache write
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars; the train bar stays
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning)


def refuse_unwritable_run_root(args: list[str]) -> None:
    """Before Hydra writes anything: a run root we cannot write is one line, not a traceback.

    Composes the config once more (a fraction of a second) to learn `run.root`; sweeps over the
    root, or overrides that do not compose, are left to Hydra's own checks.
    """
    overrides = [a for a in args if not a.startswith("-") and "," not in a.split("=", 1)[-1]]
    try:
        cfg = _config.compose(overrides)
        root = runs_root(cfg)
    except Exception:
        return
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        why = "read-only file system" if _read_only_mount(existing) else "permission denied"
        print(f"error: run.root: {root} is not writable ({why} at {existing}); point run.root at a writable "
              "directory", file=sys.stderr, flush=True)
        sys.exit(2)


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def main() -> None:
    quiet_known_noise()
    sys.argv[1:] = order_overrides(sys.argv[1:])  # `+debug=` wins wherever it stands
    refuse_unwritable_run_root(sys.argv[1:])
    try:
        hydra_task()
    except SystemExit as exit_:
        # A sweep with failed jobs ends in Hydra with exit code 1; keep the documented codes.
        if exit_.code == 1 and _stops:
            sys.exit(_stops[0].exit_code)
        raise
    if _stops:  # a single run that stopped: its one line, and the code a supervisor acts on
        print(str(_stops[0]), file=sys.stderr, flush=True)
        sys.exit(_stops[0].exit_code)


if __name__ == "__main__":
    main()
