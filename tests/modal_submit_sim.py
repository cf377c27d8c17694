"""`modal run launch/modal_entry.py -m <overrides>`, simulated: `python tests/modal_submit_sim.py ROOT OVERRIDES...`.

The local entrypoint's body (`modal_job.submit`) runs for real; only Modal's `Function.spawn` is
replaced: each call starts its own simulated container (tests/modal_sim.py, its own view of the
fake Volume at ROOT/remote) with the request it was given, and hands back the pickled result.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from noesis_accel import modal_job  # noqa: E402


class SimulatedCall:
    def __init__(self, root: Path, job: dict, number: int) -> None:
        self.root, self.job, self.number = root, job, number

    def get(self) -> object:
        job_file = self.root / f"call-{self.number}.json"
        result_file = self.root / f"call-{self.number}.pkl"
        job_file.write_text(json.dumps(self.job))
        subprocess.run([sys.executable, str(HERE / "modal_sim.py"), str(self.root / f"container-{self.number}"),
                        str(self.root / "remote"), "--job-file", str(job_file), "--result-file", str(result_file)],
                       check=False)
        return pickle.loads(result_file.read_bytes())


class SimulatedFunction:
    """Stands in for the app's training function: `.spawn(job).get()`, one container per call."""

    def __init__(self, root: Path) -> None:
        self.root, self.calls = root, 0

    def spawn(self, job: dict) -> SimulatedCall:
        self.calls += 1
        return SimulatedCall(self.root, job, self.calls)


def main() -> None:
    root, args = Path(sys.argv[1]), sys.argv[2:]
    root.mkdir(parents=True, exist_ok=True)
    settings = modal_job.ModalSettings.from_config(modal_job.compose_for_modal(modal_job.hydra_overrides(args)), args)
    modal_job.submit(args, SimulatedFunction(root), settings)


if __name__ == "__main__":
    main()
