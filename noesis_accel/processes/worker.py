"""A training process started by `launcher.py`: train the parent's resolved config, report one outcome.

The parent passes the config as a file (`NOESIS_CONFIG`), its lifeline (`NOESIS_LIFELINE_FD`: one
line per stop request, the signal's number; EOF when the parent is gone), and to the machine's first
worker a commit channel. Stop signals sent to this process directly are ignored: the launcher
receives them too and sends each one down the lifeline, so each counts once. The outcome goes to
`NOESIS_OUTCOME` as JSON; the parent turns it into the run's one line, so the worker prints no error
line of its own; the parent prints the traceback of the first failing rank, once.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

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
    parent = int(os.environ.get("NOESIS_LAUNCHER_PID", "0"))
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if parent and os.getppid() != parent:
        os._exit(1)  # the parent died before the death signal was armed
    lifeline = os.environ.get("NOESIS_LIFELINE_FD")
    if lifeline is None:
        return

    def watch() -> None:
        try:
            with os.fdopen(int(lifeline), "rb", buffering=0) as requests:
                for line in requests:
                    on_stop_request(int(line))
        except (OSError, ValueError):
            pass
        os._exit(1)  # EOF: the launcher is gone; a checkpoint now could race its restart

    threading.Thread(target=watch, name="noesis-lifeline", daemon=True).start()


def _write_outcome(outcome: dict[str, Any]) -> None:
    from noesis_accel.core.errors import redact

    path = os.environ.get("NOESIS_OUTCOME")
    if path:
        Path(path).write_text(redact(json.dumps(outcome, default=str)))


def main() -> None:
    _ignore_stop_signals()
    from noesis_accel.core.signals import PreemptionWatcher

    # Requests may arrive while the libraries load: the watcher holds them until the loop polls it.
    watcher = PreemptionWatcher(from_launcher=True)
    _die_with_parent(watcher.request)
    from omegaconf import DictConfig, OmegaConf

    from noesis_accel.config import Config
    from noesis_accel.core.env import quiet_known_noise
    from noesis_accel.core.errors import UserError
    from noesis_accel.core.signals import RunInterrupted
    from noesis_accel.processes.train import after_training_for
    from noesis_accel.rundir.volumes import LauncherCommitter, LocalCommitter
    from noesis_accel.training.trainer import Trainer

    quiet_known_noise()
    # The parent's resolved config, typed again by the schema: every rank trains exactly it.
    cfg = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(os.environ["NOESIS_CONFIG"])))
    committer = LauncherCommitter.from_env() or LocalCommitter()
    try:
        result = Trainer.run_config(cfg, committer, watcher, after_training_for(cfg))
    except RunInterrupted as stop:
        _write_outcome(stop.outcome())
        sys.exit(stop.exit_code)
    except UserError as err:
        _write_outcome({"kind": "user_error", "message": str(err), "exit_code": err.exit_code})
        sys.exit(err.exit_code)
    except BaseException as err:  # a bug or a library failure: its traceback is the useful part
        # Not printed here: when one rank fails, the others fail too ("connection closed by peer");
        # the parent prints the traceback of the first failure, the cause, once.
        _write_outcome(
            {
                "kind": "error",
                "message": f"{err.__class__.__name__}: {err}".splitlines()[0],
                "traceback": traceback.format_exc(),
                "time": time.time(),
            }
        )
        sys.exit(1)
    _write_outcome({"kind": "completed", "result": asdict(result)})


if __name__ == "__main__":
    main()
