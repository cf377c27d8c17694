"""The command line answers a first guess in one line: our parser in front of Hydra, our help, our stops.

Most of these run `noesis train` in-process (the parser decides before anything loads); a process
boundary is used where it is the point: exit codes as a shell sees them, and Ctrl-C during start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_cli
from helpers import kill_group, start_in_group

from noesis_accel.config.keyhelp import field_comments, help_text
from noesis_accel.config.overrides import check_words, positional_words
from noesis_accel.config.schema import DataConfig
from noesis_accel.config.sweeps import job_label, varying_keys
from noesis_accel.core.errors import ConfigError
from noesis_accel.core.prefixed_output import LabelledLines
from noesis_accel.processes.train import main as train_main
from noesis_accel.processes.train import sweep_job_run_name
from noesis_accel.rundir.history import write_status
from noesis_accel.rundir.layout import RunDir
from noesis_accel.rundir.listing import runs_table
from noesis_accel.rundir.status import main as status_main
from noesis_accel.rundir.sweep_table import SweepRow, format_table, remove_empty_job_dirs, write_csv


def _refused(words: list[str], capsys) -> str:
    """`noesis train WORDS` in-process: it must exit 2 with one line on stderr; that line."""
    with pytest.raises(SystemExit) as exited:
        train_main(words)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Could not override" not in err[0] and "Traceback" not in err[0]
    return err[0]


# ---------------------------------------------------------------- unknown keys and bad values


@pytest.mark.parametrize(
    "word, named",
    [
        ("train.num_train_epochs=3", "did you mean train.epochs?"),
        ("+train.num_train_epochs=3", "did you mean train.epochs?"),
        ("data.max_seq_length=2048", "did you mean data.max_length?"),
        ("train.lr=1e-4", "did you mean optim.lr?"),
        ("train.max_stepz=3", "did you mean train.max_steps?"),
    ],
)
def test_an_unknown_key_with_or_without_plus_is_one_line_naming_the_key(word: str, named: str, capsys) -> None:
    line = _refused(["+experiment=tiny", word], capsys)
    key = word.lstrip("+").split("=")[0]
    assert line.startswith(f"error: {key}: not a key of the config; {named}")


def test_a_value_of_the_wrong_type_names_the_key_and_the_type(capsys) -> None:
    assert (
        _refused(["+experiment=tiny", "train.epochs=abc"], capsys) == "error: train.epochs: takes a number, not 'abc'"
    )
    assert "takes a whole number" in _refused(["train.max_steps=2.5"], capsys)
    assert "takes true or false" in _refused(["model.gradient_checkpointing=maybe"], capsys)
    assert "optim.lr: takes a number" in _refused(["-m", "optim.lr=1e-3,fast"], capsys)  # each value of a sweep


def test_a_map_key_takes_a_map_without_plus() -> None:
    assert check_words(["data.columns={prompt: question}"]) == ["+data.columns={prompt: question}"]
    assert check_words(["+data.columns={prompt: question}"]) == ["+data.columns={prompt: question}"]
    with pytest.raises(ConfigError, match=r"data.columns: takes a map, e.g. data.columns=\{name: value\}"):
        check_words(["data.columns=question"])


def test_a_map_key_without_plus_reaches_the_config() -> None:
    from noesis_accel.config import compose

    cfg = compose(["+experiment=tiny", "data.columns={prompt: question}"])
    assert dict(cfg.data.columns) == {"prompt": "question"}


def test_words_whose_meaning_is_plain_are_taken_as_meant() -> None:
    assert check_words(["experiment=tiny", "+data=jsonl", "+train.epochs=2"]) == [
        "+experiment=tiny",
        "data=jsonl",
        "train.epochs=2",
    ]
    # Hydra's flags and their values pass through untouched.
    assert check_words(["-m", "--cfg", "job", "-p", "train", "optim.lr=1e-3,3e-4"]) == [
        "-m",
        "--cfg",
        "job",
        "-p",
        "train",
        "optim.lr=1e-3,3e-4",
    ]
    assert positional_words(["--cfg", "job", "runs/x", "train.epochs=2"]) == ["runs/x"]


def test_a_group_option_that_does_not_exist_lists_the_options(capsys) -> None:
    line = _refused(["+experiment=tny"], capsys)
    assert (
        line
        == "error: experiment=tny: no such option of experiment; one of demo, noesis, tiny (files in conf/experiment/)"
    )


def test_a_word_that_is_not_an_override_is_one_line(capsys) -> None:
    line = _refused(["runs/nowhere"], capsys)
    assert "runs/nowhere: not an override (key=value), and runs/nowhere does not exist" in line
    assert "EQUAL" not in line


def test_hydras_own_words_pass(monkeypatch) -> None:
    assert check_words(["-m", "optim=glob(*)", "judge=null", "-sc", "install=bash"]) == [
        "-m",
        "optim=glob(*)",
        "judge=null",
        "-sc",
        "install=bash",
    ]


def test_hydra_full_error_leaves_the_words_to_hydra(monkeypatch) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert check_words(["train.num_train_epochs=3"]) == ["train.num_train_epochs=3"]


def test_the_shell_sees_exit_2_and_one_line() -> None:
    result = run_cli(["train", "+experiment=tiny", "train.num_train_epochs=3"], module="noesis_accel")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.num_train_epochs: not a key of the config; did you mean train.epochs? "
        "(noesis train --help train lists the keys)"
    ]


# ---------------------------------------------------------------- help


def test_help_shows_each_key_with_its_type_default_and_comment(capsys) -> None:
    train_main(["--help"])
    out = capsys.readouterr().out
    assert "powered by Hydra" not in out
    assert "  data.max_length: int = 1024\n      tokens; longer records are truncated (and counted)" in out
    assert "  +experiment: demo | noesis | tiny" in out and "data: jsonl | noesis | sample (default)" in out
    assert "  optim.warmup_steps: int or null = null" in out
    assert "  data.on_too_long: one of truncate | drop | error = truncate" in out


def test_help_for_one_section(capsys) -> None:
    train_main(["--help", "data"])
    out = capsys.readouterr().out
    assert "data.max_length" in out and "optim.lr" not in out
    assert _refused(["--help", "dta"], capsys).startswith("error: noesis train --help dta: no such section or group")


def test_every_key_comment_comes_from_the_schema_source() -> None:
    comments = field_comments(DataConfig)
    assert comments["max_length"] == "tokens; longer records are truncated (and counted)"
    assert comments["columns"].startswith("The dataset's own field names, {canonical: yours}")
    assert "[peft] LoRA adapters via peft" in help_text("peft")


def test_hydra_help_stays_reachable(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        train_main(["--hydra-help"])
    assert exited.value.code in (0, None) and "powered by Hydra" in capsys.readouterr().out


# ---------------------------------------------------------------- stops before step 1


def test_ctrl_c_two_seconds_into_the_demo_is_one_line_without_a_checkpoint_claim(tmp_path) -> None:
    process = start_in_group(
        [sys.executable, "-m", "noesis_accel", "train", "+experiment=demo", f"run.root={tmp_path}"]
    )
    try:
        time.sleep(2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        kill_group(process)
    # 130, or (seen once under a loaded suite, after the line was printed) killed by SIGINT itself: both
    # are Ctrl-C to a shell; what matters to the user is the one line and nothing else.
    assert process.returncode in (128 + signal.SIGINT, -signal.SIGINT), err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped by SIGINT"), lines
    assert "after a checkpoint" not in out + err and "no checkpoint" in lines[0]


@pytest.mark.slow
def test_a_signal_before_the_first_step_says_no_checkpoint_exists(tmp_path) -> None:
    """SIGINT as the held-out pass before training starts (the trainer's handler is in place by then)."""
    result = run_cli(["+experiment=tiny", "train.max_steps=4", f"run.root={tmp_path}"], env={"NOESIS_FAULT": "eval:0"})
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "interrupted: stopped by SIGINT before step 1; no checkpoint exists yet" in result.stderr
    status = RunDir(tmp_path / "tiny").status()
    assert status["latest_checkpoint"] is None and "after a checkpoint" not in status["exit_reason"]


# ---------------------------------------------------------------- status lists the runs


def test_status_without_a_run_dir_lists_the_runs(tmp_path, capsys) -> None:
    for name in ("first", "second", "not-a-run"):
        (tmp_path / name).mkdir()
    write_status(tmp_path / "first", state="completed", step=12, total_steps=12)
    write_status(tmp_path / "second", state="interrupted", step=5, total_steps=12)
    assert status_main([f"root={tmp_path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"runs under {tmp_path}")
    assert lines[1].split() == ["RUN", "STATE", "STEP", "UPDATED"]
    rows = {line.split()[0]: line.split()[1:3] for line in lines[2:]}
    assert rows == {"first": ["completed", "12/12"], "second": ["interrupted", "5/12"]}
    assert "no runs under" in runs_table(tmp_path / "empty")


def test_status_shows_the_starting_command_and_how_to_continue(tmp_path, capsys) -> None:
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    write_status(run_dir, state="interrupted", step=5, total_steps=12)
    os.environ["NOESIS_COMMAND"] = json.dumps(["noesis", "train", "+experiment=tiny", "optim.lr=3e-4"])
    try:
        RunDir(run_dir).write_command()
    finally:
        del os.environ["NOESIS_COMMAND"]
    assert status_main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "command:     noesis train +experiment=tiny optim.lr=3e-4" in out
    assert f"continue:    noesis train {run_dir}" in out


# ---------------------------------------------------------------- sweeps


def test_sweep_jobs_are_named_by_what_differs_between_them() -> None:
    jobs = [["+experiment=tiny", "optim.lr=0.001"], ["+experiment=tiny", "optim.lr=0.0003"]]
    keys = varying_keys(jobs)
    assert keys == ["optim.lr"]
    assert [job_label(job, keys) for job in jobs] == ["lr0.001", "lr0.0003"]
    assert sweep_job_run_name("tiny", jobs[0], keys) == "tiny-lr0.001"
    both = [["optim=adamw", "peft.r=8"], ["optim=adamw8bit", "peft.r=16"]]
    assert [job_label(job, varying_keys(both)) for job in both] == ["optim-adamw_r8", "optim-adamw8bit_r16"]
    # Two varied keys that end alike keep their whole names.
    alike = [["peft.dropout=0.1", "model.architecture.dropout=0"], ["peft.dropout=0", "model.architecture.dropout=0.1"]]
    assert job_label(alike[0], varying_keys(alike)) == "peft.dropout0.1_model.architecture.dropout0"
    assert sweep_job_run_name("tiny", ["run.name=mine", "optim.lr=1"], ["optim.lr"]) == "tiny"
    v1, v2 = (job_label([f"data.path=/data/{v}/train.jsonl"], ["data.path"]) for v in ("v1", "v2"))
    assert v1.startswith("path-train.jsonl-") and v2.startswith("path-train.jsonl-") and v1 != v2
    # A key a restart may change never names a run dir (changing it must still resume).
    assert sweep_job_run_name("tiny", ["ckpt.every=0.2", "optim.lr=1"], ["ckpt.every", "optim.lr"]) == "tiny-lr1"


def test_the_sweep_table_and_csv(tmp_path) -> None:
    rows = [
        SweepRow(tmp_path / "tiny-lr0.001", {"optim.lr": "0.001"}, ["optim.lr=0.001"], "completed", 4, 4, 2.5),
        SweepRow(tmp_path / "tiny-lr0.0003", {"optim.lr": "0.0003"}, ["optim.lr=0.0003"], "failed", 2, 4, None),
        SweepRow(tmp_path / "tiny-lr0.01", {"optim.lr": "0.01"}, ["optim.lr=0.01"], "completed", 4, 4, 2.25),
    ]
    table = format_table(rows, ["optim.lr"]).splitlines()
    assert table[0].split() == ["RUN", "optim.lr", "STATE", "STEP", "HELD-OUT", "LOSS"]
    assert table[1].split() == ["tiny-lr0.001", "0.001", "completed", "4/4", "2.5000"]
    assert table[2].split() == ["tiny-lr0.0003", "0.0003", "failed", "2/4", "-"]
    assert table[3].split() == ["tiny-lr0.01", "0.01", "completed", "4/4", "2.2500", "<-", "lowest"]
    write_csv(rows, ["optim.lr"], tmp_path / "sweep.csv")
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert lines[0] == "run_dir,optim.lr,state,step,total_steps,heldout_loss,overrides"
    assert lines[1] == f"{tmp_path / 'tiny-lr0.001'},0.001,completed,4,4,2.5,optim.lr=0.001"


def test_empty_hydra_job_folders_are_removed_and_nothing_else(tmp_path) -> None:
    sweep = tmp_path / "multirun"
    (sweep / "0").mkdir(parents=True)
    (sweep / "1").mkdir()
    (sweep / "2" / "kept").mkdir(parents=True)  # a job folder with something in it stays
    (sweep / "mine").mkdir()  # not a job folder of this sweep: the user's, even empty
    remove_empty_job_dirs(sweep, jobs=3)
    assert sorted(p.name for p in sweep.iterdir()) == ["2", "mine"]
    # hydra.sweep.dir=. : only this sweep's job folders go, never the user's own empty ones (.git/refs).
    (tmp_path / ".git" / "refs").mkdir(parents=True)
    (tmp_path / "0").mkdir()
    remove_empty_job_dirs(tmp_path, jobs=1)
    assert (tmp_path / ".git" / "refs").is_dir() and not (tmp_path / "0").exists()


def test_lines_of_jobs_side_by_side_carry_the_job_label() -> None:
    import io

    sink = io.StringIO()
    out = LabelledLines(sink, "lr0.001")  # type: ignore[arg-type]
    out.write("step 1/4")
    out.write(": loss 2.0\nstep 2/4\n")
    out.write("done\n")
    assert sink.getvalue() == "[lr0.001] step 1/4: loss 2.0\n[lr0.001] step 2/4\n[lr0.001] done\n"


@pytest.mark.slow
def test_a_sweep_ends_with_a_table_writes_sweep_csv_and_leaves_no_empty_folder(tmp_path) -> None:
    root = tmp_path / "runs"
    result = run_cli(
        [
            "train",
            "-m",
            "+experiment=tiny",
            "train.max_steps=2",
            "ckpt.every=1",
            "optim.lr=1e-3,3e-4",
            f"run.root={root}",
        ],
        module="noesis_accel",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["multirun", "sweep.csv", "tiny-lr0.0003", "tiny-lr0.001"]
    assert [p.name for p in (root / "multirun").iterdir()] == ["multirun.yaml"]  # Hydra's record of the sweep
    assert not [p for p in root.rglob("*") if p.is_dir() and not any(p.iterdir())]
    table = result.stdout[result.stdout.index("sweep: 2 jobs") :].splitlines()
    assert table[1].split()[:2] == ["RUN", "optim.lr"]
    assert {tuple(line.split()[:3]) for line in table[2:4]} == {
        ("tiny-lr0.001", "0.001", "completed"),
        ("tiny-lr0.0003", "0.0003", "completed"),
    }
    assert all(float(line.split()[4]) > 0 for line in table[2:4])  # each job's held-out loss
    csv_lines = (root / "sweep.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("run_dir,optim.lr,state")


# ---------------------------------------------------------------- logs fit where they go


def test_no_library_progress_bar_writes_carriage_returns_into_a_pipe() -> None:
    """The GGUF de-quantisation bar (plain tqdm in transformers) and any other, off a terminal."""
    code = (
        "from noesis_accel.core.env import quiet_known_noise\n"
        "quiet_known_noise()\n"
        "from transformers.modeling_gguf_pytorch_utils import tqdm\n"
        "for _ in tqdm(range(30), desc='Converting and de-quantizing GGUF tensors...'): pass\n"
        "import subprocess, sys\n"  # a process started from here (a launched worker) too
        "subprocess.run([sys.executable, '-c', 'from tqdm import tqdm\\nfor _ in tqdm(range(30)): pass'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stdout + result.stderr and "it/s" not in result.stderr


def test_continuing_a_run_dir_that_is_not_one(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    line = _refused([str(tmp_path / "empty")], capsys)
    assert f"{tmp_path / 'empty'} is not a run directory (no config.yaml in it)" in line


def test_continuing_refuses_a_sweep(tmp_path, capsys) -> None:
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("run: {root: x, name: tiny}\n")
    assert "flags (-m, --cfg, ...) do not apply" in _refused([str(run_dir), "-m"], capsys)
    assert "flags (-m, --cfg, ...) do not apply" in _refused([str(run_dir), "-c", "job"], capsys)


def test_a_stop_claims_a_checkpoint_only_when_one_exists() -> None:
    """One process (the trainer) or many (rebuilt by the launcher from a worker's outcome): the same words."""
    import pickle

    from noesis_accel.core.protocol import OutcomeKind, WorkerOutcome
    from noesis_accel.core.signals import InterruptedBySignal
    from noesis_accel.processes.launcher import _interruption

    outcome = WorkerOutcome(OutcomeKind.INTERRUPTED, "stopped", 130, signum=signal.SIGINT)
    before = _interruption(outcome, checkpointed=False)
    assert str(before) == "stopped by SIGINT before step 1; no checkpoint exists yet, so the same command starts over"
    assert str(_interruption(outcome, checkpointed=True)) == "stopped by SIGINT after a checkpoint; restart to resume"
    assert before.exit_code == 130
    again = pickle.loads(pickle.dumps(before))  # a sweep job sends it back pickled
    assert isinstance(again, InterruptedBySignal) and str(again) == str(before)


def test_called_in_process_a_keyboard_interrupt_stays_one(monkeypatch) -> None:
    """A sweep's coordinator calls `noesis train` in-process; Modal's preemption arrives as SIGINT, and Modal
    restarts the coordinator only if the KeyboardInterrupt leaves its call (not a quiet exit 130)."""
    from noesis_accel.processes import train

    def preempted() -> None:
        os.environ["NOESIS_SWEEP_KEYS"] = '["optim.lr"]'
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_run_command", preempted)
    with pytest.raises(KeyboardInterrupt):
        train_main(["-m", "optim.lr=1e-3,3e-4"])
    assert "NOESIS_SWEEP_KEYS" not in os.environ  # the command's variables end with it
