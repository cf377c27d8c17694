"""One argument style for every command after training: `RUN_DIR key=value ...`.

`noesis-train` takes Hydra overrides; the other commands take the same style, so one way of writing
a command works everywhere: a run directory, then `key=value` words. A key of the command's own
small schema (`checkpoint=`, `out=`, `price=`) is an option; any other key is a Hydra override of
the command's config, for the commands that have one, and a one-line error for the others. The
`--option VALUE` spellings the commands had before stay accepted, so no documented command breaks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from noesis_accel.core.errors import UserError

HELP_WORDS = ("-h", "--help")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_KINDS = {str: "a value", int: "a whole number", float: "a number", bool: "true or false"}


class UsageError(UserError):
    """A word the command does not take (unknown option or key, a missing or malformed value)."""


@dataclass(frozen=True)
class Option:
    """One key of a command's schema: `key=VALUE`, or one of its older spellings (`--key VALUE`)."""

    key: str
    help: str
    kind: type = str  # str, int, float or bool; a bool alias takes no value (`--verify` = `verify=true`)
    metavar: str = "VALUE"
    default: Any = None
    aliases: tuple[str, ...] = ()
    # A key of the command's Hydra config (noesis-eval's `checkpoint`): it joins the overrides.
    is_override: bool = False

    def spelled(self) -> str:
        old = ", ".join(alias if self.kind is bool else f"{alias} {self.metavar}" for alias in self.aliases)
        return f"{self.key}={self.metavar}" + (f" (or {old})" if old else "")

    def convert(self, value: str, spelling: str) -> Any:
        """`value` as this option's kind; a UsageError in the words the user typed otherwise."""
        try:
            if self.kind is bool:
                if value.lower() not in _TRUE + _FALSE:
                    raise ValueError(value)
                return value.lower() in _TRUE
            if self.kind is int and not value.isdigit():
                raise ValueError(value)
            return self.kind(value)
        except ValueError:
            raise UsageError(f"{spelling} takes {_KINDS.get(self.kind, 'a value')}, not {value!r}") from None


@dataclass(frozen=True)
class Command:
    """What a command takes: whether a run directory, its options, and what its overrides override."""

    name: str  # `noesis NAME ...`, also installed as `noesis-NAME`
    summary: str
    options: tuple[Option, ...] = ()
    run_dir: bool = True
    run_dir_optional: bool = False  # the command does something without one (`noesis status` lists the runs)
    overrides: str | None = None  # what the Hydra overrides are overrides of; None: the command takes none
    examples: tuple[str, ...] = ()

    @property
    def prog(self) -> str:
        return f"noesis {self.name}"

    def usage(self) -> str:
        words = (["[RUN_DIR]"] if self.run_dir_optional else ["RUN_DIR"]) if self.run_dir else []
        words += [f"[{option.key}={option.metavar}]" for option in self.options]
        if self.overrides:
            words.append("[overrides]")
        return f"usage: {self.prog} " + " ".join(words)

    def help(self) -> str:
        lines = [self.usage(), "", self.summary, ""]
        if self.run_dir:
            lines.append("  RUN_DIR  the run directory, <run.root>/<run.name>, e.g. runs/demo")
        lines += [f"  {option.spelled()}\n      {option.help}" for option in self.options]
        if self.overrides:
            lines.append(f"  overrides  key=value: {self.overrides}")
        if self.examples:
            lines += ["", "examples:"] + [f"  {example}" for example in self.examples]
        return "\n".join(lines)

    def accepted(self) -> str:
        """The words this command takes, for an error message."""
        accepted = [option.spelled() for option in self.options]
        if self.overrides:
            accepted.append(f"overrides of {self.overrides}")
        return "; ".join(accepted) or "none but RUN_DIR"

    def option_named(self, word: str) -> Option | None:
        return next((option for option in self.options if word in option.aliases), None)

    def option_keyed(self, key: str) -> Option | None:
        return next((option for option in self.options if option.key == key), None)


