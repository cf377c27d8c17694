"""Our training function under Modal's own container runtime: how each stop ends, as Modal's code decides.

Each container (tests/modal_sim.py) hands one input to `modal._container_entrypoint.call_function`
with a real `ContainerIOManager` whose only stand-in is the API stub that records the outputs sent.
The client's retry loop then reads those outputs (tests/test_modal_retries.py). A preemption must
end with no output (Modal's runtime re-raises KeyboardInterrupt: a free restart), a cancellation
with TERMINATED, the deadline with one FAILURE; each after its checkpoint was committed. Signals go
to the container's main process only, or to every process of the container, as a runtime might.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import MODAL_TINY
from helpers import REPO, assert_same_adapter, descendants, kill_group, logged_step, start_in_group, wait_until

from noesis_accel.rundir.layout import RunDir
from noesis_accel.rundir.status import main as status_main

STEPS = 12
TINY = MODAL_TINY
LAYOUTS = {"1-process": [], "2-process": ["distributed=ddp", "distributed.num_processes=2"]}
GRACE_S = 30  # Modal's SIGKILL follows its stop signal after this long
TRACKED = ["train.tracker=tensorboard"]


def _run_dir(root: Path) -> Path:
    return root / "runs" / "tiny"


class Container:
    """One simulated container under Modal's runtime; `outputs` is what the runtime sent."""

    def __init__(
        self, tmp_path: Path, overrides: list[str], env: dict | None = None, sim_args: Sequence[str] = ()
    ) -> None:
        self.view, self.remote = tmp_path / "container", tmp_path / "remote"
        self.outputs_file = tmp_path / f"outputs-{time.monotonic_ns()}.json"
        self.process = start_in_group(
            [
                sys.executable,
                str(REPO / "tests" / "modal_sim.py"),
                str(self.view),
                str(self.remote),
                "--outputs",
                str(self.outputs_file),
                *sim_args,
                *overrides,
            ],
            env,
        )

    def signal(self, signum: int, every_process: bool) -> None:
        pids = descendants(self.process.pid) if every_process else [self.process.pid]
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        try:
            out, err = self.process.communicate(timeout=timeout)
        finally:
            kill_group(self.process)
        return self.process.returncode, out + err

    @property
    def outputs(self) -> list[dict]:
        return json.loads(self.outputs_file.read_text())


# The session's uninterrupted local runs (tests/conftest.py), shared with test_modal_sim.py and test_spend.py.
REFERENCES = {"1-process": "modal_tiny_reference", "2-process": "modal_tiny_ddp_reference"}


@pytest.fixture
def references(request) -> dict[str, Path]:
    """The uninterrupted runs, each made when a test first needs its layout (the default suite: one process only)."""

    class Lazy(dict):
        def __missing__(self, layout: str) -> Path:
            return request.getfixturevalue(REFERENCES[layout])

    return Lazy()


def _stopped_checkpoint(remote_run: Path) -> tuple[int, dict]:
    """The step the stop recorded (committed) and its checkpoint's manifest."""
    status = RunDir(remote_run).status()
    step = status["step"]
    manifest = json.loads((remote_run / "checkpoints" / f"step-{step:06d}" / "manifest.json").read_text())
    return step, {**manifest, "state": status["state"]}


def _signal_mid_run(
    tmp_path: Path, layout: str, signum: int, every_process: bool, extra: list[str] = ()
) -> tuple[Container, int, str]:
    container = Container(tmp_path, TINY + LAYOUTS[layout] + list(extra), env={"NOESIS_STEP_DELAY_S": "0.5"})
    wait_until(
        lambda: logged_step(_run_dir(container.view)) >= 3 or container.process.poll() is not None, 240, "step 3"
    )
    container.signal(signum, every_process)
    signalled = time.monotonic()
    code, output = container.finish(timeout=GRACE_S + 10)
    assert time.monotonic() - signalled < GRACE_S, "still running when Modal's SIGKILL would come"
    return container, code, output


CASES = [
    pytest.param(
        layout,
        every,
        marks=[] if (layout, every) == ("1-process", False) else [pytest.mark.slow],
        id=f"{layout}-{'every-process' if every else 'main-process'}",
    )
    for layout in LAYOUTS
    for every in (False, True)
]


