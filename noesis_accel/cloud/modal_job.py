"""What runs in and around Modal containers, apart from the decorators, so it is testable offline.

`launch/modal_entry.py` declares the app from `ModalSettings` (image, Volume, Secret, GPUs, timeout,
retries) and its functions call `train_in_container`, `show_status`, ...; the tests call the same
functions with a fake Volume that keeps only what was committed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from omegaconf import DictConfig

from noesis_accel.cloud.modal_image import config_extras, extras_problem, tracker_problem
from noesis_accel.config import (
    ModalConfig,
    RunConfig,
    as_schema,
    compose,
    gpu_spec_text,
    gpu_specs,
    modal_layout,
    order_overrides,
    strategy,
    validate,
)
from noesis_accel.core.cli import Arguments, Command, parse
from noesis_accel.core.errors import ConfigError, UserError, exit_on_user_error, redact
from noesis_accel.core.protocol import DEADLINE_ENV, LEASE_GROUP_ENV, MODAL_OVERRIDES_ENV
from noesis_accel.core.signals import (
    FORWARDED_SIGNALS,
    SignalledAfterDeadline,
    signalled_after_deadline,
)
from noesis_accel.rundir.history import RunState
from noesis_accel.rundir.layout import runs_root
from noesis_accel.rundir.volumes import Committer, ModalVolumeCommitter


class Volume(Protocol):
    def commit(self) -> None: ...

    def reload(self) -> None: ...


# ---------------------------------------------------------------- overrides


def hydra_overrides(argv: Sequence[str]) -> list[str]:
    """The overrides that declare the app: command-line overrides, less a sweep's varying ones.

    A sweep (`-m optim.lr=1e-4,2e-4`) shares one app declaration, so what varies between its jobs
    cannot be a Modal setting (GPUs, timeout, Volume): that is refused in one line.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    words = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    parser = OverridesParser.create()
    kept = []
    for word in words:
        override = parser.parse_overrides([word])[0]
        if not override.is_sweep_override():
            kept.append(word)
        elif override.key_or_group.startswith("modal"):
            # `modal.gpu=H100:8,H200:8` reads as a sweep: GPUs to fall back on are a list.
            fallback = (
                " (GPU types to fall back on are a list: modal.gpu=[H100:8,H200:8])"
                if override.key_or_group == "modal.gpu"
                else ""
            )
            raise ConfigError(
                f"{word}: a sweep cannot vary modal.* (its jobs share one app: GPUs, timeout, "
                f"Volume); start one `modal run` per value instead{fallback}"
            )
    return kept


# The config keys that declare the app (which Volume, which GPU); any other word is the run command's own.
APP_KEYS = ("modal", "experiment")


def run_commands() -> dict[str, Command]:
    """The functions that act on a run already on the Volume (`::export RUN_NAME [options]`), by function name."""
    from noesis_accel.after.evaluate import EVAL_COMMAND
    from noesis_accel.after.export import EXPORT_COMMAND
    from noesis_accel.after.report import REPORT_COMMAND
    from noesis_accel.rundir.status import STATUS_COMMAND

    return {"status": STATUS_COMMAND, "export": EXPORT_COMMAND, "evaluate": EVAL_COMMAND, "report": REPORT_COMMAND}


def command_arguments(function: str, args: Sequence[str]) -> Arguments:
    """A run command's words as the command itself parses them, the app's overrides set aside."""
    return parse(run_commands()[function], args, app_keys=APP_KEYS)


def overrides_at_import() -> list[str]:
    """The overrides the app is declared for: from `modal run launch/modal_entry.py <overrides>`, or
    from the environment in the container (which imports the same file with other arguments)."""
    if os.environ.get(MODAL_OVERRIDES_ENV):
        return json.loads(os.environ[MODAL_OVERRIDES_ENV])
    argv = sys.argv
    entry = next((i for i, a in enumerate(argv) if a.split("::")[0].endswith("modal_entry.py")), None)
    if entry is None:
        return []
    function = argv[entry].partition("::")[2]
    if function in run_commands():  # e.g. noesis-eval's own overrides are not the app's
        arguments = command_arguments(function, argv[entry + 1 :])
        if function == "export" and arguments.options.get("gguf"):
            return with_extra(arguments.app_overrides, GGUF_EXTRA)  # llama.cpp in the export's image
        return arguments.app_overrides
    return hydra_overrides(argv[entry + 1 :])


