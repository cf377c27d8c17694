"""Deprecations: ours are errors in the test suite, the libraries' own are listed here with why.

The run this project was born from was cancelled after a deprecation warning nobody had acted on.
So a deprecated API that *our* code calls must fail the tests while it is still only a warning, and
the warnings of the libraries about their own internals, which we cannot fix, are silenced in one
list, each with its reason.

`NOESIS_DEPRECATIONS=error` (the test suite sets it, so every process a test starts has it too)
makes `warnings.warn` raise a DeprecationWarning or FutureWarning whose deprecated function was
called from `noesis_accel` (directly, or through helpers of the same library that warned). One
library calling another's deprecated API is theirs, and stays a warning.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from types import FrameType
from typing import Any

ENV = "NOESIS_DEPRECATIONS"
OURS = "noesis_accel"
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_HELPER_DEPTH = 4  # frames of the warning library's own helpers (a decorator, a shim) between us and warn


@dataclass(frozen=True)
class Silenced:
    """A library's warning about its own code: not ours to fix, so not shown to users."""

    category: type[Warning]
    message: str  # a regular expression, matched at the start of the warning's text
    reason: str


SILENCED = (
    Silenced(
        FutureWarning,
        ".*is_gradient_checkpointing.*",
        "peft reads transformers' deprecated `is_gradient_checkpointing` property inside get_peft_model and "
        "prepare_model_for_kbit_training; our code reads `is_activation_checkpointing`",
    ),
    Silenced(
        DeprecationWarning,
        ".*torch.jit.script_method.*",
        "torch's own torch/utils/mkldnn.py decorates its classes with it when torch imports that module",
    ),
)


def silence_library_warnings() -> None:
    for entry in SILENCED:
        warnings.filterwarnings("ignore", message=entry.message, category=entry.category)


def _package(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", "")).split(".")[0]


def called_from_ours(warning_site: FrameType | None) -> bool:
    """Whether the function that warned (`warning_site`) was called by our code.

    Frames of the warning's own library above it are its helpers (a deprecation decorator, an alias
    that forwards); the first frame outside that library decides: ours, or another library's.
    """
    if warning_site is None:
        return False
    library = _package(warning_site)
    if library == OURS:
        return True
    frame = warning_site.f_back
    for _ in range(_HELPER_DEPTH):
        if frame is None:
            return False
        package = _package(frame)
        if package == OURS:
            return True
        if package != library:
            return False
        frame = frame.f_back
    return False


_original_warn = warnings.warn


def _strict_warn(message: Any, category: Any = None, stacklevel: int = 1, source: Any = None, **kwargs: Any) -> None:
    kind = category if category is not None else (type(message) if isinstance(message, Warning) else UserWarning)
    if isinstance(kind, type) and issubclass(kind, DEPRECATIONS) and called_from_ours(sys._getframe(1)):
        raise (message if isinstance(message, Warning) else kind(message))
    _original_warn(message, category, stacklevel + 1, source, **kwargs)


def make_ours_errors() -> None:
    """`warnings.warn` raises the deprecations our calls cause (idempotent)."""
    warnings.warn = _strict_warn


def apply_policy() -> None:
    """The libraries' own deprecations silenced; ours raised when NOESIS_DEPRECATIONS=error."""
    silence_library_warnings()
    if os.environ.get(ENV) == "error":
        make_ours_errors()
