"""A log cut short on the Volume comes back from a checkpoint's copy of it.

events.jsonl (the attempts, so what earlier attempts cost against `budget.usd`) and metrics.jsonl
(the loss curve) live beside the checkpoints, not in them, and are rewritten whole by every commit
that carries a change. A commit that dies while it copies one keeps only its first bytes, and a crash
can lose a file whose rename's data never reached the disk: the records are gone for good, and the
next attempt would count itself as the first and pay no heed to what was spent.

So each checkpoint keeps a copy of both in `history/` (rundir/checkpoint.py writes it before the
manifest, whose checksums then cover it). A live log with fewer records than a copy it should hold,
and equal to that copy as far as it goes, lost its end, and is replaced by the copy:

- events.jsonl is never rewritten, so every checkpoint's copy, whichever trajectory wrote it, is a
  prefix of it: the longest copy the live file is a cut of is put back, when a start opens the run.
- metrics.jsonl is truncated at each resume point, so only the checkpoint a resume loads holds a copy
  of this trajectory's curve: it is put back from that one, just before the truncation, unless that
  checkpoint is another run dir's (`ckpt.resume=PATH` starts a new curve).

A log that disagrees with the copy is left as it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from noesis_accel.rundir.checkpoint import HISTORY, file_problem, read_manifest
from noesis_accel.rundir.layout import RunDir, json_lines

log = logging.getLogger(__name__)


def restore_cut_events(rundir: RunDir) -> bool:
    """Put events.jsonl back from the longest checkpoint copy it is a cut of (main process, before it is read)."""
    live = rundir.events_file
    have = live.stat().st_size if live.is_file() else 0
    copies = [step_dir / HISTORY / live.name for _, step_dir in rundir.step_dirs()]
    longer = [copy for copy in copies if copy.is_file() and copy.stat().st_size > have]  # usually none
    for copy in sorted(longer, key=lambda path: path.stat().st_size, reverse=True):
        if _vouched_for(copy) and restore_if_cut(live, copy):
            return True
    return False


def restore_cut_metrics(rundir: RunDir, checkpoint_dir: Path) -> bool:
    """Put metrics.jsonl back from the checkpoint a resume loads (verified by then), if it is a cut of that copy.

    Only a checkpoint of this run dir: one of another run (`ckpt.resume=PATH`) holds that run's curve.
    """
    if checkpoint_dir.resolve().parent != rundir.checkpoints.resolve():
        return False
    copy = checkpoint_dir / HISTORY / rundir.metrics_file.name
    return copy.is_file() and restore_if_cut(rundir.metrics_file, copy)


def restore_if_cut(live: Path, copy: Path) -> bool:
    """Replace `live` by `copy` when it holds fewer records and equals it as far as it goes."""
    # One writer formats both the same way, so a live log as long as the copy has lost nothing: the
    # usual start stops here, without parsing a log of 100k steps (about 0.5 s).
    if live.is_file() and live.stat().st_size >= copy.stat().st_size:
        return False
    have, kept = json_lines(live), json_lines(copy)
    if len(have) >= len(kept) or kept[: len(have)] != have:
        return False
    tmp = live.with_name(live.name + ".restore.tmp")
    shutil.copyfile(copy, tmp)
    with open(tmp, "rb") as handle:  # durable before anything is appended to it again
        os.fsync(handle.fileno())
    os.replace(tmp, live)
    log.warning(
        "%s held %d of the %d records checkpoint %s kept of it: its end was lost after it was written "
        "(a commit that died while copying it, or a crash); restored from the checkpoint's copy",
        live,
        len(have),
        len(kept),
        copy.parent.parent.name,
    )
    return True


def _vouched_for(copy: Path) -> bool:
    """Whether the manifest of the checkpoint holding `copy` lists it with these bytes (its checksum only)."""
    step_dir = copy.parent.parent
    try:
        files = read_manifest(step_dir).get("files", {})
    except (OSError, json.JSONDecodeError):
        return False
    name = str(copy.relative_to(step_dir))
    return name in files and file_problem(step_dir, name, files[name]) is None
