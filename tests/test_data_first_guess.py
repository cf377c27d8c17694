"""Data on the first guess: a file of another shape than the data group's is read as what it is, a
user's own data.format is kept, identical problems are one line, data.on_bad_record=skip, the system
prompt note only where it applies, and template mismatches shown character by character."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import chat_records, write_jsonl
from helpers import typed

from noesis_accel.config import compose, validate
from noesis_accel.core.errors import ConfigError, DataError
from noesis_accel.processes.train import run
from noesis_accel.training import data, datacli, record_checks, templates
from noesis_accel.training.modeling import load_tokenizer

READ_AS_SHAREGPT = (
    "data: data.path holds sharegpt records, not the data group's chat (its data.format); reading them as "
    "sharegpt (set data.format=sharegpt or data=jsonl to say so)"
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(typed(["model=tiny"]).model)


def _sharegpt(n: int, system: bool = False) -> list[dict]:
    turns = lambda i: [  # noqa: E731
        *([{"from": "system", "value": "You are terse."}] if system else []),
        {"from": "human", "value": f"What is {i} plus {i}?"},
        {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."},
    ]
    return [{"conversations": turns(i)} for i in range(n)]


def _train(tmp_path: Path, path: Path, *more: str):
    """The tiny experiment for two steps on `path`, as `noesis train +experiment=tiny data.path=PATH` runs it."""
    cfg = compose(
        [
            "+experiment=tiny",
            f"run.root={tmp_path / 'runs'}",
            f"data.path={path}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=2",
            "train.eval_every=0",
            *more,
        ]
    )
    return run(cfg)


def _check(tmp_path: Path, path: Path, *more: str) -> data.DataStats:
    return data.check_data(
        typed(["+experiment=tiny", f"data.path={path}", "data.min_examples=1", *more]).data,
    )


# ---------------------------------------------------------------- the data group's format gives way


def test_a_sharegpt_file_trains_with_the_sample_group(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_jsonl(tmp_path / "sharegpt.jsonl", _sharegpt(60))
    result = _train(tmp_path, path)
    assert result.state == "completed"
    out = capsys.readouterr().out
    assert out.count(READ_AS_SHAREGPT) == 1
    assert "records (sharegpt)" in out
    assert json.loads((result.run_dir / "status.json").read_text())["step"] == 2


def test_noesis_data_reads_a_sharegpt_file_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_jsonl(tmp_path / "sharegpt.jsonl", _sharegpt(80))
    args = ["+experiment=tiny", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", "data.min_examples=1"]
    assert datacli.main([*args, "--examples", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count(READ_AS_SHAREGPT) == 1
    assert f"data: train split ({path}, sharegpt): 80 records read" in out
    assert "looks like" not in out


def test_a_format_the_user_set_is_kept_and_its_error_is_one_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sharegpt.jsonl", _sharegpt(80))
    for override in ("data.format=alpaca", "data=jsonl data.format=chat"):
        with pytest.raises(DataError) as err:
            _check(tmp_path, path, *override.split())
        lines = str(err.value).splitlines()
        assert len(lines) == 2, lines
        assert lines[0] == f"80 bad records in data.path ({path}):"
        assert lines[1].startswith("  80 records: ") and "(the record looks like sharegpt: set data.format=" in lines[1]
        assert lines[1].endswith(f"({path}: lines 1, 2, 3 and 77 more)")


def test_data_read_under_the_groups_format_is_not_reused_for_the_users(tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sharegpt.jsonl", _sharegpt(20))
    common = ["+experiment=tiny", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", "data.min_examples=1"]
    assert data.prepare(typed(common).data, tokenizer, seed=0).stats.format == "sharegpt"
    with pytest.raises(DataError, match="20 bad records"):  # the same settings, but data.format is the user's
        data.prepare(typed([*common, "data=jsonl", "data.format=chat"]).data, tokenizer, seed=0)


def test_records_of_no_known_shape_name_data_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)])
    with pytest.raises(DataError) as err:
        _check(tmp_path, path)
    message = str(err.value)
    assert len(message.splitlines()) == 3
    assert "5 records: unknown record shape (fields: answer, question)" in message
    assert "data.format=chat is the data group's" in message and "data=jsonl" in message


def test_the_records_own_shape_decides_only_when_the_first_has_one(tmp_path: Path) -> None:
    """The first record with a shape decides; the records of another shape are then bad, each said once."""
    mixed = _sharegpt(3) + chat_records(2)
    with pytest.raises(DataError, match="2 records: record is messages but the first record is sharegpt"):
        _check(tmp_path, write_jsonl(tmp_path / "mixed.jsonl", mixed))
    assert _check(tmp_path, write_jsonl(tmp_path / "chat.jsonl", chat_records(5))).format == "messages"


# ---------------------------------------------------------------- identical problems, one line


def test_repeated_problems_are_one_line_with_a_count_and_the_first_places() -> None:
    records = [data.RawRecord(f"d.jsonl:{i + 1}", {"conversations": []}) for i in range(80)]
    records.append(data.RawRecord("d.jsonl:81", {"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(DataError) as err:
        data.validate_records(records, "chat")
    assert str(err.value).splitlines() == [
        "81 bad records in the training data:",
        "  80 records: field 'messages' must be a non-empty list of {role, content} objects (the record looks "
        "like sharegpt: set data.format=auto or data.format=sharegpt) (d.jsonl: lines 1, 2, 3 and 77 more)",
        "  d.jsonl:81: 'messages' has no assistant turn, so there is nothing to learn; add one",
    ]


def test_places_in_several_files_or_rows_are_named_as_they_are() -> None:
    assert record_checks.places(["a.parquet: row 3", "a.parquet: row 9"], 2) == "a.parquet: rows 3, 9"
    assert record_checks.places(["a.jsonl:1", "b.jsonl:4"], 5) == "a.jsonl:1, b.jsonl:4 and 3 more"


# ---------------------------------------------------------------- data.on_bad_record


def test_skip_trains_without_an_empty_record_and_counts_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = chat_records(60)
    records[6] = {}
    path = write_jsonl(tmp_path / "d.jsonl", records)
    result = _train(tmp_path, path, "data.on_bad_record=skip")
    assert result.state == "completed"
    out = capsys.readouterr().out
    assert (
        f"data: train split: 1 bad record skipped (data.on_bad_record=skip): {path}:7: unknown record shape "
        "(fields: no fields)" in out
    )
    assert f"data: train split ({path}, messages): 59 records read" in out


def test_without_skip_one_empty_record_stops_the_run_and_says_how_to_skip(tmp_path: Path) -> None:
    records = chat_records(20)
    records[3] = {"messages": []}
    with pytest.raises(DataError) as err:
        _check(tmp_path, write_jsonl(tmp_path / "d.jsonl", records))
    assert "data.on_bad_record=skip" in str(err.value)


def test_skip_in_noesis_data_and_with_invalid_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", chat_records(10) + ["{oops", {"messages": []}])
    args = ["+experiment=tiny", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", "data.min_examples=1"]
    assert datacli.main([*args, "data.on_bad_record=skip", "--examples", "0"]) == 0
    out = capsys.readouterr().out
    assert (
        f"data: train split: 2 bad records skipped (data.on_bad_record=skip): {path}: lines 11, 12; the first: "
        "invalid JSON (" in out
    )
    assert f"data: train split ({path}, messages): 10 records read" in out


def test_skip_with_every_record_bad_is_still_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{}, {"messages": []}])
    with pytest.raises(DataError, match="2 bad records in data.path"):
        _check(tmp_path, path, "data.on_bad_record=skip")


def test_on_bad_record_is_validated() -> None:
    with pytest.raises(ConfigError, match="data.on_bad_record: 'drop' is not one of error, skip"):
        validate(compose(["+experiment=tiny", "data.on_bad_record=drop"]))


# ---------------------------------------------------------------- the default system prompt note


def test_the_system_prompt_note_only_when_a_record_lacks_a_system_turn(tokenizer, tmp_path: Path) -> None:
    def notes(name: str, records: list[dict]) -> list[str]:
        path = write_jsonl(tmp_path / name, records)
        cfg = typed(["model=tiny", f"data.path={path}", f"data.cache_dir={tmp_path / 'c'}", "data.min_examples=1"])
        return data.template_notes(tokenizer, cfg.data, data.prepare(cfg.data, tokenizer, seed=0).stats)

    assert notes("all.jsonl", _sharegpt(10, system=True)) == []
    said = notes("one_without.jsonl", _sharegpt(9, system=True) + _sharegpt(1))
    assert len(said) == 1
    assert said[0].startswith("data: the chat template adds a default system prompt to records without one (1 here)")


# ---------------------------------------------------------------- template mismatches, shown


def test_two_renderings_are_shown_aligned_with_the_first_difference_marked() -> None:
    shown = templates.first_difference(
        ("generation prompt", "x" * 50 + "<|im_start|>assistant\n"),
        ("assistant turn", "x" * 50 + "<|im_start|>assistant \nHi<|im_end|>\n"),
    )
    lines = shown.splitlines()
    assert lines[0] == "they first differ at character 72:"
    assert lines[1] == "  generation prompt: '…xxxxxxxxx<|im_start|>assistant\\n'"
    assert lines[2] == "  assistant turn:    '…xxxxxxxxx<|im_start|>assistant \\nHi<|im_end|>\\n'"
    assert lines[3].index("^") == lines[1].index("\\n")


def test_a_template_whose_generation_prompt_differs_shows_both(tokenizer) -> None:
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + ('  ' if m.role == 'assistant' else '') + '\\n' "
        "+ m.content + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(DataError) as err:
        templates.render_turns(tokenizer, template, messages, None, "r.jsonl:1")
    message = str(err.value)
    assert message.startswith("r.jsonl:1: the chat template's generation prompt for messages[1] is not how")
    *_, prompt, turn, caret = message.splitlines()
    assert prompt.startswith("  generation prompt: '…") and prompt.endswith("<|im_start|>assistant\\n'")
    assert turn.startswith("  assistant turn:    '…") and "<|im_start|>assistant  \\nHello." in turn
    assert caret.strip() == "^" and turn[caret.index("^")] == " " and prompt[caret.index("^")] == "\\"