GGUF_EXTRA = "gguf"  # `::export RUN gguf=...` converts and checks with llama.cpp: the image needs it


def with_extra(overrides: Sequence[str], extra: str) -> list[str]:
    """`overrides` with `extra` added to `modal.extras` (kept with those the command line names)."""
    given = [word for word in overrides if word.lstrip("+").startswith("modal.extras=")]
    extras = [e.strip() for word in given for e in word.split("=", 1)[1].strip("[]").split(",") if e.strip()]
    kept = [word for word in overrides if word not in given]
    return [*kept, f"modal.extras=[{','.join(dict.fromkeys([*extras, extra]))}]"]


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class ModalSettings:
    """Everything the app declaration needs, derived from the composed config."""

    app_name: str
    gpu_types: tuple[str, ...]  # in the order Modal tries them (`modal.gpu` as a list); () for a CPU container
    gpus_per_container: int  # the same for every type
    containers: int
    cpu: float
    memory_mib: int
    timeout_s: int
    retries: int
    volume: str
    mount: str
    scratch_dir: str
    secrets: tuple[str, ...]  # Modal Secret names: `modal.secret`, then `modal.secrets`
    deadline_margin_s: int
    python_version: str
    torch_version: str
    torch_index_url: str
    extras: tuple[str, ...]
    gpu_hour_usd: float | None = None
    overrides: tuple[str, ...] = field(default=())

    @property
    def gpu_type(self) -> str | None:
        """The first GPU type asked for (the one messages name), or None for a CPU container."""
        return self.gpu_types[0] if self.gpu_types else None

    @property
    def gpu(self) -> str | list[str] | None:
        """The GPU request of one container as Modal's `gpu=` takes it: `H100:8`, or `["H100:8", "H200:8"]`."""
        return self.gpu_request(self.gpus_per_container)

    def gpu_request(self, count: int) -> str | list[str] | None:
        """`count` GPUs of each of the run's types as Modal's `gpu=` takes them: a string, or a list tried in order."""
        requests = [f"{kind}:{count}" for kind in self.gpu_types]
        if len(requests) == 1:
            return requests[0]  # a one-entry list would be the same request, but not the same spelling
        return requests or None

    @property
    def clustered(self) -> bool:
        return self.containers > 1

    @classmethod
    def from_config(cls, cfg: DictConfig, overrides: Sequence[str] = ()) -> ModalSettings:
        # The `modal` keys typed; the config itself stays Hydra's (see compose_for_modal).
        modal = as_schema(cfg.modal, ModalConfig)
        layouts = [modal_layout(spec) for spec in gpu_specs(modal.gpu)]
        # `validate` has checked that every entry asks for the same count, hence the same layout.
        _, per_container, containers = layouts[0] if layouts else (None, 0, 1)
        return cls(
            app_name=modal.app_name,
            gpu_types=tuple(kind for kind, _, _ in layouts),
            gpus_per_container=per_container,
            containers=containers,
            cpu=modal.cpu,
            memory_mib=modal.memory_gib * 1024,
            timeout_s=modal.timeout_s,
            retries=modal.retries,
            volume=modal.volume,
            mount=modal.mount,
            scratch_dir=modal.scratch_dir,
            secrets=secret_names(cfg),
            deadline_margin_s=modal.deadline_margin_s,
            python_version=modal.python_version,
            torch_version=modal.torch_version,
            torch_index_url=modal.torch_index_url,
            extras=config_extras(cfg),
            gpu_hour_usd=modal.gpu_hour_usd,
            overrides=tuple(overrides),
        )


