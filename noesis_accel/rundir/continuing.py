"""`noesis train RUN_DIR [key=value ...]`: the config a run was started with, read back from its run dir.

A run dir holds its resolved config (config.yaml), so continuing a run needs no retyped command:
the file is laid over the schema (a key added to the schema since keeps its default) and the
command's overrides are applied on top. The trainer's guard then compares the result with the same
file, so an override that changes the math is refused exactly as it is for a retyped command.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from noesis_accel.config.keys import unknown_key_line
from noesis_accel.config.overrides import ConfigTree, check_word, parse_word, values_of
from noesis_accel.config.schema import Config
from noesis_accel.config.typed import over_schema
from noesis_accel.core.cli import UsageError
from noesis_accel.core.errors import UserError
from noesis_accel.rundir.layout import RunDir


def is_run_dir(word: str) -> bool:
    return (Path(word) / "config.yaml").is_file()


def config_of_run_dir(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's own config.yaml, with `overrides` (checked key=value words) applied, located at `run_dir`.

    A DictConfig: the overrides are OmegaConf's, and `run` (the entry) validates and types the result.
    """
    rundir = RunDir(run_dir).require()
    cfg = saved_config(rundir, "start it with the full command instead")
    _locate(cfg, run_dir)
    for word in overrides:  # after: a `ckpt.resume=` of this command's wins
        _apply(cfg, word)
    return cfg


def saved_config(rundir: RunDir, instead: str) -> DictConfig:
    """The run dir's config.yaml laid over the schema; a file the schema cannot hold is one line, saying `instead`."""
    try:
        return over_schema(rundir.saved_config())
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "config"
        raise UserError(
            f"{rundir.config_file}: {key}: {str(err).splitlines()[0]} (written by another version of "
            f"noesis_accel?); {instead}"
        ) from None


def _apply(cfg: DictConfig, word: str) -> None:
    tree = ConfigTree()
    word = check_word(word, tree)
    override = parse_word(word)
    key = override.key_or_group
    if key in tree.groups():
        raise UsageError(
            f"{word}: a run dir's config is resolved, so a group cannot be swapped in; set its keys instead "
            f"({tree.command} --help {key} lists them), or start a new run with the full command"
        )
    if override.is_delete() or override.is_sweep_override():
        raise UsageError(f"{word}: continuing one run takes key=value overrides only (no ~ and no sweeps)")
    if key.startswith("hydra"):
        raise UsageError(f"{word}: Hydra's settings do not apply when continuing a run dir")
    try:
        OmegaConf.update(cfg, key, values_of(override)[0], merge=True, force_add=override.is_add())
    except OmegaConfBaseException:
        raise UsageError(unknown_key_line(key, Config)) from None


def _locate(cfg: DictConfig, run_dir: Path) -> None:
    """Point run.root and run.name at `run_dir` itself: it may have been moved or reached by another path (`.`).

    Continuing means resuming the newest checkpoint, whatever `ckpt.resume` the first start was given
    (`never` would refuse the checkpoints it wrote, a path would go back to that one).
    """
    run_dir = run_dir.resolve()
    cfg.run.root = str(run_dir.parent)
    cfg.run.name = run_dir.name
    cfg.run.tag = None
    cfg.ckpt.resume = "auto"
