"""Experiment trackers: a missing package stops the run before training; W&B (offline) and MLflow (a local
file store, one per run.root) continue the same tracker run after a restart and receive each step once."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from conftest import run_cli
from helpers import step_losses, typed

from noesis_accel.config import CHOICES
from noesis_accel.rundir.layout import RunDir
from noesis_accel.training.trackers import PACKAGES, TrackerRun, _init_kwargs, mlflow_tracking_uri, start_tracker

STEPS = 8
# Checkpoints every 2 steps; SIGTERM after step 4 (checkpointed at once, as every stop signal is).
TINY = ["+experiment=tiny", f"train.max_steps={STEPS}", "ckpt.every=2", "train.eval_every=0"]


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """W&B with no network and nothing written outside tmp_path (run_cli passes os.environ on)."""
    home = tmp_path / "wandb-home"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(home),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_DATA_DIR": str(home / "data"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def _args(tmp_path: Path, *extra: str) -> list[str]:
    # A private data cache: a cache another version of the code wrote is no concern of these tests.
    return [*TINY, f"run.root={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", *extra]


def _interrupt_then_lose_the_newest_checkpoint(tmp_path: Path, args: list[str]) -> Path:
    """Train until the SIGTERM after step 4, then drop checkpoint 4, as a kill just before it would have
    left the run: the restart resumes from step 2 and re-does steps 3 and 4, which the tracker already has."""
    stopped = run_cli(args, env={"NOESIS_FAULT": "term:4"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    shutil.rmtree(RunDir(run_dir).checkpoints / "step-000004")
    return run_dir


# ---------------------------------------------------------------- a tracker that is not installed


def test_a_tracker_that_is_not_installed_stops_the_run_in_one_line_before_training(tmp_path) -> None:
    """Accelerate drops a tracker whose package is missing without a word: the run trained to the end,
    exit 0, logging nowhere. Now it is refused before anything loads."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "wandb.py").write_text("raise ModuleNotFoundError(\"No module named 'wandb'\", name='wandb')\n")
    result = run_cli(_args(tmp_path, "train.tracker=wandb"), env={"PYTHONPATH": str(shim)})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert (
        result.stderr.strip()
        == "error: train.tracker=wandb: the wandb package is not installed; pip install 'noesis-accel[wandb]'"
    )
    assert not (tmp_path / "runs").exists()  # nothing loaded, nothing written


# ---------------------------------------------------------------- W&B, offline


def _wandb_records(path: Path):  # -> Iterator[wandb_internal_pb2.Record]
    """The records of a `.wandb` file, as `wandb sync` reads them: a 7-byte header (":W&B", magic 0xBEE1,
    version), then LevelDB-log blocks of 32 KiB whose chunks (checksum, length, type) hold protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, path
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_offline_runs(logs: Path) -> list[tuple[str, dict[int, dict[str, str]]]]:
    """Each offline run W&B wrote under `logs`, oldest first: its run id, and its history rows by step."""
    runs = []
    for path in sorted(logs.glob("wandb/offline-run-*/run-*.wandb")):
        run_id, rows = None, {}
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                assert record.history.step.num not in rows, f"step {record.history.step.num} twice in {path}"
                rows[record.history.step.num] = {
                    item.key or "/".join(item.nested_key): item.value_json for item in record.history.item
                }
        runs.append((run_id, rows))
    return runs


@pytest.mark.slow
def test_wandb_a_resumed_run_logs_into_the_same_wandb_run_each_step_once(tmp_path, offline_wandb) -> None:
    args = _args(tmp_path, "train.tracker=wandb", "tracker.tags=[ci,tiny]")
    run_dir = _interrupt_then_lose_the_newest_checkpoint(tmp_path, args)
    resumed = run_cli(args)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000002'} at step 2/{STEPS}" in resumed.stdout

    runs = wandb_offline_runs(RunDir(run_dir).logs)  # W&B's files are in the run dir's logs/
    saved = TrackerRun.for_start(RunDir(run_dir), "wandb")
    assert [run_id for run_id, _ in runs] == [saved.run_id] * 2  # both attempts: one W&B run
    first, second = (sorted(rows) for _, rows in runs)
    assert first == [1, 2, 3, 4] and second == [5, 6, 7, 8]  # steps 3 and 4, re-done, were not sent again
    assert saved.logged_through == STEPS
    # What W&B holds is what the run dir's metrics say, step for step (the re-done steps came out the same).
    history = {step: row for _, rows in runs for step, row in rows.items()}
    assert {step: float(row["loss"]) for step, row in history.items()} == step_losses(run_dir)


# ---------------------------------------------------------------- MLflow, a local file store


@pytest.mark.slow
def test_mlflow_a_resumed_run_continues_the_same_mlflow_run_each_step_once(tmp_path, monkeypatch) -> None:
    """The tracker writes on a scratch disk that is gone at the restart (a fresh Modal container): the
    file store is under run.root, not there, and the same MLflow run goes on."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    scratch = tmp_path / "scratch"
    args = _args(tmp_path, "train.tracker=mlflow", f"train.tracker_dir={scratch}", "tracker.project=noesis-ci")
    run_dir = _interrupt_then_lose_the_newest_checkpoint(tmp_path, args)
    shutil.rmtree(scratch)
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())  # run.root's store
    experiment = client.get_experiment_by_name("noesis-ci")
    [run] = client.search_runs([experiment.experiment_id])  # both attempts: one MLflow run
    assert run.info.run_id == TrackerRun.for_start(RunDir(run_dir), "mlflow").run_id
    assert run.info.run_name == "tiny" and run.data.params["train.max_steps"] == str(STEPS)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))  # each step once
    assert {m.step: m.value for m in losses} == step_losses(run_dir)


