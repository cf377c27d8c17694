"""Every record shape, the mapping, train flags, data.train_on and data.chat_template, each by the exact
tokens it trains (SmolLM2's real tokenizer), and one short training run on a ShareGPT file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import write_jsonl
from helpers import typed
from omegaconf import OmegaConf

from noesis_accel.config import CHOICES, compose, differing_math_keys
from noesis_accel.core.errors import DataError
from noesis_accel.processes.train import run
from noesis_accel.training import data, formats
from noesis_accel.training.modeling import load_tokenizer

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
END = "<|im_end|>\n"  # SmolLM2's end of turn: learned with every assistant turn

# Like Qwen3: an assistant turn keeps its <think> block only while no user turn follows it.
THINK_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- set content = m.content -%}
{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content -%}
{%- set content = content.split('</think>')[-1].lstrip() -%}
{%- endif -%}
{{ '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}
"""

# A ChatML template that renders tool definitions, tool calls and tool results.
TOOL_TEMPLATE = """\
{%- if tools -%}
{{ '<|im_start|>system\\nTools:' }}{% for tool in tools %} {{ tool.function.name }}{% endfor %}{{ '<|im_end|>\\n' }}
{%- endif -%}
{%- for m in messages -%}
{{ '<|im_start|>' + m.role + '\\n' }}
{%- if m.content %}{{ m.content }}{% endif -%}
{%- for call in m.tool_calls or [] -%}
{{ '<tool_call>' + call.function.name + ' ' + (call.function.arguments | tojson) + '</tool_call>' }}
{%- endfor -%}
{{ '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}
"""

TOOL_RECORD = {
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny in Paris."},
    ],
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(typed(["model=tiny"]).model)


def _data_cfg(*overrides: str):
    return typed(["model=tiny", "data.path=unused.jsonl", *overrides]).data


def _tokenize(tokenizer, fields: dict, *overrides: str, shape: str = "auto") -> tuple[list[int], list[int]]:
    """Validate one record as training does, then tokenise it; its ids and labels."""
    cfg = _data_cfg(*overrides)
    record = data.RawRecord("r.jsonl:1", fields)
    fmt = data.validate_records([record], shape, data_cfg=cfg)
    ids, labels, truncated = data.tokenize_record(tokenizer, record, fmt, 1024, data_cfg=cfg)
    assert not truncated and len(ids) == len(labels)
    return ids, labels


