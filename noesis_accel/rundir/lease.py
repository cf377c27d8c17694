"""One writer per run dir: `lease.json` names the process that owns the run, with its heartbeat.

The lease is taken before anything in the run dir is written, renewed by a background heartbeat,
and released at exit. A second start refuses, naming the owner; a lease whose owner is provably
dead (same host, no such process) or whose heartbeat is older than `ckpt.lease_stale_s` is taken
over with a warning.

What it guarantees:
- On a local disk (one machine): creation is atomic (`O_CREAT | O_EXCL`), so of two starts racing
  for a free run dir exactly one wins, and a live owner is never displaced.
- On a Modal Volume, another container sees the lease only after the owner's container commits it
  and the other container mounts or reloads the Volume (Modal commits in the background every few
  seconds). Two `modal run`s started seconds apart can both pass; later ones refuse. Modal itself
  runs one container per input (`single_use_containers`) and starts a retry only after the previous
  attempt's container is gone, so retries never overlap: a lease left by an earlier attempt of the
  same function call (`NOESIS_LEASE_GROUP`, set by the Modal entry) is taken over at once, while a
  second `modal run` of the same run (another call) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from noesis_accel.core.errors import UserError
from noesis_accel.core.protocol import LEASE_GROUP_ENV, LEASE_HELD_ENV
from noesis_accel.rundir.layout import RunDir, this_host

log = logging.getLogger(__name__)


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


class RunLease:
    """The lease on one run dir, held by this process while it trains (or launches the trainers)."""

    def __init__(self, rundir: RunDir, stale_after_s: float, heartbeat_s: float) -> None:
        self.rundir = rundir
        self.path = rundir.lease_file
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.owner = Owner.this_process()
        self.lost: str | None = None  # set if another process took the lease away from us
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ taking and giving back

    def acquire(self) -> RunLease:
        """Take the lease or raise `LeaseHeld` naming the owner. Starts the heartbeat."""
        self.rundir.path.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a racing takeover can remove the file between our read and our create
            if self._create_exclusively():
                break
            current = self._read()
            if current is None:
                continue
            self._take_over_if_stale(current)
        else:
            raise LeaseHeld(f"{self.rundir.path} is being taken over by another start at this moment; retry")
        self._thread = threading.Thread(target=self._beat, name="noesis-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and current.get("token") == self.owner.token:
            self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------ internals

    def _record(self) -> dict[str, Any]:
        return {
            "host": self.owner.host,
            "pid": self.owner.pid,
            "started": self.owner.started,
            "token": self.owner.token,
            "group": self.owner.group,
            "heartbeat": time.time(),
            "stale_after_s": self.stale_after_s,
        }

    def _create_exclusively(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self._record()))
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            lease = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return {"host": "?", "pid": -1, "heartbeat": 0, "token": "", "unreadable": True}
        return lease if isinstance(lease, dict) else {"heartbeat": 0, "token": ""}

    def _take_over_if_stale(self, current: dict[str, Any]) -> None:
        now = time.time()
        same_host_dead = current.get("host") == self.owner.host and not _pid_alive(int(current.get("pid", -1)))
        earlier_attempt = self.owner.group is not None and current.get("group") == self.owner.group
        silent_for = now - float(current.get("heartbeat", 0))
        if not (same_host_dead or earlier_attempt or silent_for > self.stale_after_s or current.get("unreadable")):
            raise LeaseHeld(
                f"{self.rundir.path} is in use by {_describe(current, now)}; two starts must not train one run. "
                f"Wait for it or stop it; if it died on another machine, its lease is taken over once its "
                f"heartbeat is older than ckpt.lease_stale_s={self.stale_after_s:g}s, or delete {self.path}"
            )
        why = (
            "its process is gone"
            if same_host_dead
            else "it is an earlier attempt of this same job"
            if earlier_attempt
            else f"no heartbeat for {silent_for:.0f}s"
        )
        log.warning("taking over the lease of %s from %s: %s", self.rundir.path, _describe(current, now), why)
        # Rename first: of several processes taking over at once, only one rename succeeds.
        stale = self.path.with_name(f"lease.stale-{self.owner.token}.json")
        try:
            os.replace(self.path, stale)
        except FileNotFoundError:
            return
        stale.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self._read()
            if current is None or current.get("token") != self.owner.token:
                self.lost = (
                    f"the lease of {self.rundir.path} was taken by "
                    f"{_describe(current, time.time()) if current else 'nobody (lease.json was removed)'}"
                )
                log.error("%s; this process stops writing", self.lost)
                return
            tmp = self.path.with_name(f"lease.{self.owner.token}.tmp")
            try:
                tmp.write_text(json.dumps(self._record()))
                os.replace(tmp, self.path)
            except OSError as err:  # a full disk must not kill training; the lease just ages
                log.warning("could not renew the lease %s: %s", self.path, err)


def take_run_lease(rundir: RunDir, ckpt_cfg: Any) -> RunLease | None:
    """This start's lease on `rundir` (see `ckpt.lease_*`), or None when the launcher above us holds it."""
    if os.environ.get(LEASE_HELD_ENV):  # set by the launcher for its workers: the lease is already ours
        return None
    return RunLease(rundir, float(ckpt_cfg.lease_stale_s), float(ckpt_cfg.lease_heartbeat_s)).acquire()
