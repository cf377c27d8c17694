"""`hydra/launcher=modal`: every job of a sweep in its own Modal call, in parallel, as override strings.

    noesis-train -m +experiment=noesis optim.lr=1e-4,2e-4 hydra/launcher=modal
    modal run launch/modal_entry.py -m +experiment=noesis optim.lr=1e-4,2e-4      # the same, run from inside Modal
    noesis-train -m +experiment=tiny optim.lr=1e-3,3e-4 hydra/launcher=modal hydra.launcher.backend=local

`backend=local` runs each job in a local process through the very same request (for tests, or a
parallel sweep on one machine). `noesis-train` starts the app itself for the sweep's duration (the
sweep ends with this process); `modal run ... -m` runs the sweep in the app's coordinator function,
which names its own training function with `hydra.launcher.function`. Every job runs to its end;
each one's outcome is logged (and written to `hydra.launcher.outcomes`, when set).
"""

# No `from __future__ import annotations`: Hydra loads plugin modules outside sys.modules, where
# dataclasses cannot resolve string annotations.
import contextlib
import importlib.util
import inspect
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, cast

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from noesis_accel.config import sweeps
from noesis_accel.core.protocol import MODAL_OVERRIDES_ENV

log = logging.getLogger(__name__)
PROJECT = Path(__file__).resolve().parents[2]


@dataclass
class ModalLauncherConf:
    _target_: str = "hydra_plugins.noesis_modal_launcher.modal_launcher.ModalLauncher"
    backend: str = "modal"  # modal | local
    max_parallel: int = 16  # jobs in flight at once
    entry: str = "launch/modal_entry.py"  # the Modal app, relative to the project root
    # `module:callable` giving the training function of an app already running (the sweep coordinator
    # inside Modal names its own); unset: the app in `entry` is started for the sweep's duration.
    function: Optional[str] = None
    outcomes: Optional[str] = None  # a JSON file that receives every job's outcome
    calls: Optional[str] = None  # a JSON file (on the Volume) recording each job's call, for a restarted coordinator


ConfigStore.instance().store(group="hydra/launcher", name="modal", node=ModalLauncherConf, provider="noesis_accel")


def load_entry(path: Path) -> ModuleType:
    """Import the Modal app's file as a module registered under the name Modal gives it (`modal_entry`).

    Modal decides from the module of a function whether the container imports that function by
    name or receives it cloudpickled (`FunctionSourceInfo` in modal/_utils/function_utils.py): a
    module that `inspect.getmodule` cannot find in `sys.modules` is treated like a notebook cell, and
    every function would travel pickled. Registered, they are imported from /root/modal_entry.py,
    exactly as after `modal run launch/modal_entry.py`.
    """
    name = inspect.getmodulename(str(path)) or "modal_entry"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"{path} is not a Python file"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _attach(call_id: str) -> Any:
    import modal

    return modal.FunctionCall.from_id(call_id)


class ModalLauncher(Launcher):
    def __init__(
        self,
        backend: str = "modal",
        max_parallel: int = 16,
        entry: str = "launch/modal_entry.py",
        function: Optional[str] = None,
        outcomes: Optional[str] = None,
        calls: Optional[str] = None,
    ) -> None:
        if backend not in ("modal", "local"):
            raise ValueError(f"hydra.launcher.backend={backend!r}: use modal or local")
        self.backend, self.max_parallel, self.entry = backend, max_parallel, entry
        self.function, self.outcomes, self.calls = function, outcomes, calls
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        # A bad override fails here, before any call is made (as with Hydra's basic launcher).
        for overrides in job_overrides:
            self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        to_modal = self.backend == "modal"
        requests = sweeps.requests_for(
            self.config, self.task_function, job_overrides, initial_job_idx, project_config=to_modal
        )
        if not to_modal:
            # The resolved sweep dir (it may hold a timestamp) goes along, so every job agrees on it.
            sweep_dir.mkdir(parents=True, exist_ok=True)
            for request in requests:
                request.hydra_overrides.append(f"hydra.sweep.dir={sweep_dir}")
        log.info("Launching %d jobs on %s", len(requests), "Modal" if to_modal else "local processes")
        for request in requests:
            log.info("\t#%d : %s", request.job_num, " ".join(request.overrides))
        with self._backend(sweep_dir) as backend:
            results = sweeps.run_all(backend, requests, self.max_parallel)
        self._report([sweeps.JobOutcome.of(request, result) for request, result in zip(requests, results)])
        return results

    def _report(self, outcomes: Sequence[sweeps.JobOutcome]) -> None:
        """One line per job and the count, before the sweeper raises the first failure it finds."""
        for outcome in outcomes:
            (log.info if outcome.state == "completed" else log.error)("\t%s", outcome.line())
        log.info("Sweep batch: %s", sweeps.summary(outcomes))
        if self.outcomes:  # batches of one sweep add up in the same file
            path = Path(self.outcomes)
            earlier = json.loads(path.read_text()) if path.is_file() else []
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(earlier + [asdict(outcome) for outcome in outcomes], indent=1))

    @contextlib.contextmanager
    def _backend(self, sweep_dir: Path) -> Iterator[sweeps.Backend]:
        if self.backend == "local":
            yield sweeps.LocalProcessBackend(sweep_dir / ".requests")
            return
        if self.function:  # inside the running app: the coordinator named its training function
            book = sweeps.CallBook(Path(self.calls), attach=_attach) if self.calls else None
            yield sweeps.ModalBackend(sweeps.import_object(self.function)(), book)
            return
        # `noesis-train -m ... hydra/launcher=modal`: start the app ourselves for the sweep's duration.
        assert self.config is not None, "setup() runs before launch()"
        given = cast(list[str], OmegaConf.to_container(self.config.hydra.overrides.task, resolve=False))
        task_overrides = [o for o in given if "," not in o.split("=", 1)[-1]]
        os.environ[MODAL_OVERRIDES_ENV] = json.dumps(task_overrides)
        entry = load_entry(PROJECT / self.entry)
        with entry.app.run():
            yield sweeps.ModalBackend(entry.training_function())
