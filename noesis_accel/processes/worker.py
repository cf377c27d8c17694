"""A training process started by `launcher.py`: train the parent's resolved config, report one outcome.

The parent passes the config as a file (`CONFIG_ENV`), its lifeline (`LIFELINE_FD_ENV`: one line
per stop request, the signal's number; EOF when the parent is gone), and to the machine's first
worker a commit channel (all named in core/protocol.py). Stop signals sent to this process directly
are ignored: the launcher receives them too and sends each one down the lifeline, so each counts
once. The outcome goes to `OUTCOME_ENV` as a `WorkerOutcome`; the parent turns it into the run's one
line, so the worker prints no error line of its own; the parent prints the traceback of the first
failing rank, once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import cast

from noesis_accel.core.protocol import (
    CONFIG_ENV,
    LAUNCHER_PID_ENV,
    LIFELINE_FD_ENV,
    OUTCOME_ENV,
    OutcomeKind,
    WorkerOutcome,
    decode_stop_request,
)

_PR_SET_PDEATHSIG = 1


def _ignore_stop_signals() -> None:
    """From the first moment: a stop signal sent to every process of a container reaches the launcher
    too, which forwards it down the lifeline; taking it here as well would count it twice."""
    from noesis_accel.core.signals import FORWARDED_SIGNALS

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _die_with_parent(on_stop_request: Callable[[int], None]) -> None:
    """Exit within moments of the parent, whatever killed it, including SIGKILL; pass on its stop requests.

    The kernel's parent-death signal covers Linux (even if this process is stuck in C code); the
    lifeline thread covers every platform. Workers have their own session, so nothing else would
    tell them: without this, killing the launcher leaves training running beside its restart.
    """
    parent = int(os.environ.get(LAUNCHER_PID_ENV, "0"))
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if parent and os.getppid() != parent:
        os._exit(1)  # the parent died before the death signal was armed
    lifeline = os.environ.get(LIFELINE_FD_ENV)
    if lifeline is None:
        return

    def watch() -> None:
        try:
            with os.fdopen(int(lifeline), "rb", buffering=0) as requests:
                for line in requests:
                    on_stop_request(decode_stop_request(line))
        except (OSError, ValueError):
            pass
        os._exit(1)  # EOF: the launcher is gone; a checkpoint now could race its restart

    threading.Thread(target=watch, name="noesis-lifeline", daemon=True).start()


def outcome_of(err: BaseException) -> WorkerOutcome:
    """How a run that raised `err` ended, for the launcher (which rebuilds the exception from it)."""
    from noesis_accel.core.errors import UserError
    from noesis_accel.core.signals import RunInterrupted, StoppedAtDeadline

    if isinstance(err, RunInterrupted):
        return WorkerOutcome(
            OutcomeKind.INTERRUPTED,
            str(err),
            err.exit_code,
            signum=getattr(err, "signum", None),
            deadline=isinstance(err, StoppedAtDeadline),
        )
    if isinstance(err, UserError):
        return WorkerOutcome(OutcomeKind.USER_ERROR, str(err), err.exit_code)
    return WorkerOutcome(
        OutcomeKind.ERROR,
        f"{err.__class__.__name__}: {err}".splitlines()[0],
        traceback=traceback.format_exc(),
        time=time.time(),
    )


def _write_outcome(outcome: WorkerOutcome) -> None:
    from noesis_accel.core.errors import redact

    path = os.environ.get(OUTCOME_ENV)
    if path:
        Path(path).write_text(redact(outcome.to_json()))


def main() -> None:
    _ignore_stop_signals()
    from noesis_accel.core.signals import PreemptionWatcher

    # Requests may arrive while the libraries load: the watcher holds them until the loop polls it.
    watcher = PreemptionWatcher(from_launcher=True)
    _die_with_parent(watcher.request)
    from omegaconf import DictConfig, OmegaConf

    from noesis_accel.config import Config, to_config
    from noesis_accel.core.env import quiet_known_noise
    from noesis_accel.core.errors import UserError
    from noesis_accel.core.signals import RunInterrupted
    from noesis_accel.processes.train import after_training_for
    from noesis_accel.rundir.volumes import LauncherCommitter, LocalCommitter
    from noesis_accel.training.trainer import Trainer

    quiet_known_noise()
    # The parent's resolved and validated config, typed again by the schema: every rank trains exactly it.
    saved = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(os.environ[CONFIG_ENV]))
    cfg = to_config(cast(DictConfig, saved))
    committer = LauncherCommitter.from_env() or LocalCommitter()
    try:
        result = Trainer.run_config(cfg, committer, watcher, after_training_for(cfg))
    except (RunInterrupted, UserError) as stop:
        _write_outcome(outcome_of(stop))
        sys.exit(stop.exit_code)
    except BaseException as err:  # a bug or a library failure: its traceback is the useful part
        # Not printed here: when one rank fails, the others fail too ("connection closed by peer");
        # the parent prints the traceback of the first failure, the cause, once.
        _write_outcome(outcome_of(err))
        sys.exit(1)
    _write_outcome(WorkerOutcome(OutcomeKind.COMPLETED, result=asdict(result)))


if __name__ == "__main__":
    main()
