"""`noesis train --help [SECTION]`: the groups and their options, and every key with its type, default and comment.

The comments are the schema's own (config/schema.py): each field's comment lines above it and the
comment on its line, read from the source, so the help can never say something the schema does not.
"""

from __future__ import annotations

import ast
import inspect
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

import yaml

from noesis_accel.config.overrides import ConfigTree
from noesis_accel.config.schema import choices
from noesis_accel.core.cli import UsageError

_WIDTH = 100


def field_comments(section: type) -> dict[str, str]:
    """{field: its comment} for a schema dataclass: the `#` lines right above the field and the one on its line."""
    source_lines, first = inspect.getsourcelines(section)
    tree = ast.parse(inspect.cleandoc("\n".join(line.rstrip("\n") for line in source_lines)))
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef))
    lines = [line.strip() for line in inspect.cleandoc("".join(source_lines)).splitlines()]
    comments = {}
    for statement in cls.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        row = statement.lineno - 1
        above: list[str] = []
        for line in reversed(lines[:row]):
            if not line.startswith("#"):
                break
            above.insert(0, line.lstrip("# "))
        own = lines[row].split("  # ", 1)[1] if "  # " in lines[row] else ""
        comments[statement.target.id] = " ".join(part for part in (*above, own) if part)
    return comments


def _type_words(section: type, name: str) -> str:
    """`int`, `float or null`, `one of auto, cpu`, `map`, `list of str`."""
    allowed = choices(section).get(name)
    hint = typing.get_type_hints(section)[name]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if allowed:
        words = "one of " + " | ".join(allowed)
    elif typing.get_origin(hint) is dict:
        words = "map"
    elif typing.get_origin(hint) is list:
        words = f"list of {getattr(typing.get_args(hint)[0], '__name__', 'any')}"
    elif hint is Any:
        words = "any"
    else:
        words = getattr(hint, "__name__", str(hint))
    return f"{words} or null" if optional and "null" not in words else words


def _default_words(section: type, name: str) -> str:
    field = next(f for f in fields(section) if f.name == name)
    if field.default is not MISSING:
        value = field.default
    elif field.default_factory is not MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value == "???":
        return "required"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix(" ...").strip()


def section_help(name: str, section: type) -> list[str]:
    """The lines for one section of the schema: its docstring, then each key."""
    lines = [f"[{name}] {inspect.getdoc(section) or ''}".rstrip()]
    comments = field_comments(section)
    for field in fields(section):
        if is_dataclass(field.type) or (isinstance(field.type, str) and field.type.endswith("Config")):
            continue
        lines.append(
            f"  {name}.{field.name}: {_type_words(section, field.name)} = {_default_words(section, field.name)}"
        )
        if comments.get(field.name):
            lines += _wrapped(comments[field.name], indent=6)
    return lines


def _wrapped(text: str, indent: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, _WIDTH, initial_indent=" " * indent, subsequent_indent=" " * indent)


def groups_help(tree: ConfigTree, only: str | None = None) -> list[str]:
    """The config groups, their options (the default marked) and how to choose one."""
    chosen = _chosen_options(tree)
    lines = ["groups: group=option (a group the defaults leave out, experiment or debug, takes +group=option)"]
    for group, options in tree.groups().items():
        if only and group != only:
            continue
        marked = [f"{option} (default)" if chosen.get(group) == option else option for option in options]
        prefix = "" if group in chosen else "+"
        lines.append(f"  {prefix}{group}: {' | '.join(marked)}")
    return lines


def _chosen_options(tree: ConfigTree) -> dict[str, str]:
    raw = yaml.safe_load((tree.conf_dir / f"{tree.primary}.yaml").read_text()) or {}
    return {
        str(key): str(value)
        for entry in raw.get("defaults", [])
        if isinstance(entry, dict)
        for key, value in entry.items()
        if not str(key).startswith(("override ", "hydra/"))
    }


def sections(schema: type) -> dict[str, type]:
    return {
        name: hint
        for name, hint in typing.get_type_hints(schema).items()
        if isinstance(hint, type) and is_dataclass(hint)
    }


def help_text(topic: str | None = None, tree: ConfigTree | None = None) -> str:
    """The whole help, or one section's and group's (`topic`: `data`, `optim`, `experiment`, ...)."""
    tree = tree or ConfigTree()
    parts = sections(tree.schema)
    if topic is not None and topic not in parts and topic not in tree.groups():
        known = sorted(set(parts) | set(tree.groups()))
        raise UsageError(f"{tree.command} --help {topic}: no such section or group; one of {', '.join(known)}")
    lines = []
    if topic is None:
        lines += [
            f"usage: {tree.command} [RUN_DIR] [group=option ...] [key=value ...] [-m]",
            "",
            "  RUN_DIR    continue that run from its own config.yaml (overrides that change the math are refused)",
            "  key=value  set a key, with or without Hydra's +; a sweep: key=a,b with -m",
            "  -m         a sweep: one job per combination (Hydra's multirun)",
            "  --help SECTION  one section's keys; --hydra-help: Hydra's own help; --cfg job: the composed config",
            "",
        ]
    if topic is None or topic in tree.groups():
        lines += groups_help(tree, topic) + [""]
    for name, section in parts.items():
        if topic is None or topic == name:
            lines += section_help(name, section) + [""]
    return "\n".join(lines).rstrip()
