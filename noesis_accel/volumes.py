"""Where checkpoints are persisted: a committer is called after every complete checkpoint.

Locally the run directory is already durable, so the committer does nothing. On Modal the run
directory sits on a Volume, which only persists what `commit()` flushed before the container died.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Protocol

log = logging.getLogger(__name__)


class Committer(Protocol):
    """Makes everything written under the run directory durable. Must be safe to call repeatedly."""

    def commit(self) -> None: ...


class LocalCommitter:
    """The local filesystem needs no commit: fsync in the checkpoint writer already made it durable."""

    def commit(self) -> None:
        return None


class ModalVolumeCommitter:
    """Commits a `modal.Volume` mounted in this container (the Modal entry passes it in)."""

    def __init__(self, volume) -> None:  # modal.Volume; untyped so importing this needs no modal
        self.volume = volume

    def commit(self) -> None:
        self.volume.commit()


_default_committer: Committer | None = None


def use_default_committer(committer: Committer | None) -> None:
    """What `run(cfg)` commits with when its caller names none (a Modal container sets its Volume)."""
    global _default_committer
    _default_committer = committer


def default_committer() -> Committer:
    return _default_committer or LocalCommitter()


class LauncherCommitter:
    """Asks the launcher (the process that holds the Volume) to commit, and waits for its answer.

    Modal's `commit()` must run in the container process that mounts the Volume, and a training
    process started by the launcher is a child of it; whether a child may commit is undocumented,
    so it never tries: it writes `commit` on a pipe and reads `ok` or `error ...` back.
    """

    def __init__(self, request_fd: int, response_fd: int) -> None:
        self.request_fd = request_fd
        self.responses = os.fdopen(response_fd, "rb", buffering=0)

    @classmethod
    def from_env(cls) -> "LauncherCommitter | None":
        value = os.environ.get("NOESIS_COMMIT_FDS")
        if not value:
            return None
        request_fd, response_fd = (int(fd) for fd in value.split(","))
        return cls(request_fd, response_fd)

    def commit(self) -> None:
        os.write(self.request_fd, b"commit\n")
        reply = self.responses.readline().decode().strip()
        if not reply:
            raise OSError("the launcher is gone, so nothing can be committed")
        if reply != "ok":
            raise OSError(f"the launcher could not commit: {reply.removeprefix('error ')}")


def commit_with_retry(
    committer: Committer,
    retries: int,
    backoff_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Commit, retrying with exponential backoff; returns the attempts used. Raises after the last.

    Every failure is logged: a checkpoint that never reaches the volume must never go unnoticed.
    """
    for attempt in range(1, retries + 2):
        try:
            committer.commit()
            return attempt
        except Exception as err:  # any backend error; retried, then re-raised
            if attempt > retries:
                log.error("commit failed %d time(s), giving up: %s", attempt, err)
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("commit attempt %d failed (%s); retrying in %.1fs", attempt, err, delay)
            sleep(delay)
    raise AssertionError("unreachable")
