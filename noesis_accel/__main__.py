"""`noesis train|plan|status|export|eval|report|data ...` (or `python -m noesis_accel ...`): one command for all.

Each subcommand is the same `main` as its `noesis-NAME` script, imported only when asked for, so
`noesis status` starts without loading the trainer. This module sits above every wing and imports
them; no wing imports it (an import-linter contract says so).
"""

from __future__ import annotations

import importlib
import signal
import sys

from noesis_accel.core.errors import safe_for_pipes
from noesis_accel.core.signals import STARTUP_INTERRUPTED

# name -> (module whose `main` runs it, what it does)
COMMANDS = {
    "train": ("noesis_accel.processes.train", "fine-tune: Hydra overrides of conf/ (noesis train --help)"),
    "status": ("noesis_accel.rundir.status", "a run's state, progress, history and cost"),
    "export": ("noesis_accel.after.export", "merge the adapter into the base model; optionally push to the hub"),
    "eval": ("noesis_accel.after.evaluate", "held-out loss and judged generations, base against tuned"),
    "report": ("noesis_accel.after.report", "plots and a markdown summary of a run"),
    "data": ("noesis_accel.training.datacli", "check a dataset against the tokenizer and template, no GPU"),
    "plan": ("noesis_accel.training.plancli", "fit, time and cost of a run before any GPU starts"),
}


def usage() -> str:
    lines = ["usage: noesis COMMAND [RUN_DIR] [key=value ...]", "", "commands:"]
    lines += [f"  {name:8} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`noesis COMMAND --help` for the keys of one; each is also installed as noesis-COMMAND."]
    return "\n".join(lines)


@safe_for_pipes
def main(argv: list[str] | None = None) -> int | None:
    """Run the subcommand `argv[0]` with the rest of `argv` as its own command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: noesis: unknown command {name!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])  # seconds for train: torch, transformers
        # `noesis-train` reads sys.argv itself (Hydra does); the others take it from there when given none.
        sys.argv = [sys.argv[0], *rest]
        return module.main()
    except KeyboardInterrupt:  # Ctrl-C while the command loads, or in one with no handler of its own
        print(STARTUP_INTERRUPTED if name == "train" else "interrupted: stopped by SIGINT", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
