"""The override words of a command line, checked against conf/ and the schema before Hydra sees them.

Hydra's own answers to a first guess cost the user a round trip each: `train.num_train_epochs=3`
gets "Could not override ... To append to your config use +train.num_train_epochs=3" (and with the
`+` the run would train without it), a map without `+` gets "Key 'prompt' is not in struct", a word
that is not an override gets an ANTLR grammar error. Here every such word is one line naming the key
and what to write instead (`ConfigError`, exit 2), and the words whose meaning is plain are accepted as
meant: `experiment=tiny` is `+experiment=tiny`, `+data=jsonl` is `data=jsonl`, `+train.epochs=3` is
`train.epochs=3`, and a map for a map-valued key needs no `+`. `HYDRA_FULL_ERROR=1` leaves the words
to Hydra untouched, so everything Hydra would say is still there to see.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override, OverrideType
from hydra.errors import HydraException
from omegaconf import AnyNode, DictConfig, ListConfig, OmegaConf, ValueNode
from omegaconf.errors import OmegaConfBaseException

from noesis_accel.config.keys import declared_keys, is_declared, unknown_key_line
from noesis_accel.config.paths import CONF_DIR
from noesis_accel.config.schema import Config
from noesis_accel.core.errors import ConfigError

# Hydra's flags that take the next word as their value (`--cfg job`, `-p train`).
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
FLAGS_WITH_VALUE |= {"--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}
# `--info` takes one of these, or nothing.
INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
_KINDS = {"IntegerNode": "a whole number", "FloatNode": "a number", "BooleanNode": "true or false"}


@dataclass(frozen=True)
class ConfigTree:
    """What a config's command line may name: its groups and their options, and its schema."""

    schema: type = Config
    conf_dir: Path = CONF_DIR
    primary: str = "config"  # the primary config file, whose defaults list says which groups are chosen
    extra_options: tuple[tuple[str, str], ...] = ()  # (group, option) offered outside conf/ (noesis-eval's run)
    command: str = "noesis train"

    def groups(self) -> dict[str, list[str]]:
        return config_groups(self.conf_dir, self.extra_options)

    def chosen_groups(self) -> set[str]:
        """The groups the primary config's defaults list chooses (`data: sample`): set without `+`."""
        return defaults_groups(self.conf_dir / f"{self.primary}.yaml")


@functools.lru_cache(maxsize=8)
def config_groups(conf_dir: Path, extra_options: tuple[tuple[str, str], ...] = ()) -> dict[str, list[str]]:
    """{group: its options}: the folders of conf/ that hold YAML files, and their file names."""
    groups = {}
    for folder in sorted(p for p in conf_dir.iterdir() if p.is_dir()):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            groups[folder.name] = options + [o for g, o in extra_options if g == folder.name and o not in options]
    return groups


@functools.lru_cache(maxsize=8)
def defaults_groups(primary: Path) -> set[str]:
    raw = yaml.safe_load(primary.read_text()) or {}
    chosen = set()
    for entry in raw.get("defaults", []):
        if isinstance(entry, dict):
            key = str(next(iter(entry)))
            if not key.startswith(("override ", "hydra/")):
                chosen.add(key)
    return chosen


def is_override_word(word: str) -> bool:
    return not word.startswith("-") and ("=" in word or word.startswith(("+", "~")))


def check_words(words: Sequence[str], tree: ConfigTree | None = None) -> list[str]:
    """`words` (a command line's, flags included) checked, each override as Hydra will apply it.

    Raises ConfigError with one line for the first word that cannot be right. Flags and their values
    pass through; a word that is neither a flag nor an override is the caller's to interpret.
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return list(words)
    tree = tree or ConfigTree()
    values = _flag_values(words)
    return [
        word if i in values or not is_override_word(word) else check_word(word, tree) for i, word in enumerate(words)
    ]


def _flag_values(words: Sequence[str]) -> set[int]:
    """The places of the words that are a flag's value (`--cfg job`: `job`), not overrides or a RUN_DIR."""
    places = set()
    for i, word in enumerate(words[:-1]):
        if i in places:
            continue
        if word in FLAGS_WITH_VALUE or (word in ("--info", "-i") and words[i + 1] in INFO_TOPICS):
            places.add(i + 1)
    return places


