"""Hydra multirun jobs sent elsewhere as override strings: one Modal call (or local process) per job.

The launcher (`hydra/launcher=modal`, in `hydra_plugins/noesis_modal_launcher`) turns every job of a
sweep into a `JobRequest`: the task function's import path, where the config lives, the Hydra
overrides and the job's own overrides, all strings. The receiving side (`run_sweep_job`, in a Modal
container or a local process) composes the job's config itself and runs it through Hydra's own
`run_job`, so the job's output dir, `.hydra/` files and return value are exactly what Hydra's basic
launcher would produce. A retried job composes the same config and, with its stable run dir, resumes.

`noesis-train`'s task is importable and its resolvers register on import, so its jobs are strings
only. A task that cannot be imported by name (a closure, a callable object) and OmegaConf resolvers
registered at run time in the launching process travel pickled (cloudpickle) beside the strings:
Hydra's own launcher test suite uses both.

    python -m noesis_accel.config.sweeps REQUEST.json RESULT.pkl      # what the local backend runs per job
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from hydra.errors import CompactHydraException

from noesis_accel.core.prefixed_output import labelled_output
from noesis_accel.core.protocol import SWEEP_KEYS_ENV

log = logging.getLogger(__name__)
# Hydra overrides that only concern the launching side: the receiving side launches nothing.
_LAUNCHER_KEYS = ("hydra/launcher", "hydra.launcher")


@dataclass
class JobRequest:
    """One sweep job, as plain strings."""

    task: str  # "module:function", importable where the job runs
    config_name: str
    job_name: str
    job_num: int
    overrides: list[str]  # the job's own overrides (every task override, one value each)
    hydra_overrides: list[str] = field(default_factory=list)
    config_dir: str | None = None  # a file-system config dir; None: this project's conf/
    config_module: str | None = None  # or a package holding the configs
    python_path: list[str] = field(default_factory=list)  # where the task's module is, if not installed
    version_base: str = "1.3"  # the launching app's Hydra version base (it decides, e.g., whether jobs chdir)
    # The keys whose values differ between the sweep's jobs: they alone name each job's run dir.
    sweep_keys: list[str] | None = None
    label: str | None = None  # prefixed to the job's output lines when jobs run side by side
    task_pickle: str | None = None  # base64 cloudpickle of a task that cannot be imported by name
    resolvers_pickle: str | None = None  # base64 cloudpickle of resolvers registered at run time

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class Backend(Protocol):
    def run(self, request: JobRequest) -> Any:  # a hydra JobReturn
        ...


def _is_cancellation(stop: BaseException) -> bool:
    """Modal's InputCancellation: the coordinator's own call was cancelled (`modal app stop`, `.cancel()`)."""
    try:
        from modal.exception import InputCancellation
    except ImportError:  # no Modal here: nothing of Modal's to cancel
        return False
    return isinstance(stop, InputCancellation)


def _unwrap(task_function: Callable) -> Callable:
    """Hydra's test harness holds the task in `.task_function`, decorators in `__wrapped__`."""
    while True:
        inner = getattr(task_function, "task_function", None) or getattr(task_function, "__wrapped__", None)
        if inner is None:
            return task_function
        task_function = inner


def task_reference(task_function: Callable) -> tuple[str, list[str]] | None:
    """`module:function` of a task and the directory to import it from, or None if it has no import path."""
    task_function = _unwrap(task_function)
    module, name = getattr(task_function, "__module__", None), getattr(task_function, "__qualname__", None)
    if not module or not name or "<locals>" in name or module == "__main__":
        return None
    file = getattr(sys.modules.get(module), "__file__", None)
    return f"{module}:{name}", [str(Path(file).parent)] if file else []


def _pickled(value: Any) -> str:
    import cloudpickle

    return base64.b64encode(cloudpickle.dumps(value)).decode()


def _unpickled(text: str) -> Any:
    return pickle.loads(base64.b64decode(text))


def _runtime_resolvers() -> dict[str, Any]:
    """OmegaConf resolvers the receiving side would not have: neither OmegaConf's, Hydra's nor ours."""
    from omegaconf.basecontainer import BaseContainer

    builtin = ("oc.", "hydra", "now", "python_version", "package_dir", "conf_path")
    return {name: r for name, r in BaseContainer._resolvers.items() if not name.startswith(builtin)}


