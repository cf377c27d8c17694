"""`modal run ...` through Modal's own CLI (modal.cli.entry_point), offline.

Modal's code parses the command line, imports launch/modal_entry.py as it does for `modal run`,
builds the click command of the entrypoint or function, and invokes it; only what reaches Modal's
servers is replaced, at the narrowest points that can run offline:
- `modal.cli.run.run_app`: creating the app and its objects on the server (the `modal run` and
  `--detach` context); recorded instead, with the app and the detach flag it was given.
- `Function.spawn`, `Function.remote`: starting a call needs the hydrated app; recorded, and the
  call's result given by the test.
Everything else (argument parsing, the import, `main` and `submit`, the config and data checks)
is the real code.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import modal
import pytest
from click.testing import CliRunner
from helpers import REPO, FakeVolume
from modal_fakes import FakeCall, completed_run

# In-process bodies of functions that mount a Volume: Modal warns that a local run has none.
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally")


@dataclass
class ModalServer:
    """What reached the (replaced) server: the app runs, and each started call with its function's name."""

    runs: list[dict] = field(default_factory=list)
    spawned: list[tuple[str, tuple]] = field(default_factory=list)
    remote: list[tuple[str, tuple]] = field(default_factory=list)
    results: dict[str, Callable[..., Any]] = field(default_factory=dict)  # function name -> its body's stand-in

    def result(self, function: Any, args: tuple) -> Any:
        return self.results.get(_name(function), lambda *a: None)(*args)


def _name(function: Any) -> str:
    return function._source_info_.function_name  # the name Modal registers the function under (as its CLI reads it)


@pytest.fixture
def modal_cli(monkeypatch, tmp_path):
    """`modal <args>` run by Modal's CLI in this process, from the project root, with the server replaced."""
    from modal.cli import run as run_module
    from modal.cli.entry_point import entrypoint_cli

    server = ModalServer()

    @contextlib.contextmanager
    def run_app(app, **options):
        server.runs.append({"app": app, **options})
        yield app

    def spawn(self, *args, **kwargs):
        server.spawned.append((_name(self), args))
        return FakeCall(f"fc-{len(server.spawned)}", lambda: server.result(self, args))

    def remote(self, *args, **kwargs):
        server.remote.append((_name(self), args))
        return server.result(self, args)

    monkeypatch.setattr(run_module, "run_app", run_app)
    monkeypatch.setattr(modal.Function, "spawn", spawn)
    monkeypatch.setattr(modal.Function, "remote", remote)
    monkeypatch.delenv("NOESIS_MODAL_OVERRIDES", raising=False)  # the laptop: the app is declared from argv
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))  # `modal run` adds the file's directory
    monkeypatch.setitem(sys.modules, "modal_entry", None)  # Modal's import registers it; removed afterwards
    del sys.modules["modal_entry"]

    def invoke(*args: str) -> Any:
        monkeypatch.setattr(
            sys, "argv", ["modal", *args]
        )  # the app reads its overrides from argv, as under `modal run`
        result = CliRunner().invoke(entrypoint_cli, list(args), catch_exceptions=False)
        result.server = server
        return result

    invoke.server = server
    return invoke


def test_modal_run_reaches_main_with_the_overrides_unchanged_and_spawns_the_training(modal_cli) -> None:
    modal_cli.server.results["train"] = lambda args: completed_run()
    modal_cli.server.results["check_data"] = lambda overrides: {"error": None, "records": 12000, "format": "chat"}
    result = modal_cli("run", "launch/modal_entry.py", "+experiment=noesis")
    assert result.exit_code == 0, result.output
    server = result.server
    assert server.spawned == [("train", (["+experiment=noesis"],))]
    # The recipe's data is on the Volume: read on a CPU container before the GPUs start.
    assert server.remote == [("check_data", (["+experiment=noesis"],))]
    assert [run["detach"] for run in server.runs] == [False]
    assert sys.modules["modal_entry"].SETTINGS.gpu == "H100:8"  # declared from the command line
    assert "started call fc-1" in result.output and "completed at step 2/2" in result.output


def test_modal_run_detach_spawns_the_same_call(modal_cli) -> None:
    modal_cli.server.results["train"] = lambda args: completed_run()
    result = modal_cli("run", "--detach", "launch/modal_entry.py", "+experiment=tiny", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    assert [run["detach"] for run in result.server.runs] == [True]
    assert result.server.spawned == [("train", (["+experiment=tiny", "train.max_steps=2"],))]
    assert not result.server.remote  # the sample data is in the image: checked on this machine


def test_a_sweep_through_modal_run_starts_exactly_one_coordinator_call(modal_cli) -> None:
    jobs = [
        {
            "job_num": n,
            "overrides": ["+experiment=tiny", f"optim.lr={lr}"],
            "state": "completed",
            "value": 0.4,
            "error": None,
            "exit_code": 0,
        }
        for n, lr in enumerate(("0.0001", "0.0002"))
    ]
    modal_cli.server.results["sweep"] = lambda args: {"jobs": jobs, "exit_code": 0}
    result = modal_cli("run", "launch/modal_entry.py", "-m", "+experiment=tiny", "optim.lr=1e-4,2e-4")
    assert result.exit_code == 0, result.output
    assert result.server.spawned == [("sweep", (["-m", "+experiment=tiny", "optim.lr=1e-4,2e-4"],))]
    assert not result.server.remote
    assert "modal: sweep: 2 jobs: 2 completed, 0 failed" in result.output


@pytest.mark.parametrize(
    "price", [["price=3.95"], ["--price=3.95"], ["--price", "3.95"]], ids=["key", "equals", "space"]
)
def test_status_gets_the_price_in_either_spelling(modal_cli, price, tmp_path, monkeypatch) -> None:
    """`modal run launch/modal_entry.py::status noesis --price=3.95`: Modal passes the words on; the
    function's body (run in-process against a fake Volume) hands the price to noesis-status."""
    received: list[list[str]] = []
    monkeypatch.setattr("noesis_accel.rundir.status.main", lambda argv: received.append(argv) or 0)

    def status_body(*args: str) -> None:
        entry = sys.modules["modal_entry"]
        monkeypatch.setattr(entry, "volume", FakeVolume.mount(tmp_path / "view", tmp_path / "remote"))
        return entry.status.local(*args)

    modal_cli.server.results["status"] = status_body
    result = modal_cli("run", "launch/modal_entry.py::status", "noesis", *price, "modal.volume=other")
    assert result.exit_code == 0, result.output
    assert result.server.remote == [("status", ("noesis", *price, "modal.volume=other"))]
    assert received == [["/vol/runs/noesis", "price=3.95"]]  # in the one style, whichever spelling was typed
    assert sys.modules["modal_entry"].SETTINGS.volume == "other"  # the app's word declared the app
