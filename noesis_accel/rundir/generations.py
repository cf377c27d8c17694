"""A small JSON record that is only ever replaced by compare-and-swap: one file per generation.

    <folder>/000000000001.json, 000000000002.json, ...   the newest one is the record

A file is never rewritten. Whoever read generation g and wants to replace it writes g+1, and only
one writer can create g+1: it is written to a private temporary file and then hard-linked to its
name, which fails with `FileExistsError` when the name exists (POSIX `link`, like `O_EXCL`, never
replaces). So the writer that creates g+1 first wins and every other one learns that it lost,
whatever happened between its read and its write. The name appears with its content complete, so a
reader never sees half of a record. A filesystem without hard links gets the file created with
`O_CREAT | O_EXCL` instead: still exclusive, but a reader can then see it before it is fully
written (it reads as unreadable, with the file's modification time).

Old generations are pruned, oldest first, by the writer of a newer one, and the newest one is
never removed; so a pruned name could be created again by a writer that read its predecessor long
ago and was paused since (the very writer a stale takeover presumes dead). A writer therefore
checks after creating g+1 that g still exists and nothing newer than g+1 does: if g was pruned,
some writer created a generation after g (pruning goes oldest first, so g went before any g+1 that
existed), and the late g+1 is removed again and reported as lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_GENERATION_FILE = re.compile(r"^(\d{12})\.json$")
_TEMPORARY_FILE = re.compile(r"^\.(\d{12})\.[0-9a-f]+\.tmp$")  # left by a writer that died before linking


@dataclass(frozen=True)
class Generation:
    """What a reader saw: the newest generation's number (0: none written yet) and its record."""

    number: int
    record: dict[str, Any] | None  # None only when number is 0
    unreadable: bool = False  # the file is damaged, or still being written where there are no hard links
    written: float = 0.0  # the file's modification time, for judging an unreadable one


class GenerationalRecord:
    """The record kept in `folder`; `current()` reads it, `swap()` replaces it if nobody did first."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, number: int) -> Path:
        return self.folder / f"{number:012d}.json"

    def numbers(self) -> list[int]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for name in names if (m := _GENERATION_FILE.match(name)))

    def current(self) -> Generation:
        """The newest generation. One pruned between listing and reading is looked up again."""
        while True:
            numbers = self.numbers()
            if not numbers:
                return Generation(0, None)
            path = self.path(numbers[-1])
            try:
                text = path.read_text()
                written = path.stat().st_mtime
            except FileNotFoundError:
                continue  # a newer generation was written and this one pruned: list again
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                return Generation(numbers[-1], {}, unreadable=True, written=written)
            return Generation(numbers[-1], record, written=written)

    def swap(self, expected: int, record: dict[str, Any]) -> bool:
        """Write generation `expected + 1` with `record`: True if this call created it, False if another
        writer created it first (the record this caller read is no longer the current one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(expected + 1)
        text = json.dumps(record)
        tmp = self.folder / f".{expected + 1:012d}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(text)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network and FUSE filesystems): create in place
            if not self._create_exclusively(target, text):
                return False
        finally:
            tmp.unlink(missing_ok=True)
        if (expected > 0 and not self.path(expected).exists()) or self.numbers()[-1:] != [expected + 1]:
            target.unlink(missing_ok=True)  # created late, in a name an earlier winner had and pruned
            return False
        return True

    def prune(self, below: int) -> None:
        """Remove the generations older than `below`; a reader that is reading one lists again."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        old = []
        for name in names:
            match = _GENERATION_FILE.match(name) or _TEMPORARY_FILE.match(name)
            if match and int(match.group(1)) < below:
                old.append((int(match.group(1)), name))
        for _, name in sorted(old):  # oldest first: `swap` relies on it to spot a late writer
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()

    @staticmethod
    def _create_exclusively(target: Path, text: str) -> bool:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return True
