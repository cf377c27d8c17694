"""Offline stand-ins for the Modal objects the entry calls.

A function's `.spawn()`/`.remote()` and the call it returns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FakeCall:
    """A started call: `object_id` like Modal's, `.get()` runs the stand-in body (or raises its error)."""

    def __init__(self, object_id: str, body: Callable[[], Any]) -> None:
        self.object_id, self._body = object_id, body
        self.gets = 0

    def get(self, timeout: float | None = None) -> Any:
        self.gets += 1
        return self._body()


class RecordingFunction:
    """A Modal function: each `.spawn(arg)` and `.remote(arg)` recorded; `respond(arg)` is the body's result."""

    def __init__(self, name: str, respond: Callable[..., Any] = lambda *args: None) -> None:
        self.name, self.respond = name, respond
        self.spawned: list[Any] = []
        self.remote_calls: list[Any] = []
        self.calls: list[FakeCall] = []

    def spawn(self, *args: Any) -> FakeCall:
        self.spawned.append(args[0] if len(args) == 1 else args)
        call = FakeCall(f"fc-{self.name}-{len(self.spawned)}", lambda: self.respond(*args))
        self.calls.append(call)
        return call

    def remote(self, *args: Any) -> Any:
        self.remote_calls.append(args[0] if len(args) == 1 else args)
        return self.respond(*args)


def completed_run(job: Any = None) -> dict:
    """What the training function returns for a run that finished."""
    return {
        "state": "completed",
        "run_dir": "/vol/runs/tiny",
        "step": 2,
        "total_steps": 2,
        "eval_loss_before": 1.0,
        "eval_loss_after": 0.5,
    }
