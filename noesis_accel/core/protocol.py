"""What the processes of a run tell each other: environment variables, pipe lines, the worker's outcome.

A run may span several processes: the Modal entry (or `noesis-train`), the launcher that supervises
one machine's training processes, and those workers. Every value that crosses between them is named
here, with who writes it and who reads it, so neither side spells it on its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

# ---------------------------------------------------------------- environment variables

# Launcher -> worker: the parent's resolved config (a YAML file); the worker trains exactly it.
CONFIG_ENV = "NOESIS_CONFIG"
# Launcher -> worker: where the worker writes its `WorkerOutcome` (JSON); the launcher reads it.
OUTCOME_ENV = "NOESIS_OUTCOME"
# Launcher -> worker: the read end of the worker's lifeline pipe (stop requests; EOF: the launcher is gone).
LIFELINE_FD_ENV = "NOESIS_LIFELINE_FD"
# Launcher -> worker: the launcher's pid; the worker checks it is still its parent, and the fault
# injection (core/faults.py) signals it as a preemption of the machine would.
LAUNCHER_PID_ENV = "NOESIS_LAUNCHER_PID"
# Launcher -> the machine's first worker: "REQUEST_FD,RESPONSE_FD" of the commit pipe (rundir/volumes.py
# LauncherCommitter writes requests, the launcher commits and replies).
COMMIT_FDS_ENV = "NOESIS_COMMIT_FDS"
# Modal entry (cloud/modal_job.py) -> trainer: the attempt's "checkpoint and stop by" unix time
# (core/signals.py attempt_deadline); inherited by the launcher's workers.
DEADLINE_ENV = "NOESIS_DEADLINE"
# Modal entry -> rundir/lease.py: the function call's id; retries of one call share it, so a lease
# left by an earlier (dead) attempt of the same call is taken over at once.
LEASE_GROUP_ENV = "NOESIS_LEASE_GROUP"
# Launcher -> worker (rundir/lease.py reads it): the launcher holds the run dir's lease already.
LEASE_HELD_ENV = "NOESIS_LEASE_HELD"
# `modal run` / the sweep launcher -> the container's own import of launch/modal_entry.py: the CLI
# overrides (JSON list) the app is declared for (cloud/modal_job.py overrides_at_import).
MODAL_OVERRIDES_ENV = "NOESIS_MODAL_OVERRIDES"

# `noesis train -m` -> each job (in-process, a local process, or a Modal container via its JobRequest): the
# keys whose values differ between the sweep's jobs (JSON list), which alone name each job's run dir.
SWEEP_KEYS_ENV = "NOESIS_SWEEP_KEYS"

# Set by tests and benchmarks, read by core/faults.py and training/probes.py; unset in real runs.
FAULT_ENV = "NOESIS_FAULT"  # `point:step[,point:step]`: the fault to inject, and where
FAULT_KILL_PID_ENV = "NOESIS_FAULT_KILL_PID"  # a process SIGKILLed with a `step`/`save` fault (the container)
STEP_DELAY_ENV = "NOESIS_STEP_DELAY_S"  # seconds to sleep after every step, so a test can act mid-run
PROBE_GRADS_ENV = "NOESIS_PROBE_GRADS"  # a file for the full gradients of the first optimizer step

# ---------------------------------------------------------------- pipes (one line per message)

# The commit pipe: the worker asks COMMIT_REQUEST, the launcher answers COMMIT_OK or `error WHY`.
COMMIT_REQUEST = "commit"
COMMIT_OK = "ok"
_ERROR = "error "


def encode_line(message: str) -> bytes:
    """One message on a pipe: one line, whatever the message holds."""
    return (message.replace("\n", " ") + "\n").encode()


def decode_line(line: bytes) -> str:
    return line.decode().strip()


def commit_error(why: str) -> str:
    """The launcher's answer when it could not commit (or did not understand the request)."""
    return _ERROR + why


def commit_failure(reply: str) -> str | None:
    """None when the launcher's answer says it committed; otherwise why it did not."""
    return None if reply == COMMIT_OK else reply.removeprefix(_ERROR)


def encode_stop_request(signum: int) -> bytes:
    """A stop request down a worker's lifeline: the number of the signal the launcher received."""
    return encode_line(str(signum))


def decode_stop_request(line: bytes) -> int:
    return int(line)


# ---------------------------------------------------------------- the worker's outcome


class OutcomeKind(Enum):
    COMPLETED = "completed"  # `result` holds the run's result (rank 0's is the run's)
    INTERRUPTED = "interrupted"  # stopped on purpose after a complete checkpoint: by `signum`, the `deadline`, ...
    USER_ERROR = "user_error"  # the user's mistake: `message` is its one line, `exit_code` its code
    ERROR = "error"  # a bug or a library failure: `traceback`, and `time` to tell the first failing rank


@dataclass
class WorkerOutcome:
    """How one training process ended: written by the worker (`OUTCOME_ENV`), read by the launcher."""

    kind: OutcomeKind
    message: str = ""
    exit_code: int = 1
    signum: int | None = None  # INTERRUPTED by this stop signal
    deadline: bool = False  # INTERRUPTED at the attempt's deadline
    traceback: str = ""  # ERROR
    time: float = 0.0  # ERROR: when it failed
    result: dict[str, Any] | None = None  # COMPLETED

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "kind": self.kind.value}, default=str)

    @classmethod
    def from_json(cls, text: str) -> WorkerOutcome:
        """Raises ValueError for anything that is not an outcome (a worker killed while writing it)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"not an outcome: {text[:80]!r}")
        known = {f.name for f in fields(cls)} - {"kind"}
        return cls(kind=OutcomeKind(data.get("kind")), **{k: v for k, v in data.items() if k in known})
