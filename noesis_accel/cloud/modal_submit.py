"""Starting work on Modal: what the laptop does before and after the GPU calls, and the sweep coordinator.

`modal run launch/modal_entry.py [overrides]` ends in `submit`. The config of every job is composed
and checked, and the data read and validated (here, or in a CPU container when it lies on the
Volume) before any GPU is started. The training call is then started with `.spawn()`, so Modal's
server, not this laptop, drives its retries: under `modal run --detach` a run goes on retrying
after the laptop disconnects (a `.remote()` call's retries are driven by the client). A sweep (`-m`)
starts one call of the app's coordinator, which runs the whole sweep inside Modal
(`coordinate_sweep`): one training call per job, every job's outcome gathered, failed ones included.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from noesis_accel.cloud.modal_image import carried_by_image
from noesis_accel.cloud.modal_job import ModalSettings, compose_for_modal
from noesis_accel.config import DataConfig, RunConfig, as_schema, to_config
from noesis_accel.config.sweeps import override_words, sweep_jobs, varying_keys
from noesis_accel.core.errors import DataError, UserError, redact
from noesis_accel.core.protocol import SWEEP_KEYS_ENV
from noesis_accel.rundir.history import RunState
from noesis_accel.rundir.layout import RunDir

ENTRY = "launch/modal_entry.py"


@dataclass(frozen=True)
class AppFunctions:
    """The running app's functions that `submit` starts, handed over by the entry explicitly."""

    train: Any  # one run, or one sweep job (the clustered function when the GPUs span containers)
    sweep: Any  # the coordinator: a whole sweep inside Modal
    check_data: Any  # reads and validates data on the Volume, in a CPU container
    app_id: str | None = None  # names the app in the stop and logs commands


# ---------------------------------------------------------------- the jobs and their configs


def is_sweep(args: Sequence[str]) -> bool:
    return "-m" in args or "--multirun" in args


def job_configs(args: Sequence[str]) -> list[tuple[list[str], DictConfig]]:
    """(overrides, config) of every job a command starts: one for a run, one per job of a sweep.

    Each is composed and checked here, so a bad value in any job fails before a container starts.
    """
    jobs = sweep_jobs(args) if is_sweep(args) else [override_words(args)]
    if is_sweep(args):  # the keys the jobs differ in name their run dirs, here as in the coordinator
        os.environ[SWEEP_KEYS_ENV] = json.dumps(varying_keys(jobs))
    return [(job, compose_for_modal(job)) for job in jobs]


# ---------------------------------------------------------------- the data, before any GPU


def on_volume(path: str, settings: ModalSettings) -> bool:
    mount = Path(settings.mount)
    return Path(path).is_absolute() and mount in (Path(path), *Path(path).parents)


def _data_paths(cfg: DictConfig) -> dict[str, str]:
    """`data.path` and `data.eval_path` (when set), resolved here."""
    return {f"data.{key}": str(cfg.data[key]) for key in ("path", "eval_path") if cfg.data[key]}


def _refuse_laptop_only(key: str, path: str, settings: ModalSettings) -> None:
    """A file only this machine has: every container would fail to find it, after its GPUs started."""
    from noesis_accel.training.data import is_hub_dataset

    local = Path(path).expanduser()
    if on_volume(path, settings) or is_hub_dataset(path) or not local.exists() or carried_by_image(local):
        return
    name = local.name
    raise DataError(
        f"{key}: {path} is on this machine only; Modal's containers cannot read it. Put it on the "
        f"Volume (modal volume put {settings.volume} {shlex.quote(path)} /data/{name}) and set "
        f"{key}={settings.mount}/data/{name}"
    )


def _data_key(cfg: DictConfig) -> str:
    from omegaconf import OmegaConf

    return json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True, default=str)


def check_data_before_gpu(
    jobs: Sequence[tuple[list[str], DictConfig]], settings: ModalSettings, volume_check: Any
) -> dict[str, int]:
    """Every job's data read and validated before a GPU starts; raises DataError with the file:line.

    Data in the image or on this machine is checked here. Data on the Volume is checked by the
    app's CPU function (`volume_check`), which composes the job's config where the data is. Hub
    datasets are left to training (reading one here could mean downloading all of it). Returns the
    training records counted, by data config, for the plan.
    """
    from noesis_accel.training.data import check_data

    records: dict[str, int] = {}
    for overrides, cfg in jobs:
        data_key = _data_key(cfg)
        if data_key in records:  # a sweep over the learning rate reads the same file once
            continue
        paths = _data_paths(cfg)
        for key, path in paths.items():
            _refuse_laptop_only(key, path, settings)
        if any(on_volume(path, settings) for path in paths.values()):
            print(f"modal: checking {', '.join(paths.values())} on the Volume (in a CPU container)", flush=True)
            found = volume_check.remote(list(overrides))
            if found.get("error"):
                raise DataError(found["error"])
            records[data_key] = int(found.get("train_records") or 0)
            continue
        records[data_key] = check_data(as_schema(cfg.data, DataConfig)).train_records
    return records


