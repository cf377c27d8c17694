"""Where checkpoints are persisted: a committer is called after every complete checkpoint.

Locally the run directory is already durable, so the committer does nothing. On Modal the run
directory sits on a Volume, which only persists what `commit()` flushed before the container died.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from noesis_accel.config.schema import CkptConfig
from noesis_accel.core.protocol import COMMIT_FDS_ENV, COMMIT_REQUEST, commit_failure, decode_line, encode_line

log = logging.getLogger(__name__)


class Committer(Protocol):
    """Makes everything written under the run directory durable. Must be safe to call repeatedly."""

    def commit(self) -> None: ...


class LocalCommitter:
    """The local filesystem needs no commit: fsync in the checkpoint writer already made it durable."""

    instant = True  # nothing to wait for: no thread, no time limit

    def commit(self) -> None:
        return None


class ModalVolumeCommitter:
    """Commits a `modal.Volume` mounted in this container (the Modal entry passes it in)."""

    def __init__(self, volume) -> None:  # modal.Volume; untyped so importing this needs no modal
        self.volume = volume

    def commit(self) -> None:
        self.volume.commit()


class MirroringCommitter:
    """Copies directories kept off the Volume into the run dir, then commits through `inner`.

    A tracker holds its files open while the run lasts, and a Modal Volume cannot commit (its
    reload fails) while a file on it is open; so the tracker writes on the container's disk and
    each commit carries a copy. Copies are whole files (tmp + rename): a background commit never
    captures half of one.
    """

    def __init__(self, inner: Committer, mirrors: list[tuple[Path, Path]]) -> None:
        self.inner = inner
        self.instant = bool(getattr(inner, "instant", False))  # copying files is quick; the inner commit decides
        self.mirrors = [(Path(source), Path(target)) for source, target in mirrors if Path(source) != Path(target)]
        self._copied: dict[Path, tuple[int, int]] = {}

    def sync(self) -> None:
        """Bring every mirror's changed files, and its folders (empty ones too), into its target."""
        for source, target in self.mirrors:
            for path in sorted(source.rglob("*")):
                if _is_folder(path):
                    # A folder with nothing in it can be part of the format: MLflow's file store finds a
                    # run only if its artifacts/ folder exists.
                    (target / path.relative_to(source)).mkdir(parents=True, exist_ok=True)
                elif path.is_file():
                    self._copy_if_changed(path, target / path.relative_to(source))

    def _copy_if_changed(self, path: Path, destination: Path) -> None:
        stat = path.stat()
        if self._copied.get(path) == (stat.st_size, stat.st_mtime_ns):
            return
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_name(destination.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, destination)
        self._copied[path] = (stat.st_size, stat.st_mtime_ns)

    def restore(self) -> None:
        """Copy back into each source what only its target holds: on a fresh machine's empty disk, a
        tracker that continues its own files (MLflow's file store appends to them) finds them again."""
        for source, target in self.mirrors:
            for path in sorted(target.rglob("*")):
                destination = source / path.relative_to(target)
                if _is_folder(path):
                    destination.mkdir(parents=True, exist_ok=True)
                elif path.is_file() and not path.name.endswith(".tmp") and not destination.exists():
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, destination)
                    stat = destination.stat()
                    self._copied[destination] = (stat.st_size, stat.st_mtime_ns)  # the target has it already

    def commit(self) -> None:
        try:
            self.sync()
        except OSError as err:  # the logs are worth less than the checkpoint this commit carries
            log.warning("could not copy the tracker's files into the run dir: %s", err)
        self.inner.commit()


def _is_folder(path: Path) -> bool:
    """A real folder; a link to one (W&B's latest-run) is not followed, or its files would be copied twice."""
    return path.is_dir() and not path.is_symlink()


class LauncherCommitter:
    """Asks the launcher (the process that holds the Volume) to commit, and waits for its answer.

    Modal's `commit()` must run in the container process that mounts the Volume, and a training
    process started by the launcher is a child of it; whether a child may commit is undocumented,
    so it never tries: it writes `COMMIT_REQUEST` on a pipe and reads `COMMIT_OK` or why not back.
    """

    def __init__(self, request_fd: int, response_fd: int) -> None:
        self.request_fd = request_fd
        self.responses = os.fdopen(response_fd, "rb", buffering=0)

    @classmethod
    def from_env(cls) -> LauncherCommitter | None:
        value = os.environ.get(COMMIT_FDS_ENV)
        if not value:
            return None
        request_fd, response_fd = (int(fd) for fd in value.split(","))
        return cls(request_fd, response_fd)

    def commit(self) -> None:
        os.write(self.request_fd, encode_line(COMMIT_REQUEST))
        reply = decode_line(self.responses.readline())
        if not reply:
            raise OSError("the launcher is gone, so nothing can be committed")
        why = commit_failure(reply)
        if why is not None:
            raise OSError(f"the launcher could not commit: {why}")