def requests_for(
    config: Any,
    task_function: Callable,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    project_config: bool,
) -> list[JobRequest]:
    """The requests of a batch of jobs, from the launcher's master config."""
    reference = task_reference(task_function)
    task, python_path = reference if reference else ("", [])
    task_pickle = None if reference else _pickled(task_function)
    resolvers = _runtime_resolvers()
    resolvers_pickle = _pickled(resolvers) if resolvers else None
    runtime = config.hydra.runtime
    main_source = next((s for s in runtime.config_sources if s.provider == "main"), None)
    config_dir = config_module = None
    if not project_config and main_source is not None:
        if main_source.schema == "pkg":
            config_module = main_source.path
        else:
            config_dir = main_source.path
    from omegaconf import OmegaConf

    # Unresolved: an override may itself hold an interpolation (`hydra.sweep.subdir=x_${hydra.job.num}`).
    given = cast(list[str], OmegaConf.to_container(config.hydra.overrides.hydra, resolve=False))
    hydra_overrides = [o for o in given if not o.startswith(_LAUNCHER_KEYS)]
    from hydra import version

    base = version.getbase()
    version_base = f"{base.major}.{base.minor}" if base is not None and hasattr(base, "major") else "1.1"
    # `noesis train -m` set the whole sweep's keys (this batch may be only part of it); otherwise this batch's.
    given_keys = os.environ.get(SWEEP_KEYS_ENV)
    keys = json.loads(given_keys) if given_keys else varying_keys(job_overrides)
    return [
        JobRequest(
            task=task,
            config_name=str(config.hydra.job.config_name),
            job_name=str(config.hydra.job.name),
            job_num=initial_job_idx + i,
            overrides=list(overrides),
            hydra_overrides=hydra_overrides,
            config_dir=config_dir,
            config_module=config_module,
            python_path=python_path,
            version_base=version_base,
            task_pickle=task_pickle,
            resolvers_pickle=resolvers_pickle,
            sweep_keys=keys,
            label=job_label(overrides, keys) or f"job{initial_job_idx + i}",
        )
        for i, overrides in enumerate(job_overrides)
    ]


def varying_keys(jobs: Sequence[Sequence[str]]) -> list[str]:
    """The keys (and groups) whose values differ between `jobs`, in the order they first appear."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for word in job:
            key, _, value = word.lstrip("+~").partition("=")
            values.setdefault(key, set()).add(value)
    for job in jobs:  # a key set by some jobs only differs too
        for key in values:
            if not any(w.lstrip("+~").partition("=")[0] == key for w in job):
                values[key].add("<unset>")
    return [key for key, seen in values.items() if len(seen) > 1]


def job_label(overrides: Sequence[str], keys: Sequence[str]) -> str:
    """`lr0.001`, `lr0.001_r16`, `optim-adamw8bit`: a job's values of the sweep's varying keys, for a path.

    Each key is shortened to its last part (`optim.lr` -> `lr`) unless two varying keys share it.
    """
    import re

    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    parts = []
    for word in overrides:
        key, _, value = word.lstrip("+~").partition("=")
        if key not in keys:
            continue
        name = leaves[list(keys).index(key)] if leaves.count(key.rsplit(".", 1)[-1]) == 1 else key
        if "/" in value:  # a path: its file names the job, and a short hash of the whole path tells two alike apart
            value = f"{value.rstrip('/').rsplit('/', 1)[-1]}-{hashlib.sha1(value.encode()).hexdigest()[:6]}"
        joiner = "" if re.match(r"[-0-9.]", value) else "-"
        # Only characters that need no quoting in an override or a path.
        parts.append(re.sub(r"[^A-Za-z0-9._-]+", "-", f"{name}{joiner}{value}").strip("-"))
    return "_".join(parts)


def run_all(backend: Backend, requests: list[JobRequest], max_parallel: int) -> list[Any]:
    """Every job at once (up to `max_parallel`), results in job order, each job's to its end.

    A job that raised (a Modal call that spent its retries, a local process that died) becomes a
    failed result instead of ending the batch: the other jobs' results are never thrown away.
    """
    workers = max(1, min(max_parallel, len(requests)))
    if workers == 1:  # one at a time: nothing interleaves, so no line needs its job's label
        for request in requests:
            request.label = None
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(backend.run, request) for request in requests]
        results = [_result_or_failure(request, future) for request, future in zip(requests, futures)]
    except BaseException as stop:
        # The coordinator itself stopped while its jobs ran. Cancelled: its jobs are cancelled too (they
        # checkpoint and end; nothing else would stop them). Preempted or timed out: they go on, and the
        # restarted coordinator attaches to them (CallBook). Either way, nothing waits here for them.
        if _is_cancellation(stop):
            cancel_all = getattr(backend, "cancel_all", None)
            if cancel_all is not None:
                cancel_all()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def _result_or_failure(request: JobRequest, future: Any) -> Any:
    try:
        return future.result()
    except Exception as error:  # any way a job can fail is that job's outcome, not the sweep's
        return failed_return(request, error)


def failed_return(request: JobRequest, error: BaseException) -> Any:
    """A Hydra JobReturn for a job that never returned one: the sweeper sees it failed, with its line."""
    from hydra.core.utils import JobReturn, JobStatus

    if not isinstance(error, CompactHydraException):  # Hydra then prints the line, not this thread's traceback
        error = JobFailed(error_line(error), int(getattr(error, "exit_code", 1) or 1))
    return JobReturn(
        overrides=list(request.overrides), task_name=request.job_name, status=JobStatus.FAILED, _return_value=error
    )


def error_line(error: BaseException) -> str:
    """The line a person reads: a stopped job's message is one already; anything else is named by its type."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, CompactHydraException) else f"{type(error).__name__}: {text}".rstrip(": ")


