"""The machines of a cluster watch each other, so a lost one ends the others within a bound.

A collective whose peer is gone, or frozen without closing its connections (a lost machine, a network
partition, a stuck host), waits for the process group's timeout: half an hour of idle GPUs, billed,
on every other container. The training processes cannot notice: they are the ones blocked. Each
machine's launcher can: it never takes part in a collective. So every launcher bumps its own counter
in a small TCP store on the first machine every `HEARTBEAT_S` and reads the others'. A counter that
has not moved for `distributed.peer_timeout_s` (a frozen or vanished machine), or a store that
cannot be reached for as long (the first machine itself lost), is a lost peer: the launcher stops its
workers and ends the attempt as a crash, so Modal restarts the cluster from the newest committed
checkpoint. Counters, not clocks: machines need not agree on the time.
"""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

HEARTBEAT_S = 2.0
# A peer that has not beaten once yet is still starting (its image, its imports): it is given this long.
STARTUP_S = 600.0
# After our own workers failed, a peer silent this long is taken as the cause (a live one beats every 2 s).
SILENT_AFTER_FAILURE_S = 3 * HEARTBEAT_S


class ClusterWatch:
    """One machine's side of the watch; `lost` is None while every peer answers, else one line saying which."""

    def __init__(self, machine_rank: int, machines: int, address: str, port: int, timeout_s: float) -> None:
        self.machine_rank, self.machines = machine_rank, machines
        self.address, self.port, self.timeout_s = address, port, timeout_s
        self.lost: str | None = None
        self._last_seen: dict[int, tuple[int, float]] = {}  # peer -> (its counter, when we saw it change)
        self._stop = threading.Event()
        self._store: Any = None
        self._thread = threading.Thread(target=self._run, name="cluster-watch", daemon=True)

    def start(self) -> ClusterWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def peers(self) -> list[int]:
        return [rank for rank in range(self.machines) if rank != self.machine_rank]

    def silent_peer(self, since: float, within_s: float = SILENT_AFTER_FAILURE_S) -> str | None:
        """After a failure at `since` (monotonic): which peer has not beaten since, once `within_s` has
        passed (waiting for it); None when every peer is alive."""
        deadline = since + within_s
        while time.monotonic() < deadline and self.lost is None:
            if all(seen >= since for _, seen in (self._last_seen.get(p, (0, 0.0)) for p in self.peers)):
                return None
            time.sleep(0.2)
        if self.lost is not None:
            return self.lost
        silent = [p for p in self.peers if self._last_seen.get(p, (0, 0.0))[1] < since]
        return self._words(silent[0], time.monotonic() - since) if silent else None

    def _words(self, peer: int, silent_s: float) -> str:
        return (
            f"machine {peer} of the cluster stopped answering (no heartbeat for {silent_s:.0f} s): its container "
            "was lost or frozen"
        )

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self._store = self._connect()
        except Exception as err:  # the first machine never came up (or is gone already)
            self.lost = f"the cluster's first machine ({self.address}:{self.port}) could not be reached: {err}"
            return
        unreachable_since: float | None = None
        while not self._stop.wait(HEARTBEAT_S):
            now = time.monotonic()
            try:
                self._store.add(f"beat/{self.machine_rank}", 1)
                for peer in self.peers:
                    count = int(self._store.add(f"beat/{peer}", 0))  # adding 0 reads without waiting for the key
                    known = self._last_seen.get(peer)
                    if known is None or count != known[0]:
                        self._last_seen[peer] = (count, now)
                unreachable_since = None
            except Exception as err:  # the store (the first machine) did not answer in time
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.timeout_s:
                    self.lost = (
                        f"the cluster's first machine stopped answering for {now - unreachable_since:.0f} s "
                        f"({type(err).__name__}): its container was lost or frozen"
                    )
                    return
                continue
            for peer in self.peers:
                count, seen = self._last_seen[peer]
                allowed = self.timeout_s if count > 0 else max(self.timeout_s, STARTUP_S)
                if now - max(seen, started) > allowed:
                    self.lost = self._words(peer, now - seen)
                    return

    def _connect(self) -> Any:
        from torch.distributed import TCPStore

        store = TCPStore(
            self.address,
            self.port,
            is_master=self.machine_rank == 0,
            timeout=datetime.timedelta(seconds=STARTUP_S),
            wait_for_workers=False,
        )
        store.set_timeout(datetime.timedelta(seconds=HEARTBEAT_S * 2))  # a frozen host: its reply never comes
        return store
