"""Reading the user's data: splits in a directory, every bad JSON line, what was dropped or truncated and
why, `data.on_too_long`, parallel tokenisation, and the prepared output pinned to its earlier bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import chat_records, run_cli, write_jsonl
from helpers import typed

from noesis_accel.config import compose
from noesis_accel.core.errors import DataError
from noesis_accel.training import data
from noesis_accel.training.modeling import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(typed(["model=tiny"]).model)


def _cfg(tmp_path: Path, path: Path, *overrides: str):
    return typed(
        ["model=tiny", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", "data.min_examples=1", *overrides]
    ).data


def _texts(prepared_split, tokenizer) -> set[str]:
    return {tokenizer.decode(ids) for ids in prepared_split["input_ids"]}


def _long_records(n: int, start: int = 0) -> list[dict]:
    """Chat records whose user turn alone fills 64 tokens: truncation leaves no assistant token."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"Long {start + i}: " + "word " * 200},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for i in range(n)
    ]


# ---------------------------------------------------------------- splits


def test_a_directory_of_splits_trains_on_train_only_and_holds_out_test(tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", chat_records(30))
    write_jsonl(
        folder / "test.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"Test question {i}?"},
                    {"role": "assistant", "content": f"Test answer {i}."},
                ]
            }
            for i in range(5)
        ],
    )
    prepared = data.prepare(_cfg(tmp_path, folder), tokenizer, seed=0)
    assert not any("Test" in text for text in _texts(prepared.train, tokenizer))
    assert prepared.stats.train_records == 30 and prepared.stats.eval_records == 5
    assert all("Test answer" in text for text in _texts(prepared.eval, tokenizer))