class JobFailed(CompactHydraException):
    """A job that ended without a result of its own (its call failed after its retries, its process died)."""

    def __init__(self, line: str, exit_code: int = 1) -> None:
        super().__init__(line)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple:
        return (JobFailed, (str(self), self.exit_code))


@dataclass
class JobOutcome:
    """How one job of a sweep ended, in plain values (it travels back from a Modal coordinator as JSON)."""

    job_num: int
    overrides: list[str]
    state: str  # completed | failed
    value: Any = None  # the task's return value (noesis-train: the final held-out loss)
    error: str | None = None  # the one line a person reads
    exit_code: int = 0

    @classmethod
    def of(cls, request: JobRequest, returned: Any) -> JobOutcome:
        from hydra.core.utils import JobStatus

        if returned.status == JobStatus.COMPLETED:
            value = returned._return_value
            plain = value is None or isinstance(value, (bool, int, float, str))
            return cls(request.job_num, list(request.overrides), "completed", value if plain else repr(value))
        error = returned._return_value
        return cls(
            request.job_num,
            list(request.overrides),
            "failed",
            error=error_line(error),
            exit_code=int(getattr(error, "exit_code", 1) or 1),
        )

    def line(self) -> str:
        what = f"completed (returned {self.value})" if self.state == "completed" else f"failed: {self.error}"
        return f"#{self.job_num} ({' '.join(self.overrides)}): {what}"


def summary(outcomes: Sequence[JobOutcome]) -> str:
    """`3 jobs: 2 completed, 1 failed`: the sweep's last line."""
    failed = sum(outcome.state != "completed" for outcome in outcomes)
    return f"{len(outcomes)} jobs: {len(outcomes) - failed} completed, {failed} failed"


# ---------------------------------------------------------------- the jobs of a command line


def override_words(args: Sequence[str]) -> list[str]:
    """The override words of a command line (not its flags such as `-m` or `--cfg job`)."""
    return [a for a in args if not a.startswith("-") and ("=" in a or a.startswith("~"))]


