"""The one argument style (`RUN_DIR key=value ...`) every command shares, and the `noesis` dispatcher."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tomllib
from helpers import REPO

from noesis_accel.__main__ import COMMANDS
from noesis_accel.__main__ import main as noesis_main
from noesis_accel.after.evaluate import EVAL_COMMAND
from noesis_accel.after.export import EXPORT_COMMAND
from noesis_accel.core.cli import UsageError, parse
from noesis_accel.rundir.history import write_status
from noesis_accel.rundir.status import STATUS_COMMAND
from noesis_accel.rundir.status import main as status_main
from noesis_accel.training.datacli import DATA_COMMAND


def test_a_run_dir_then_options_and_overrides_in_the_order_given() -> None:
    args = parse(EVAL_COMMAND, ["judge=exact", "runs/demo", "--checkpoint", "step-000010", "+eval.judge.bonus=1"])
    assert args.run_dir == "runs/demo"
    # noesis-eval's checkpoint is a key of its config: its alias becomes an override, in place
    assert args.overrides == ["judge=exact", "checkpoint=step-000010", "+eval.judge.bonus=1"]
    assert args.argv() == ["runs/demo", "judge=exact", "checkpoint=step-000010", "+eval.judge.bonus=1"]


@pytest.mark.parametrize(
    "words",
    [
        ["verify=true", "price=3.95"],
        ["--verify", "--price", "3.95"],
        ["--price=3.95", "--verify"],
        ["verify=yes", "--price", "3.95"],
    ],
    ids=["keys", "aliases", "alias-equals", "mixed"],
)
def test_every_documented_spelling_means_the_same(words: list[str]) -> None:
    args = parse(STATUS_COMMAND, ["runs/demo", *words])
    assert args.options == {"verify": True, "price": 3.95, "root": "runs"} and args.given == {"verify", "price"}
    assert args.argv() == ["runs/demo", "verify=true", "price=3.95"]


def test_options_not_given_keep_their_defaults_and_stay_off_the_command_line() -> None:
    args = parse(EXPORT_COMMAND, ["runs/demo", "--push-to-hub", "org/name"])
    assert args.options == {
        "checkpoint": None,
        "out": None,
        "push_to_hub": "org/name",
        "gguf": None,
        "adapter": False,
        "max_shard_size": "2GB",
    }
    assert args.argv() == ["runs/demo", "push_to_hub=org/name"]


def test_data_takes_trainings_overrides_and_no_run_dir() -> None:
    args = parse(DATA_COMMAND, ["+experiment=tiny", "examples=5", "data.max_length=64"])
    assert args.run_dir is None and args.options["examples"] == 5
    assert args.overrides == ["+experiment=tiny", "data.max_length=64"]


def test_the_app_keys_are_set_aside_by_their_key_not_their_spelling() -> None:
    args = parse(
        STATUS_COMMAND,
        ["noesis", "modal.volume=other", "+experiment=noesis", "price=1"],
        app_keys=("modal", "experiment"),
    )
    assert args.app_overrides == ["modal.volume=other", "+experiment=noesis"] and args.overrides == []
    with pytest.raises(UsageError, match="unknown key modality"):
        parse(STATUS_COMMAND, ["noesis", "modality=x"], app_keys=("modal",))


@pytest.mark.parametrize(
    ("command", "words", "said"),
    [
        (STATUS_COMMAND, ["runs/demo", "--frobnicate"], "noesis status: unknown option --frobnicate; it takes verify="),
        (STATUS_COMMAND, ["runs/demo", "judge=exact"], "noesis status: unknown key judge; it takes verify="),
        (STATUS_COMMAND, ["runs/demo", "price=cheap"], "price takes a number, not 'cheap'"),
        (STATUS_COMMAND, ["runs/demo", "runs/other"], "noesis status: unexpected argument 'runs/other'"),
        (EVAL_COMMAND, [], "noesis eval: which run? give its RUN_DIR"),
        (EXPORT_COMMAND, ["runs/demo", "--checkpoint"], "--checkpoint needs a value: --checkpoint PATH"),
        (DATA_COMMAND, ["--examples", "many"], "--examples takes a whole number, not 'many'"),
    ],
)
def test_a_word_the_command_does_not_take_is_one_line(command, words, said) -> None:
    with pytest.raises(UsageError) as error:
        parse(command, words)
    assert said in str(error.value) and "\n" not in str(error.value)


def test_a_main_exits_2_with_the_option_and_the_accepted_ones(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        status_main([str(tmp_path), "--frobnicate"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "--frobnicate" in err and "verify=true (or --verify)" in err and "price=USD (or --price USD)" in err


def test_help_prints_every_key_and_exits_0(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(EXPORT_COMMAND, ["runs/demo", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: noesis export RUN_DIR [checkpoint=PATH]")
    assert all(key in out for key in ("out=DIR (or --out DIR)", "push_to_hub=REPO", "max_shard_size=SIZE"))


def test_the_dispatcher_runs_the_same_mains(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["noesis"])  # the subcommand's main reads its words from there
    assert noesis_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "status", "export", "eval", "report", "data"))
    assert noesis_main(["stat", "runs/demo"]) == 2
    assert "unknown command 'stat'; one of train, status" in capsys.readouterr().err
    assert noesis_main(["status", str(tmp_path / "nope")]) == 2
    assert "no readable status.json" in capsys.readouterr().err


def test_every_command_is_a_noesis_subcommand_and_keeps_its_own_script() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["noesis"] == "noesis_accel.__main__:main"
    for name, (module, _) in COMMANDS.items():
        assert scripts[f"noesis-{name}"] == f"{module}:main"


def test_noesis_status_and_noesis_status_script_print_the_same(tmp_path) -> None:
    """Both console scripts, run as pip's wrapper runs them: the entry point in pyproject.toml, in a new process."""
    write_status(tmp_path, state="interrupted", step=58, total_steps=100, latest_checkpoint="checkpoints/step-000050")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def script(name: str, *args: str) -> subprocess.CompletedProcess:
        module, function = scripts[name].split(":")
        wrapper = f"import sys; from {module} import {function}; sys.exit({function}())"
        return subprocess.run(
            [sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
        )

    combined = script("noesis", "status", str(tmp_path), "price=2")
    alone = script("noesis-status", str(tmp_path), "--price", "2")
    assert combined.returncode == alone.returncode == 0, combined.stderr + alone.stderr
    assert combined.stdout == alone.stdout and "step 58 / 100" in combined.stdout


def test_modal_run_commands_go_through_the_same_parser() -> None:
    """`modal run launch/modal_entry.py::evaluate noesis +experiment=noesis --checkpoint step-1 judge=exact`."""
    from noesis_accel.cloud.modal_job import command_arguments

    args = command_arguments("evaluate", ["noesis", "+experiment=noesis", "--checkpoint", "step-1", "judge=exact"])
    assert args.run_dir == "noesis" and args.app_overrides == ["+experiment=noesis"]
    assert args.overrides == ["checkpoint=step-1", "judge=exact"]
    with pytest.raises(UsageError, match="noesis report: unknown key judge"):
        command_arguments("report", ["noesis", "modal.volume=other", "judge=exact"])
