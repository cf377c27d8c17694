"""Where `noesis eval`'s prompts come from: the demo's prompt file on the demo's data, a file the user names,
or else the run's held-out records (the user turn asked, the reference answer expected). Units: no model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import SAMPLE, write_jsonl
from omegaconf import OmegaConf

from noesis_accel.after import judges
from noesis_accel.after.prompts import DEMO_DATA, DEMO_PROMPTS, asks_heldout, from_file, from_heldout
from noesis_accel.config.schema import DataConfig

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima")]


def _data(path: Path, **keys) -> OmegaConf:
    return OmegaConf.structured(DataConfig(path=str(path), **keys))


@pytest.fixture
def geography(tmp_path: Path) -> Path:
    """A user's own chat set: a system turn, then one question and its answer per record."""
    return write_jsonl(
        tmp_path / "geo.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Answer with the city only."},
                    {"role": "user", "content": f"What is the capital of {country}?"},
                    {"role": "assistant", "content": city},
                ]
            }
            for country, city in CAPITALS
        ],
    )


def test_the_demo_prompt_file_is_asked_only_on_the_demo_data(tmp_path, geography) -> None:
    assert DEMO_DATA.samefile(SAMPLE) and DEMO_PROMPTS.is_file()
    assert not asks_heldout(str(DEMO_PROMPTS), str(SAMPLE))
    assert not asks_heldout(
        str(DEMO_PROMPTS), str(shutil.copy(SAMPLE, tmp_path / "copy.jsonl"))
    )  # a copy is the demo's
    assert asks_heldout(str(DEMO_PROMPTS), str(geography))  # the demo's name questions judge nothing here
    assert not asks_heldout(str(write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "q"}])), str(geography))
    assert not asks_heldout(None, str(geography))  # eval.prompts=null: no prompts, as asked
    assert asks_heldout(str(DEMO_PROMPTS), "HuggingFaceH4/no_robots")  # a hub dataset is not the demo's either


def test_a_prompt_file_names_itself(tmp_path) -> None:
    demo = from_file(str(DEMO_PROMPTS))
    assert demo.file == str(DEMO_PROMPTS) and str(DEMO_PROMPTS) in demo.source and demo.warning is None
    assert demo.records and demo.source == f"{len(demo.records)} from {DEMO_PROMPTS}"
    none = from_file(None)
    assert none.records == [] and none.file is None and "eval.prompts=null" in none.source


def test_other_data_asks_its_held_out_records(geography) -> None:
    held_out = [f"{geography}:4", f"{geography}:2"]
    prompts = from_heldout(_data(geography), held_out)
    assert [(r.prompt, r.expected, r.location) for r in prompts.records] == [
        ("What is the capital of Peru?", "Lima", f"{geography}:4"),
        ("What is the capital of Japan?", "Tokyo", f"{geography}:2"),
    ]
    assert prompts.records[0].record["messages"][2] == {"role": "assistant", "content": "Lima"}  # the judge sees it all
    assert prompts.file is None and prompts.warning is None
    assert prompts.source.startswith(f"2 held-out records of data.path ({geography})")
    assert "eval.prompts=" in prompts.source  # and how to ask your own instead
    # The reference judges want an expected string: the reference answer is one.
    assert judges.contains(prompts.records[0].prompt, "It is Lima.", prompts.records[0].expected, {})[0] == 1.0


def test_held_out_records_of_every_prompted_shape(tmp_path) -> None:
    shapes = {
        "alpaca": {"instruction": "Name the capital.", "input": "Kenya", "output": "Nairobi"},
        "prompt_completion": {"prompt": "The capital of Peru is", "completion": " Lima"},
        "sharegpt": {
            "conversations": [{"from": "human", "value": "Capital of Japan?"}, {"from": "gpt", "value": "Tokyo"}]
        },
    }
    for shape, record in shapes.items():
        path = write_jsonl(tmp_path / f"{shape}.jsonl", [record])
        [asked] = from_heldout(_data(path), [f"{path}:1"]).records
        assert asked.expected.strip() in ("Nairobi", "Lima", "Tokyo") and asked.prompt, shape
    alpaca = tmp_path / "alpaca.jsonl"
    assert from_heldout(_data(alpaca), [f"{alpaca}:1"]).records[0].prompt == "Name the capital.\n\nKenya"
    # data=sample's format (chat) left in place over a file of another shape: read as the record is.
    assert from_heldout(_data(alpaca, format="chat"), [f"{alpaca}:1"]).records[0].expected == "Nairobi"


def test_a_held_out_set_from_data_eval_path_is_read_there(tmp_path, geography) -> None:
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": "Capital of Kenya?", "completion": "Nairobi"}])
    prompts = from_heldout(_data(geography, eval_path=str(heldout)), [f"{heldout}:1"])
    assert [r.expected for r in prompts.records] == ["Nairobi"]
    assert f"data.eval_path ({heldout})" in prompts.source


def test_no_held_out_records_is_one_warning_that_says_how_to_ask_your_own(tmp_path, geography) -> None:
    nothing = from_heldout(_data(geography, eval_fraction=0.0), [])
    assert nothing.records == [] and nothing.warning is not None
    assert "\n" not in nothing.warning and "eval.prompts=" in nothing.warning and str(geography) in nothing.warning
    plain_text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Paris is the capital of France."}])
    unprompted = from_heldout(_data(plain_text), [f"{plain_text}:1"])  # text records have no prompt turn
    assert unprompted.records == [] and "eval.prompts=" in (unprompted.warning or "")
