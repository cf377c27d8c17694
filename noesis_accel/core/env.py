"""Process environment that must be set before CUDA starts: the allocator variable and quiet libraries."""

from __future__ import annotations

import logging
import os
import sys

from packaging.version import Version

from noesis_accel.core import deprecations

# torch >= 2.10 reads PYTORCH_ALLOC_CONF; older releases read PYTORCH_CUDA_ALLOC_CONF.
# Setting the wrong one is silently ignored, and setting both makes 2.9 warn.
_NEW_ALLOC_VAR = "PYTORCH_ALLOC_CONF"
_OLD_ALLOC_VAR = "PYTORCH_CUDA_ALLOC_CONF"


def alloc_conf_variable(torch_version: str) -> str:
    """The allocator variable the given torch release reads."""
    release = Version(Version(torch_version).base_version)
    return _NEW_ALLOC_VAR if release >= Version("2.10") else _OLD_ALLOC_VAR


def apply_alloc_conf(alloc_conf: str | None, torch_version: str | None = None) -> str | None:
    """Set `alloc_conf` through the one variable the installed torch reads; returns that variable.

    Must run before the first CUDA allocation: the caching allocator reads it once. A value the
    user already exported wins, so an operator can always override the config from the shell.
    """
    if not alloc_conf:
        return None
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    variable = alloc_conf_variable(torch_version)
    other = _OLD_ALLOC_VAR if variable == _NEW_ALLOC_VAR else _NEW_ALLOC_VAR
    value = os.environ.get(variable) or os.environ.get(other) or alloc_conf
    os.environ[variable] = value
    os.environ.pop(other, None)  # never both
    return variable


def quiet_libraries() -> None:
    """Defaults that keep logs readable and avoid fork warnings; explicit user settings win."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch

    # Without a GPU DeepSpeed warns "Setting accelerator to CPU ..." on every run; saying so up
    # front (its own variable, checked the way it checks) is the same choice, without the warning.
    if "DS_ACCELERATOR" not in os.environ and torch.cuda.device_count() == 0:
        os.environ["DS_ACCELERATOR"] = "cpu"


_bars_off = False  # this process's tqdm default is switched off already


def progress_bars_off_unless_terminal() -> None:
    """No library's progress bar where the output is not a terminal (a pipe, a file, Modal's logs).

    A bar redraws itself with `\r` frames: in a piped log they pile up on one line thousands of
    characters long. Every library bar here is tqdm's, so tqdm is switched off: through its own
    `TQDM_DISABLE` for processes started from here (tqdm reads it once, when it is imported), and in
    its default for this process, which imported it already. The trainer's progress prints plain lines
    off a terminal by itself (train.progress_bar). An explicit `TQDM_DISABLE` of the user's wins, and a
    notebook (IPython) keeps its bars: there they draw in place, and they are the user's own too.
    """
    global _bars_off
    if _bars_off or sys.stderr.isatty() or "TQDM_DISABLE" in os.environ or "IPython" in sys.modules:
        return
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import functools

    import tqdm.std

    tqdm.std.tqdm.__init__ = functools.partialmethod(tqdm.std.tqdm.__init__, disable=True)
    _bars_off = True


def quiet_known_noise() -> None:
    """Silence warnings that say nothing actionable to a user of this tool."""
    quiet_libraries()
    progress_bars_off_unless_terminal()
    # bitsandbytes looks for an optional CPU 4-bit kernel package we never use.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Accelerate narrates every file of every save_state; our own line per checkpoint says enough.
    for name in ("accelerate.checkpointing", "accelerate.accelerator", "accelerate.state"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import datasets  # imported here, so that importing env stays cheap for the commands that never train
    import transformers

    datasets.disable_progress_bars()  # "Saving the dataset" bars for a few-ms cache write
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars; the train bar stays
    deprecations.apply_policy()  # the libraries' own deprecations, listed with why; ours are errors in the tests
