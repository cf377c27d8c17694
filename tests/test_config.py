"""Composition of every config group and experiment, and `validate` errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from helpers import typed
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from noesis_accel.config import (
    CHOICES,
    CONF_DIR,
    Config,
    Resume,
    accumulation_steps,
    compose,
    differing_math_keys,
    register,
    resume_mode,
    strategy,
    strategy_names,
    validate,
    world_size,
)
from noesis_accel.core.errors import ConfigError

# Every shipped option composed before the defaults were moved into the schema (conf/ then restated
# them): the defaults in full and, per option, the keys where it differs from them. Unresolved, so
# ${package_dir:...} paths do not depend on the machine.
SNAPSHOT = json.loads((Path(__file__).parent / "fixtures" / "composed_configs.json").read_text())

GROUPS = ["model", "data", "peft", "optim", "train", "ckpt", "distributed"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option == "jsonl":
        overrides.append("data.path=/tmp/train.jsonl")
    if group == "distributed" and option in ("zero2", "fsdp2"):
        overrides += ["train.global_batch_size=32"]  # 32 = 4 x 1 x 8
    cfg = compose(overrides)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate(cfg)
    if group == "distributed":
        # Each layout is the strategy its file names, and its process count divides the batch it runs with.
        assert strategy(cfg) == option
        assert (world_size(cfg) > 1) == (option != "single")
        micro, world = cfg.train.micro_batch_size, world_size(cfg)
        assert micro * accumulation_steps(cfg) * world == cfg.train.global_batch_size


@pytest.mark.parametrize("debug", sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml")))
def test_every_debug_variant_applies_after_the_experiment(debug: str) -> None:
    cfg = compose(["+experiment=noesis", f"+debug={debug}"])
    validate(cfg)
    assert cfg.distributed.num_processes == 1 and cfg.train.max_steps is not None  # debug wins


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    cfg = compose([f"+experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)
    validate(cfg)


def test_noesis_recipe_is_the_production_recipe() -> None:
    cfg = compose(["+experiment=noesis"])
    assert cfg.distributed.type == "zero2" and cfg.distributed.num_processes == 8
    assert cfg.train.global_batch_size == 80 and cfg.train.epochs == 3
    assert cfg.optim.name == "adamw8bit" and cfg.train.mixed_precision == "bf16"
    assert cfg.ckpt.every == 0.1 and cfg.peft.enabled
    assert accumulation_steps(cfg) == 5  # 80 = 2 x 5 x 8
    assert "8B" in cfg.model.name_or_path


def test_public_keys_exist() -> None:
    cfg = compose([])
    for key in [
        "run.root",
        "run.name",
        "data.path",
        "data.min_examples",
        "data.max_length",
        "train.max_steps",
        "train.epochs",
        "train.global_batch_size",
        "train.micro_batch_size",
        "train.seed",
        "optim.name",
        "optim.lr",
        "ckpt.every",
        "ckpt.keep_last",
        "ckpt.resume",
        "distributed.type",
    ]:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key


def test_validate_reports_every_problem_at_once() -> None:
    cfg = compose(["optim.lr=-1", "ckpt.every=1.5", "optim.name=sgd", "train.mixed_precision=fp8", "ckpt.keep_last=0"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    for key in ["optim.lr", "ckpt.every", "optim.name", "train.mixed_precision", "ckpt.keep_last"]:
        assert key in message


def test_impossible_batch_lists_valid_combinations() -> None:
    cfg = compose(["distributed=ddp", "distributed.num_processes=3", "train.global_batch_size=8"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "valid train.micro_batch_size values are none" in str(err.value)
    assert "valid world sizes are [1, 2]" in str(err.value)
    cfg = compose(["train.global_batch_size=12", "train.micro_batch_size=5"])
    with pytest.raises(ConfigError, match=r"valid train.micro_batch_size values are \[1, 2, 3, 4, 6, 12\]"):
        validate(cfg)


def test_restart_compares_only_math_keys() -> None:
    saved = OmegaConf.to_container(compose([]), resolve=True)
    same_math = compose(["ckpt.every=0.2", "train.log_every=5", "run.root=/elsewhere"])
    assert differing_math_keys(saved, same_math) == []
    changed = compose(["optim.lr=0.1", "train.seed=1"])
    assert differing_math_keys(saved, changed) == ["optim.lr", "train.seed"]


def test_unknown_key_is_a_clear_error_without_traceback() -> None:
    result = run_cli(["train.learning_rate=0.1"])
    assert result.returncode != 0
    assert "learning_rate" in result.stderr and "Traceback" not in result.stderr


def test_bad_value_is_a_clear_error_without_traceback(tmp_path) -> None:
    result = run_cli([f"run.root={tmp_path}", "optim.name=sgd", "ckpt.keep_last=0"])
    assert result.returncode == 2
    assert "optim.name" in result.stderr and "ckpt.keep_last" in result.stderr
    assert "Traceback" not in result.stderr


def _flat(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _changes_from_defaults(overrides: list[str]) -> dict:
    composed = _flat(OmegaConf.to_container(compose(overrides), resolve=False))
    defaults = SNAPSHOT["defaults"]
    absent = "<absent>"
    return {
        k: composed.get(k, absent)
        for k in sorted(composed.keys() | defaults.keys())
        if composed.get(k, absent) != defaults.get(k, absent)
    }


def test_defaults_compose_as_in_the_snapshot() -> None:
    assert _flat(OmegaConf.to_container(compose([]), resolve=False)) == SNAPSHOT["defaults"]


@pytest.mark.parametrize("name", sorted(SNAPSHOT["changes"]))
def test_every_shipped_option_composes_as_in_the_snapshot(name: str) -> None:
    """Each default is stated once (schema or group file); moving one must not change what composes."""
    assert _changes_from_defaults(name.split()) == SNAPSHOT["changes"][name]


def test_snapshot_covers_every_shipped_option() -> None:
    shipped = {f"+{g}={p.stem}" for g in ("experiment", "debug") for p in (CONF_DIR / g).glob("*.yaml")}
    shipped |= {f"{g}={p.stem}" for g in ("model", "data") for p in (CONF_DIR / g).glob("*.yaml")}
    assert shipped <= set(SNAPSHOT["changes"])


def test_eval_yaml_composes_as_in_the_snapshot() -> None:
    register()
    base = OmegaConf.to_container(compose([]), resolve=False)
    for group in ("model", "data"):
        ConfigStore.instance().store(group=group, name="run", node=base[group])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="eval", overrides=["run_dir=/runs/x"])
    finally:
        GlobalHydra.instance().clear()
    assert _flat(OmegaConf.to_container(cfg, resolve=False)) == SNAPSHOT["eval.yaml"]


def test_choices_come_from_the_schema_annotations() -> None:
    assert CHOICES["distributed.type"] == ("single", "ddp", "fsdp2", "zero2")  # conf/distributed/*.yaml
    assert CHOICES["model.attn_implementation"][-1] == "flex_attention"
    assert "tracker.mode" not in CHOICES  # null has a meaning of its own there; its own check says so
    with pytest.raises(ConfigError, match="distributed.type: 'fsdp' is not one of single, ddp, fsdp2, zero2"):
        validate(compose(["distributed.type=fsdp"]))


def test_strategy_names_come_from_conf_distributed_and_manifests_name_their_format() -> None:
    from noesis_accel.training.strategies import build_strategy, saved_format

    assert [build_strategy(typed([f"distributed={d}"])).name for d in strategy_names()] == list(strategy_names())
    assert strategy(compose(["+experiment=noesis"])) == "zero2"
    # Manifests written before formats were named: Accelerate's recorded type tells ZeRO-2 from the others.
    assert saved_format({"distributed_type": "DistributedType.DEEPSPEED"}) == "zero2"
    assert saved_format({"distributed_type": "DistributedType.MULTI_GPU"}) == saved_format({}) == "replicated"
    assert saved_format({"state_format": "dcp", "distributed_type": "DistributedType.MULTI_CPU"}) == "dcp"
    with pytest.raises(ValueError, match="distributed.type: 'fsdp' is not one of single, ddp, fsdp2, zero2"):
        strategy(OmegaConf.create({"distributed": {"type": "fsdp"}}))


def test_resume_values_are_read_in_one_place() -> None:
    assert resume_mode("auto") is Resume.AUTO and resume_mode("never") is Resume.NEVER
    assert resume_mode("runs/demo/checkpoints/step-000010") is Resume.PATH
    assert resume_mode(Config().ckpt.resume) is Resume.AUTO  # the schema's default is the named value


def test_importing_the_config_registers_nothing_until_compose() -> None:
    """Registration is explicit: compose() (and the noesis-train entry) register, an import does not."""
    code = (
        "from omegaconf import OmegaConf\n"
        "import noesis_accel.config as c\n"
        "assert not OmegaConf.has_resolver('package_dir')\n"
        "c.compose([])\n"
        "assert OmegaConf.has_resolver('package_dir') and OmegaConf.has_resolver('conf_path')\n"
        "import noesis_accel.processes.train\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    # The Hydra entry composes through @hydra.main, not compose(): importing it registers both first.
    entry = (
        "from hydra.core.config_store import ConfigStore\n"
        "from omegaconf import OmegaConf\n"
        "import noesis_accel.processes.train\n"
        "assert OmegaConf.has_resolver('package_dir') and OmegaConf.has_resolver('conf_path')\n"
        "assert ConfigStore.instance().load('schema.yaml') is not None\n"
    )
    subprocess.run([sys.executable, "-c", entry], check=True, cwd=Path(__file__).parents[1])
