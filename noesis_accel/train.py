"""The `noesis-train` entry: compose the config with Hydra, then `run(cfg)`.

`run(cfg, committer)` is the one entry that the CLI, Hydra multirun sweeps and the Modal
function all call.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from noesis_accel import config as _config  # registers the schema and resolvers  # noqa: F401
from noesis_accel.config import RESTART_SAFE_PREFIXES, validate
from noesis_accel.distributed import launch, needs_launch
from noesis_accel.errors import UserError
from noesis_accel.signals import InterruptedBySignal
from noesis_accel.trainer import RunResult, Trainer
from noesis_accel.volumes import Committer


def run(cfg: DictConfig, committer: Committer | None = None, overrides: list[str] | None = None) -> RunResult | int:
    """Train `cfg` to completion (resuming if its run dir holds checkpoints).

    With `distributed.num_processes > 1` and no launcher around us, this starts the processes
    (each of which calls `run` again) and returns their exit code.
    """
    quiet_known_noise()
    validate(cfg)
    if needs_launch(cfg):
        return launch(cfg, overrides or [])
    return Trainer(cfg, committer).run()


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
        if key.startswith(RESTART_SAFE_PREFIXES) or key.startswith("hydra."):
            continue
        # Only characters that need no quoting in an override or a path.
        parts.append(re.sub(r"[^A-Za-z0-9._-]+", "-", override.lstrip("+~")).strip("-"))
    if parts:
        cfg.run.name = f"{cfg.run.name}__{'_'.join(parts)}"


@hydra.main(version_base=None, config_path=str(_config.CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    _name_sweep_job(cfg)
    overrides = list(HydraConfig.get().overrides.task)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        overrides.append(f"run.name={cfg.run.name}")  # the processes a launch starts must agree on it
    try:
        result = run(cfg, overrides=overrides)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except InterruptedBySignal as stop:
        print(f"interrupted: {stop}", file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)  # non-zero, so Modal (or any supervisor) retries and resumes
    if isinstance(result, int) and result != 0:
        sys.exit(result)  # the launched processes already printed their one-line error


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


def main() -> None:
    quiet_known_noise()
    _hydra_main()


if __name__ == "__main__":
    main()