def check_word(word: str, tree: ConfigTree) -> str:
    """One override word as Hydra will apply it (`+` added or dropped where only one meaning exists)."""
    override = parse_word(word, tree.command)
    key = override.key_or_group
    if override.is_hydra_override() or key.startswith("hydra"):
        return word
    if key in tree.groups():
        return _group_word(word, override, tree)
    if not is_declared(key, tree.schema):
        raise ConfigError(unknown_key_line(key, tree.schema, tree.command))
    if override.is_delete():
        return word
    node = _schema_node(tree.schema, key)
    for value in values_of(override):
        _check_value(key, value, node, tree)
    if override.type is OverrideType.ADD and isinstance(node, ValueNode):
        return word[1:]  # `+train.epochs=3`: the key exists, so it is a change, which Hydra's `+` refuses
    if override.type is OverrideType.CHANGE and isinstance(node, DictConfig) and _all_maps(override):
        return f"+{word}"  # a map into a map-valued key: Hydra merges it only as an addition
    return word


def parse_word(word: str, command: str = "noesis train") -> Override:
    try:
        return OverridesParser.create().parse_override(word)
    except HydraException as err:
        reason = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ConfigError(
            f"{word!r} is not an override ({reason}); write key=value, quoting a value with spaces, "
            f"commas or brackets: key='a, b' ({command} --help lists the keys)"
        ) from None


def values_of(override: Override) -> list[Any]:
    """The value, or each value of a sweep (`optim.lr=1e-3,3e-4`)."""
    if override.is_sweep_override():
        if override.is_interval_sweep() or isinstance(override.value(), Glob):
            return []  # a sweeper's interval (bounds), a group's glob (its options, listed by Hydra's loader)
        return list(override.sweep_iterator())
    return [override.value()]


def _all_maps(override: Override) -> bool:
    return all(isinstance(value, dict) for value in values_of(override))


def _group_word(word: str, override: Override, tree: ConfigTree) -> str:
    group = override.key_or_group
    options = tree.groups()[group]
    if not override.is_delete():
        for value in values_of(override):
            if value is not None and str(value) not in options:  # null: Hydra drops the group's default
                raise ConfigError(
                    f"{group}={value}: no such option of {group}; one of {', '.join(options)} "
                    f"(files in {tree.conf_dir.name}/{group}/)"
                )
    chosen = group in tree.chosen_groups()
    if override.type is OverrideType.ADD and chosen:
        return word[1:]  # `+data=jsonl`: data is chosen already, so this replaces it
    if override.type is OverrideType.CHANGE and not chosen:
        return f"+{word}"  # `experiment=tiny`: nothing to replace, so it is added
    return word


@functools.lru_cache(maxsize=4)
def _schema(schema: type) -> DictConfig:
    return OmegaConf.structured(schema)


def _schema_node(schema: type, key: str) -> Any:
    """The schema's node for `key`, or None below a free-form key."""
    if key not in declared_keys(schema):
        return None
    parent, _, leaf = key.rpartition(".")
    container = OmegaConf.select(_schema(schema), parent) if parent else _schema(schema)
    return container._get_node(leaf) if isinstance(container, DictConfig) else None


def _check_value(key: str, value: Any, node: Any, tree: ConfigTree) -> None:
    """A value the key's type cannot hold: one line naming the key and the type."""
    if isinstance(value, str) and "${" in value:
        return  # an interpolation: its type is known once it resolves (validate checks that)
    if isinstance(node, DictConfig) and not _is_any_map(node):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{key}: takes a map, e.g. {key}={{name: value}}, not {_shown(value)}")
        return
    if isinstance(node, ListConfig):
        if value is not None and not isinstance(value, list):
            raise ConfigError(f"{key}: takes a list, e.g. {key}=[a,b], not {_shown(value)}")
        return
    if isinstance(node, AnyNode):
        return  # Any: a string, a list (modal.gpu's fallbacks), a map; the key's own check reads it
    if isinstance(node, ValueNode):
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: takes {_kind(node)}, not {_shown(value)}")
        try:
            node.validate_and_convert(value)
        except OmegaConfBaseException:
            raise ConfigError(f"{key}: takes {_kind(node)}, not {_shown(value)}") from None


def _is_any_map(node: DictConfig) -> bool:
    return node._metadata.element_type is Any and node._metadata.key_type is Any


def _shown(value: Any) -> str:
    return "null" if value is None else repr(value)


def _kind(node: ValueNode) -> str:
    kind = _KINDS.get(type(node).__name__, "a string")
    return f"{kind} or null" if node._is_optional() else kind


def positional_words(words: Sequence[str]) -> list[str]:
    """The words that are neither flags, nor a flag's value, nor overrides (`noesis train RUN_DIR`)."""
    values = _flag_values(words)
    return [w for i, w in enumerate(words) if i not in values and not w.startswith("-") and not is_override_word(w)]