@pytest.mark.parametrize("layout, every_process", CASES)
def test_a_preemption_commits_its_checkpoint_sends_no_output_and_the_restart_loses_nothing(
    tmp_path, references, layout: str, every_process: bool, capsys
) -> None:
    # The tracker on too: its files are open while the run lasts, and the Volume must still commit.
    container, code, output = _signal_mid_run(tmp_path, layout, signal.SIGINT, every_process, TRACKED)
    assert container.outputs == [], output[-3000:]  # KeyboardInterrupt: Modal restarts the input for free
    assert code == 3, output[-3000:]  # 6 if a commit's reload had been refused for an open file
    stopped_at, manifest = _stopped_checkpoint(_run_dir(container.remote))
    assert manifest["reason"] == "signal" and manifest["state"] == "interrupted"
    assert 3 <= stopped_at < STEPS
    assert list((container.remote / "cache" / "data").iterdir())  # the tokenised data, kept for the restart
    restart = Container(tmp_path, TINY + LAYOUTS[layout] + TRACKED)
    code, output = restart.finish()
    assert code == 0 and restart.outputs[0]["status"] == "SUCCESS", output[-3000:]
    assert list((_run_dir(restart.remote) / "logs").rglob("events.out.tfevents.*"))  # both attempts' logs
    start = [e for e in RunDir(_run_dir(restart.remote)).events() if e["event"] == "start"][-1]
    assert start["step"] == stopped_at and start["lost_steps"] == 0 and start["lost_steps_exact"]
    assert_same_adapter(_run_dir(restart.remote), references[layout])
    # What `modal run launch/modal_entry.py::status tiny` prints from the Volume.
    assert status_main([str(_run_dir(restart.remote))]) == 0
    history = capsys.readouterr().out
    assert "attempts:    2 (1 interruption(s) survived, 0 step(s) redone)" in history
    assert f"#1: steps 0 -> {stopped_at}" in history and "stopped by SIGINT" in history


@pytest.mark.slow
@pytest.mark.parametrize("layout, every_process", CASES)
def test_a_cancellation_commits_its_checkpoint_and_ends_terminated(tmp_path, layout: str, every_process: bool) -> None:
    container, code, output = _signal_mid_run(tmp_path, layout, signal.SIGUSR1, every_process)
    assert [o["status"] for o in container.outputs] == ["TERMINATED"], output[-3000:]  # never retried
    assert code == 4
    stopped_at, manifest = _stopped_checkpoint(_run_dir(container.remote))
    assert manifest["reason"] == "signal" and manifest["state"] == "interrupted" and stopped_at >= 3


def _each_layout_against_the_clock(tmp_path: Path, overrides: list[str], started: float) -> dict[str, Container]:
    """One container per layout, all started at once with the attempt's start `started`: a test that waits
    most of a minute on the clock waits once for every layout instead of once each."""
    containers = {}
    for layout in LAYOUTS:
        (tmp_path / layout).mkdir()
        containers[layout] = Container(
            tmp_path / layout,
            TINY + LAYOUTS[layout] + overrides,
            env={"NOESIS_STEP_DELAY_S": "0.5"},
            sim_args=["--attempt-started", str(started)],
        )
    return containers


def _hold_each_after_a_step(containers: dict[str, Container]) -> dict[str, float]:
    """SIGSTOP each container (every process) as soon as it has logged a step (or ended); when each was held."""
    held: dict[str, float] = {}

    def all_held() -> bool:
        for layout, container in containers.items():
            if layout not in held and (
                logged_step(_run_dir(container.view)) >= 1 or container.process.poll() is not None
            ):
                container.signal(signal.SIGSTOP, every_process=True)
                held[layout] = time.time()
        return len(held) == len(containers)

    wait_until(all_held, 240, "step 1 in every container")
    return held


def _resume_all(containers: dict[str, Container]) -> None:
    for container in containers.values():
        container.signal(signal.SIGCONT, every_process=True)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [pytest.param("1-process"), pytest.param("2-process", marks=pytest.mark.slow)])
def test_the_deadline_commits_its_checkpoint_and_ends_as_one_failure(tmp_path, layout: str) -> None:
    # A 60 s attempt with a 50 s margin: checkpoint and stop 10 s after the start the test gives it.
    # The run is held (SIGSTOP) once a step is logged until that deadline has passed, so the stop
    # lands mid-run however fast or slow the machine starts: not after the last step, not before the first.
    # No held-out set: a deadline already passed during start-up would end the pass before training, and
    # the attempt with it, at step 0 (nothing to save); this test is about a stop after a step.
    timed = TINY + LAYOUTS[layout] + ["modal.timeout_s=60", "modal.deadline_margin_s=50", "data.eval_fraction=0"]
    started = time.time()
    container = Container(
        tmp_path, timed, env={"NOESIS_STEP_DELAY_S": "0.5"}, sim_args=["--attempt-started", str(started)]
    )
    run_dir = _run_dir(container.view)
    wait_until(lambda: logged_step(run_dir) >= 1 or container.process.poll() is not None, 240, "step 1")
    container.signal(signal.SIGSTOP, every_process=True)
    try:
        time.sleep(max(0.0, started + 10 - time.time()) + 0.1)
    finally:
        container.signal(signal.SIGCONT, every_process=True)
    code, output = container.finish()
    assert [o["status"] for o in container.outputs] == ["FAILURE"], output[-3000:]  # spends one retry
    assert "before this attempt's time limit" in container.outputs[0]["exception"]
    stopped_at, manifest = _stopped_checkpoint(_run_dir(container.remote))
    assert manifest["reason"] == "deadline" and 0 < stopped_at < STEPS