@dataclass
class Arguments:
    """A command line, parsed: the run directory, the options (defaults filled in), the overrides."""

    run_dir: str | None
    options: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    # Overrides of someone else's config, set aside: the Modal app's `modal.volume=other`.
    app_overrides: list[str] = field(default_factory=list)
    given: set[str] = field(default_factory=set)  # the options on the command line, not defaulted

    def argv(self) -> list[str]:
        """The same command line in the one style: what to hand the command's `main` (the app's words left out)."""
        words = [self.run_dir] if self.run_dir is not None else []
        words += [f"{key}={_word(self.options[key])}" for key in self.options if key in self.given]
        return words + self.overrides


def _word(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def override_key(word: str) -> str:
    """`+experiment=noesis` -> `experiment`; `~eval.judge` -> `eval.judge`."""
    return word.lstrip("+~").split("=", 1)[0]


def has_key(word: str, keys: Sequence[str]) -> bool:
    """Whether the override `word` sets one of `keys` or a key inside it (`modal` covers `modal.gpu`)."""
    key = override_key(word)
    return any(key == k or key.startswith(k + ".") for k in keys)


def parse(command: Command, argv: Sequence[str], app_keys: Sequence[str] = ()) -> Arguments:
    """`argv` as `command` takes it; UsageError on a word it does not take, help printed on `--help`.

    `app_keys`: config keys that belong to an enclosing app, not to the command (the Modal app's
    `modal`, `experiment`); overrides of them land in `Arguments.app_overrides`.
    """
    if any(word in HELP_WORDS for word in argv):
        print(command.help())
        raise SystemExit(0)
    args = Arguments(run_dir=None, options={option.key: option.default for option in command.options})
    words = list(argv)
    while words:
        word = words.pop(0)
        if word.startswith("--") or (word.startswith("-") and len(word) == 2):
            _take_alias(command, args, word, words)
        elif "=" in word or word.startswith(("+", "~")):
            _take_key(command, args, word, app_keys)
        elif command.run_dir and args.run_dir is None:
            args.run_dir = word
        else:
            raise UsageError(f"{command.prog}: unexpected argument {word!r}; it takes {command.accepted()}")
    if command.run_dir and args.run_dir is None and not command.run_dir_optional:
        raise UsageError(
            f"{command.prog}: which run? give its RUN_DIR, e.g. {command.prog} runs/demo ({command.usage()})"
        )
    return args


def _take_alias(command: Command, args: Arguments, word: str, rest: list[str]) -> None:
    """`--checkpoint PATH`, `--checkpoint=PATH`, `--verify`: an older spelling of a schema key."""
    name, has_value, value = word.partition("=")
    option = command.option_named(name)
    if option is None:
        raise UsageError(f"{command.prog}: unknown option {name}; it takes {command.accepted()}")
    if not has_value:
        if option.kind is bool:
            value = "true"
        elif rest:
            value = rest.pop(0)
        else:
            raise UsageError(f"{name} needs a value: {name} {option.metavar}")
    _set(args, option, option.convert(value, name), value)


def _take_key(command: Command, args: Arguments, word: str, app_keys: Sequence[str]) -> None:
    """`key=value`: a schema key, an override of the app's config, or an override of the command's own."""
    option = command.option_keyed(word.split("=", 1)[0])
    if option is not None:
        value = word.split("=", 1)[1]
        _set(args, option, option.convert(value, option.key), value)
    elif has_key(word, app_keys):
        args.app_overrides.append(word)
    elif command.overrides:
        args.overrides.append(word)
    else:
        raise UsageError(f"{command.prog}: unknown key {override_key(word)}; it takes {command.accepted()}")


def _set(args: Arguments, option: Option, value: Any, text: str) -> None:
    if option.is_override:
        args.overrides.append(f"{option.key}={text}")
    else:
        args.options[option.key] = value
        args.given.add(option.key)


def command_line(argv: Sequence[str] | None) -> list[str]:
    """The words a command was given: `argv` when called in-process, the process's arguments otherwise."""
    return list(sys.argv[1:] if argv is None else argv)
