"""`ckpt.resume`: the values with a meaning of their own, and the one reading of the key."""

from __future__ import annotations

from enum import Enum


class Resume(Enum):
    """How a start treats the checkpoints already in its run dir."""

    AUTO = "auto"  # the newest complete checkpoint, or a fresh start where there is none
    NEVER = "never"  # a fresh start; refused where checkpoints exist, so nothing is trained over
    PATH = "path"  # any other value: the checkpoint directory it names


def resume_mode(value: object) -> Resume:
    """What a `ckpt.resume` value asks for; anything but `auto` and `never` is a checkpoint path."""
    text = str(value)
    if text == Resume.AUTO.value:
        return Resume.AUTO
    if text == Resume.NEVER.value:
        return Resume.NEVER
    return Resume.PATH
