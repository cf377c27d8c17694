"""Output lines labelled by the job that wrote them, for sweep jobs that run side by side.

Two jobs printing into one terminal (local processes) or one log stream (Modal) interleave their
lines; each line then starts with `[label] ` so a reader can follow one job. Only Python-level
writes are labelled: a job's child processes write to the inherited descriptors directly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, TextIO


class LabelledLines:
    """A text stream that writes `[label] ` before every line it passes on to `stream`."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream, self.prefix = stream, f"[{label}] "
        self._at_line_start = True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                self.stream.write(self.prefix)
            self.stream.write(piece)
            self._at_line_start = piece.endswith(("\n", "\r"))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...: the stream's own
        return getattr(self.stream, name)


@contextlib.contextmanager
def labelled_output(label: str | None) -> Iterator[None]:
    """sys.stdout and sys.stderr labelled with `label` while the block runs; unchanged for None."""
    if not label:
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = LabelledLines(sys.stdout, label), LabelledLines(sys.stderr, label)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