def _learned_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Each stretch of consecutive learned tokens, decoded on its own: exactly what the loss sees."""
    stretches: list[list[int]] = []
    for position, (token, label) in enumerate(zip(ids, labels)):
        if label == data.IGNORE_INDEX:
            continue
        assert label == token
        if position and labels[position - 1] != data.IGNORE_INDEX:
            stretches[-1].append(token)
        else:
            stretches.append([token])
    return [tokenizer.decode(stretch) for stretch in stretches]


# ---------------------------------------------------------------- one test per shape


def test_messages_with_openai_text_parts(tokenizer) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is your name?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "I am"}, {"type": "text", "text": "Noesis."}]},
        {"role": "user", "content": "Who made you?"},
        {"role": "assistant", "content": "Lyceum Labs."},
    ]
    ids, labels = _tokenize(tokenizer, {"messages": messages})
    assert _learned_runs(tokenizer, ids, labels) == ["I am\nNoesis." + END, "Lyceum Labs." + END]
    as_strings = [
        {"role": "user", "content": "What is your name?"},
        {"role": "assistant", "content": "I am\nNoesis."},
        *messages[2:],
    ]
    assert ids == tokenizer.apply_chat_template(as_strings, tokenize=True, return_dict=False)


def test_sharegpt(tokenizer) -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Name?"},
            {"from": "gpt", "value": "Noesis."},
            {"from": "human", "value": "Maker?"},
            {"from": "gpt", "value": "Lyceum Labs."},
        ]
    }
    ids, labels = _tokenize(tokenizer, record)
    assert _learned_runs(tokenizer, ids, labels) == ["Noesis." + END, "Lyceum Labs." + END]
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName?")


def test_alpaca(tokenizer) -> None:
    record = {
        "instruction": "Translate to French.",
        "input": "Good morning",
        "output": "Bonjour",
        "system": "You translate.",
    }
    ids, labels = _tokenize(tokenizer, record)
    assert _learned_runs(tokenizer, ids, labels) == ["Bonjour" + END]
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nYou translate.<|im_end|>\n<|im_start|>user\n"
        "Translate to French.\n\nGood morning<|im_end|>\n"
        "<|im_start|>assistant\nBonjour" + END
    )


def test_prompt_completion(tokenizer) -> None:
    ids, labels = _tokenize(tokenizer, {"prompt": "Q: capital of France?\nA:", "completion": " Paris"})
    assert _learned_runs(tokenizer, ids, labels) == [" Paris" + tokenizer.eos_token]


def test_conversational_prompt_completion_learns_the_completion_only(tokenizer) -> None:
    record = {
        "prompt": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"},
        ],
        "completion": [{"role": "assistant", "content": "6"}],
    }
    ids, labels = _tokenize(tokenizer, record)
    assert _learned_runs(tokenizer, ids, labels) == ["6" + END]  # the prompt's assistant turn is context


def test_text(tokenizer) -> None:
    ids, labels = _tokenize(tokenizer, {"text": "Noesis means understanding."})
    assert _learned_runs(tokenizer, ids, labels) == ["Noesis means understanding." + tokenizer.eos_token]


@pytest.mark.parametrize(
    ("fields", "shape"),
    [
        ({"messages": []}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "", "output": ""}, "alpaca"),
        ({"prompt": "", "completion": ""}, "prompt_completion"),
        ({"prompt": [], "completion": []}, "conversational_prompt_completion"),
        ({"text": ""}, "text"),
    ],
)
def test_each_shape_is_detected_and_selectable_by_name(fields: dict, shape: str) -> None:
    record = data.RawRecord("r.jsonl:1", fields)
    assert data.detect_format(record, "auto") == shape
    assert data.detect_format(record, shape) == shape
    assert data.detect_format(record, "chat") == "messages"  # the earlier name still works


def test_format_choices_are_the_shapes() -> None:
    assert set(CHOICES["data.format"]) == {"auto", *formats.SHAPES, *formats.ALIASES}
    assert set(CHOICES["data.train_on"]) == set(formats.TRAIN_ON)


def test_sharegpt_file_trains_the_same_tokens_as_its_messages_file(tokenizer, tmp_path: Path) -> None:
    pairs = [(f"Question {i}?", f"Answer {i}.") for i in range(12)]
    sharegpt = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in pairs]
    messages = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    prepared = []
    for name, records in (("sharegpt", sharegpt), ("messages", messages)):
        cfg = typed(
            [
                "model=tiny",
                f"data.path={write_jsonl(tmp_path / f'{name}.jsonl', records)}",
                "data.format=auto",
                "data.min_examples=1",
                "data.eval_fraction=0",
                f"data.cache_dir={tmp_path / 'cache'}",
            ]
        )
        prepared.append(data.prepare(cfg.data, tokenizer, seed=0))
    assert prepared[0].stats.format == "sharegpt" and prepared[1].stats.format == "messages"
    assert prepared[0].train["input_ids"] == prepared[1].train["input_ids"]
    assert prepared[0].train["labels"] == prepared[1].train["labels"]


# ---------------------------------------------------------------- mapping


def test_columns_roles_and_message_keys_map_other_layouts(tokenizer) -> None:
    record = {
        "dialog": [
            {"speaker": "narrator", "text": "Be brief."},
            {"speaker": "customer", "text": "Hi"},
            {"speaker": "agent", "text": "Hello!"},
        ]
    }
    ids, labels = _tokenize(
        tokenizer,
        record,
        "+data.columns={messages: dialog}",
        "data.role_key=speaker",
        "data.content_key=text",
        "+data.roles={narrator: system, customer: user, agent: assistant}",
    )
    assert _learned_runs(tokenizer, ids, labels) == ["Hello!" + END]
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")

    ids, labels = _tokenize(
        tokenizer, {"question": "2+2=", "answer": "4"}, "+data.columns={prompt: question, completion: answer}"
    )
    assert _learned_runs(tokenizer, ids, labels) == ["4" + tokenizer.eos_token]


def test_problems_name_the_files_own_field_and_the_fix() -> None:
    records = [
        data.RawRecord(
            "r.jsonl:1", {"conversations": [{"from": "narrator", "value": "hi"}, {"from": "gpt", "value": ""}]}
        )
    ]
    with pytest.raises(DataError) as err:
        data.validate_records(records, "auto")
    assert (
        "r.jsonl:1: conversations[0].from is 'narrator'; use one of system, user, assistant, tool, "
        "or map it with data.roles (e.g. +data.roles={narrator: user})" in str(err.value)
    )
    assert "r.jsonl:1: field 'conversations[1].value' is empty" in str(err.value)
    with pytest.raises(DataError, match="data.columns: 'question' is not a field name"):
        data.validate_records(records, "auto", data_cfg=_data_cfg("+data.columns={question: q}"))


def test_a_declared_shape_that_does_not_fit_says_which_does() -> None:
    record = data.RawRecord("r.jsonl:1", {"conversations": [{"from": "human", "value": "hi"}]})
    with pytest.raises(DataError, match="looks like sharegpt: set data.format=auto or data.format=sharegpt"):
        data.validate_records([record], "chat")


def test_image_parts_are_refused_by_name(tokenizer) -> None:
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]
    with pytest.raises(DataError, match=r"messages\[0\].content\[1\] is a 'image_url' part; only text parts"):
        _tokenize(
            tokenizer, {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "A"}]}
        )


# ---------------------------------------------------------------- train flags and data.train_on

TWO_TURNS = [
    {"role": "user", "content": "Name?"},
    {"role": "assistant", "content": "Noesis."},
    {"role": "user", "content": "Maker?"},
    {"role": "assistant", "content": "Lyceum Labs."},
]


def test_weight_zero_on_an_assistant_message_is_not_learned(tokenizer) -> None:
    messages = copy.deepcopy(TWO_TURNS)
    messages[1]["weight"] = 0
    ids, labels = _tokenize(tokenizer, {"messages": messages})
    assert _learned_runs(tokenizer, ids, labels) == ["Lyceum Labs." + END]
    messages[1] = {**TWO_TURNS[1], "train": False}
    assert _learned_runs(tokenizer, *_tokenize(tokenizer, {"messages": messages})) == ["Lyceum Labs." + END]


def test_a_record_switched_off_learns_nothing(tokenizer) -> None:
    _, labels = _tokenize(tokenizer, {"messages": TWO_TURNS, "weight": 0})
    assert set(labels) == {data.IGNORE_INDEX}
    _, labels = _tokenize(tokenizer, {"prompt": "a", "completion": "b", "train": False})
    assert set(labels) == {data.IGNORE_INDEX}


def test_flags_are_checked(tokenizer) -> None:
    with pytest.raises(DataError, match=r"messages\[1\].weight is 0.5; use 0 \(not learned\) or 1 \(learned\)"):
        _tokenize(tokenizer, {"messages": [TWO_TURNS[0], {**TWO_TURNS[1], "weight": 0.5}]})
    with pytest.raises(DataError, match=r"messages\[0\] is a user message; only assistant messages take"):
        _tokenize(tokenizer, {"messages": [{**TWO_TURNS[0], "weight": 1}, TWO_TURNS[1]]})


@pytest.mark.parametrize(
    ("train_on", "expected"),
    [
        ("assistant", ["Noesis." + END, "Lyceum Labs." + END]),
        ("last_assistant", ["Lyceum Labs." + END]),
        ("all", None),  # every token
    ],
)
def test_train_on(tokenizer, train_on: str, expected: list[str] | None) -> None:
    ids, labels = _tokenize(tokenizer, {"messages": TWO_TURNS}, f"data.train_on={train_on}")
    if expected is None:
        assert labels == ids
        assert tokenizer.decode(ids).startswith(f"<|im_start|>system\n{SMOLLM_SYSTEM}")
    else:
        assert _learned_runs(tokenizer, ids, labels) == expected


def test_train_on_last_assistant_keeps_an_earlier_turn_flagged_to_learn(tokenizer) -> None:
    messages = copy.deepcopy(TWO_TURNS)
    messages[1]["weight"] = 1
    ids, labels = _tokenize(tokenizer, {"messages": messages}, "data.train_on=last_assistant")
    assert _learned_runs(tokenizer, ids, labels) == ["Noesis." + END, "Lyceum Labs." + END]


def test_train_on_all_learns_the_prompt_of_prompt_completion(tokenizer) -> None:
    ids, labels = _tokenize(tokenizer, {"prompt": "2+2=", "completion": "4"}, "data.train_on=all")
    assert _learned_runs(tokenizer, ids, labels) == ["2+2=4" + tokenizer.eos_token]


# ---------------------------------------------------------------- chat templates


def test_template_that_rewrites_earlier_turns_trains_turn_by_turn(tokenizer, tmp_path: Path) -> None:
    template = tmp_path / "think.jinja"
    template.write_text(THINK_TEMPLATE)
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\nFour."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nadd again\n</think>\n\nSix."},
    ]
    # The template itself drops the first turn's reasoning once a user turn follows it...
    whole = tokenizer.apply_chat_template(messages, chat_template=THINK_TEMPLATE, tokenize=False)
    assert "<think>\nadd\n</think>" not in whole
    ids, labels = _tokenize(tokenizer, {"messages": messages}, f"data.chat_template={template}")
    # ...and each turn is trained as the template writes it when that turn is the last one.
    runs = _learned_runs(tokenizer, ids, labels)
    for k, learned in zip((1, 3), runs):
        prompt = tokenizer.apply_chat_template(
            messages[:k], chat_template=THINK_TEMPLATE, tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(messages[: k + 1], chat_template=THINK_TEMPLATE, tokenize=False)
        assert learned == through[len(prompt) :]
    assert runs == ["<think>\nadd\n</think>\n\nFour." + END, "<think>\nadd again\n</think>\n\nSix." + END]
    assert tokenizer.decode(ids) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        + runs[0]
        + "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n"
        + runs[1]
    )


def test_tool_calls_with_a_template_that_renders_them(tokenizer, tmp_path: Path) -> None:
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    ids, labels = _tokenize(tokenizer, TOOL_RECORD, f"data.chat_template={template}")
    assert _learned_runs(tokenizer, ids, labels) == [
        '<tool_call>get_weather {"city": "Paris"}</tool_call>' + END,
        "It is 18C and sunny in Paris." + END,
    ]
    rendered = tokenizer.decode(ids)
    assert rendered.startswith("<|im_start|>system\nTools: get_weather<|im_end|>\n")
    assert "<|im_start|>tool\n18C, sunny<|im_end|>\n" in rendered


def test_a_template_without_tool_support_is_refused_by_name(tokenizer) -> None:
    with pytest.raises(DataError) as err:
        _tokenize(tokenizer, TOOL_RECORD)
    assert str(err.value).startswith(
        "r.jsonl:1: the chat template does not render the tool call 'get_weather' of messages[1]"
    )
    assert "set data.chat_template" in str(err.value)


def test_a_template_the_tokenizer_ships_by_name(tokenizer) -> None:
    several = copy.deepcopy(tokenizer)
    several.chat_template = {"default": tokenizer.chat_template, "tool_use": TOOL_TEMPLATE}
    cfg = _data_cfg("data.chat_template=tool_use")
    record = data.RawRecord("r.jsonl:1", TOOL_RECORD)
    ids, labels, _ = data.tokenize_record(several, record, "messages", 1024, data_cfg=cfg)
    assert _learned_runs(tokenizer, ids, labels)[1] == "It is 18C and sunny in Paris." + END
    with pytest.raises(
        DataError,
        match="data.chat_template: no template named 'nope' "
        r"\(the tokenizer ships: default, tool_use\)",
    ):
        data.tokenize_record(several, record, "messages", 1024, data_cfg=_data_cfg("data.chat_template=nope"))
    with pytest.raises(DataError, match="data.chat_template: .*missing.jinja does not exist"):
        data.tokenize_record(several, record, "messages", 1024, data_cfg=_data_cfg("data.chat_template=missing.jinja"))


def test_default_system_prompt_is_named(tokenizer, tmp_path: Path) -> None:
    notes = data.template_notes(tokenizer, _data_cfg(), "sharegpt")
    assert notes == [
        f'data: the chat template adds a default system prompt to records without one: "{SMOLLM_SYSTEM}"; '
        "add a system turn to your records or set data.chat_template to change it"
    ]
    template = tmp_path / "think.jinja"
    template.write_text(THINK_TEMPLATE)
    assert data.template_notes(tokenizer, _data_cfg(f"data.chat_template={template}"), "messages") == []
    assert data.template_notes(tokenizer, _data_cfg(), "text") == []


def test_fingerprint_follows_every_setting_that_changes_tokens(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text(THINK_TEMPLATE)
    base = formats.fingerprint(_data_cfg(f"data.chat_template={template}"))
    assert base == formats.fingerprint(_data_cfg(f"data.chat_template={template}"))
    for override in (
        "data.train_on=all",
        "+data.columns={text: body}",
        "+data.roles={agent: assistant}",
        "data.role_key=speaker",
        "data.format=sharegpt",
    ):
        assert formats.fingerprint(_data_cfg(f"data.chat_template={template}", override)) != base, override
    template.write_text(THINK_TEMPLATE + " ")
    assert formats.fingerprint(_data_cfg(f"data.chat_template={template}")) != base


def test_a_run_started_before_these_keys_existed_still_resumes(tiny_cfg) -> None:
    saved = OmegaConf.to_container(tiny_cfg, resolve=True)
    for key in ("columns", "roles", "role_key", "content_key", "train_on", "chat_template"):
        del saved["data"][key]
    assert differing_math_keys(saved, tiny_cfg) == []
    assert differing_math_keys(saved, compose(["+experiment=tiny", "data.train_on=all"])) == ["data.train_on"]


# ---------------------------------------------------------------- training the tiny model


def test_tiny_model_trains_on_a_sharegpt_file(tiny_overrides: list[str], tmp_path: Path, capsys) -> None:
    records = [
        {
            "conversations": [
                {"from": "human", "value": f"What is {i} plus {i}?"},
                {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."},
            ]
        }
        for i in range(60)
    ]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", records)
    cfg = compose(
        tiny_overrides
        + [
            f"data.path={path}",
            "data.format=auto",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=2",
            "train.eval_every=0",
        ]
    )
    result = run(cfg)
    assert result.state == "completed"
    out = capsys.readouterr().out
    assert "records (sharegpt)" in out
    assert out.count("data: the chat template adds a default system prompt") == 1
    assert f'"{SMOLLM_SYSTEM}"' in out
    assert json.loads((result.run_dir / "status.json").read_text())["step"] == 2
