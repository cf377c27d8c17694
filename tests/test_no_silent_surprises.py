"""What a practitioner's first commands must never do silently: an unknown key applied as if it
were one, a changed config on a finished run ignored, sweep jobs sharing a run dir, Hydra's own
errors taken for crashes, a progress bar smeared over a log, library chatter, a broken pipe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import run_cli
from helpers import REPO

from noesis_accel.config import compose, validate
from noesis_accel.core.errors import ConfigError, ResumeError
from noesis_accel.rundir.history import write_status

TINY = ["+experiment=tiny", "train.max_steps=2", "ckpt.every=2", "train.eval_every=0"]


@pytest.mark.parametrize(
    "override, named",
    [
        ("+train.lerning_rate=1e-4", "train.lerning_rate: not a key of the config; did you mean optim.lr?"),
        (
            "+optim.neftune_noise_alpha=5",
            "optim.neftune_noise_alpha: not a key of the config; no key of that name",
        ),
        ("+train.max_stepz=3", "train.max_stepz: not a key of the config; did you mean train.max_steps?"),
    ],
)
def test_an_undeclared_key_is_an_error_even_with_a_plus(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        validate(compose(["+experiment=tiny", override]))
    assert named in str(refused.value)


def test_free_form_sections_still_take_any_key() -> None:
    validate(compose(["+experiment=tiny", "+model.architecture.rope_theta=10000.0"]))


def test_an_undeclared_key_writes_nothing(tmp_path) -> None:
    from noesis_accel.processes.train import run

    with pytest.raises(ConfigError, match="train.lerning_rate"):
        run(compose(TINY + ["+train.lerning_rate=1e-4", f"run.root={tmp_path}"]))
    assert not (tmp_path / "tiny").exists()  # no config.yaml recording it as applied


def test_a_typo_in_a_config_group_is_one_line_and_exit_2(tmp_path) -> None:
    result = run_cli(["+experiment=tiny", "optim=adamw_8bit", f"run.root={tmp_path}"])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: optim=adamw_8bit: no such option of optim; one of adamw")
    assert "adamw8bit" in lines[0]  # the options it could have been


def test_a_completed_run_asked_again_with_other_math_is_refused_by_key(tmp_path) -> None:
    from noesis_accel.processes.train import run

    assert run(compose(TINY + [f"run.root={tmp_path}"])).state == "completed"
    with pytest.raises(ResumeError) as refused:
        run(compose(TINY + [f"run.root={tmp_path}", "optim.lr=5e-4"]))
    assert "holds a completed run started with a different config" in str(refused.value)
    assert "optim.lr: 0.001 -> 0.0005" in str(refused.value)
    # The same math again is still "nothing to do", and a change of where or how often is allowed.
    assert run(compose(TINY + [f"run.root={tmp_path}", "ckpt.keep_last=1"])).state == "already_completed"


@pytest.mark.parametrize(
    "sweep",
    [
        ["run.name=fixed", "optim.lr=1e-3,2e-3"],  # a fixed name for every job
        ["ckpt.keep_last=1,2"],  # jobs that differ only in keys that do not name a run
    ],
)
def test_a_sweep_whose_jobs_would_share_a_run_dir_is_refused_before_any_job(tmp_path, sweep: list[str]) -> None:
    result = run_cli(["-m", *TINY, f"run.root={tmp_path}", *sweep])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "jobs of this sweep would share the run dir" in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # no job started, Hydra wrote nothing


@pytest.mark.slow
def test_outside_a_terminal_progress_is_one_plain_line_per_report_and_no_library_chatter(tmp_path) -> None:
    result = run_cli(
        [
            "+experiment=tiny",
            "train.max_steps=4",
            "ckpt.every=2",
            "train.progress_bar=true",
            "train.print_every=2",
            f"run.root={tmp_path}",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "\r" not in output and "it/s" not in output  # no bar redraws in a log
    progress = [line for line in output.splitlines() if line.startswith("step ") and "/4 (" in line]
    assert [line.split(":")[0] for line in progress] == ["step 2/4 (50%)", "step 4/4 (100%)"]
    assert all("loss " in line and "tok/s" in line and "ETA" in line for line in progress)
    checkpoint_lines = [line for line in output.splitlines() if "checkpoint step-000002" in line]
    assert len(checkpoint_lines) == 1
    assert "Setting accelerator to CPU" not in output  # DeepSpeed's warning on every CPU run


def test_a_status_read_through_head_ends_quietly(tmp_path) -> None:
    write_status(tmp_path, state="running", step=3, total_steps=10)
    for number in range(400):  # a long history: the reader leaves before the writer is done
        (tmp_path / "events.jsonl").open("a").write(
            f'{{"event": "start", "time": {1700000000 + number}, "attempt": {number + 1}, "step": 0}}\n'
        )
    pipeline = subprocess.run(
        f"{sys.executable} -m noesis_accel.rundir.status {tmp_path} | head -1",
        shell=True,
        executable="/bin/bash",
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pipeline.stdout.startswith("state:")
    assert "Traceback" not in pipeline.stderr and "BrokenPipeError" not in pipeline.stderr

    # Whether `head` leaves before the last write is a race; a reader that is already gone is not.
    reader, writer = os.pipe()
    os.close(reader)
    try:
        gone = subprocess.run(
            [sys.executable, "-m", "noesis_accel.rundir.status", str(tmp_path)],
            stdout=writer,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
            timeout=120,
        )
    finally:
        os.close(writer)
    assert gone.returncode == 141, gone.stderr
    assert "Traceback" not in gone.stderr and "BrokenPipeError" not in gone.stderr