@pytest.mark.slow
def test_a_preemption_during_evaluation_on_a_slow_volume_ends_within_the_grace(tmp_path) -> None:
    """SIGINT as the held-out pass after step 3 starts, and every commit (ours and Modal's exit commit) takes
    15 s: the pass is given up at its next batch, the checkpoint comes first, our commit of it is waited for
    only until ckpt.stop_commit_s (10 s) after the signal, and the container is gone before Modal's SIGKILL
    (30 s); the checkpoint reaches the Volume (our commit, going on in the background, or the exit's)."""
    evaluated = TINY + ["train.eval_every=3"]
    container = Container(tmp_path, evaluated, env={"NOESIS_FAULT": "eval:3", "NOESIS_SIM_COMMIT_S": "15"})
    run_dir = _run_dir(container.view)
    wait_until(lambda: logged_step(run_dir) >= 3 or container.process.poll() is not None, 240, "step 3")
    signalled = time.monotonic()  # the signal comes as the pass after step 3's log line starts: no later than now
    code, output = container.finish(timeout=120)
    ended = time.monotonic() - signalled
    assert ended < GRACE_S, f"the container lasted {ended:.1f} s after the preemption"
    assert container.outputs == [] and code == 3, output[-3000:]  # a preemption: restarted for free
    assert "held-out pass given up for the stop request's checkpoint" in output
    stopped_at, manifest = _stopped_checkpoint(_run_dir(container.remote))
    assert stopped_at == 3 and manifest["reason"] == "signal"


@pytest.mark.slow
def test_a_stop_signal_after_the_deadline_is_the_time_limit_and_is_retried(tmp_path) -> None:
    """No margin (modal.deadline_margin_s=0) and a step still running at the deadline: the SIGUSR1 that
    comes then is the attempt's time limit, whatever its number, so one FAILURE (a retry resumes), not
    TERMINATED (a cancellation, never retried). Each container is held (SIGSTOP) from a logged step until
    the deadline has passed, so the signal lands after it however fast the machine starts."""
    timeout_s = 60  # both layouts start at once: room for the slower start of the two
    started = time.time()
    containers = _each_layout_against_the_clock(
        tmp_path, [f"modal.timeout_s={timeout_s}", "modal.deadline_margin_s=0"], started
    )
    try:
        held = _hold_each_after_a_step(containers)
        assert max(held.values()) < started + timeout_s, f"a first step came after the deadline: raise timeout_s {held}"
        time.sleep(max(0.0, started + timeout_s - time.time()) + 0.5)
        for container in containers.values():  # delivered when it runs again, after the deadline
            container.signal(signal.SIGUSR1, every_process=False)
    finally:
        _resume_all(containers)
    for layout, container in containers.items():
        code, output = container.finish()
        assert [o["status"] for o in container.outputs] == ["FAILURE"], (layout, output[-3000:])
        # Read as the time limit either way: the signal after the deadline, or (when the workers reach the step
        # boundary before the launcher's request does) the deadline itself.
        exception = container.outputs[0]["exception"]
        assert "at or after this attempt's deadline" in exception or "before this attempt's time limit" in exception
        stopped_at, manifest = _stopped_checkpoint(_run_dir(container.remote))
        # Committed for the retry.
        assert manifest["reason"] in ("signal", "deadline") and 0 < stopped_at < STEPS, layout


@pytest.mark.slow
@pytest.mark.parametrize("layout", [pytest.param("1-process"), pytest.param("2-process", marks=pytest.mark.slow)])
def test_a_bad_config_is_one_line_and_a_result_not_a_failure(tmp_path, layout: str) -> None:
    container = Container(tmp_path, TINY + LAYOUTS[layout] + [f"data.path={tmp_path / 'missing.jsonl'}"])
    code, output = container.finish()
    assert [o["status"] for o in container.outputs] == ["SUCCESS"], output[-3000:]  # terminal: no retry
    assert container.outputs[0]["value"]["state"] == "failed" and code == 2
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        f"error: {container.outputs[0]['value']['error']}"
    ]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.slow  # tests/test_spend.py has the same stop as a plain run, in the default suite