def secret_names(cfg: DictConfig) -> tuple[str, ...]:
    """`modal.secret` (the Hugging Face token's, unless null) and `modal.secrets`, each once, in that order."""
    names = ([cfg.modal.secret] if cfg.modal.secret else []) + [str(name) for name in cfg.modal.secrets]
    return tuple(dict.fromkeys(names))


def compose_for_modal(overrides: Sequence[str]) -> DictConfig:
    """The config `noesis-train` would compose, checked for what a Modal run needs besides.

    Kept a DictConfig: a Modal job travels as its overrides and `run` types the config where it trains;
    the settings and checks here read the few `modal.` keys and Hydra's own view of them.
    """
    cfg = compose(list(overrides))
    validate(cfg)
    validate_for_modal(cfg, root_given=any(o.lstrip("+").startswith("run.root=") for o in overrides))
    return cfg


def validate_for_modal(cfg: DictConfig, root_given: bool) -> None:
    """What only matters on Modal: a layout the strategy can run, runs kept on the Volume, known extras, a
    tracker the image installs."""
    problems = [problem for problem in (extras_problem(cfg), tracker_problem(cfg)) if problem]
    specs = gpu_specs(cfg)
    if specs:
        _, per_container, containers = modal_layout(specs[0])  # every entry has the same count
        if per_container * containers > 1 and strategy(cfg) == "single":
            problems.append(
                f"distributed: modal.gpu={gpu_spec_text(cfg.modal.gpu)} runs {per_container * containers} processes; "
                "choose distributed=ddp, zero2 or fsdp2"
            )
    mount = Path(str(cfg.modal.mount))
    root = runs_root(as_schema(cfg.run, RunConfig))
    if root_given and mount not in (root, *root.parents):
        problems.append(
            f"run.root: {root} is not on the Volume ({mount}); checkpoints there are lost with the "
            f"container. Leave run.root unset (it becomes {mount}/runs) or put it under {mount}"
        )
    if problems:
        raise ConfigError("invalid config for Modal:\n  - " + "\n  - ".join(problems))


def settings_at_import() -> ModalSettings:
    """The app's settings for this `modal run` (or this container); config errors become one line."""
    try:
        overrides = overrides_at_import()
        cfg = compose_for_modal(overrides)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return ModalSettings.from_config(cfg, overrides)


# ---------------------------------------------------------------- in the container


def placement_overrides(
    settings: ModalSettings, given: Sequence[str], machine_rank: int = 0, main_address: str = "127.0.0.1"
) -> list[str]:
    """Where things live (unless `given` sets them) and the process layout the GPUs give.

    What must last goes on the Volume: runs, model files (read once and closed), a copy of the
    tokenised data. What stays open while training goes on the container's disk: the tokenised data
    (memory-mapped) and the tracker's files; a Volume cannot commit while a file on it is open.
    """
    keys = {o.lstrip("+~").split("=", 1)[0] for o in given}
    placed = {
        "run.root": f"{settings.mount}/runs",
        "data.cache_dir": f"{settings.scratch_dir}/cache/data",
        "data.persistent_cache_dir": f"{settings.mount}/cache/data",
        "model.cache_dir": f"{settings.mount}/cache/models",
        "train.tracker_dir": f"{settings.scratch_dir}/tracker",
    }
    derived = [f"{key}={value}" for key, value in placed.items() if key not in keys]
    if settings.gpu_type:
        derived += [
            f"distributed.num_processes={settings.gpus_per_container}",
            f"distributed.num_machines={settings.containers}",
            f"distributed.machine_rank={machine_rank}",
            f"distributed.main_process_ip={main_address}",
        ]
    return derived


