"""Fault injection for the crash tests: `NOESIS_FAULT=point:step[,point:step]` in the environment.

Points: `step` (SIGKILL right after optimizer step N), `save` (SIGKILL inside the save of step N,
after Accelerate wrote its files and before the manifest), `term` (SIGTERM to ourselves after step
N: the preemption path). Unset in normal runs, where this costs one dictionary lookup per step.
"""

from __future__ import annotations

import os
import signal

_SIGNALS = {"step": signal.SIGKILL, "save": signal.SIGKILL, "term": signal.SIGTERM}


def maybe_inject(point: str, step: int) -> None:
    spec = os.environ.get("NOESIS_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        name, _, at = item.strip().partition(":")
        if name == point and at and int(at) == step:
            os.kill(os.getpid(), _SIGNALS[point])