def test_an_out_of_memory_error_at_the_first_step_is_a_result_not_a_retry(tmp_path) -> None:
    """The batch shape does not fit: ten more attempts would fail the same way, each paying start-up."""
    container = Container(tmp_path, TINY, env={"NOESIS_FAULT": "oom:1"})
    code, output = container.finish()
    assert [o["status"] for o in container.outputs] == ["SUCCESS"], output[-3000:]  # terminal: no retry
    value = container.outputs[0]["value"]
    assert value["state"] == "failed" and code == 2 and "Traceback" not in output
    assert _error_lines(output) == [f"error: {value['error']}"] and "out of memory at step 1" in value["error"]


@pytest.mark.slow
def test_an_out_of_memory_error_later_spends_one_retry_then_is_a_result(tmp_path) -> None:
    """After the largest batch fitted, an OOM may be fragmentation: one retry (ckpt.oom_retries=1) from the
    committed checkpoint, and the same OOM again ends the run as a result, not nine more attempts."""
    oom = {"NOESIS_FAULT": "oom:8"}
    first = Container(tmp_path, TINY, env=oom)
    code, output = first.finish()
    assert [o["status"] for o in first.outputs] == ["FAILURE"], output[-3000:]  # Modal retries it
    assert "OutOfMemoryCrash" in first.outputs[0]["exception"] or "out of memory" in first.outputs[0]["exception"]
    committed = sorted(path.name for path in (_run_dir(first.remote) / "checkpoints").glob("step-*"))
    assert committed[-1] == "step-000006"  # the last checkpoint (every 3 steps) is on the Volume for the retry
    retry = Container(tmp_path, TINY, env=oom)
    code, output = retry.finish()
    assert [o["status"] for o in retry.outputs] == ["SUCCESS"], output[-3000:]
    value = retry.outputs[0]["value"]
    assert value["state"] == "failed" and code == 2 and "1 earlier attempt" in value["error"]
    stops = [e for e in RunDir(_run_dir(retry.remote)).events() if e["event"] == "stop"]
    assert [e.get("out_of_memory", False) for e in stops] == [True, True]


def test_the_fake_volume_refuses_a_reload_while_a_file_under_it_is_open_or_mapped(tmp_path) -> None:
    """Modal's rule (`Volume.reload`: "will fail if there are open files for the volume"), mapped files
    included: what `datasets` loads from disk stays memory-mapped, with no descriptor left open."""
    import datasets
    from helpers import FakeVolume

    volume = FakeVolume.mount(tmp_path / "view", tmp_path / "remote")
    (volume.view / "notes.txt").write_text("x")
    with (volume.view / "notes.txt").open(), pytest.raises(RuntimeError, match="path notes.txt is open"):
        volume.commit()
    datasets.Dataset.from_dict({"length": list(range(100))}).save_to_disk(str(volume.view / "cache"))
    volume.commit()  # written and closed: the rule is satisfied
    loaded = datasets.load_from_disk(str(volume.view / "cache"))
    with pytest.raises(RuntimeError, match=r"path cache/data-00000-of-00001.arrow is memory-mapped"):
        volume.reload()
    del loaded
    import gc

    gc.collect()
    volume.commit()
    assert (tmp_path / "remote" / "cache" / "data-00000-of-00001.arrow").is_file()


def test_weights_loaded_on_the_cpu_hold_no_mapping_of_their_file(tmp_path) -> None:
    """safetensors maps the file for tensors already in its dtype; kept, that mapping is an open file
    on the Volume for the whole run (model weights are cached there), and every commit would fail."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaConfig

    from noesis_accel.training.modeling import load_base_model

    saved = tmp_path / "model"
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(str(saved))
    model_cfg = OmegaConf.create(
        {
            "name_or_path": str(saved),
            "gguf_file": None,
            "architecture": None,
            "dtype": "float32",
            "attn_implementation": "eager",
            "load_in_4bit": False,
            "trust_remote_code": False,
            "revision": None,
            "cache_dir": str(tmp_path / "c"),
        }
    )
    model = load_base_model(model_cfg, vocab_size=512, device_is_cuda=False)
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(saved) in line]
    assert mapped == [] and next(model.parameters()).dtype.is_floating_point
