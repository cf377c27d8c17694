"""Modal's stop paths, simulated on the CPU: a container is a process, the Volume keeps only what was committed.

Each container (tests/modal_sim.py) mounts a fresh copy of the committed state, runs the training
function under Modal's own container runtime, and commits in the background every half second as
Modal does. It is SIGKILLed at random moments (a lost machine); every restart sees the committed
state only, and the run must end bitwise equal to an uninterrupted one. How preemption,
cancellation and the deadline end is in tests/test_modal_runtime.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MODAL_TINY, MODAL_TINY_DDP
from helpers import REPO, assert_same_adapter, kill_group, logged_step, start_in_group, step_losses, wait_until

from noesis_accel.rundir.checkpoint import checkpoint_problem
from noesis_accel.rundir.layout import RunDir

STEPS = 12
RANDOM_KILL_STEP_DELAY_S = 0.25  # the random sleep before a kill is at most 0.6 s: under 3 steps
TINY = MODAL_TINY


def _container(
    view: Path, remote: Path, overrides: list[str], env: dict | None = None, rank: int = 0
) -> subprocess.Popen:
    return start_in_group(
        [sys.executable, str(REPO / "tests" / "modal_sim.py"), str(view), str(remote), "--rank", str(rank), *overrides],
        env,
    )


def _finish(container: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, err = container.communicate(timeout=timeout)
    finally:
        kill_group(container)
    return container.returncode, out + err


def _run_dir(root: Path) -> Path:
    return root / "runs" / "tiny"


@pytest.fixture
def reference(modal_tiny_reference) -> Path:
    """The same training, uninterrupted, as a plain local run (one per session, shared with test_modal_runtime.py)."""
    return modal_tiny_reference


def _kill_at_random_moments(tmp_path: Path, overrides: list[str], kills: list[dict], seed: int) -> list[int]:
    """Run containers until the run completes, killing the first ones as `kills` says; steps each kill cost."""
    rng = random.Random(seed)
    view, remote = tmp_path / "container", tmp_path / "remote"
    for kill in kills:
        env = kill.get("env")
        if "after_step" in kill:
            # Slow steps keep a kill at most a few steps after `after_step` on a fast machine, so the
            # kills land where the test plans them (before the next fault's save, before the end).
            env = {**(env or {}), "NOESIS_STEP_DELAY_S": str(RANDOM_KILL_STEP_DELAY_S)}
        container = _container(view, remote, overrides, env=env)
        if "after_step" in kill:  # a random moment: some time after a step, mid-step or mid-save alike
            wait_until(
                lambda kill=kill, container=container: (
                    logged_step(_run_dir(view)) >= kill["after_step"] or container.poll() is not None
                ),
                240,
                f"step {kill['after_step']}",
            )
            time.sleep(rng.uniform(0, 0.6))
            kill_group(container, signal.SIGKILL)  # the container dies: nothing more is committed
        code, output = _finish(container)
        assert code != 0, f"the container planned to die ({kill}) finished:\n{output[-3000:]}"
    for _ in range(3):
        code, output = _finish(_container(view, remote, overrides))
        if code == 0:
            break
    assert code == 0, output[-3000:]
    events = RunDir(_run_dir(remote)).events()
    lost = [e.get("lost_steps") for e in events if e.get("event") == "start" and e.get("attempt", 1) > 1]
    print(f"steps lost per kill: {lost}")
    return lost


@pytest.mark.slow
def test_a_container_killed_at_random_moments_and_during_a_save_resumes_from_the_committed_state(
    tmp_path, reference
) -> None:
    kills = [
        {"after_step": random.Random(1).randint(2, 5)},
        # SIGKILL of the whole container inside the save of step 9: files half-copied by the
        # background commit must never count as a checkpoint.
        {"env": {"NOESIS_FAULT": "save:9", "NOESIS_FAULT_KILL_PID": "container"}},
    ]
    lost = _kill_at_random_moments(tmp_path, TINY, kills, seed=7)
    assert len(lost) == 2 and all(0 <= n <= 3 for n in lost)  # at most one checkpoint interval each
    remote_run = _run_dir(tmp_path / "remote")
    assert_same_adapter(remote_run, reference)
    assert all(checkpoint_problem(path) is None for _, path in RunDir(remote_run).step_dirs())
    ours, theirs = step_losses(remote_run), step_losses(reference)
    assert ours == theirs  # every step's loss, after all the kills, exactly


@pytest.mark.slow
def test_a_two_process_container_killed_at_random_moments_resumes_bitwise(tmp_path, modal_tiny_ddp_reference) -> None:
    ddp, reference = MODAL_TINY_DDP, modal_tiny_ddp_reference
    # The save fault comes before the late random kill, which could otherwise pass step 6 first.
    kills = [
        {"after_step": 2},
        {"env": {"NOESIS_FAULT": "save:6", "NOESIS_FAULT_KILL_PID": "container"}},
        {"after_step": 8},
    ]
    lost = _kill_at_random_moments(tmp_path, ddp, kills, seed=11)
    assert all(0 <= n <= 3 for n in lost)
    assert_same_adapter(_run_dir(tmp_path / "remote"), reference)
    assert step_losses(_run_dir(tmp_path / "remote")) == step_losses(reference)


def _cluster_overrides(rank: int, port: int) -> list[str]:
    """Two containers of one process each, rank 0's address and port, as the clustered function sets them."""
    return TINY + [
        "distributed=ddp",
        "distributed.num_processes=1",
        "distributed.num_machines=2",
        f"distributed.machine_rank={rank}",
        "distributed.main_process_ip=127.0.0.1",
        f"distributed.main_process_port={port}",
    ]


