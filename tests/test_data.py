"""Each record shape with its loss mask (token by token), and each bad-data message."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import chat_records, run_cli, write_jsonl
from helpers import typed

from noesis_accel.core.errors import DataError
from noesis_accel.training import data
from noesis_accel.training.modeling import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(typed(["model=tiny"]).model)


def _labelled(ids: list[int], labels: list[int]) -> list[int]:
    return [t for t, label in zip(ids, labels) if label != data.IGNORE_INDEX]


def test_chat_masks_everything_but_assistant_turns(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is your name?"},
        {"role": "assistant", "content": "I am Noesis."},
        {"role": "user", "content": "Who made you?"},
        {"role": "assistant", "content": "Lyceum Labs."},
    ]
    ids, labels, truncated = data.tokenize_record(tokenizer, data.RawRecord("x:1", {"messages": messages}), "chat", 512)
    assert not truncated and len(ids) == len(labels)
    # Independent expectation, token by token: a token is learned iff it lies inside an assistant turn,
    # whose tokens are those between the prompt-with-generation-header and the rendering through the turn.
    expected = [data.IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(
            tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True, return_dict=False)
        )
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=False))
        for position in range(start, end):
            expected[position] = ids[position]
    assert labels == expected
    learned = tokenizer.decode(_labelled(ids, labels))
    assert learned == "I am Noesis.<|im_end|>\nLyceum Labs.<|im_end|>\n"
    assert "What is your name" not in learned and "Be brief" not in learned


def test_prompt_completion_learns_only_the_completion(tokenizer) -> None:
    record = data.RawRecord("x:1", {"prompt": "Q: capital of France?\nA:", "completion": " Paris"})
    ids, labels, _ = data.tokenize_record(tokenizer, record, "prompt_completion", 512)
    assert tokenizer.decode(_labelled(ids, labels)) == " Paris" + tokenizer.eos_token
    prompt_len = len(tokenizer("Q: capital of France?\nA:", add_special_tokens=True)["input_ids"])
    assert all(label == data.IGNORE_INDEX for label in labels[:prompt_len])


def test_text_learns_every_token(tokenizer) -> None:
    ids, labels, _ = data.tokenize_record(
        tokenizer, data.RawRecord("x:1", {"text": "Noesis means understanding."}), "text", 512
    )
    assert labels == ids
    assert tokenizer.decode(ids) == "Noesis means understanding." + tokenizer.eos_token


def test_truncation_is_counted_and_fully_truncated_records_dropped(tokenizer, tmp_path: Path) -> None:
    long_user = "word " * 200
    records = chat_records(20) + [
        {"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "ok"}]}
    ]
    cfg = typed(
        [
            "model=tiny",
            f"data.path={write_jsonl(tmp_path / 'd.jsonl', records)}",
            "data.max_length=64",
            "data.min_examples=1",
            "data.eval_fraction=0",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    prepared = data.prepare(cfg.data, tokenizer, seed=0)
    assert prepared.stats.truncated == 1 and prepared.stats.dropped_truncated == 1
    assert prepared.stats.train_records == 20
    assert max(prepared.train["length"]) <= 64


def test_held_out_split_is_seeded_and_disjoint(tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", chat_records(50))
    cfg = typed(
        [
            "model=tiny",
            f"data.path={path}",
            "data.min_examples=1",
            "data.eval_fraction=0.2",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    first = data.prepare(cfg.data, tokenizer, seed=3)
    assert (first.stats.train_records, first.stats.eval_records) == (40, 10)
    train_texts = {tuple(x) for x in first.train["input_ids"]}
    assert not train_texts & {tuple(x) for x in first.eval["input_ids"]}
    cached = data.prepare(cfg.data, tokenizer, seed=3)  # second call: served from the fingerprint cache
    assert cached.eval["input_ids"] == first.eval["input_ids"]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_parquet_and_json_array_are_read(tokenizer, tmp_path: Path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.json"):
        records = data.read_records(str(tmp_path / name))
        assert data.validate_records(records, "auto") == "prompt_completion" and len(records) == 5


def _error_for(tmp_path: Path, tokenizer, records: list, **overrides) -> str:
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    args = ["model=tiny", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", "data.format=auto"]
    args += [f"data.{k}={v}" for k, v in overrides.items()]
    with pytest.raises(DataError) as err:
        data.prepare(typed(args).data, tokenizer, seed=0)
    return str(err.value)


def test_missing_file(tokenizer, tmp_path: Path) -> None:
    cfg = typed(["model=tiny", f"data.path={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(DataError, match=r"data.path: .*nope.jsonl does not exist"):
        data.prepare(cfg.data, tokenizer, seed=0)


def test_invalid_json_names_file_and_line(tokenizer, tmp_path: Path) -> None:
    message = _error_for(tmp_path, tokenizer, chat_records(3) + ['{"messages": [}'])
    assert "bad.jsonl:4: invalid JSON" in message


def test_unknown_shape_names_the_fields_and_the_shapes(tokenizer, tmp_path: Path) -> None:
    message = _error_for(tmp_path, tokenizer, [{"question": "a", "answer": "b"}])
    assert "bad.jsonl:1: unknown record shape (fields: answer, question)" in message
    assert '"messages"' in message and '"prompt"' in message and '"text"' in message


def test_empty_content_names_the_field(tokenizer, tmp_path: Path) -> None:
    records = chat_records(2) + [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}
    ]
    assert "bad.jsonl:3: field 'messages[1].content' is empty" in _error_for(tmp_path, tokenizer, records)


def test_unknown_role_lists_the_valid_roles(tokenizer, tmp_path: Path) -> None:
    records = [{"messages": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    message = _error_for(tmp_path, tokenizer, records)
    assert "bad.jsonl:1: messages[0].role is 'narrator'; use one of system, user, assistant, tool" in message
    assert "data.roles={narrator: user}" in message


def test_too_few_examples(tokenizer, tmp_path: Path) -> None:
    message = _error_for(tmp_path, tokenizer, chat_records(30), min_examples=100)
    assert "only 27 usable training records" in message and "data.min_examples is 100" in message


def test_every_record_truncated_away(tokenizer, tmp_path: Path) -> None:
    records = [{"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}] * 5
    assert "every one of 5 records was truncated away at data.max_length=16" in _error_for(
        tmp_path, tokenizer, records, max_length=16
    )


def test_bad_data_from_the_cli_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", chat_records(3) + ["not json"])
    result = run_cli(
        ["+experiment=tiny", f"run.root={tmp_path}", f"data.path={path}", f"data.cache_dir={tmp_path / 'c'}"]
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{path}:4: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_collator_pads_and_masks(tokenizer) -> None:
    collate = data.PaddingCollator(pad_token_id=0, pad_to_multiple_of=8)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum().item() == 4
    assert batch["labels"][1].tolist() == [9] + [-100] * 7
