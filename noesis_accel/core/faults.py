"""Fault injection for the crash tests: `NOESIS_FAULT=point:step[,point:step]` in the environment.

Points: `step` (SIGKILL right after optimizer step N), `save` (SIGKILL inside the save of step N,
after Accelerate wrote its files and before the manifest), `term` / `usr1` (SIGTERM / SIGUSR1 to
ourselves, or to our launcher, after step N: the preemption and timeout paths), `enospc` (the save of step N fails as a
full disk would, for machines where a small filesystem cannot be mounted), `oom` (the forward of step N raises
torch.OutOfMemoryError, as a GPU out of memory does), `eval` (SIGINT, Modal's preemption, as the held-out pass
after step N starts; 0: the pass before training). `NOESIS_STEP_DELAY_S=S`
sleeps S seconds after every step, so a test can act while a run is in progress. `NOESIS_FAULT_KILL_PID=PID` sends the
SIGKILL of `step`/`save` to that process first: a whole container dying, not just this process.
Unset in normal runs, where this costs a few environment lookups per step (microseconds).
"""

from __future__ import annotations

import errno
import os
import signal
import time

from noesis_accel.core.protocol import FAULT_ENV, FAULT_KILL_PID_ENV, LAUNCHER_PID_ENV, STEP_DELAY_ENV

_SIGNALS = {
    "step": signal.SIGKILL,
    "save": signal.SIGKILL,
    "term": signal.SIGTERM,
    "usr1": signal.SIGUSR1,
    "eval": signal.SIGINT,
}


def maybe_inject(point: str, step: int) -> None:
    if point == "step" and os.environ.get(STEP_DELAY_ENV):
        time.sleep(float(os.environ[STEP_DELAY_ENV]))
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, at = item.strip().partition(":")
        if name != point or not at or int(at) != step:
            continue
        if point == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if point == "oom":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV} at step {step})")
        signum = _SIGNALS[point]
        container = os.environ.get(FAULT_KILL_PID_ENV)
        if container and signum == signal.SIGKILL:
            os.kill(int(container), signal.SIGKILL)
        if signum != signal.SIGKILL and os.environ.get(LAUNCHER_PID_ENV):
            # A training process takes stop requests from its launcher only: the signal goes there,
            # once (from the machine's first process), as a preemption of the machine would.
            if os.environ.get("LOCAL_RANK", "0") == "0":
                os.kill(int(os.environ[LAUNCHER_PID_ENV]), signum)
            continue
        os.kill(os.getpid(), signum)
