"""Composition of every config group and experiment, and `validate` errors."""

from __future__ import annotations

import pytest
from conftest import run_cli
from omegaconf import OmegaConf

from noesis_accel.config import CONF_DIR, accumulation_steps, compose, differing_math_keys, validate
from noesis_accel.core.errors import ConfigError

GROUPS = ["model", "data", "peft", "optim", "train", "ckpt", "distributed"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option == "jsonl":
        overrides.append("data.path=/tmp/train.jsonl")
    if group == "distributed" and option != "single":
        pass  # multi-process layouts validate with the default batch (8 = 4 x 1 x 2 for ddp)
    if group == "distributed" and option == "zero2":
        overrides += ["train.global_batch_size=32"]
    cfg = compose(overrides)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate(cfg)


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