class CommitStillRunning(TimeoutError):
    """A commit not done when its time was up. It goes on in the background; the caller does not wait."""


# A commit given up on, per committer, still running: the next commit waits for it first (two at once
# could interleave their requests, or reload under each other).
_in_flight: dict[int, threading.Thread] = {}


def commit_within(committer: Committer, seconds: float | None) -> None:
    """`committer.commit()`, waited for at most `seconds` (None: as long as it takes).

    A Volume commit is a server call that can hang; during a stop, the grace before Modal's SIGKILL
    does not wait for it. The commit then goes on in a background thread, and the exit commit (Modal's
    own, after the function returns) carries the files if it never completes.
    """
    if seconds is None or getattr(committer, "instant", False):
        committer.commit()
        return
    started = time.monotonic()
    earlier = _in_flight.get(id(committer))
    if earlier is not None and earlier.is_alive():
        earlier.join(max(0.0, seconds))
        if earlier.is_alive():
            raise CommitStillRunning("an earlier commit is still running; not waited for any longer")
    failure: list[BaseException] = []

    def commit() -> None:
        try:
            committer.commit()
        except BaseException as err:  # handed to the waiting thread, which raises it
            failure.append(err)

    thread = threading.Thread(target=commit, name="volume-commit", daemon=True)
    thread.start()
    thread.join(max(0.0, seconds - (time.monotonic() - started)))
    if thread.is_alive():
        _in_flight[id(committer)] = thread
        raise CommitStillRunning(f"still running after {max(0.0, seconds):.0f} s; not waited for any longer")
    _in_flight.pop(id(committer), None)
    if failure:
        raise failure[0]


def commit_with_retry(
    committer: Committer,
    retries: int,
    backoff_s: float,
    sleep: Callable[[float], None] = time.sleep,
    budget_s: float | None = None,
) -> int:
    """Commit, retrying with exponential backoff; returns the attempts used. Raises after the last.

    `budget_s` bounds the whole: the commits themselves (each waited for at most what is left of it)
    and the waits between attempts. A commit during a preemption must be done within the grace before
    the SIGKILL (Modal's is 30 s). Each retried failure is logged; the last one is raised for the
    caller to report (`commit_or_report`), once. A commit still running when the budget is spent is
    not retried: the time is up.
    """
    started, waited = time.monotonic(), 0.0
    for attempt in range(1, retries + 2):
        left = None if budget_s is None else budget_s - waited - (time.monotonic() - started)
        try:
            commit_within(committer, left)
            return attempt
        except CommitStillRunning:
            raise
        except Exception as err:  # any backend error; retried, then re-raised
            delay = backoff_s * 2 ** (attempt - 1)
            if attempt > retries or (budget_s is not None and waited + delay > budget_s):
                raise
            log.warning("commit attempt %d failed (%s); retrying in %.1fs", attempt, err, delay)
            sleep(delay)
            waited += delay
    raise AssertionError("unreachable")


def commit_budget(ckpt_cfg: CkptConfig) -> float:
    """How long a commit may take: `ckpt.commit_budget_s`; once this process has a stop request, only
    what is left of `ckpt.stop_commit_s` since it came (Modal's exit commit needs the rest of the grace)."""
    from noesis_accel.core.signals import first_stop_signal_at

    signalled = first_stop_signal_at()
    if signalled is None:
        return ckpt_cfg.commit_budget_s
    since = time.time() - signalled
    return max(0.0, min(ckpt_cfg.commit_budget_s, ckpt_cfg.stop_commit_s - since))


def commit_or_report(committer: Committer, ckpt_cfg: CkptConfig, what: str) -> bool:
    """Commit within `commit_budget`; on failure say so and carry on: the files stay on local disk
    (nothing is deleted because a commit failed) and the next commit, or the exit's, carries them."""
    try:
        commit_with_retry(
            committer,
            ckpt_cfg.commit_retries,
            ckpt_cfg.commit_backoff_s,
            budget_s=commit_budget(ckpt_cfg),
        )
        return True
    except Exception as err:  # a checkpoint that never reaches the volume must never go unnoticed
        print(
            f"warning: {what} is saved but not committed ({err.__class__.__name__}: {err}); "
            "the next commit will carry it",
            file=sys.stderr,
            flush=True,
        )
        return False