def _cluster(tmp_path: Path, port: int, env: dict | None = None) -> list[subprocess.Popen]:
    remote = tmp_path / "remote"
    return [
        _container(tmp_path / f"container{rank}", remote, _cluster_overrides(rank, port), env=env, rank=rank)
        for rank in (0, 1)
    ]


PEER_TIMEOUT_S = 20  # distributed.peer_timeout_s for these tests (60 s by default)
PEER_LOST_BOUND_S = PEER_TIMEOUT_S + 20  # a heartbeat, stopping the workers, the exit commit, the process exit


@pytest.mark.slow
@pytest.mark.parametrize("how", ["frozen", "killed"])
def test_a_lost_cluster_peer_ends_the_other_container_within_the_bound_and_the_restart_is_exact(
    tmp_path, modal_tiny_ddp_reference, how: str
) -> None:
    """Container 1 frozen (SIGSTOP: a lost machine that keeps its connections open) or killed at step 5:
    container 0 must not idle in the collective for torch's timeout (30 min of GPUs): it ends within
    distributed.peer_timeout_s and a little, names the lost peer, and the restarted cluster resumes
    from the newest committed checkpoint to exactly the uninterrupted run.

    That checkpoint is a cluster's: each container sees the other's files only after their commit and
    its own remount; the manifest, written last by rank 0, lists both containers' files (checked where
    container 1 was killed: a frozen one may have left a later save unfinished), and a restart checks
    every one of them."""
    from noesis_accel.training.distributed import free_port

    reference = modal_tiny_ddp_reference
    watched = {"NOESIS_STEP_DELAY_S": "0.3"}
    timeout = [f"distributed.peer_timeout_s={PEER_TIMEOUT_S}"]
    port = free_port()
    containers = [
        _container(
            tmp_path / f"container{rank}",
            tmp_path / "remote",
            _cluster_overrides(rank, port) + timeout,
            env=watched,
            rank=rank,
        )
        for rank in (0, 1)
    ]
    wait_until(lambda: logged_step(_run_dir(tmp_path / "container0")) >= 5, 300, "step 5 on rank 0")
    kill_group(containers[1], signal.SIGSTOP if how == "frozen" else signal.SIGKILL)
    lost_at = time.monotonic()
    try:
        code, output = _finish(containers[0], timeout=PEER_LOST_BOUND_S + 60)
        ended = time.monotonic() - lost_at
    finally:
        kill_group(containers[1], signal.SIGKILL)  # a frozen container is Modal's to tear down
        _finish(containers[1], timeout=30)
    assert ended < PEER_LOST_BOUND_S, f"container 0 lasted {ended:.0f} s after losing its peer"
    assert code == 5, output[-3000:]  # a FAILURE: Modal restarts the cluster's input
    status = RunDir(_run_dir(tmp_path / "remote")).status()
    assert "machine 1 of the cluster stopped answering" in (status.get("exit_reason") or ""), status
    remote_run = _run_dir(tmp_path / "remote")
    if how == "killed":  # what container 1 committed before it died is all there is of it
        newest = RunDir(remote_run).step_dirs()[0][1]
        manifest = json.loads((newest / "manifest.json").read_text())
        assert manifest["num_machines"] == 2 and "random_states_1.pkl" in manifest["files"]  # rank 1's own file
        # Only container 1 writes it: it reached the Volume by that container's commit (container 0 sees
        # it too, since a commit reloads, as Modal's does).
        assert (newest / "random_states_1.pkl").is_file()
    restarted = _cluster(tmp_path, free_port())
    results = [_finish(container) for container in restarted]
    assert all(code == 0 for code, _ in results), results[0][1][-2000:] + results[1][1][-2000:]
    assert_same_adapter(remote_run, reference)
    assert step_losses(remote_run) == step_losses(reference)
    # A commit of rank 1 that never arrived: the checkpoint is incomplete, whoever looks at it.
    (RunDir(remote_run).step_dirs()[0][1] / "random_states_1.pkl").unlink()
    assert "random_states_1.pkl is missing" in checkpoint_problem(RunDir(remote_run).step_dirs()[0][1])


@pytest.mark.slow
def test_a_sweep_from_the_modal_entrypoint_runs_each_job_in_its_own_container(tmp_path) -> None:
    """`modal run launch/modal_entry.py -m ...`: the entrypoint's and the coordinator's real bodies; the
    coordinator's one call simulated in-process, each job's training call in its own simulated container."""
    args = ["-m", "+experiment=tiny", "train.max_steps=2", "ckpt.every=1", "optim.lr=0.001,0.002", "modal.secret=null"]
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "modal_submit_sim.py"), str(tmp_path), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "coordinator calls: 1" in output and "Launching 2 jobs on Modal" in output
    assert "modal: sweep: 2 jobs: 2 completed, 0 failed" in output
    runs = sorted(p for p in (tmp_path / "remote" / "runs").iterdir() if (p / "status.json").is_file())
    assert [p.name.rsplit("-lr", 1)[1] for p in runs] == ["0.001", "0.002"]  # named by what the sweep varies
    assert all(RunDir(p).status()["state"] == "completed" for p in runs)  # committed from each job's own container
    views = sorted(
        p.name for p in tmp_path.iterdir() if p.name.startswith("container-") and not p.name.endswith("-local")
    )
    assert views == ["container-1", "container-2"]  # each job in its own container (each with its own disk)
