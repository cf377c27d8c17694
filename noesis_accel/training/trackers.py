"""The experiment tracker a run logs to: `train.tracker` chooses it, the `tracker.` keys configure it.

Owns whether the tracker's package is installed, how Accelerate starts it (project, run name, tags,
where its files go), and the run dir's `tracker.json`: the tracker run this run logs to and the
newest step sent to it, so a restart continues the same tracker run and sends each step once.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from noesis_accel.config import Config, flatten
from noesis_accel.core.errors import ConfigError, UserError, redact
from noesis_accel.rundir.layout import RunDir, runs_root


@dataclass(frozen=True)
class TrackerPackage:
    """What a tracker needs installed: the module it imports, and what `pip install` takes for it."""

    module: str
    install: str


# Every tracker Accelerate ships (accelerate.tracking.LOGGER_TYPE_TO_CLASS), by its `train.tracker` name.
PACKAGES: dict[str, TrackerPackage] = {
    "tensorboard": TrackerPackage("tensorboard", "tensorboard"),
    "wandb": TrackerPackage("wandb", "'noesis-accel[wandb]'"),
    "mlflow": TrackerPackage("mlflow", "'noesis-accel[mlflow]'"),
    "comet_ml": TrackerPackage("comet_ml", "comet_ml"),
    "aim": TrackerPackage("aim", "aim"),
    "clearml": TrackerPackage("clearml", "clearml"),
    "dvclive": TrackerPackage("dvclive", "dvclive"),
    "swanlab": TrackerPackage("swanlab", "swanlab"),
    "trackio": TrackerPackage("trackio", "trackio"),
}


def require_installed(cfg: Config) -> None:
    """The chosen tracker's package imports, or one line saying what to install.

    Checked before anything loads: Accelerate drops a tracker whose package is missing without a
    word, and the run would train to the end logging nowhere.
    """
    name = cfg.train.tracker
    if name == "none":
        return
    package = PACKAGES[name]
    try:
        importlib.import_module(package.module)
    except ImportError as err:
        missing = isinstance(err, ModuleNotFoundError) and err.name == package.module
        why = "is not installed" if missing else f"does not import ({_first_line(err)})"
        raise ConfigError(
            f"train.tracker={name}: the {package.module} package {why}; pip install {package.install}"
        ) from None


# ---------------------------------------------------------------- the run dir's record


@dataclass
class TrackerRun:
    """`tracker.json`: the tracker run this run logs to, and the newest step sent to it.

    `first_step` is not saved: steps below it are held by this tracker run (as the tracker tells, or
    else as `logged_through` says), so a restart that re-does them does not send them again.
    """

    path: Path
    tracker: str
    run_id: str | None = None
    logged_through: int = 0
    first_step: int = 1

    @classmethod
    def for_start(cls, rundir: RunDir, tracker: str) -> TrackerRun:
        """The record this start continues; a new one when there is none or it names another tracker."""
        saved = _read_json(rundir.tracker_file)
        if saved.get("tracker") != tracker:
            return cls(rundir.tracker_file, tracker)
        return cls(rundir.tracker_file, tracker, saved.get("run_id"), int(saved.get("logged_through") or 0))

    def save(self) -> None:
        """Written whole and renamed into place: a kill never leaves half a record."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("path", "first_step")}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(fields) + "\n")
        os.replace(tmp, self.path)

    def sent(self, step: int) -> None:
        """Step `step` went to the tracker."""
        if step > self.logged_through:
            self.logged_through = step
            self.save()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def forget_tracker_run(rundir: RunDir) -> None:
    """A run dir that starts over with another config is a new tracker run, not the old one's continuation."""
    rundir.tracker_file.unlink(missing_ok=True)


# ---------------------------------------------------------------- starting the tracker


def start_tracker(accelerator: Any, cfg: Config, rundir: RunDir, tracker_logs: Path) -> TrackerRun | None:
    """Start `train.tracker` on the main process, continuing the run dir's tracker run if it has one.

    Returns its record (None for `train.tracker=none`), whose `first_step` is the first step to send.
    """
    name = cfg.train.tracker
    if name == "none":
        return None
    run = TrackerRun.for_start(rundir, name)
    continued = run.run_id is not None
    if name == "wandb" and not continued:
        run.run_id = secrets.token_hex(4)  # W&B takes an id we choose: saved before its run exists
    run.save()
    # MLflow refuses to change a param once logged, and a restart may change restart-safe keys: a
    # continued MLflow run keeps the params of its first start.
    _init_tracker(accelerator, cfg, run, rundir, tracker_logs, with_config=not (name == "mlflow" and continued))
    if name == "mlflow":  # MLflow chooses its run's id
        run.run_id = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
        run.save()
    held = _last_step_held(accelerator, name, run.run_id)
    run.first_step = (run.logged_through if held is None else held) + 1
    return run


