"""Task functions for the launcher tests: module-level, so another process can import them by name."""

from __future__ import annotations

from typing import Any


def return_100(_cfg: Any) -> int:
    return 100