def _prepare_attempt(settings: ModalSettings, volume: Volume, attempt_started: float | None) -> Committer:
    """Per attempt: the deadline a margin before Modal's timeout; the committer that commits the Volume.

    The deadline and the lease group travel in the environment: the launcher's training processes
    inherit them.
    """
    started = attempt_started if attempt_started is not None else time.time()
    os.environ[DEADLINE_ENV] = str(started + settings.timeout_s - settings.deadline_margin_s)
    os.environ.setdefault("HF_HOME", f"{settings.mount}/hf-cache")  # models download once per Volume
    # Hub datasets are memory-mapped from their cache while read: never from the Volume.
    os.environ.setdefault("HF_DATASETS_CACHE", f"{settings.scratch_dir}/hf-datasets")
    # Retries of one call share its id: a lease left by an earlier (dead) attempt is taken over at once.
    os.environ[LEASE_GROUP_ENV] = _modal_call_id() or os.environ.get(LEASE_GROUP_ENV, "")
    return ModalVolumeCommitter(volume)


def _modal_call_id() -> str | None:
    try:
        import modal

        return modal.current_function_call_id() or modal.current_input_id()
    except Exception:  # not in a Modal container (tests, a local run)
        return None


def run_job_in_container(
    job: Sequence[str] | dict,
    volume: Volume,
    settings: ModalSettings,
    machine_rank: int = 0,
    main_address: str = "127.0.0.1",
    attempt_started: float | None = None,
) -> Any:
    """The body of the training functions: one run (a list of overrides) or one sweep job (a request).

    A user error is returned (a retry would fail the same way, ten times over). A stop ends the
    input the way Modal's runtime expects (`end_as_modal_expects`), after its checkpoint was
    committed; a crash or the deadline is raised, so Modal spends a retry and the next attempt
    resumes from the newest committed checkpoint.
    """
    # Modal's own handlers (SIGUSR1: its input cancellation); ours replace them while training runs.
    modal_handlers: dict[int, Any] = {signum: signal.getsignal(signum) for signum in FORWARDED_SIGNALS}
    committer = _prepare_attempt(settings, volume, attempt_started)
    try:
        if isinstance(job, dict):
            from noesis_accel.config.sweeps import JobRequest, run_sweep_job
            from noesis_accel.processes.train import TASK_REFERENCE, TrainCommand

            request = JobRequest(**job)
            returned = run_sweep_job(
                request,
                placement_overrides(settings, request.overrides, machine_rank, main_address),
                # noesis-train's jobs commit to the Volume; another task runs as its request names it.
                task_function=TrainCommand(committer) if request.task == TASK_REFERENCE else None,
            )
            failure = getattr(returned, "_return_value", None)
            if isinstance(failure, BaseException) and getattr(failure, "retryable", False):
                raise failure  # a preempted or crashed job: let Modal run it again, it resumes
            return returned
        return train_in_container(list(job), settings, committer, machine_rank, main_address)
    except BaseException as stop:
        if getattr(stop, "signum", None) is None:  # not a signal's stop: a crash, the deadline, ...
            raise
        end_as_modal_expects(stop, modal_handlers)


def end_as_modal_expects(stop: BaseException, modal_handlers: dict[int, Any]) -> NoReturn:
    """End the input after a stop the way Modal's runtime reads it (modal 1.6, read in its source).

    The runtime runs a sync function in the container's main thread. `handle_input_exception`
    (modal/_runtime/container_io_manager.py) re-raises a KeyboardInterrupt without sending an
    output, so a preempted input comes back as lost and is restarted without spending a retry;
    it turns InputCancellation, which its own SIGUSR1 handler raises, into TERMINATED, which the
    client never retries; any other exception is sent as a FAILURE, which spends one of the
    function's retries (a crash, the deadline). Our checkpoint is committed before we get here.
    """
    signum = getattr(stop, "signum", None)
    print(f"modal: {redact(str(stop))}", file=sys.stderr, flush=True)
    if signum is not None and signalled_after_deadline():
        # Any signal at or after our deadline is the attempt's time limit (a slow step or save overran
        # the margin): a FAILURE, so Modal retries and the next attempt resumes. Read as a cancellation,
        # a run that only needed its next attempt would end for good.
        raise SignalledAfterDeadline(signum) from None
    if signum == signal.SIGUSR1:  # Modal's input cancellation: the input stays cancelled
        handler = modal_handlers.get(signal.SIGUSR1)
        if callable(handler):
            handler(signal.SIGUSR1, None)  # Modal's own handler raises its InputCancellation
        from modal.exception import InputCancellation

        raise InputCancellation(str(stop)) from None
    if signum in (signal.SIGINT, signal.SIGTERM):  # a preemption: the same input runs again, for free
        raise KeyboardInterrupt(str(stop)) from None
    raise stop


