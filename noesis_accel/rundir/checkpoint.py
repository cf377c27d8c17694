"""`CheckpointManager`: when to save, atomic save with a manifest, retention, discovery, resume.

A checkpoint is `checkpoints/step-NNNNNN/`: Accelerate's `save_state` output, `history/` (copies of
events.jsonl and metrics.jsonl, for rundir/logrestore.py) and `manifest.json`, written last. It is
written as `step-NNNNNN.tmp` and renamed only once complete and fsynced, so a directory without the
`.tmp` suffix and with a manifest whose files all match is complete; anything else is skipped on
resume with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from noesis_accel.config import CkptConfig, Resume, interval_steps, resume_mode
from noesis_accel.core import faults
from noesis_accel.core.collective import main_decides
from noesis_accel.core.errors import ResumeError, UserError
from noesis_accel.rundir.layout import RunDir, step_dir_name
from noesis_accel.rundir.volumes import Committer, commit_or_report

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HISTORY = "history"  # copies of the run's growing logs as they were at the save (rundir/logrestore.py)
MANIFEST_FORMAT = 3  # 2: records the loss normalisation; 3: a CRC-32 of every file
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    manifest: dict[str, Any]


class CheckpointWriteError(UserError):
    """The storage refused a checkpoint (full, read-only, over quota): one line, the run stops."""


def _fsync_tree(root: Path) -> None:
    """Flush every file, then every directory: the rename that follows must not outrun the data."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_crc32(path: Path) -> str:
    """CRC-32 of a file: detects flipped or torn bytes at ~7 GB/s (about 0.15 s per GB on one core).

    A checksum, not a signature: it guards against storage faults, which is what a resume needs.
    """
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def describe_files(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under `root` with its size and CRC-32, read back right after it was written."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            full = Path(folder) / name
            files[str(full.relative_to(root))] = {"bytes": full.stat().st_size, "crc32": file_crc32(full)}
    return files


def checkpoint_problem(path: Path, verify_contents: bool = True) -> str | None:
    """Why a checkpoint directory cannot be loaded, or None if it is complete.

    `verify_contents=False` checks presence and sizes only (cheap: for pruning and quick looks);
    the full check recomputes every file's CRC-32 against the manifest, as a resume does.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, OSError) as err:
        return f"unreadable manifest.json ({err})"
    for name, entry in manifest.get("files", {}).items():
        problem = file_problem(path, name, entry, verify_contents)
        if problem is not None:
            return problem
    return None


def file_problem(checkpoint_dir: Path, name: str, entry: Any, verify_contents: bool = True) -> str | None:
    """Why the file `name` of a checkpoint does not match its manifest `entry`, or None if it does."""
    expected = entry if isinstance(entry, dict) else {"bytes": entry}  # format <= 2 listed sizes only
    file = checkpoint_dir / name
    if not file.is_file():
        return f"{name} is missing"
    size = file.stat().st_size
    if size != expected["bytes"]:
        return f"{name} has {size} bytes, the manifest says {expected['bytes']}"
    if verify_contents and "crc32" in expected and file_crc32(file) != expected["crc32"]:
        return f"{name} does not match its checksum (crc32 {expected['crc32']} in the manifest): its bytes changed"
    return None


def checkpoint_bytes(manifest: dict[str, Any]) -> int:
    return sum(e["bytes"] if isinstance(e, dict) else int(e) for e in manifest.get("files", {}).values())


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def storage_problem(err: BaseException, directory: Path) -> str | None:
    """What the storage said if `err` is a storage failure (full, read-only, quota), else None.

    torch reports a full disk as a RuntimeError from its C++ writer ("file write failed",
    "basic_ios::clear"), so besides OSError's errno the directory itself is asked: a small write.
    """
    if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
        return f"{err.strerror or err} ({err.filename or directory})"
    probe = directory / f".noesis-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as probe_err:
        return f"{probe_err.strerror or probe_err} ({directory})"
    finally:
        probe.unlink(missing_ok=True)
    return None


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _megabytes(count: int | None) -> str:
    return "an unknown amount" if count is None else f"{count / 1e6:,.1f} MB"


def any_complete_checkpoint(rundir: RunDir) -> bool:
    """True if the run dir holds a checkpoint a restart could continue (a quick check: sizes, no hashing)."""
    return any(checkpoint_problem(path, verify_contents=False) is None for _, path in rundir.step_dirs())


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


class StateWriter(Protocol):
    """What a distributed strategy does with a checkpoint's contents (training/strategies): this module
    owns when, where and how atomically; the strategy owns which files hold what."""

    @property
    def name(self) -> str: ...  # distributed.type

    @property
    def state_format(self) -> str: ...  # what its files are (the manifest records it)

    def save_state(self, accelerator: Any, target: Path) -> None: ...

    def load_state(self, accelerator: Any, path: Path, manifest: Mapping[str, Any], reset_optimizer: bool) -> None: ...

    def check_format(self, path: Path, manifest: Mapping[str, Any]) -> None: ...

    def resume_refusal(self, manifest: Mapping[str, Any], world_size: int) -> str | None: ...


class CheckpointManager:
    """Decides when to checkpoint, writes checkpoints atomically, prunes, commits, and resumes.

    All ranks call `save` and `load` (every strategy's state is written by every rank); only the main
    process writes the manifest, renames, prunes and commits.
    """

    def __init__(
        self,
        accelerator: Any,
        rundir: RunDir,
        ckpt_cfg: CkptConfig,
        total_steps: int,
        config_fingerprint: str,
        committer: Committer,
        state: StateWriter,
        loss_normalization: str,
        num_machines: int = 1,
    ) -> None:
        self.accelerator = accelerator
        self.rundir = rundir
        self.root = self.rundir.checkpoints
        self.cfg = ckpt_cfg
        self.total_steps = total_steps
        self.interval = interval_steps(ckpt_cfg.every, total_steps)
        self.config_fingerprint = config_fingerprint
        self.committer = committer
        self.state = state
        # How the loss weights tokens (owned by the training wing), stored in every manifest: a
        # checkpoint written under another normalisation is continued with a warning.
        self.loss_normalization = loss_normalization
        self.num_machines = num_machines
        self._last_save_time = time.monotonic()
        if accelerator.is_local_main_process:  # every machine writes its ranks' files in its own view
            self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ when

    def minutes_elapsed_due(self) -> bool:
        minutes = self.cfg.every_minutes
        if not minutes:
            return False
        return time.monotonic() - self._last_save_time >= 60 * minutes

    def due(self, step: int, signal_received: bool, minutes_due: bool, deadline_due: bool = False) -> str | None:
        """The reason to checkpoint after optimizer step `step`, or None."""
        if signal_received:
            return "signal"
        if deadline_due and step < self.total_steps:
            return "deadline"
        if step >= self.total_steps:
            return "final"
        if (self.interval and step % self.interval == 0) or minutes_due:
            return "interval"
        return None

    # ------------------------------------------------------------ save

    def save(self, step: int, reason: str, progress: dict[str, Any]) -> Path:
        """Write `step-NNNNNN` atomically, prune old ones, and commit. Every rank must call this.

        One machine: written as `step-NNNNNN.tmp`, renamed once complete. Several machines (a
        shared Volume, where a rename cannot move files another container wrote): each machine
        writes its ranks' files into `step-NNNNNN/` and commits them, and the manifest, which
        lists every machine's files with their checksums, is written last: a directory whose
        manifest's files are not all there and intact is incomplete, whoever looks at it.
        """
        accelerator = self.accelerator
        final = self.root / step_dir_name(step)
        # Fully verified: a same-size damaged directory of this step must be rewritten, not kept.
        if main_decides(accelerator, lambda: final.is_dir() and checkpoint_problem(final) is None):
            return final  # this step is already saved (a signal right after an interval save)
        multi_machine = self.num_machines > 1
        target = final if multi_machine else final.with_name(final.name + ".tmp")
        needed = self._make_room(step) if accelerator.is_main_process else None
        if accelerator.is_local_main_process:
            if not multi_machine:
                shutil.rmtree(target, ignore_errors=True)  # leftovers of a save that was killed
            (target / MANIFEST).unlink(missing_ok=True)  # a damaged same-step manifest must not vouch for new files
        accelerator.wait_for_everyone()
        started = time.monotonic()
        try:
            self._write_state(target, step)
            listing = self._listing(target)
        except Exception as err:
            raise self._write_failure(err, target, needed) from None
        listings = self._gather(listing)
        if multi_machine and accelerator.is_local_main_process:  # each machine's own files reach the Volume
            commit_or_report(self.committer, self.cfg, f"this machine's part of checkpoint {final.name}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files: dict[str, Any] = {}
            for node_listing in listings:
                files.update(node_listing)
            manifest = {
                "format": MANIFEST_FORMAT,
                "step": step,
                "reason": reason,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "world_size": accelerator.num_processes,
                "num_machines": self.num_machines,
                "distributed_type": str(accelerator.distributed_type),
                "strategy": self.state.name,
                "state_format": self.state.state_format,
                "config_fingerprint": self.config_fingerprint,
                "loss_normalization": self.loss_normalization,
                **progress,
                "files": files,
            }
            try:
                (target / MANIFEST).write_text(json.dumps(manifest, indent=2))
                _fsync_tree(target)
                if not multi_machine:
                    if final.exists():  # a damaged directory of the same step: replaced by the good one
                        shutil.rmtree(final)
                    os.replace(target, final)
                _fsync_dir(self.root)
            except Exception as err:
                raise self._write_failure(err, target, needed) from None
            self.prune()
            committed = commit_or_report(self.committer, self.cfg, f"checkpoint {final.name}")
            log.debug(
                "checkpoint %s (%s) saved in %.2fs, committed: %s",
                final.name,
                reason,
                time.monotonic() - started,
                committed,
            )
        accelerator.wait_for_everyone()
        self._last_save_time = time.monotonic()
        return final

    def _write_state(self, target: Path, step: int) -> None:
        self.state.save_state(self.accelerator, target)
        if self.accelerator.is_main_process:  # before the barrier: every machine lists after it
            self._copy_history(target)
        faults.maybe_inject("save", step)
        faults.maybe_inject("enospc", step)
        self.accelerator.wait_for_everyone()

    def _listing(self, target: Path) -> dict[str, Any]:
        """This machine's files in the checkpoint (its local main process lists them), for the manifest.

        `history/` is the main process's alone: another machine's view of a directory written in place
        can hold a copy an earlier attempt committed there, which must not overwrite the main's entry.
        """
        if not self.accelerator.is_local_main_process:
            return {}
        listing = describe_files(target)
        if self.accelerator.is_main_process:
            return listing
        return {name: entry for name, entry in listing.items() if not name.startswith(f"{HISTORY}/")}

    def _copy_history(self, target: Path) -> None:
        """The run's growing logs as they are now, into the checkpoint: the manifest's checksums cover them."""
        folder = target / HISTORY
        folder.mkdir(parents=True, exist_ok=True)
        for live in self.rundir.history_logs:
            if live.is_file():
                shutil.copyfile(live, folder / live.name)

    def _write_failure(self, err: Exception, target: Path, needed: int | None) -> Exception:
        """A storage failure becomes one line (after removing our partial files); anything else stays as is."""
        problem = storage_problem(err, self.root)
        if problem is None:
            return err
        shutil.rmtree(target, ignore_errors=True)
        free = _free_bytes(self.root)
        newest = self.latest_complete(warn=False)
        resume = f"it resumes from {newest.path.name}" if newest else "nothing was saved yet, it starts afresh"
        return CheckpointWriteError(
            f"checkpoint {target} could not be written: {problem}; a checkpoint needs about {_megabytes(needed)} "
            f"and {_megabytes(free)} are free there. Free space (or lower ckpt.keep_last, or set ckpt.make_room=true) "
            f"and restart the same command: {resume}"
        )

    def _make_room(self, step: int) -> int | None:
        """Bytes the next checkpoint needs (the newest one's size); warn, or prune, when they are not free.

        A save that fails midway costs a restart; one line before it lets a person act first.
        """
        newest = self.latest_complete(warn=False, verify_contents=False)
        if newest is None:
            return None
        needed = checkpoint_bytes(newest.manifest)
        margin = needed // 10 + (64 << 20)  # filesystem overhead, metrics and status written meanwhile
        free = _free_bytes(self.root)
        if free is None or free >= needed + margin:
            return needed
        if self.cfg.make_room:
            for _, path in self.step_dirs()[::-1]:
                if path == newest.path or (_free_bytes(self.root) or 0) >= needed + margin:
                    break
                log.warning("removing %s to make room for checkpoint step %d (ckpt.make_room=true)", path, step)
                shutil.rmtree(path, ignore_errors=True)
            free = _free_bytes(self.root)
        if free is not None and free < needed + margin:
            log.warning(
                "checkpoint step %d needs about %s and only %s are free in %s; free space, lower "
                "ckpt.keep_last or set ckpt.make_room=true, or the save will fail",
                step,
                _megabytes(needed),
                _megabytes(free),
                self.root,
            )
        return needed

    def _gather(self, listing: dict[str, Any]) -> list[dict[str, Any]]:
        """Every machine's file listing, on the main process (one process: just ours)."""
        if self.accelerator.num_processes == 1:
            return [listing]
        from accelerate.utils import gather_object

        return gather_object([listing])

    # ------------------------------------------------------------ discovery and retention

    def step_dirs(self) -> list[tuple[int, Path]]:
        """Finished (renamed) checkpoint directories, newest first; completeness not yet checked."""
        return self.rundir.step_dirs()

    def latest_complete(self, warn: bool = True, verify_contents: bool = True) -> Checkpoint | None:
        """The newest checkpoint whose manifest and files check out; damaged ones are named and skipped."""
        for step, path in self.step_dirs():
            problem = checkpoint_problem(path, verify_contents)
            if problem is None:
                return Checkpoint(path, step, read_manifest(path))
            if warn and self.accelerator.is_main_process:
                log.warning("skipping checkpoint %s: %s; falling back to the one before", path, problem)
        return None

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older complete and damaged ones.

        Only directories older than the newest complete checkpoint are ever removed, so the newest
        complete one and any save in progress (a `.tmp` directory) are never touched.
        """
        complete_seen = 0
        for _step, path in self.step_dirs():
            if checkpoint_problem(path, verify_contents=False) is None:
                complete_seen += 1
                if complete_seen > self.cfg.keep_last:
                    shutil.rmtree(path, ignore_errors=True)
            elif complete_seen > 0:
                shutil.rmtree(path, ignore_errors=True)

    def remove_stale_partials(self) -> None:
        """`.tmp` directories left by a save that was killed; called at start, before any save."""
        if self.accelerator.is_main_process:
            for path in self.rundir.partial_checkpoints():
                log.warning("removing incomplete checkpoint %s left by an interrupted save", path)
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------ resume

    def select_for_resume(self, mode: str) -> Checkpoint | None:
        """The checkpoint `ckpt.resume` asks for: `auto` (newest complete or none), `never`, or a path."""
        kind = resume_mode(mode)
        if kind is Resume.NEVER:
            refuse_fresh_start_over(self.root)
            return None
        if kind is Resume.AUTO:
            return self.latest_complete()
        path = Path(os.path.expanduser(mode))
        problem = checkpoint_problem(path) if path.is_dir() else "no such directory"
        if problem:
            raise ResumeError(f"ckpt.resume={mode}: cannot resume from it: {problem}")
        manifest = read_manifest(path)
        newer = [p.name for step, p in self.step_dirs() if step > manifest["step"]]
        if newer:
            # They belong to another trajectory: pruning and later `auto` resumes would mix the two.
            raise ResumeError(
                f"ckpt.resume={mode}: {self.root} already holds later checkpoints ({', '.join(newer)}); "
                "resume into a new run.name, or move those checkpoints away first"
            )
        return Checkpoint(path, manifest["step"], manifest)

    def check_compatible(self, checkpoint: Checkpoint) -> None:
        manifest = checkpoint.manifest
        if manifest.get("config_fingerprint") != self.config_fingerprint:
            raise ResumeError(
                f"checkpoint {checkpoint.path} was written with a different training config "
                f"(fingerprint {manifest.get('config_fingerprint')} != {self.config_fingerprint}); "
                "resume it with the config it was trained with"
            )
        normalization = manifest.get("loss_normalization", "micro-batch mean (before format 2)")
        if normalization != self.loss_normalization and self.accelerator.is_main_process:
            # Weights, optimizer, schedule and data position restore exactly; only the weighting of
            # tokens in the steps still to come differs from what the checkpoint's run would have done.
            log.warning(
                "checkpoint %s was trained with the loss normalised as '%s'; continuing with '%s' "
                "(each global batch's summed token losses / its label tokens) from step %s on",
                checkpoint.path,
                normalization,
                self.loss_normalization,
                checkpoint.step,
            )
        self.state.check_format(checkpoint.path, manifest)

    def _reset_optimizer(self, checkpoint: Checkpoint) -> bool:
        """Whether the optimizer's moments start afresh: only on another process count, and only when the
        config asks (`ckpt.on_world_size_change=reset_optimizer`). A checkpoint whose strategy cannot
        continue it exactly on this count is refused in one line otherwise, with the reason and the option."""
        world = self.accelerator.num_processes
        if int(checkpoint.manifest.get("world_size", 1)) == world:
            return False
        if self.cfg.on_world_size_change == "reset_optimizer":
            return True
        refusal = self.state.resume_refusal(checkpoint.manifest, world)
        if refusal is not None:
            raise ResumeError(f"checkpoint {checkpoint.path}: {refusal}")
        return False

    def load(self, checkpoint: Checkpoint) -> bool:
        """Restore model, optimizer, scheduler, RNG and every registered object. All ranks call this.
        True when the optimizer's moments were started afresh instead (ckpt.on_world_size_change)."""
        self.check_compatible(checkpoint)
        reset = self._reset_optimizer(checkpoint)
        if reset:
            log.warning(
                "world size changed (%s -> %s): optimizer moments start afresh; weights, schedule and "
                "data position continue",
                checkpoint.manifest.get("world_size"),
                self.accelerator.num_processes,
            )
        self.state.load_state(self.accelerator, checkpoint.path, checkpoint.manifest, reset)
        self._last_save_time = time.monotonic()
        return reset


def refuse_fresh_start_over(checkpoints_dir: Path) -> None:
    """`ckpt.resume=never` must not silently train over a run that has checkpoints."""
    if any(Path(checkpoints_dir).glob("step-*")):
        raise ResumeError(
            f"ckpt.resume=never but {checkpoints_dir} already holds checkpoints; use ckpt.resume=auto to "
            "continue that run, or a new run.name to start afresh"
        )