# ---------------------------------------------------------------- settings


def test_every_tracker_accelerate_ships_can_be_chosen_and_says_what_to_install() -> None:
    assert set(CHOICES["train.tracker"]) == {*LOGGER_TYPE_TO_CLASS, "none"} == {*PACKAGES, "none"}


def test_the_tracker_keys_reach_wandb_and_mlflow(tmp_path, monkeypatch) -> None:
    cfg = typed(
        [
            "+experiment=tiny",
            f"run.root={tmp_path}",
            "run.tag=a",
            "tracker.entity=team",
            "tracker.tags=[x,y]",
            "tracker.mode=offline",
        ]
    )
    rundir = RunDir.of(cfg.run)
    wandb = _init_kwargs(cfg, "wandb", rundir, tmp_path / "logs", "abc123")
    assert wandb == {
        "id": "abc123",
        "resume": "allow",
        "dir": str(tmp_path / "logs"),
        "name": "tiny-a",
        "entity": "team",
        "tags": ["x", "y"],
        "mode": "offline",
    }
    assert _init_kwargs(cfg, "mlflow", rundir, tmp_path, None) == {"run_name": "tiny-a", "tags": {"x": "", "y": ""}}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_tracking_uri(cfg) == (tmp_path / "mlruns").as_uri()  # run.root's store, shared by its runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert mlflow_tracking_uri(cfg) == "http://mlflow:5000"
    cfg.tracker.uri = "sqlite:///runs.db"  # the config's own key wins
    assert mlflow_tracking_uri(cfg) == "sqlite:///runs.db"


def test_mlflow_runs_under_one_root_share_one_store_each_keeping_its_own_run(tmp_path, monkeypatch) -> None:
    """One `mlflow ui --backend-store-uri <run.root>/mlruns` shows every run of the root; each run dir's
    tracker.json names its own MLflow run, and a restart continues that one."""
    from mlflow.tracking import MlflowClient

    from noesis_accel.training.distributed import build_accelerator
    from noesis_accel.training.strategies import build_strategy

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    root = tmp_path / "runs"
    ids: dict[str, str] = {}
    for name in ("first", "second", "first"):  # the third start is the first run's restart
        cfg = typed(
            ["+experiment=tiny", f"run.root={root}", f"run.name={name}", "train.tracker=mlflow", "tracker.project=ci"]
        )
        rundir = RunDir.of(cfg.run)
        rundir.path.mkdir(parents=True, exist_ok=True)  # as RunSession.open leaves it
        accelerator = build_accelerator(cfg, rundir.logs, build_strategy(cfg))
        run = start_tracker(accelerator, cfg, rundir, rundir.logs)
        assert run is not None and run.run_id
        accelerator.log({"loss": 1.0}, step=run.first_step)
        accelerator.end_training()
        assert ids.setdefault(name, run.run_id) == run.run_id
        assert not (rundir.logs / "mlruns").exists()

    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    [experiment] = client.search_experiments(filter_string="name = 'ci'")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name: r.info.run_id for r in runs} == ids and len(set(ids.values())) == 2
    assert [m.step for m in client.get_metric_history(ids["first"], "loss")] == [1, 2]  # continued, not restarted


def test_another_tracker_starts_a_new_tracker_run(tmp_path) -> None:
    rundir = RunDir(tmp_path)
    TrackerRun(rundir.tracker_file, "wandb", "abc123", logged_through=7).save()
    assert TrackerRun.for_start(rundir, "wandb").run_id == "abc123"
    fresh = TrackerRun.for_start(rundir, "mlflow")
    assert fresh.run_id is None and fresh.logged_through == 0
