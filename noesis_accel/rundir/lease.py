"""One writer per run dir: the lease names the process that owns the run, with its heartbeat.

The lease is taken before anything in the run dir is written, renewed by a background heartbeat,
and released at exit. A second start refuses, naming the owner; a lease whose owner is provably
dead (same host, no such process) or whose heartbeat is older than `ckpt.lease_stale_s` is taken
over with a warning.

The lease lives in `lease/` as generation-numbered records (see `generations.py`): taking it,
renewing it and releasing it all write generation g+1 after reading g, and only one writer can
create g+1. So a write succeeds only if the lease it read is still the current one; a heartbeat
that finds a newer generation, or loses the race for the next one, reports the loss in `lost` and
stops, instead of overwriting the new owner. Release writes a `released` generation rather than
deleting the folder, so generation numbers never repeat and an owner that was suspended between
its read and its write (the very owner a stale takeover presumes dead) cannot come back later and
win a generation that was taken, released and freed in the meantime.

What it guarantees:
- On a local POSIX disk (one machine): `link` and `O_CREAT | O_EXCL` are atomic, so of any number
  of starts or takeovers racing from the same lease exactly one wins and the others re-read it; a
  live owner is never displaced; an owner that was taken over learns it at its next heartbeat (it
  may write until then: a lease cannot stop a process that was paused for longer than
  `ckpt.lease_stale_s`, it only makes it stop once it runs again).
- On NFS, `link` and exclusive create are atomic on the server, but a client may list an older
  generation for a while (attribute caching): a heartbeat may then see its own generation a little
  longer, but its next write still fails if someone else wrote. A `link` whose reply was lost and
  retried can report `FileExistsError` although it succeeded; the writer then believes it lost and
  stops, which is the safe direction.
- On a Modal Volume there is no compare-and-swap between containers: a container sees another's
  files only after that container commits (the committer in `volumes.py` commits at every
  checkpoint, Modal also in the background every few seconds) and this one mounts or reloads the
  Volume, and when two containers write the same file the later commit wins. Two `modal run`s
  started seconds apart can both pass; later ones refuse. Modal itself runs one container per
  input (`single_use_containers`) and starts a retry only after the previous attempt's container
  is gone, so retries never overlap: a lease left by an earlier attempt of the same function call
  (`NOESIS_LEASE_GROUP`, set by the Modal entry) is taken over at once, while a second `modal run`
  of the same run (another call) is refused. Within one container (a launcher and its workers, or
  two starts) the guarantees of a local disk hold.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from noesis_accel.config.schema import CkptConfig
from noesis_accel.core.errors import UserError
from noesis_accel.core.protocol import LEASE_GROUP_ENV, LEASE_HELD_ENV
from noesis_accel.rundir.generations import Generation, GenerationalRecord
from noesis_accel.rundir.layout import RunDir, this_host

log = logging.getLogger(__name__)

# Where there are no hard links a generation is visible before its content is written: an unreadable
# one younger than this is being written, an older one was left damaged and is taken over.
UNREADABLE_GRACE_S = 5.0


class LeaseHeld(UserError):
    """Another live process owns the run dir."""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: float
    token: str
    # Attempts of one job share a group (on Modal: the function call, which its retries keep):
    # a lease left by an earlier attempt of the same group belongs to a container that is gone.
    group: str | None

    @classmethod
    def this_process(cls) -> Owner:
        return cls(this_host(), os.getpid(), time.time(), uuid.uuid4().hex, os.environ.get(LEASE_GROUP_ENV) or None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _describe(lease: dict[str, Any], now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
    age = now - float(lease.get("heartbeat", 0))
    return f"pid {lease.get('pid')} on host {lease.get('host')} (since {started}, last heartbeat {age:.0f}s ago)"


def _holds(generation: Generation) -> bool:
    """Whether this generation stands for an owner (not: never taken, or released)."""
    return generation.record is not None and not generation.record.get("released")


def read_lease(rundir: RunDir) -> dict[str, Any] | None:
    """The lease held on `rundir` (host, pid, started, heartbeat, ...), or None when nobody holds it."""
    current = GenerationalRecord(rundir.lease_dir).current()
    return current.record if _holds(current) else None


class RunLease:
    """The lease on one run dir, held by this process while it trains (or launches the trainers)."""

    def __init__(
        self, rundir: RunDir, stale_after_s: float, heartbeat_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.rundir = rundir
        self.records = GenerationalRecord(rundir.lease_dir)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.clock = clock  # wall time, in the records and for judging staleness
        self.owner = Owner.this_process()
        self.generation = 0  # the generation this process wrote last: the lease is ours while it is the newest
        self.lost: str | None = None  # set if another process took the lease away from us
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ taking and giving back

    def acquire(self) -> RunLease:
        """Take the lease or raise `LeaseHeld` naming the owner. Starts the heartbeat."""
        self.rundir.path.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race means another start wrote first: judge its lease instead
            current = self.records.current()
            if _holds(current):
                self._check_may_take_over(current)
            if self._swap(current.number, self._record()):
                break
        else:
            raise LeaseHeld(f"{self.rundir.path} is being taken over by another start at this moment; retry")
        self._thread = threading.Thread(target=self._beat, name="noesis-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        """One heartbeat: write a fresh generation if ours is still the newest. False (and `lost` set)
        when another process wrote one since, whether before our read or between our read and write."""
        if self.lost is not None:
            return False
        try:
            current = self.records.current()
        except OSError as err:  # as before generations: a lease that cannot be read is not known to be ours
            log.warning("could not read the lease %s: %s", self.records.folder, err)
            current = Generation(self.generation, {}, unreadable=True)
        if current.number != self.generation or not self._ours(current):
            return self._lose(current)
        try:
            if self._swap(current.number, self._record()):
                return True
        except OSError as err:  # a full disk must not kill training; the lease just ages
            log.warning("could not renew the lease %s: %s", self.records.folder, err)
            return True
        return self._lose(self.records.current())

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost is not None or self.generation == 0:
            return
        current = self.records.current()
        if current.number == self.generation and self._ours(current):
            try:
                self._swap(current.number, {**self._record(), "released": True})
            except OSError as err:  # the lease then ages out like a dead owner's
                log.warning("could not release the lease %s: %s", self.records.folder, err)

    # ------------------------------------------------------------ internals

    def _record(self) -> dict[str, Any]:
        return {
            "host": self.owner.host,
            "pid": self.owner.pid,
            "started": self.owner.started,
            "token": self.owner.token,
            "group": self.owner.group,
            "heartbeat": self.clock(),
            "stale_after_s": self.stale_after_s,
        }

    def _ours(self, generation: Generation) -> bool:
        return generation.record is not None and generation.record.get("token") == self.owner.token

    def _swap(self, expected: int, record: dict[str, Any]) -> bool:
        """Replace generation `expected` by `record`; on success it is ours and the older ones go."""
        if not self.records.swap(expected, record):
            return False
        self.generation = expected + 1
        try:
            self.records.prune(below=self.generation)
        except OSError as err:  # old generations only take a little room
            log.debug("could not prune old lease generations in %s: %s", self.records.folder, err)
        return True

    def _lose(self, current: Generation) -> bool:
        if _holds(current) and not current.unreadable:
            assert current.record is not None
            by = _describe(current.record, self.clock())
        elif current.unreadable:
            by = "an unknown process (the newest lease record cannot be read)"
        else:
            by = "nobody (the lease was released or removed)"
        self.lost = f"the lease of {self.rundir.path} was taken by {by}"
        log.error("%s; this process stops writing", self.lost)
        return False

    def _check_may_take_over(self, current: Generation) -> None:
        """Return if the owner of `current` is gone, with a warning; raise `LeaseHeld` if it may be alive."""
        now = self.clock()
        lease = current.record or {}
        if current.unreadable:
            if now - current.written <= UNREADABLE_GRACE_S:
                raise LeaseHeld(f"{self.rundir.path} is being taken by another start at this moment; retry")
            log.warning("taking over the lease of %s: its newest record cannot be read", self.rundir.path)
            return
        same_host_dead = lease.get("host") == self.owner.host and not _pid_alive(int(lease.get("pid", -1)))
        earlier_attempt = self.owner.group is not None and lease.get("group") == self.owner.group
        silent_for = now - float(lease.get("heartbeat", 0))
        if not (same_host_dead or earlier_attempt or silent_for > self.stale_after_s):
            raise LeaseHeld(
                f"{self.rundir.path} is in use by {_describe(lease, now)}; two starts must not train one run. "
                f"Wait for it or stop it; if it died on another machine, its lease is taken over once its "
                f"heartbeat is older than ckpt.lease_stale_s={self.stale_after_s:g}s, or delete {self.records.folder}"
            )
        why = (
            "its process is gone"
            if same_host_dead
            else "it is an earlier attempt of this same job"
            if earlier_attempt
            else f"no heartbeat for {silent_for:.0f}s"
        )
        log.warning("taking over the lease of %s from %s: %s", self.rundir.path, _describe(lease, now), why)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.renew():
                return


def take_run_lease(rundir: RunDir, ckpt_cfg: CkptConfig) -> RunLease | None:
    """This start's lease on `rundir` (see `ckpt.lease_*`), or None when the launcher above us holds it."""
    if os.environ.get(LEASE_HELD_ENV):  # set by the launcher for its workers: the lease is already ours
        return None
    return RunLease(rundir, ckpt_cfg.lease_stale_s, ckpt_cfg.lease_heartbeat_s).acquire()
