"""User-facing errors: one clear message naming the file, line or key and the fix."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake the user can fix (bad config, bad data, missing file); printed without a traceback."""

    exit_code = 2


class ConfigError(UserError):
    """The composed config is invalid; the message lists every problem with its key."""


class DataError(UserError):
    """The training data is unusable; the message names the file, line and field."""


class ResumeError(UserError):
    """A restart cannot continue the run it found (config changed, checkpoint unusable, ...)."""


def one_line(err: BaseException) -> str:
    """Hydra's and OmegaConf's several-line messages (and their cause), as one line."""
    parts: list[str] = []
    for source in (err, err.__cause__):
        if source is None:
            continue
        for line in str(source).splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break  # Hydra's provider list says nothing a user can act on
            if line and not line.startswith(("full_key:", "object_type", "reference_type")) and line not in parts:
                parts.append(line)
    return " ".join(parts) or err.__class__.__name__


def safe_for_pipes(fn: Callable[..., T]) -> Callable[..., T]:
    """A command whose reader went away (`noesis-status | head`) ends quietly, as a C program would.

    Python raises BrokenPipeError on the next write and again when it flushes stdout at exit; the
    rest of the output is for nobody, so stdout is pointed at /dev/null and the exit code is that
    of a process ended by SIGPIPE (141).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)

    return wrapper


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn a `UserError` raised by `fn` into a one-paragraph message on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {redact(str(err))}", file=sys.stderr, flush=True)
            sys.exit(err.exit_code)

    return wrapper


# Environment variables whose values must never reach a terminal, a log or a file we write.
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY)", re.IGNORECASE)


def redact_tree(value: Any) -> Any:
    """`redact` applied to every string inside nested dicts and lists (a config about to be written)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_tree(item) for item in value]
    return value


def redact(text: str) -> str:
    """`text` with the value of every secret-looking environment variable (HF_TOKEN, ...) replaced by ***."""
    for name, value in os.environ.items():
        if len(value) >= 8 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "***")
    return text