def sweep_jobs(args: Sequence[str]) -> list[list[str]]:
    """The overrides of each job of `-m ARGS`, split as Hydra's basic sweeper splits them.

    `hydra.*` words configure the sweep itself (its launcher, its batches), not a job's config.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from noesis_accel.config import CONF_DIR

    words = [w for w in override_words(args) if not w.lstrip("+~").startswith("hydra")]
    if not words:
        return [[]]
    # The loader lets `optim=glob(*)` list the group's options, as in Hydra's own sweep.
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(words)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for batch in batches for job in batch]


# ---------------------------------------------------------------- the receiving side


def import_object(reference: str) -> Any:
    """`package.module:name.attr` -> that object, imported (a module already imported is reused)."""
    module, _, name = reference.partition(":")
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    return target


def run_sweep_job(
    request: JobRequest, extra_overrides: Sequence[str] = (), task_function: Callable | None = None
) -> Any:
    """Compose the job's config where it runs and run it through Hydra's `run_job`; the JobReturn.

    `extra_overrides` are added by the receiving side (on Modal: where the Volume is, the GPU layout),
    and so is `task_function`, the request's task as the receiving side binds it (on Modal: with the
    Volume's committer); None: the task the request names.
    """
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode
    from omegaconf import open_dict
    from omegaconf.basecontainer import BaseContainer

    for path in request.python_path:
        if path not in sys.path:
            sys.path.insert(0, path)
    if request.sweep_keys is not None:  # the task names the job's run dir by them (this process runs one job)
        os.environ[SWEEP_KEYS_ENV] = json.dumps(request.sweep_keys)
    if task_function is None:
        task_function = _unpickled(request.task_pickle) if request.task_pickle else import_object(request.task)
    for name, resolver in (_unpickled(request.resolvers_pickle) if request.resolvers_pickle else {}).items():
        BaseContainer._resolvers.setdefault(name, resolver)
    # conf/config.yaml names the schema and uses the resolvers; a task bound by the receiving side
    # (or unpickled) need not have imported the module that registers them.
    from noesis_accel.config.compose import register

    register()
    GlobalHydra.instance().clear()
    context: initialize_config_module | initialize_config_dir
    if request.config_module:
        context = initialize_config_module(
            config_module=request.config_module, job_name=request.job_name, version_base=request.version_base
        )
    else:
        from noesis_accel.config import CONF_DIR

        context = initialize_config_dir(
            config_dir=request.config_dir or str(CONF_DIR), job_name=request.job_name, version_base=request.version_base
        )
    with context:
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(
            config_name=request.config_name, overrides=list(request.hydra_overrides), run_mode=RunMode.MULTIRUN
        )
        config = loader.load_sweep_config(master, [*request.overrides, *extra_overrides])
        with open_dict(config):
            config.hydra.job.id = request.job_num
            config.hydra.job.num = request.job_num
        with labelled_output(request.label):
            return run_job(
                hydra_context=HydraContext(config_loader=loader, callbacks=_callbacks(config)),
                task_function=task_function,
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )


def _callbacks(config: Any) -> Any:
    from hydra._internal.callbacks import Callbacks

    return Callbacks(config)


class LocalProcessBackend:
    """Each job in a fresh local Python process: the same strings a Modal call gets, no pickled function."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def run(self, request: JobRequest) -> Any:
        self.workdir.mkdir(parents=True, exist_ok=True)
        request_file = self.workdir / f"job-{request.job_num}.json"
        result_file = self.workdir / f"job-{request.job_num}.pkl"
        request_file.write_text(request.to_json())
        done = subprocess.run(
            [sys.executable, "-m", "noesis_accel.config.sweeps", str(request_file), str(result_file)],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if not result_file.is_file():
            raise RuntimeError(
                f"sweep job {request.job_num} ({' '.join(request.overrides)}) died "
                f"(exit code {done.returncode}) before reporting a result"
            )
        return pickle.loads(result_file.read_bytes())


class CallBook:
    """Which Modal call runs each job of a sweep, in a JSON file on the Volume (Modal's background
    commits keep it): a restarted coordinator attaches to the calls its earlier attempt started
    instead of starting each job a second time (that one would find the run dir leased, and fail)."""

    def __init__(self, path: Path, attach: Callable[[str], Any]) -> None:
        self.path, self.attach = path, attach
        self._lock = threading.Lock()

    def call_for(self, request: JobRequest, function: Any) -> Any:
        key = f"{request.job_num} {' '.join(request.overrides)}"
        with self._lock:  # the jobs start from several threads; the file is read and written whole
            known = json.loads(self.path.read_text()) if self.path.is_file() else {}
            if key in known:
                return self.attach(known[key])
            call = function.spawn(asdict(request))
            known[key] = call.object_id
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.name + ".tmp")
            partial.write_text(json.dumps(known, indent=1))
            os.replace(partial, self.path)  # a commit never sees half a file
            return call


class ModalBackend:
    """Each job in its own call of the app's training function (a clustered one when the GPUs span containers)."""

    def __init__(self, function: Any, calls: CallBook | None = None) -> None:
        self.function, self.calls = function, calls
        self.started: list[Any] = []  # every call this coordinator started or attached to
        self._lock = threading.Lock()

    def run(self, request: JobRequest) -> Any:
        call = self.calls.call_for(request, self.function) if self.calls else self.function.spawn(asdict(request))
        with self._lock:
            self.started.append(call)
        return call.get()

    def cancel_all(self) -> None:
        """Cancel every job's call (each one checkpoints and ends, as a cancelled run does); one that
        cannot be reached is named, and the others are still cancelled."""
        with self._lock:
            calls = list(self.started)
        for call in calls:
            try:
                call.cancel()
            except Exception as err:  # a call already finished, or a lost connection
                log.warning("could not cancel call %s: %s", getattr(call, "object_id", "?"), err)


def main(argv: list[str] | None = None) -> int:
    """`python -m noesis_accel.config.sweeps REQUEST.json RESULT.pkl`: one job, its JobReturn pickled."""
    args = sys.argv[1:] if argv is None else argv
    request = JobRequest(**json.loads(Path(args[0]).read_text()))
    result = run_sweep_job(request)
    Path(args[1]).write_bytes(pickle.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
