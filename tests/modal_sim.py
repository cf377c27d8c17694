"""One simulated Modal container: `python tests/modal_sim.py VIEW REMOTE [--rank R --address A] OVERRIDES...`.

It mounts a fresh view of the fake Volume (only what was committed), and runs the training function's
body (`modal_job.run_job_in_container`) with a background commit every half second, as Modal does.
Kill it with SIGKILL to lose the container; send SIGINT (preemption) or SIGUSR1 (timeout) as Modal does.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import FakeVolume  # noqa: E402

from noesis_accel.modal_job import ModalSettings, compose_for_modal, run_job_in_container  # noqa: E402
from noesis_accel.train import STOPS, stop_line  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("view", type=Path)
    parser.add_argument("remote", type=Path)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--job-file", type=Path, help="a sweep job's request (JSON) instead of overrides")
    parser.add_argument("--result-file", type=Path, help="where a sweep job's JobReturn goes (pickled)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    started = time.time()
    if os.environ.get("NOESIS_FAULT_KILL_PID") == "container":  # a fault that takes the whole container down
        os.environ["NOESIS_FAULT_KILL_PID"] = str(os.getpid())
    volume = FakeVolume.mount(args.view, args.remote, background_s=0.5)
    if args.job_file:  # a sweep job: its request names its overrides; the container adds where the Volume is
        job = json.loads(args.job_file.read_text())
        job["overrides"] = [*job["overrides"], f"modal.mount={args.view}"]
        overrides = job["overrides"]
    else:
        job = overrides = [*args.overrides, f"modal.mount={args.view}"]
    settings = ModalSettings.from_config(compose_for_modal(overrides), overrides)
    try:
        result = run_job_in_container(job, volume, settings, machine_rank=args.rank,
                                      main_address=args.address, attempt_started=started)
        if args.result_file:
            args.result_file.write_bytes(pickle.dumps(result))
            return 0
    except STOPS as stop:  # Modal would see the function fail, and run it again
        print(stop_line(stop), file=sys.stderr, flush=True)
        return int(getattr(stop, "exit_code", 1))
    print(f"result: {result}", flush=True)
    return 0 if result.get("state") in ("completed", "already_completed") else int(result.get("exit_code", 2))


if __name__ == "__main__":
    sys.exit(main())