def _init_tracker(
    accelerator: Any, cfg: Config, run: TrackerRun, rundir: RunDir, tracker_logs: Path, with_config: bool
) -> None:
    """Accelerate's `init_trackers` with the `tracker.` keys; a refusal a person can fix becomes one line."""
    name = run.tracker
    tracker_logs.mkdir(parents=True, exist_ok=True)
    if name == "mlflow":
        _use_mlflow_store(cfg)
    kwargs = {
        **_init_kwargs(cfg, name, rundir, tracker_logs, run.run_id),
        **cfg.tracker.init_kwargs,
    }
    try:
        accelerator.init_trackers(
            _project_name(cfg, name), config=tracker_config(cfg) if with_config else None, init_kwargs={name: kwargs}
        )
    except Exception as err:  # whatever the tracker raises; only the ones a person can fix are reworded
        problem = _user_error(name, err, run)
        if problem is None:
            raise
        raise problem from None


def tracker_config(cfg: Config) -> dict[str, Any]:
    """The config as tracker hyperparameters: scalars only (lists and None become strings), secrets redacted."""
    return {k: v if isinstance(v, (int, float, bool)) else redact(str(v)) for k, v in flatten(asdict(cfg)).items()}


def _project_name(cfg: Config, name: str) -> str:
    """What Accelerate passes first: TensorBoard's folder under logs/ (as before there were `tracker.` keys),
    every other tracker's project (W&B project, MLflow experiment, ...)."""
    return cfg.run.name if name == "tensorboard" else cfg.tracker.project


def _init_kwargs(cfg: Config, name: str, rundir: RunDir, tracker_logs: Path, run_id: str | None) -> dict[str, Any]:
    """The tracker's start arguments from the `tracker.` keys; None values are left to the tracker."""
    tracker = cfg.tracker
    run_name = tracker.run_name or rundir.path.name
    tags = list(tracker.tags)
    kwargs: dict[str, Any]
    if name == "wandb":
        # The same id with resume="allow": a restart continues the run (created on the first start).
        kwargs = {
            "id": run_id,
            "resume": "allow",
            "dir": str(tracker_logs),
            "name": run_name,
            "entity": tracker.entity,
            "tags": tags or None,
            "mode": tracker.mode,
        }
    elif name == "mlflow":
        kwargs = {"run_id": run_id, "run_name": run_name, "tags": {tag: "" for tag in tags} or None}
    else:
        kwargs = {}
    return {key: value for key, value in kwargs.items() if value is not None}


def mlflow_tracking_uri(cfg: Config) -> str:
    """`tracker.uri`, else $MLFLOW_TRACKING_URI, else a file store shared by every run under `run.root`.

    One store per root, so one `mlflow ui --backend-store-uri <run.root>/mlruns` compares every run
    in it; each run dir's tracker.json names its own MLflow run there, which a restart continues.
    The store sits on run.root itself, not in the tracker's directory (`train.tracker_dir`, a scratch
    disk on Modal, copied into one run dir): it is no one run's, and the file store closes each small
    file it appends to, so none stays open. MLflow's own default would be a database in the working
    directory.
    """
    return str(
        cfg.tracker.uri or os.environ.get("MLFLOW_TRACKING_URI") or (runs_root(cfg.run) / "mlruns").resolve().as_uri()
    )


def _use_mlflow_store(cfg: Config) -> None:
    import mlflow

    uri = mlflow_tracking_uri(cfg)
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses a file store unless told otherwise; it is the store that needs no server
        # and no database package (mlflow-skinny has none).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)


def _last_step_held(accelerator: Any, name: str, run_id: str | None) -> int | None:
    """The newest step the tracker's run holds, as the tracker itself tells (None where it cannot).

    Asked where it can answer, since it knows better than the run dir's record: a server keeps steps
    sent after the record's last commit (Modal commits it every so often), and loses the rows a hard
    kill caught in its client's buffer; a step it lacks that this start re-does is sent again.
    """
    if name == "wandb":
        wandb_run = accelerator.get_tracker("wandb", unwrap=True)
        if wandb_run.offline or wandb_run.disabled:
            return None  # an offline run knows only its own files
        return int(wandb_run.step) - 1  # the step its next log takes, after the server's newest
    if name == "mlflow":  # a file store is written as logged; a server as it received
        if not run_id:
            return None
        from mlflow.tracking import MlflowClient

        return max((metric.step for metric in MlflowClient().get_metric_history(run_id, "loss")), default=0)
    return None


def _user_error(name: str, err: Exception, run: TrackerRun) -> UserError | None:
    """A tracker's refusal a person can fix (no API key, a run its store does not hold), as one line."""
    if name == "wandb":
        import wandb.errors

        if isinstance(err, wandb.errors.UsageError):  # AuthenticationError is one too
            return ConfigError(
                f"train.tracker=wandb: {_first_line(err)}; set WANDB_API_KEY (on Modal: a Secret "
                "in modal.secrets) or tracker.mode=offline"
            )
    if name == "mlflow" and getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" and run.run_id:
        return ConfigError(
            f"{run.path}: MLflow run {run.run_id} is not in the tracking store ({_first_line(err)}); "
            "point tracker.uri (or MLFLOW_TRACKING_URI) at the store it started in, or delete "
            f"{run.path.name} to log to a new MLflow run"
        )
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
