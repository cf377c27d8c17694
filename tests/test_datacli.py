"""`noesis-data`: counts, lengths and marked examples of a dataset, prepared as training will; exit 2 on bad data."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, chat_records, write_jsonl

from noesis_accel.training import datacli


def _long(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": "Long: " + "word " * 200}, {"role": "assistant", "content": "ok"}]}
        for _ in range(n)
    ]


def _args(tmp_path: Path, path: Path, *more: str) -> list[str]:
    return [
        "+experiment=tiny",
        f"data.path={path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.min_examples=1",
        "data.max_length=64",
        *more,
    ]


def test_counts_lengths_and_marked_examples(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", chat_records(20) + _long(2))
    write_jsonl(folder / "validation.jsonl", chat_records(4))
    assert datacli.main(_args(tmp_path, folder, "--examples", "2")) == 0
    out = capsys.readouterr().out
    assert f"data: train split ({folder / 'train.jsonl'}, messages): 22 records read, 20 train" in out
    assert (
        f"data: validation split, held out ({folder / 'validation.jsonl'}, messages): 4 records read, 4 held out" in out
    )
    assert (
        f"2 records dropped, truncation at data.max_length=64 left no learned token: {folder / 'train.jsonl'}:21" in out
    )
    assert "train split: min " in out and "max 2" in out and "; 2 of 22 over data.max_length" in out
    assert "2 of 20 training records as training sees them (learned tokens between [[ and ]])" in out
    assert f"--- {folder / 'train.jsonl'}:1 (" in out
    assert "[[Answer number 0.<|im_end|>\n]]" in out  # the learned tokens, marked; the question is not
    assert "[[Question" not in out and "\x1b[" not in out


def test_a_terminal_gets_colour(tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    cfg = datacli.compose_checked(_args(tmp_path, write_jsonl(tmp_path / "d.jsonl", chat_records(5))))
    datacli.report(cfg, 1, out)
    assert "\x1b[1;32mAnswer number 0.<|im_end|>\n\x1b[0m" in out.getvalue() and "[[" not in out.getvalue()


def test_bad_data_is_one_error_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", chat_records(5) + ["{oops", "nope"])
    with pytest.raises(SystemExit) as exit_:
        datacli.main(_args(tmp_path, path))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 lines of invalid JSON") and f"{path}:6:" in err and f"{path}:7:" in err


def test_bad_options_and_overrides_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv, said in (
        (["--examples", "many"], "--examples takes a whole number"),
        (["+experiment=tiny", "data.on_too_long=cut"], "data.on_too_long: 'cut' is not one of"),
        (["+experiment=tny"], "experiment=tny: no such option of experiment; one of demo, noesis, tiny"),
    ):
        with pytest.raises(SystemExit) as exit_:
            datacli.main(argv)
        assert exit_.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_in_its_own_process(tmp_path: Path) -> None:
    """Through a pipe (no terminal): markers, not colour; a missing file is one line and exit 2, no traceback."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "noesis_accel.training.datacli"]
    good = subprocess.run(
        command + _args(tmp_path, write_jsonl(tmp_path / "d.jsonl", chat_records(5)), "--examples=1"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert good.returncode == 0, good.stderr[-2000:]
    assert "[[Answer number 0." in good.stdout and "\x1b[" not in good.stdout
    bad = subprocess.run(
        command + _args(tmp_path, tmp_path / "missing.jsonl"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip() == f"error: data.path: {tmp_path / 'missing.jsonl'} does not exist; point data.path "
        "at a .jsonl, .json or .parquet file or a directory of them"
    )
