"""Rank 0 decides: how every rank of a run comes to the same answer about shared storage.

Ranks never decide from their own view of the run dir (a Volume may show each machine another
moment of it): the main process looks, and its answer, or the user error it raised, reaches every
rank. With one process these are plain calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from noesis_accel.core.errors import UserError

T = TypeVar("T")


def broadcast_from_main(accelerator: Any, value: T) -> T:
    """Rank 0's `value` on every rank (every rank must call this)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def main_decides(accelerator: Any, decide: Callable[[], T]) -> T:
    """`decide()` on the main process only; its answer on every rank, or its user error raised on every rank."""
    if accelerator.num_processes == 1:
        return decide()
    answer: Any = None
    problem: UserError | None = None
    if accelerator.is_main_process:
        try:
            answer = decide()
        except UserError as err:
            problem = err
    answer, problem = broadcast_from_main(accelerator, (answer, problem))
    if problem is not None:
        raise problem
    return answer


def on_main_process(accelerator: Any, action: Callable[[], T]) -> T | None:
    """`action()` on the main process only, its result kept there (None elsewhere: it may not travel,
    a lease holds a thread); a user error it raises stops every rank."""
    result: T | None = None

    def act() -> None:
        nonlocal result
        result = action()

    main_decides(accelerator, act)
    return result