def _plan_key(cfg: DictConfig) -> str:
    """All a plan depends on: a sweep over the learning rate (or the run's name) plans once."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("run", None)
    plain.get("optim", {}).pop("lr", None)
    return json.dumps(plain, sort_keys=True, default=str)


def plan_before_gpu(
    jobs: Sequence[tuple[list[str], DictConfig]], settings: ModalSettings, records: dict[str, int]
) -> None:
    """Every job's plan before a GPU starts: one that does not fit its GPU, or is over its `budget.usd`
    (unless budget.preflight=warn), stops the command with the plan's line (ConfigError).

    Data on this machine (carried by the image) is read and tokenised here, as `noesis plan` does.
    Data on the Volume is counted by the data check; its tokens are assumed to be data.max_length
    each (plan.mean_tokens says otherwise), the worst case for memory and time. A hub dataset is
    planned only when plan.records gives its size: reading it here could mean downloading all of it.
    """
    from noesis_accel.training.data import is_hub_dataset
    from noesis_accel.training.plan import budget_problem, check_before_gpu, plan_line

    planned: set[str] = set()
    for _, cfg in jobs:
        key = _plan_key(cfg)
        if key in planned:
            continue
        planned.add(key)
        paths = _data_paths(cfg).values()
        read_here = not any(on_volume(path, settings) or is_hub_dataset(path) for path in paths)
        if not read_here and cfg.plan.records is None:
            counted = records.get(_data_key(cfg))
            if not counted:
                print(
                    f"modal: no plan for {cfg.run.name} before its GPUs start: {cfg.data.path} is not read here; "
                    "give its size (plan.records=N) to have the memory and the budget checked first",
                    flush=True,
                )
                continue
            cfg = copy.deepcopy(cfg)  # the job's own config travels as its overrides, unchanged
            cfg.plan.records = counted
        plan = check_before_gpu(to_config(cfg), read_data=read_here, host_bytes=settings.memory_mib * 2**20)
        over = budget_problem(plan)
        print(f"modal: {cfg.run.name}: {plan_line(plan)}", flush=True)
        if over:  # budget.preflight=warn: said, then started; the cap still stops it at a checkpoint
            print(f"modal: warning: {over}", flush=True)


def check_data_in_container(overrides: Sequence[str]) -> dict[str, Any]:
    """The CPU function's body: the job's config composed here, its data read and validated.

    A problem is returned as its line (raising would cost the function's retries and a traceback).
    """
    from noesis_accel.training.data import check_data

    try:
        stats = check_data(as_schema(compose_for_modal(list(overrides)).data, DataConfig))
    except UserError as err:
        return {"error": redact(str(err))}
    return {"error": None, "records": stats.records, "train_records": stats.train_records, "format": stats.format}


# ---------------------------------------------------------------- starting the calls


def _where(settings: ModalSettings) -> str:
    """`1 x H100:8`, `1 x H100:8, falling back to H200:8, then A100-80GB:8`, or `a CPU container`."""
    if not settings.gpu_types:
        return "a CPU container"
    first, *fallbacks = (f"{kind}:{settings.gpus_per_container}" for kind in settings.gpu_types)
    return f"{settings.containers} x {first}" + (f", falling back to {', then '.join(fallbacks)}" if fallbacks else "")


def describe_submission(settings: ModalSettings, cfg: DictConfig) -> str:
    """One line before a run starts: what runs where, and the command that watches it."""
    return (
        f"modal: {cfg.run.name} on {_where(settings)} (timeout {settings.timeout_s // 3600} h per attempt, "
        f"{settings.retries} retries); watch it with: modal run {ENTRY}::status "
        f"{shlex.quote(RunDir.of(as_schema(cfg.run, RunConfig)).path.name)}"
    )


def call_lines(call_id: str, settings: ModalSettings, app_id: str | None) -> str:
    """Where a started call can be followed and stopped from any machine, whatever happens to this one."""
    app = app_id or settings.app_name
    return (
        f"modal: started call {call_id}; its retries are Modal's, so under `modal run --detach` it goes on if "
        f"this laptop disconnects\n"
        f"  logs: modal app logs {app} --function-call {call_id} --follow\n"
        f"  stop: modal app stop {app}   (or in Python: modal.FunctionCall.from_id({call_id!r}).cancel())"
    )


def _started(function: Any, argument: Any, settings: ModalSettings, app_id: str | None) -> Any:
    call = function.spawn(argument)
    print(call_lines(call.object_id, settings, app_id), flush=True)
    return call


def _result_of(call: Any, settings: ModalSettings, app_id: str | None) -> Any:
    """The call's result; a call that failed after all its retries is one line and its exit code.

    A lost connection is this laptop's, not the call's: said in one line, then left to Modal's runner,
    which keeps a detached app running (`modal run --detach`) and says so itself.
    """
    from modal.exception import ConnectionError as ModalConnectionError

    try:
        return call.get()
    except ModalConnectionError:
        print(
            f"modal: lost the connection to Modal while waiting for call {call.object_id}; the call itself goes "
            f"on under `modal run --detach` (the detached app keeps running): follow it with modal app logs "
            f"{app_id or settings.app_name} --function-call {call.object_id} --follow",
            file=sys.stderr,
            flush=True,
        )
        raise
    except Exception as err:  # the container's own exception, re-raised here by Modal
        line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"error: call {call.object_id} failed after its retries: {type(err).__name__}: {redact(line)}",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(int(getattr(err, "exit_code", 1) or 1)) from None


def submit(args: Sequence[str], functions: AppFunctions, settings: ModalSettings) -> None:
    """The local entrypoint: check every job and its data, then start the run (or the sweep) and await it."""
    args = list(args)
    try:
        jobs = job_configs(args)
        records = check_data_before_gpu(jobs, settings, functions.check_data)
        plan_before_gpu(jobs, settings, records)
    except UserError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None
    if is_sweep(args):
        _submit_sweep(args, jobs, functions, settings)
    else:
        _submit_run(args, jobs[0][1], functions, settings)


def _submit_run(args: list[str], cfg: DictConfig, functions: AppFunctions, settings: ModalSettings) -> None:
    print(describe_submission(settings, cfg), flush=True)
    result = _result_of(_started(functions.train, args, settings, functions.app_id), settings, functions.app_id)
    if result.get("state") == RunState.FAILED:
        raise SystemExit(int(result.get("exit_code", 2)))  # the container printed its one line
    print(
        f"modal: {result['state']} at step {result['step']}/{result['total_steps']} in {result['run_dir']} "
        f"(held-out loss {result.get('eval_loss_before')} -> {result.get('eval_loss_after')})",
        flush=True,
    )


def _submit_sweep(
    args: list[str], jobs: Sequence[tuple[list[str], DictConfig]], functions: AppFunctions, settings: ModalSettings
) -> None:
    from noesis_accel.config.sweeps import JobOutcome, summary
    from noesis_accel.processes.train import refuse_shared_run_dirs

    refuse_shared_run_dirs(jobs)  # before any container starts: two jobs must not share a run dir
    print(
        f"modal: a sweep of {len(jobs)} jobs, each on {_where(settings)}, run by a coordinator inside Modal", flush=True
    )
    result = _result_of(_started(functions.sweep, args, settings, functions.app_id), settings, functions.app_id)
    outcomes = [JobOutcome(**outcome) for outcome in result["jobs"]]
    for outcome in outcomes:
        print(f"modal: {outcome.line()}", flush=True)
    failed = [outcome for outcome in outcomes if outcome.state != "completed"]
    if outcomes:
        print(f"modal: sweep: {summary(outcomes)}", flush=True)
    else:
        print(
            f"modal: the sweep ended before any job ran (exit code {result.get('exit_code')}); its log has why",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(int(result.get("exit_code") or 1))
    if failed:
        raise SystemExit(failed[0].exit_code or 1)


# ---------------------------------------------------------------- the coordinator, inside Modal


def calls_file(settings: ModalSettings) -> str | None:
    """Where this coordinator call records its jobs' calls: on the Volume, under the call's id (which
    its restarts keep); None outside a Modal container."""
    import modal

    call_id = modal.current_function_call_id()
    return f"{settings.mount}/sweeps/{call_id}/calls.json" if call_id else None


def coordinate_sweep(args: Sequence[str], function_reference: str, calls_file: str | None = None) -> dict[str, Any]:
    """The coordinator's body: `noesis-train -m ARGS` through Hydra (any sweeper), inside Modal.

    Each job is spawned on the training function that `function_reference` (`module:callable`)
    gives. Every job runs to its end; the result holds every job's outcome, failed ones included,
    and the exit code of Hydra's run. `calls_file` (on the Volume) records each job's call, so a
    restarted coordinator attaches to the calls its first attempt started instead of starting them again.
    """
    from noesis_accel.processes.train import main

    with tempfile.TemporaryDirectory(prefix="noesis-sweep-") as scratch:
        outcomes = Path(scratch) / "outcomes.json"
        argv = [
            *args,
            "hydra/launcher=modal",
            f"hydra.launcher.function={function_reference}",
            f"hydra.launcher.outcomes={outcomes}",
            f"hydra.sweep.dir={scratch}/multirun",
        ]
        if calls_file:
            argv.append(f"hydra.launcher.calls={calls_file}")
        code: int = 0
        try:
            main(argv)
        except SystemExit as ended:  # Hydra ends a sweep with a failed job this way, after every job ran
            code = ended.code if isinstance(ended.code, int) else 1
        jobs = json.loads(outcomes.read_text()) if outcomes.is_file() else []
    return {"jobs": jobs, "exit_code": code}
