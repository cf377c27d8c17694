"""The `noesis-train` entry: compose the config with Hydra, then `run(cfg)`.

`run(cfg, committer)` is the one entry that the CLI, Hydra multirun sweeps (any launcher) and the
Modal functions all call. The Hydra task function returns the final held-out loss (so a sweeper
can optimise it) and raises on failure (so a launcher or sweeper survives it); only `main()`, the
console script, turns an outcome into an exit code: its `TrainCommand` keeps what stopped the jobs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from noesis_accel.config import (
    CONF_DIR,
    RESTART_SAFE_PREFIXES,
    Config,
    RunConfig,
    as_schema,
    compose,
    order_overrides,
    register,
    validate,
)
from noesis_accel.config.keyhelp import help_text
from noesis_accel.config.overrides import check_words, positional_words
from noesis_accel.config.sweeps import job_label, override_words, sweep_jobs, varying_keys
from noesis_accel.core import env
from noesis_accel.core.cli import UsageError
from noesis_accel.core.errors import UserError, one_line, redact, safe_for_pipes
from noesis_accel.core.protocol import SWEEP_KEYS_ENV
from noesis_accel.core.signals import STARTUP_INTERRUPTED, ForcedStop, RunInterrupted, forget_stop_signals
from noesis_accel.processes.launcher import TrainingProcessFailed, launch, needs_launch
from noesis_accel.rundir.continuing import config_of_run_dir, is_run_dir
from noesis_accel.rundir.layout import COMMAND_VARIABLE, RunDir, runs_root
from noesis_accel.rundir.sweep_table import format_table, remove_empty_job_dirs, sweep_row, write_csv
from noesis_accel.rundir.volumes import Committer, LocalCommitter, commit_or_report
from noesis_accel.training.oom import OutOfMemoryCrash
from noesis_accel.training.trackers import require_installed
from noesis_accel.training.trainer import AfterTraining, RunResult, Trainer

log = logging.getLogger(__name__)

# What stops a run in a way a person can act on: printed as one line, mapped to an exit code.
STOPS = (UserError, RunInterrupted, ForcedStop, TrainingProcessFailed, OutOfMemoryCrash)


def after_training_for(cfg: Config) -> AfterTraining | None:
    """With `eval.after_training`, the evaluation the trainer runs on its model in memory, else None.

    Checked as it is built: a prompt file or judge that cannot load fails now, not after training.
    """
    if not cfg.eval.after_training:
        return None
    from noesis_accel.after.evaluate import check_ready, evaluate_after_training

    check_ready(cfg)
    return evaluate_after_training


def run(cfg: DictConfig, committer: Committer | None = None) -> RunResult:
    """Train `cfg` to completion, resuming if its run dir holds checkpoints.

    `cfg` is the composed config (Hydra's, a sweep job's, a run dir's config.yaml with overrides): it is
    validated and typed here, once; everything below reads the schema's dataclasses.

    `committer` makes the run dir durable after each checkpoint (a Modal container passes its
    Volume's); None: the local filesystem, which needs no commit.

    With `distributed.num_processes > 1` and no launcher around us, this starts the processes and
    supervises them; either way it returns the run's result or raises one of `STOPS`.
    """
    env.quiet_known_noise()
    forget_stop_signals()  # a stop request of an earlier run in this process is not this run's
    config = validate(cfg)
    require_installed(config)  # the tracker's package, before any process starts
    after_training_for(config)  # a judge or prompt file that cannot load fails before any process starts
    committer = committer or LocalCommitter()
    try:
        if needs_launch(config):
            return RunResult.from_dict(launch(config, committer))
        return Trainer.run_config(config, committer, after_training=after_training_for(config))
    finally:
        # What reached the run dir (status.json included) is made durable on every exit path; a
        # failure is reported, never raised over the error that ended the run.
        # After a stop request, within what is left of its share of the grace (volumes.commit_budget).
        commit_or_report(committer, config.ckpt, "the run dir's final state")


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
    def of(cls, stop: BaseException) -> JobStopped:
        return cls(
            stop_line(stop),
            int(getattr(stop, "exit_code", 1)),
            not isinstance(stop, UserError),
            getattr(stop, "signum", None),
        )

    def __reduce__(self) -> tuple:  # sweep jobs send it back pickled
        return (JobStopped, (str(self), self.exit_code, self.retryable, self.signum))


def sweep_job_run_name(name: str, job_overrides: Sequence[str], sweep_keys: Sequence[str] | None = None) -> str:
    """In a multirun sweep each job needs its own stable run dir, or the jobs would resume each other.

    Unless the sweep sets run.name itself, the job's values of the keys the sweep varies name it
    (`tiny-lr0.001`): stable across restarts of the same sweep (unlike the job number), and short.
    `sweep_keys`: those keys (None: the sweep's, from SWEEP_KEYS_ENV; unset there, every key the job
    sets). Keys a restart may change (where files go, checkpoint cadence, process layout) are left out,
    so changing them still resumes.
    """
    if any(o.lstrip("+").startswith("run.name=") for o in job_overrides):
        return name
    if sweep_keys is None:
        given = os.environ.get(SWEEP_KEYS_ENV)
        sweep_keys = json.loads(given) if given else [o.lstrip("+~").split("=", 1)[0] for o in job_overrides]
    keys = [k for k in sweep_keys if not k.startswith(RESTART_SAFE_PREFIXES) and not k.startswith(("hydra", "modal."))]
    label = job_label(sorted(job_overrides), keys)
    return f"{name}-{label}" if label else name


def sweep_job_run_dir(job: Sequence[str], cfg: DictConfig) -> RunDir:
    """The run dir a sweep job with these overrides trains into (its config left as it is)."""
    run = run_section(cfg)
    return RunDir.of(replace(run, name=sweep_job_run_name(run.name, job)))


def run_section(cfg: DictConfig) -> RunConfig:
    """The `run` section of a composed, not yet validated config (a sweep's jobs): where its run dir is."""
    return as_schema(cfg.run, RunConfig)


def _name_sweep_job(cfg: DictConfig) -> None:
    # Hydra's own config object, changed in place before `run` types it: the job's run.name is part of it.
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        cfg.run.name = sweep_job_run_name(str(cfg.run.name), list(hydra_cfg.overrides.task))


class TrainCommand:
    """The Hydra task of one `noesis-train` invocation, and what stopped its jobs (for `main()`'s exit code).

    Hydra takes it for `task` (its `__wrapped__`): Hydra names the job after that function's module,
    and a sweep launcher that sends jobs elsewhere names them by that import path; there each job
    runs `task`, and its stop comes back with the job's result.
    """

    def __init__(self, committer: Committer | None = None) -> None:
        self.committer = committer
        self.stops: list[JobStopped] = []  # what this invocation's jobs raised, first first
        self.__wrapped__ = task

    def __call__(self, cfg: DictConfig) -> float | None:
        """Train; return the final held-out loss (the last training loss if none is held out).

        In a sweep a stop raises `JobStopped`, so the launcher and sweeper record that job as failed
        and go on. In a single run the stop is kept in `stops` and `main()` prints its one line and
        exit code (raising would make Hydra add its own lines around ours).
        """
        _name_sweep_job(cfg)
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # each job's run dir records the job's own command
            record_command(["noesis", "train", *HydraConfig.get().overrides.task])
        try:
            result = run(cfg, self.committer)
        except STOPS as stop:
            stopped = JobStopped.of(stop)
            self.stops.append(stopped)
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                return None
            print(
                f"job {HydraConfig.get().job.num} ({' '.join(HydraConfig.get().overrides.task)}): {stop_line(stop)}",
                file=sys.stderr,
                flush=True,
            )
            raise stopped from None
        if result.eval_loss_after is not None:
            return result.eval_loss_after
        return result.losses[-1] if result.losses else None

    def hydra_main(self) -> None:
        """Hydra's app for this command: composes from the command line (`sys.argv`) and runs the jobs."""
        hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")(self)()


# conf/config.yaml names the schema and uses the resolvers: both exist before Hydra composes it (and
# before a sweep job, which imports this module to find the task, composes its own).
register()


def task(cfg: DictConfig) -> float | None:
    """`noesis-train`'s Hydra task by import path: what a sweep job sent elsewhere runs (see `TrainCommand`)."""
    return TrainCommand()(cfg)


TASK_REFERENCE = f"{task.__module__}:{task.__qualname__}"  # how a sweep's job request names `task`


def preflight(args: list[str]) -> list[tuple[list[str], DictConfig]]:
    """Before Hydra starts (and writes anything), each a one-line error with exit code 2:

    - the config of every job composes (a typo'd group option is Hydra's several-line error, exit 1,
      which a supervisor would take for a crash and retry forever);
    - no two jobs of a sweep share a run dir (the second would resume or skip the first's run);
    - the run root is writable.

    Returns each job's overrides and config. For a sweep, the keys it varies are set for its jobs
    (SWEEP_KEYS_ENV): they name each job's run dir. The configs stay as composed (DictConfig): they are
    validated and typed by `run`, job by job; here only their `run` sections are read.
    """
    multirun = is_multirun(args)
    jobs = (
        sweep_jobs(args) if multirun else [[w for w in override_words(args) if not w.lstrip("+~").startswith("hydra")]]
    )
    if multirun:
        os.environ[SWEEP_KEYS_ENV] = json.dumps(varying_keys(jobs))
    configs = []
    for job in jobs:
        try:
            configs.append((job, compose(job)))
        except UserError as err:
            _exit_with_line(str(err))
        except (HydraException, OmegaConfBaseException) as err:
            _exit_with_line(f"{one_line(err)} (config groups and keys: conf/, or noesis-train --help)")
    if len(jobs) > 1:
        refuse_shared_run_dirs(configs)
    for _, cfg in configs:
        refuse_unwritable_run_root(cfg)
    return configs


def is_multirun(args: Sequence[str]) -> bool:
    return "-m" in args or "--multirun" in args


# Hydra's flags that print instead of running jobs: a sweep with them has no table to show.
_NO_JOBS_FLAGS = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc")


def ran_jobs_here(args: Sequence[str]) -> bool:
    """Whether this command's sweep ran its jobs where their run dirs can be read: not a printing flag, and not
    Modal's launcher (its jobs' run dirs are on the Volume, and the launcher reports each job's outcome)."""
    if any(word.startswith(flag) for word in args for flag in _NO_JOBS_FLAGS):
        return False
    to_modal = any(w.lstrip("+") == "hydra/launcher=modal" for w in args)
    return not to_modal or "hydra.launcher.backend=local" in args


def close_sweep(args: Sequence[str], configs: Sequence[tuple[list[str], DictConfig]]) -> None:
    """After a sweep: the table of its jobs (also `sweep.csv` beside them), and no empty Hydra job folders.

    A table that cannot be written is a warning: the jobs' own outcome and exit code stand.
    """
    keys = json.loads(os.environ.get(SWEEP_KEYS_ENV) or "[]")
    rows = []
    for job, cfg in configs:
        rows.append(sweep_row(sweep_job_run_dir(job, cfg), job, keys))
    root = runs_root(run_section(configs[0][1]))
    print(f"sweep: {len(rows)} jobs (also in {root / 'sweep.csv'}):", flush=True)
    print(format_table(rows, keys), flush=True)
    given = next((w.split("=", 1)[1] for w in args if w.lstrip("+").startswith("hydra.sweep.dir=")), None)
    try:
        if root.is_dir():
            write_csv(rows, keys, root / "sweep.csv")
        # Only the job folders Hydra made for this sweep (`hydra.sweep.subdir` is the job number), if empty.
        remove_empty_job_dirs(Path(given) if given else root / "multirun", len(configs))
    except OSError as err:
        print(f"warning: the sweep's table or folders: {err}", file=sys.stderr, flush=True)


def refuse_shared_run_dirs(configs: Sequence[tuple[Sequence[str], DictConfig]]) -> None:
    """Two jobs of one sweep with one run dir: the second would resume the first's run, or skip it as done."""
    by_dir: dict[Path, list[str]] = {}
    for job, cfg in configs:
        by_dir.setdefault(sweep_job_run_dir(job, cfg).path, []).append(" ".join(job))
    shared = {path: jobs for path, jobs in by_dir.items() if len(jobs) > 1}
    if shared:
        path, jobs = next(iter(shared.items()))
        _exit_with_line(
            f"run.name: {len(jobs)} jobs of this sweep would share the run dir {path} ({'; '.join(jobs[:3])}), "
            "so each would resume or skip the others' run; leave run.name unset (each job is named by its "
            "overrides), sweep run.name too, or vary a key that changes the math"
        )


def _exit_with_line(message: str) -> None:
    print(f"error: {redact(message)}", file=sys.stderr, flush=True)
    sys.exit(2)


def refuse_unwritable_run_root(cfg: DictConfig) -> None:
    """A run root we cannot write is one line, not a traceback."""
    root = runs_root(run_section(cfg))
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        why = "read-only file system" if _read_only_mount(existing) else "permission denied"
        _exit_with_line(
            f"run.root: {root} is not writable ({why} at {existing}); point run.root at a writable directory"
        )


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@safe_for_pipes
def main(argv: Sequence[str] | None = None) -> None:
    """`noesis-train ARGS`: the command line's, or `argv` (without the program's name) if given."""
    if argv is None:
        _main_quietly_interrupted()
        return
    # Hydra's app reads its arguments from sys.argv and takes them from nowhere else: they go there
    # while it runs. Called in-process (a sweep's coordinator on Modal), a KeyboardInterrupt stays one:
    # Modal's preemption arrives as SIGINT, and the coordinator's restart depends on it leaving the call.
    saved, sys.argv = sys.argv, ["noesis-train", *argv]
    try:
        _main()
    finally:
        sys.argv = saved


def _main_quietly_interrupted() -> None:
    """The console script: Ctrl-C before the trainer's own handler is in place (imports, composing, loading)
    is one line, not a traceback; from then on the trainer handles the signal and says whether a checkpoint
    exists. In a sweep, jobs already run may have checkpointed, so the line claims nothing about them."""
    try:
        _main()
    except KeyboardInterrupt:
        if is_multirun(sys.argv[1:]):
            print(
                "interrupted: stopped by SIGINT; a job that had started keeps its checkpoints "
                "(the same sweep resumes it)",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(STARTUP_INTERRUPTED, file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)


def _main() -> None:
    try:
        _run_command()
    finally:
        # This command's, not a later one's in the same process (tests, notebooks, a sweep's coordinator).
        os.environ.pop(COMMAND_VARIABLE, None)
        os.environ.pop(SWEEP_KEYS_ENV, None)


def _run_command() -> None:
    env.quiet_known_noise()
    words = typed = sys.argv[1:]
    if "--hydra-help" in words:  # Hydra's own help, as `--help` gave it before ours
        sys.argv[1:] = ["--help" if word == "--hydra-help" else word for word in words]
    elif any(word in ("-h", "--help") for word in words):
        _print_help(words)
        return
    else:
        try:
            words = check_words(words)
            positional = positional_words(words)
            if positional:
                _continue_run_dir(positional, [w for w in words if w not in positional])
                return
        except UserError as err:
            _exit_with_line(str(err))
        sys.argv[1:] = order_overrides(words)  # `+debug=` wins wherever it stands
    configs = preflight(sys.argv[1:])
    record_command(["noesis", "train", *typed])
    command = TrainCommand()
    try:
        command.hydra_main()
    except SystemExit as exit_:
        # A sweep with failed jobs ends in Hydra with exit code 1; keep the documented codes.
        if exit_.code == 1 and command.stops:
            sys.exit(command.stops[0].exit_code)
        raise
    finally:
        if is_multirun(sys.argv[1:]) and ran_jobs_here(sys.argv[1:]):
            close_sweep(sys.argv[1:], configs)
    if command.stops:  # a single run that stopped: its one line, and the code a supervisor acts on
        print(str(command.stops[0]), file=sys.stderr, flush=True)
        sys.exit(command.stops[0].exit_code)


def _print_help(words: list[str]) -> None:
    """`--help [SECTION]`: our keys and groups (a UsageError for a section that does not exist)."""
    after = words[[w in ("-h", "--help") for w in words].index(True) + 1 :]
    topic = next((w for w in after if not w.startswith("-") and "=" not in w), None)
    try:
        print(help_text(topic), flush=True)
    except UserError as err:
        _exit_with_line(str(err))


def _continue_run_dir(positional: list[str], overrides: list[str]) -> None:
    """`noesis train RUN_DIR [key=value ...]`: the run from its own config.yaml, to completion or its next stop."""
    run_dir = positional[0]
    if len(positional) > 1 or not is_run_dir(run_dir):
        why = "is not a run directory (no config.yaml in it)" if Path(run_dir).exists() else "does not exist"
        raise UsageError(
            f"{' '.join(positional)}: not an override (key=value), and {run_dir} {why}; "
            "give overrides, or one RUN_DIR of a run to continue (noesis status lists them)"
        )
    if any(word.startswith("-") for word in overrides):
        raise UsageError(f"{run_dir}: continuing a run dir runs that one run; flags (-m, --cfg, ...) do not apply")
    cfg = config_of_run_dir(Path(run_dir), overrides)
    os.environ.pop(COMMAND_VARIABLE, None)  # the run dir keeps the command that started it
    refuse_unwritable_run_root(cfg)
    print(f"continuing {run_dir} from its config.yaml", flush=True)
    try:
        run(cfg)
    except STOPS as stop:
        stopped = JobStopped.of(stop)
        print(str(stopped), file=sys.stderr, flush=True)
        sys.exit(stopped.exit_code)


def record_command(words: Sequence[str]) -> None:
    """The command line that starts a run, for the run dir's command file (written with its config.yaml)."""
    os.environ[COMMAND_VARIABLE] = json.dumps(list(words))


if __name__ == "__main__":
    main()
