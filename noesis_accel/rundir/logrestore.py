"""A log cut short on the Volume comes back from the newest checkpoint's copy of it.

events.jsonl (the attempts, so what earlier attempts cost against `budget.usd`) and metrics.jsonl
(the loss curve) live beside the checkpoints, not in them, and are rewritten whole by every commit
that carries a change. A commit that dies while it copies one keeps only its first bytes, and a crash
can lose a file whose rename's data never reached the disk: the records are gone for good, and the
next attempt would count itself as the first and pay no heed to what was spent.

So each checkpoint keeps a copy of both in `history/` (rundir/checkpoint.py writes it before the
manifest, whose checksums then cover it). Both logs only grow between resumes, so a checkpoint's copy
is a prefix of what the live file holds later. A live file with fewer records than its newest copy,
and equal to that copy as far as it goes, lost its end: the start replaces it with the copy. A file
that disagrees with the copy is another trajectory's and is left as it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from noesis_accel.rundir.checkpoint import HISTORY, MANIFEST, file_crc32
from noesis_accel.rundir.layout import RunDir, json_lines

log = logging.getLogger(__name__)


def restore_cut_logs(rundir: RunDir) -> list[str]:
    """Replace each log that lost its end by the newest checkpoint's copy; the names of those replaced."""
    copies = newest_verified_history(rundir)
    if copies is None:
        return []
    restored = []
    for live in rundir.history_logs:
        saved = copies / live.name
        if not saved.is_file():
            continue
        # One writer formats both the same way, so a live log as long as its copy has lost nothing; the
        # usual start stops here, without parsing a log of 100k steps (about 0.5 s each).
        if live.is_file() and live.stat().st_size >= saved.stat().st_size:
            continue
        have, kept = json_lines(live), json_lines(saved)
        if len(have) >= len(kept) or kept[: len(have)] != have:
            continue
        _replace_with(live, saved)
        restored.append(live.name)
        log.warning(
            "%s held %d of the %d records checkpoint %s kept of it: its end was lost after it was written "
            "(a commit that died while copying it, or a crash); restored from the checkpoint's copy",
            live,
            len(have),
            len(kept),
            copies.parent.name,
        )
    return restored


def newest_verified_history(rundir: RunDir) -> Path | None:
    """The `history/` folder of the newest checkpoint whose manifest vouches for its copies, if any."""
    for _, step_dir in rundir.step_dirs():
        try:
            files = json.loads((step_dir / MANIFEST).read_text()).get("files", {})
        except (OSError, json.JSONDecodeError):
            continue
        listed = {name: entry for name, entry in files.items() if name.startswith(f"{HISTORY}/")}
        if listed and all(_matches(step_dir / name, entry) for name, entry in listed.items()):
            return step_dir / HISTORY
    return None


def _matches(path: Path, entry: object) -> bool:
    if not isinstance(entry, dict) or not path.is_file() or path.stat().st_size != entry.get("bytes"):
        return False
    return file_crc32(path) == entry.get("crc32")


def _replace_with(live: Path, saved: Path) -> None:
    """Atomically, and durably before anything is appended to it again."""
    tmp = live.with_name(live.name + ".restore.tmp")
    shutil.copyfile(saved, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, live)