def test_validation_split_is_preferred_and_sharded_files_join_their_split(tokenizer, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "d"
    folder.mkdir()
    records = chat_records(40)
    for shard in range(2):  # the hub's shard naming: train-00000-of-00002.parquet
        pq.write_table(
            pa.Table.from_pylist(records[shard * 20 : (shard + 1) * 20]), folder / f"train-{shard:05d}-of-00002.parquet"
        )
    write_jsonl(folder / "validation.jsonl", chat_records(3))
    write_jsonl(folder / "test.jsonl", chat_records(7))
    prepared = data.prepare(_cfg(tmp_path, folder), tokenizer, seed=0)
    assert (prepared.stats.records, prepared.stats.train_records, prepared.stats.eval_records) == (40, 40, 3)
    assert "validation" in prepared.stats.eval_source
    checked = data.check_data(_cfg(tmp_path, folder))  # the check before a GPU starts reads the same splits
    assert (checked.records, checked.train_records, checked.eval_records) == (40, 40, 3)
    explicit = data.prepare(_cfg(tmp_path, folder, "data.eval_split=test"), tokenizer, seed=0)
    assert explicit.stats.eval_records == 7


def test_a_directory_without_split_names_is_all_training_data(tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "part-a.jsonl", chat_records(10))
    write_jsonl(folder / "part-b.jsonl", chat_records(10))
    prepared = data.prepare(_cfg(tmp_path, folder, "data.eval_fraction=0.1"), tokenizer, seed=0)
    assert (prepared.stats.records, prepared.stats.train_records, prepared.stats.eval_records) == (20, 18, 2)


def test_an_unknown_eval_split_names_the_splits_there(tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", chat_records(10))
    write_jsonl(folder / "test.jsonl", chat_records(3))
    with pytest.raises(DataError, match=r"data.eval_split: .*no 'dev2' files.*it has test, train"):
        data.prepare(_cfg(tmp_path, folder, "data.eval_split=dev2"), tokenizer, seed=0)


def test_hub_datasets_hold_out_their_eval_split(monkeypatch: pytest.MonkeyPatch) -> None:
    from noesis_accel.training import data_sources

    monkeypatch.setattr(data_sources, "_first_hub_split", lambda name, candidates: "validation")
    cfg = typed(["model=tiny", "data.path=someone/chats"]).data
    assert data_sources.training_source(cfg) == data_sources.Source("data.path", "train", hub="someone/chats")
    assert data_sources.eval_source(cfg) == data_sources.Source("data.path", "validation", hub="someone/chats")
    explicit = typed(["model=tiny", "data.path=someone/chats", "data.eval_split=test_sft"]).data
    assert data_sources.eval_source(explicit).split == "test_sft"
    monkeypatch.setattr(data_sources, "_first_hub_split", lambda name, candidates: None)
    assert data_sources.eval_source(cfg) is None  # no eval split: data.eval_fraction of train


def test_split_of_follows_the_datasets_convention() -> None:
    from noesis_accel.training.data_sources import split_of

    names = ("train", "validation", "test")
    assert [
        split_of(n, names)
        for n in (
            "train.jsonl",
            "train-00000-of-00002.parquet",
            "validation.jsonl",
            "dev.json",
            "test_final.jsonl",
            "training.jsonl",
            "trainer.jsonl",
            "notes.jsonl",
        )
    ] == ["train", "train", "validation", "validation", "test", "train", None, None]
    assert split_of("train_sft-00000-of-00001.parquet", ("train", "train_sft")) == "train_sft"


# ---------------------------------------------------------------- bad JSON, too few records


@pytest.mark.parametrize("processes", [1, 2])
def test_invalid_json_lists_every_bad_line(tokenizer, tmp_path: Path, processes: int) -> None:
    path = write_jsonl(
        tmp_path / "bad.jsonl", chat_records(3) + ['{"messages": [}'] + chat_records(2) + ["not json"] + ['{"a": 1']
    )
    with pytest.raises(DataError) as err:
        data.prepare(_cfg(tmp_path, path, f"data.num_proc={processes}"), tokenizer, seed=0)
    message = str(err.value)
    assert message.startswith("3 lines of invalid JSON")
    for line in (4, 7, 8):
        assert f"bad.jsonl:{line}: invalid JSON" in message


def test_invalid_json_lists_at_most_the_limit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ["{"] * 25)
    with pytest.raises(DataError) as err:
        data.read_records(str(path))
    message = str(err.value)
    assert message.count(": invalid JSON (") == data.MAX_LISTED_PROBLEMS and "... and 15 more" in message


def test_bad_records_of_every_checked_batch_are_counted_together(tmp_path: Path) -> None:
    records = chat_records(6000)
    records[1] = records[5500] = {"messages": [{"role": "user", "content": "hi"}]}
    path = write_jsonl(tmp_path / "big.jsonl", records)
    with pytest.raises(DataError) as err:
        data.check_data(_cfg(tmp_path, path, "data.num_proc=1"))  # batches of 5,000 in one process
    assert str(err.value).splitlines() == [
        f"2 bad records in data.path ({path}):",
        f"  2 records: 'messages' has no assistant turn, so there is nothing to learn; add one ({path}: lines 2, 5501)",
        "Fix them, or set data.on_bad_record=skip to train without them.",
    ]


def test_too_few_records_names_the_files_read(tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "few.jsonl", chat_records(30))
    cfg = _cfg(tmp_path, path, "data.min_examples=100")
    for check in (lambda: data.prepare(cfg, tokenizer, seed=0), lambda: data.check_data(cfg)):
        with pytest.raises(DataError) as err:
            check()
        assert str(path) in str(err.value) and "data.min_examples is 100" in str(err.value)


# ---------------------------------------------------------------- dropped and truncated, said on the console


def test_dropped_and_truncated_records_are_counted_with_where(tokenizer, tmp_path: Path) -> None:
    records = chat_records(18) + _long_records(2)
    records[5] = {
        "messages": [
            {"role": "user", "content": "Short question?"},
            {"role": "assistant", "content": "A long answer " + "word " * 200},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", records)
    prepared = data.prepare(_cfg(tmp_path, path, "data.max_length=64", "data.eval_fraction=0"), tokenizer, seed=0)
    assert (prepared.stats.truncated, prepared.stats.dropped_truncated, prepared.stats.train_records) == (3, 2, 18)
    lines = "\n".join(data.describe(prepared.stats))
    assert "1 record truncated at data.max_length=64 and kept" in lines and f"{path}:6" in lines
    assert "2 records dropped" in lines and f"{path}:19" in lines and f"{path}:20" in lines


@pytest.mark.slow
def test_training_says_what_was_dropped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", chat_records(60) + _long_records(6))
    result = run_cli(
        [
            "+experiment=tiny",
            f"run.root={tmp_path}",
            f"data.path={path}",
            "data.max_length=64",
            f"data.cache_dir={tmp_path / 'c'}",
            "train.max_steps=1",
            "train.eval_every=0",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 records dropped" in result.stdout and f"{path}:61" in result.stdout


def test_on_too_long_drop_drops_every_long_record(tokenizer, tmp_path: Path) -> None:
    records = chat_records(10)
    records[2] = {"messages": [{"role": "user", "content": "Short?"}, {"role": "assistant", "content": "word " * 200}]}
    path = write_jsonl(tmp_path / "d.jsonl", records + _long_records(1))
    prepared = data.prepare(
        _cfg(tmp_path, path, "data.max_length=64", "data.eval_fraction=0", "data.on_too_long=drop"), tokenizer, seed=0
    )
    assert prepared.stats.train_records == 9 and prepared.stats.truncated == 0
    assert max(prepared.train["length"]) < 64
    assert "2 records dropped, longer than data.max_length=64" in "\n".join(data.describe(prepared.stats))


def test_on_too_long_error_lists_the_records(tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", chat_records(10) + _long_records(2))
    with pytest.raises(DataError) as err:
        data.prepare(_cfg(tmp_path, path, "data.max_length=64", "data.on_too_long=error"), tokenizer, seed=0)
    message = str(err.value)
    assert message.startswith("2 records are longer than data.max_length=64")
    assert f"{path}:11" in message and f"{path}:12" in message and "data.on_too_long=truncate" in message


def test_on_too_long_is_validated() -> None:
    from noesis_accel.config import validate
    from noesis_accel.core.errors import ConfigError

    with pytest.raises(ConfigError, match="data.on_too_long: 'cut' is not one of truncate, drop, error"):
        validate(compose(["+experiment=tiny", "data.on_too_long=cut"]))


# ---------------------------------------------------------------- the same bytes as before, in parallel too


def _digest(split) -> str:
    digest = hashlib.sha256()
    for name in ("input_ids", "labels", "length", "label_count"):
        digest.update(json.dumps(list(split[name])).encode())
    return digest.hexdigest()[:16]


# Computed with the code before splits, on_too_long and parallel tokenisation: the sample data must
# tokenise, mask, truncate and split to the same bytes (an existing run's data does not move).
PINNED = {
    (): ("3907b07546626903", "b1ba934177a6ad9a"),
    ("data.max_length=40",): ("5e1f6bf72a7b4b9b", "9cddd9fbb8b9b11b"),
}


@pytest.mark.parametrize("overrides", list(PINNED))
def test_sample_data_prepares_to_the_pinned_bytes(tokenizer, tmp_path: Path, overrides: tuple) -> None:
    cfg = typed(["+experiment=tiny", f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    prepared = data.prepare(cfg.data, tokenizer, seed=int(cfg.train.seed))
    assert (_digest(prepared.train), _digest(prepared.eval)) == PINNED[overrides]


def test_parallel_tokenisation_gives_the_same_bytes(tokenizer, tmp_path: Path) -> None:
    cfg = typed(["+experiment=tiny", f"data.cache_dir={tmp_path / 'cache'}", "data.max_length=40", "data.num_proc=2"])
    prepared = data.prepare(cfg.data, tokenizer, seed=int(cfg.train.seed))
    assert (_digest(prepared.train), _digest(prepared.eval)) == PINNED[("data.max_length=40",)]
    assert prepared.stats.dropped_truncated == 12
