"""Preemption signals: the first SIGTERM/SIGINT asks for a checkpoint at the next step boundary,
a second one exits at once (the checkpoint directory is atomic, so nothing is left half-written)."""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Callable


class PreemptionWatcher:
    """Records the first termination signal; the training loop polls `requested`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, on_second: Callable[[int], None] | None = None) -> None:
        self.received: int | None = None
        self._on_second = on_second
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            return
        if self._on_second is not None:
            self._on_second(signum)
        os._exit(128 + signum)

    def install(self) -> "PreemptionWatcher":
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()


class InterruptedBySignal(Exception):
    """Raised by the loop after the signal checkpoint is safely written; the process exits non-zero."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after a checkpoint; restart to resume")
        self.signum = signum
