"""`hydra/launcher=modal`: every job of a sweep in its own Modal call, in parallel, as override strings.

    noesis-train -m +experiment=noesis optim.lr=1e-4,2e-4 hydra/launcher=modal
    modal run launch/modal_entry.py -m +experiment=noesis optim.lr=1e-4,2e-4      # the same, from Modal's CLI
    noesis-train -m +experiment=tiny optim.lr=1e-3,3e-4 hydra/launcher=modal hydra.launcher.backend=local

`backend=local` runs each job in a local process through the very same request (for tests, or a
parallel sweep on one machine).
"""

# No `from __future__ import annotations`: Hydra loads plugin modules outside sys.modules, where
# dataclasses cannot resolve string annotations.
import contextlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from noesis_accel import sweeps
from noesis_accel.modal_job import OVERRIDES_ENV

log = logging.getLogger(__name__)
PROJECT = Path(__file__).resolve().parents[2]


@dataclass
class ModalLauncherConf:
    _target_: str = "hydra_plugins.noesis_modal_launcher.modal_launcher.ModalLauncher"
    backend: str = "modal"  # modal | local
    max_parallel: int = 16  # jobs in flight at once
    entry: str = "launch/modal_entry.py"  # the Modal app, relative to the project root


ConfigStore.instance().store(group="hydra/launcher", name="modal", node=ModalLauncherConf, provider="noesis_accel")

# Set by `modal run launch/modal_entry.py -m ...`, whose app is already running: jobs go to its function.
running_function: Any = None


class ModalLauncher(Launcher):
    def __init__(self, backend: str = "modal", max_parallel: int = 16, entry: str = "launch/modal_entry.py") -> None:
        if backend not in ("modal", "local"):
            raise ValueError(f"hydra.launcher.backend={backend!r}: use modal or local")
        self.backend, self.max_parallel, self.entry = backend, max_parallel, entry
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
        requests = sweeps.requests_for(self.config, self.task_function, job_overrides, initial_job_idx,
                                       project_config=to_modal)
        if not to_modal:
            # The resolved sweep dir (it may hold a timestamp) goes along, so every job agrees on it.
            sweep_dir.mkdir(parents=True, exist_ok=True)
            for request in requests:
                request.hydra_overrides.append(f"hydra.sweep.dir={sweep_dir}")
        log.info("Launching %d jobs on %s", len(requests), "Modal" if to_modal else "local processes")
        for request in requests:
            log.info("\t#%d : %s", request.job_num, " ".join(request.overrides))
        with self._backend(sweep_dir) as backend:
            return sweeps.run_all(backend, requests, self.max_parallel)

    @contextlib.contextmanager
    def _backend(self, sweep_dir: Path) -> Iterator[sweeps.Backend]:
        if self.backend == "local":
            yield sweeps.LocalProcessBackend(sweep_dir / ".requests")
            return
        if running_function is not None:
            yield sweeps.ModalBackend(running_function)
            return
        # `noesis-train -m ... hydra/launcher=modal`: start the app ourselves for the sweep's duration.
        given = OmegaConf.to_container(self.config.hydra.overrides.task, resolve=False)
        task_overrides = [o for o in given if "," not in o.split("=", 1)[-1]]
        os.environ[OVERRIDES_ENV] = json.dumps(task_overrides)
        spec = importlib.util.spec_from_file_location("noesis_modal_entry", PROJECT / self.entry)
        entry = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(entry)
        with entry.app.run():
            yield sweeps.ModalBackend(entry.training_function())
