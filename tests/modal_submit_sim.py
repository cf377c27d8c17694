"""`modal run launch/modal_entry.py -m <overrides>`, simulated: `python tests/modal_submit_sim.py ROOT OVERRIDES...`.

The local entrypoint's body (`modal_submit.submit`) and the coordinator's (`coordinate_sweep`) run
for real; only Modal's calls are replaced. The coordinator's one call runs in this process (as its
own container would), and each training call it spawns starts its own simulated container
(tests/modal_sim.py, its own view of the fake Volume at ROOT/remote) and hands back the pickled result.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from noesis_accel.cloud import modal_job, modal_submit  # noqa: E402


class SimulatedCall:
    def __init__(self, object_id: str, body: Callable[[], Any]) -> None:
        self.object_id, self._body = object_id, body

    def get(self) -> Any:
        return self._body()


class SimulatedFunction:
    """Stands in for the app's training function: `.spawn(job).get()`, one container per call."""

    def __init__(self, root: Path) -> None:
        self.root, self.calls = root, 0

    def spawn(self, job: dict) -> SimulatedCall:
        self.calls += 1
        return SimulatedCall(f"fc-train-{self.calls}", lambda number=self.calls: self._container(job, number))

    def _container(self, job: dict, number: int) -> object:
        job_file = self.root / f"call-{number}.json"
        result_file = self.root / f"call-{number}.pkl"
        job_file.write_text(json.dumps(job))
        subprocess.run(
            [
                sys.executable,
                str(HERE / "modal_sim.py"),
                str(self.root / f"container-{number}"),
                str(self.root / "remote"),
                "--job-file",
                str(job_file),
                "--result-file",
                str(result_file),
            ],
            check=False,
        )
        return pickle.loads(result_file.read_bytes())


class SimulatedCoordinator:
    """Stands in for the app's `sweep` function: its one call runs the sweep in this process."""

    def __init__(self) -> None:
        self.calls = 0

    def spawn(self, args: list[str]) -> SimulatedCall:
        self.calls += 1
        return SimulatedCall("fc-sweep-1", lambda: modal_submit.coordinate_sweep(args, "__main__:training_function"))


class NoDataCheck:
    def remote(self, overrides: list[str]) -> dict:
        raise AssertionError("the sweep's data is in the image: it is checked on this machine")


_ROOT: Path | None = None  # this process stands for one sweep: where its containers and fake Volume live


def training_function() -> SimulatedFunction:
    """What the entry's `training_function` is to the coordinator: here, simulated containers."""
    assert _ROOT is not None
    return SimulatedFunction(_ROOT)


def main() -> None:
    global _ROOT
    root, args = Path(sys.argv[1]), sys.argv[2:]
    root.mkdir(parents=True, exist_ok=True)
    _ROOT = root
    settings = modal_job.ModalSettings.from_config(modal_job.compose_for_modal(modal_job.hydra_overrides(args)), args)
    coordinator = SimulatedCoordinator()
    functions = modal_submit.AppFunctions(train=SimulatedFunction(root), sweep=coordinator, check_data=NoDataCheck())
    modal_submit.submit(args, functions, settings)
    print(f"coordinator calls: {coordinator.calls}", flush=True)


if __name__ == "__main__":
    main()