def train_in_container(
    overrides: Sequence[str],
    settings: ModalSettings,
    committer: Committer,
    machine_rank: int = 0,
    main_address: str = "127.0.0.1",
) -> dict[str, Any]:
    """Compose with the Volume's paths and the GPU layout, then `run()` committing to the Volume through
    `committer`: the same entry as `noesis-train`."""
    from noesis_accel.processes.train import run

    try:
        cfg = compose_for_modal(
            order_overrides([*overrides, *placement_overrides(settings, overrides, machine_rank, main_address)])
        )
        result = run(cfg, committer)
    except UserError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr, flush=True)
        return {"state": RunState.FAILED.value, "error": redact(str(err)), "exit_code": err.exit_code}
    return {
        "state": result.state,
        "run_dir": str(result.run_dir),
        "step": result.step,
        "total_steps": result.total_steps,
        "eval_loss_before": result.eval_loss_before,
        "eval_loss_after": result.eval_loss_after,
    }


def cluster_position() -> tuple[int, str]:
    """(this container's rank, rank 0's address) inside a `@modal.clustered` function."""
    import modal

    cluster = modal.Cluster.from_context()
    context = modal._cluster.get_current_cluster_context()
    addresses = context.container_ipv4_ips or cluster.container_ips()
    return int(cluster.container_rank()), str(addresses[0])


def run_dir_for(settings: ModalSettings, name_or_path: str) -> Path:
    """`noesis` -> <mount>/runs/noesis; a path is taken as it is."""
    return Path(name_or_path) if "/" in name_or_path else Path(settings.mount) / "runs" / name_or_path


def run_command(command: str, args: Sequence[str], volume: Volume, settings: ModalSettings) -> int:
    """`noesis export`, `noesis eval` or `noesis report` on a run on the Volume; what they write is committed."""
    from noesis_accel.after import evaluate, export, report

    volume.reload()  # the newest committed state of the run, whoever wrote it
    entry = {"export": export.main, "evaluate": evaluate.main, "report": report.main}[command]
    try:
        code = entry(_on_volume(command, args, settings).argv())
    except SystemExit as stop:  # the commands exit with one line on a user error
        code = stop.code if isinstance(stop.code, int) else 1
    volume.commit()
    return int(code or 0)


def show_status(args: Sequence[str], volume: Volume, settings: ModalSettings) -> int:
    """`noesis status` for a run on the Volume; `args` = RUN_NAME [verify=true] [price=USD]."""
    from noesis_accel.rundir.status import main as status_main

    volume.reload()  # other containers' commits become visible
    try:
        parsed = _on_volume("status", args, settings)
    except SystemExit as stop:  # --help, or a word the command does not take (one line, already printed)
        return stop.code if isinstance(stop.code, int) else 1
    if settings.gpu_hour_usd and "price" not in parsed.given:
        parsed.options["price"] = settings.gpu_hour_usd
        parsed.given.add("price")
    return status_main(parsed.argv())


@exit_on_user_error
def _on_volume(function: str, args: Sequence[str], settings: ModalSettings) -> Arguments:
    """The command's words, parsed, the run they name found on the Volume; one line and exit 2 on a bad word."""
    parsed = command_arguments(function, args)
    parsed.run_dir = str(run_dir_for(settings, str(parsed.run_dir)))
    return parsed
