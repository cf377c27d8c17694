"""Record shapes: recognise each layout of training records and turn it into one canonical form.

A record becomes a `Conversation` (OpenAI-style messages, each with its own train flag) or a
`Completion` (a prompt and the text to learn). Tokenisation only ever sees these two; every shape,
and the small mapping for layouts that differ only in names (`data.columns`, `data.roles`,
`data.role_key`, `data.content_key`), is dealt with here.

| shape | a record looks like |
| --- | --- |
| `messages` (alias `chat`) | `{"messages": [{"role": "user", "content": "..."}, ...]}` (or OpenAI text parts) |
| `sharegpt` | `{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}` |
| `alpaca` | `{"instruction": "...", "input": "..." (optional), "output": "..."}` |
| `prompt_completion` | `{"prompt": "...", "completion": "..."}` (strings: no chat template) |
| `conversational_prompt_completion` | `{"prompt": [messages], "completion": [messages]}` (TRL) |
| `text` | `{"text": "..."}` (every token is learned) |

Train flags: `"weight": 0|1` or `"train": false|true`, on an assistant message (wins over
`data.train_on` for that turn) or on the record (`0`/`false`: nothing in it is learned, so the
record takes no part in training).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from noesis_accel.config import DataConfig
from noesis_accel.core.errors import DataError
from noesis_accel.training.templates import template_fingerprint

SHAPES = ("messages", "sharegpt", "alpaca", "prompt_completion", "conversational_prompt_completion", "text")
ALIASES = {"chat": "messages"}  # names earlier versions used
CHAT_SHAPES = ("messages", "sharegpt", "alpaca", "conversational_prompt_completion")  # rendered by a chat template
ROLES = ("system", "user", "assistant", "tool")
DEFAULT_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant"}  # ShareGPT's; data.roles adds to them
TRAIN_ON = ("assistant", "last_assistant", "all")
# Field names `data.columns` may map: the canonical names the shapes above are recognised by.
COLUMNS = (
    "messages",
    "conversations",
    "prompt",
    "completion",
    "text",
    "instruction",
    "input",
    "output",
    "system",
    "tools",
)
_SHAPE_HELP = (
    'use one of {"messages": [{"role": ..., "content": ...}]}, {"conversations": [{"from": ..., "value": ...}]}, '
    '{"prompt": ..., "completion": ...}, {"instruction": ..., "output": ...} or {"text": ...}, '
    "or name your fields with data.columns (e.g. +data.columns={prompt: question, completion: answer})"
)


@dataclass(frozen=True)
class Options:
    """The `data` settings that decide what a record means and what of it is learned."""

    columns: dict[str, str] = field(default_factory=dict)  # canonical field -> the dataset's field
    roles: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLES))  # the dataset's role -> canonical
    role_key: str | None = None  # None: "role", or "from" where a message has no "role"
    content_key: str | None = None  # None: "content", or "value" where a message has no "content"
    train_on: str = "assistant"
    chat_template: str | None = None

    @classmethod
    def from_config(cls, data_cfg: DataConfig | None = None) -> Options:
        """The options of a `data` config; defaults for None."""
        if data_cfg is None:
            return cls()
        return cls(
            columns=dict(data_cfg.columns),
            roles={**DEFAULT_ROLES, **data_cfg.roles},
            role_key=data_cfg.role_key,
            content_key=data_cfg.content_key,
            train_on=data_cfg.train_on,
            chat_template=data_cfg.chat_template,
        )

    def problems(self) -> list[str]:
        """Mistakes in the mapping itself, each naming its key."""
        found = [
            f"data.columns: '{k}' is not a field name this launcher knows; map one of {', '.join(COLUMNS)}"
            for k in self.columns
            if k not in COLUMNS
        ]
        found += [
            f"data.roles: '{k}' maps to '{v}'; map roles to one of {', '.join(ROLES)}"
            for k, v in self.roles.items()
            if v not in ROLES
        ]
        if self.train_on not in TRAIN_ON:
            found.append(f"data.train_on: {self.train_on!r} is not one of {', '.join(TRAIN_ON)}")
        return found


@dataclass(frozen=True)
class Conversation:
    """A chat-shaped record: what a chat template renders."""

    messages: list[dict[str, Any]]  # role in ROLES, content a string, tool_calls as templates expect; other keys kept
    flags: list[bool | None]  # each message's own train flag; None: data.train_on decides
    prompt_turns: int = 0  # leading messages that are the prompt (conversational prompt-completion)
    tools: list[dict[str, Any]] | None = None  # tool definitions handed to the chat template
    learn: bool = True  # the record's own flag: False, nothing in it is learned


@dataclass(frozen=True)
class Completion:
    """A plain-text record: the prompt (learned only under data.train_on=all) and the text to learn."""

    prompt: str  # "" for the `text` shape
    completion: str
    learn: bool = True


Example = Conversation | Completion


def canonical_shape(name: str) -> str:
    """A shape's name with earlier names (`chat`) replaced by today's."""
    return ALIASES.get(name, name)


def mapped_fields(fields: dict[str, Any], options: Options) -> tuple[dict[str, Any], dict[str, str]]:
    """The record under canonical field names, and each canonical name's name in the file (for messages)."""
    sources = {source: canonical for canonical, source in options.columns.items() if source in fields}
    view = {key: value for key, value in fields.items() if key not in sources}
    names = {key: key for key in view}
    for source, canonical in sources.items():
        view[canonical], names[canonical] = fields[source], source
    return view, names


def detect_shape(fields: dict[str, Any], options: Options) -> str | None:
    """The shape a record's (mapped) fields say it has; None when no shape fits."""
    view, _ = mapped_fields(fields, options)
    if "messages" in view:
        return "messages"
    if "conversations" in view:
        return "sharegpt"
    if "prompt" in view and "completion" in view:
        lists = isinstance(view["prompt"], list) or isinstance(view["completion"], list)
        return "conversational_prompt_completion" if lists else "prompt_completion"
    if "instruction" in view and "output" in view:
        return "alpaca"
    if "text" in view:
        return "text"
    return None


def unknown_shape(fields: dict[str, Any], where: str) -> DataError:
    """The error for a record that fits no shape: its fields and the shapes there are."""
    found = ", ".join(sorted(fields)) or "no fields"
    return DataError(f"{where}: unknown record shape (fields: {found}); {_SHAPE_HELP}")


def parse(fields: Any, shape: str, options: Options, where: str) -> tuple[Example | None, list[str]]:
    """The record in canonical form, or None and everything wrong with it (each line names the field and fix)."""
    if not isinstance(fields, dict):
        return None, [f"{where}: a record must be a JSON object, found {type(fields).__name__}"]
    found = canonical_shape(shape) if shape != "auto" else detect_shape(fields, options)
    if found is None:
        return None, [str(unknown_shape(fields, where))]
    if found not in _PARSERS:
        return None, [f"data.format: {found!r} is not one of auto, {', '.join(SHAPES)}"]
    view, names = mapped_fields(fields, options)
    reader = _Reader(where, names, options)
    example = _PARSERS[found](reader, view)
    return (None if reader.problems else example), reader.problems


def to_example(fields: Any, shape: str, options: Options, where: str) -> Example:
    """The record in canonical form; a DataError naming its first problem when it has one."""
    example, problems = parse(fields, shape, options, where)
    if example is None:
        raise DataError(problems[0] if len(problems) == 1 else f"{problems[0]} (and {len(problems) - 1} more)")
    return example


def fingerprint(data_cfg: DataConfig) -> str:
    """What the settings of this module (and the chat template's source) contribute to the data cache key.

    Everything here changes token ids or labels, so the tokenised data cached for one value must not
    be reused for another: data.format, data.columns, data.roles, data.role_key, data.content_key,
    data.train_on, data.chat_template (a file by its contents).
    """
    options = Options.from_config(data_cfg)
    parts = [
        canonical_shape(data_cfg.format),
        json.dumps(options.columns, sort_keys=True),
        json.dumps(options.roles, sort_keys=True),
        str(options.role_key),
        str(options.content_key),
        options.train_on,
        template_fingerprint(options.chat_template),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- reading one record


class _Reader:
    """Reads one record's fields into canonical values, collecting every problem instead of stopping."""

    def __init__(self, where: str, names: dict[str, str], options: Options) -> None:
        self.where, self.names, self.options = where, names, options
        self.problems: list[str] = []

    def problem(self, message: str) -> None:
        self.problems.append(f"{self.where}: {message}")

    def name(self, key: str) -> str:
        """A canonical field's name as the file spells it."""
        return self.names.get(key, key)

    def text(self, value: Any, label: str, *, optional: bool = False) -> str:
        """A string field's value; '' (and a problem unless `optional`) when missing, empty or not a string."""
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            self.problem(f"field '{label}' must be a string, found {type(value).__name__}")
            return ""
        if not value.strip() and not optional:
            self.problem(f"field '{label}' is empty; remove the record or fill it in")
        return value

    def flag(self, holder: dict[str, Any], label: str) -> bool | None:
        """The train flag of a record or message: `weight` 0/1 or `train` false/true; None when it has none."""
        weight, train = holder.get("weight"), holder.get("train")
        flags = []
        if weight is not None:
            if isinstance(weight, (bool, int, float)) and weight in (0, 1):
                flags.append(bool(weight))
            else:
                self.problem(f"{label}weight is {weight!r}; use 0 (not learned) or 1 (learned)")
        if train is not None:
            if isinstance(train, bool):
                flags.append(train)
            else:
                self.problem(f"{label}train is {train!r}; use true or false")
        if len(set(flags)) > 1:
            self.problem(f"{label}weight and {label}train disagree; keep one of them")
        return flags[0] if flags else None

    def system(self, view: dict[str, Any]) -> list[dict[str, Any]]:
        """The record-level `system` field as a leading system message ([] when absent or empty)."""
        value = self.text(view.get("system"), self.name("system"), optional=True)
        return [{"role": "system", "content": value}] if value.strip() else []

    def tools(self, view: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Tool definitions (a list of JSON schemas, or that list as a JSON string)."""
        tools, label = view.get("tools"), self.name("tools")
        if isinstance(tools, str):
            try:
                tools = json.loads(tools) if tools.strip() else None
            except json.JSONDecodeError:
                self.problem(f"field '{label}' is a string but not JSON; give a list of tool definitions")
                return None
        if tools is None or tools == []:
            return None
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            self.problem(f"field '{label}' must be a list of tool definitions (JSON objects)")
            return None
        return tools

    def messages(self, value: Any, label: str) -> tuple[list[dict[str, Any]], list[bool | None]]:
        """A list of message objects in canonical form, with each one's own train flag."""
        if not isinstance(value, list) or not value:
            keys = "{from, value}" if label == "conversations" else "{role, content}"
            self.problem(f"field '{label}' must be a non-empty list of {keys} objects")
            return [], []
        messages, flags = [], []
        for i, raw in enumerate(value):
            if not isinstance(raw, dict):
                self.problem(f"{label}[{i}] must be an object with a role and content")
                continue
            message = self.message(raw, f"{label}[{i}]")
            messages.append(message)
            flags.append(self.flag(raw, f"{label}[{i}]."))
            if flags[-1] is not None and message.get("role") != "assistant":
                self.problem(
                    f"{label}[{i}] is a {message.get('role')} message; only assistant messages take "
                    "a weight/train flag (data.train_on=all learns every token)"
                )
        return messages, flags

    def message(self, raw: dict[str, Any], label: str) -> dict[str, Any]:
        """One message: role mapped by data.roles, content as a string, tool calls as chat templates expect."""
        role_key = self.options.role_key or ("role" if "role" in raw or "from" not in raw else "from")
        content_key = self.options.content_key or ("content" if "content" in raw or "value" not in raw else "value")
        given = raw.get(role_key)
        role = self.options.roles.get(given, given) if isinstance(given, str) else given
        if role not in ROLES:
            example = given if isinstance(given, str) and given.isidentifier() else "speaker"
            self.problem(
                f"{label}.{role_key} is {given!r}; use one of {', '.join(ROLES)}, "
                f"or map it with data.roles (e.g. +data.roles={{{example}: user}})"
            )
        # Other keys (tool_call_id, name, reasoning_content, ...) reach the template as they are.
        message = {k: v for k, v in raw.items() if k not in (role_key, content_key, "weight", "train", "tool_calls")}
        message["role"] = role
        calls = self.tool_calls(raw.get("tool_calls"), f"{label}.tool_calls", role)
        optional = bool(calls)  # an assistant turn that only calls tools has no text
        message["content"] = self.content(raw.get(content_key), f"{label}.{content_key}", optional)
        if calls:
            message["tool_calls"] = calls
        return message

    def content(self, value: Any, label: str, optional: bool) -> str:
        """A message's text: a string, or OpenAI content parts of type text (joined by newlines)."""
        if isinstance(value, list):
            texts = []
            for j, part in enumerate(value):
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    self.problem(
                        f"{label}[{j}] is a {kind!r} part; only text parts "
                        '({"type": "text", "text": ...}) can be trained on'
                    )
            value = "\n".join(texts)
        return self.text(value, label, optional=optional)

    def tool_calls(self, value: Any, label: str, role: Any) -> list[dict[str, Any]]:
        """OpenAI tool calls with arguments as objects (what Hugging Face chat templates render)."""
        if value is None or value == []:
            return []
        if role != "assistant":
            self.problem(f"{label}: only assistant messages make tool calls")
            return []
        if not isinstance(value, list):
            self.problem(f"{label} must be a list of calls")
            return []
        return [call for j, raw in enumerate(value) if (call := self.tool_call(raw, f"{label}[{j}]")) is not None]

    def tool_call(self, raw: Any, label: str) -> dict[str, Any] | None:
        """One call as {"type": "function", "function": {"name", "arguments"}} (and its id); None if unreadable."""
        function = raw.get("function", raw) if isinstance(raw, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            self.problem(f'{label} must be {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}')
            return None
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends a JSON string; chat templates expect the object
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                self.problem(f"{label}.function.arguments is not valid JSON")
                return None
        call = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(raw.get("id"), str):
            call["id"] = raw["id"]
        return call

    def needs_assistant(self, messages: list[dict[str, Any]], label: str) -> None:
        if messages and not any(m.get("role") == "assistant" for m in messages):
            self.problem(f"'{label}' has no assistant turn, so there is nothing to learn; add one")

    def with_system(
        self, view: dict[str, Any], messages: list[dict[str, Any]], flags: list[bool | None]
    ) -> tuple[list[dict[str, Any]], list[bool | None]]:
        """`messages` after the record-level system prompt, if the record has one."""
        system = self.system(view)
        if system and messages and messages[0].get("role") == "system":
            self.problem(f"field '{self.name('system')}' and a system message both give a system prompt; keep one")
        return system + messages, [None] * len(system) + flags


def _messages_shape(reader: _Reader, view: dict[str, Any], key: str) -> Conversation:
    label = reader.name(key)
    messages, flags = reader.messages(view.get(key), label)
    reader.needs_assistant(messages, label)
    messages, flags = reader.with_system(view, messages, flags)
    return Conversation(messages, flags, tools=reader.tools(view), learn=reader.flag(view, "") is not False)


def _conversational_prompt_completion(reader: _Reader, view: dict[str, Any]) -> Conversation:
    prompt, prompt_flags = reader.messages(view.get("prompt"), reader.name("prompt"))
    completion, completion_flags = reader.messages(view.get("completion"), reader.name("completion"))
    reader.needs_assistant(completion, reader.name("completion"))
    prompt, prompt_flags = reader.with_system(view, prompt, prompt_flags)
    return Conversation(
        prompt + completion,
        prompt_flags + completion_flags,
        prompt_turns=len(prompt),
        tools=reader.tools(view),
        learn=reader.flag(view, "") is not False,
    )


def _alpaca(reader: _Reader, view: dict[str, Any]) -> Conversation:
    """Instruction and input become one user turn (input after a blank line), output the assistant turn."""
    instruction = reader.text(view.get("instruction"), reader.name("instruction"))
    extra = reader.text(view.get("input"), reader.name("input"), optional=True)
    output = reader.text(view.get("output"), reader.name("output"))
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages, flags = reader.with_system(
        view, [{"role": "user", "content": user}, {"role": "assistant", "content": output}], [None, None]
    )
    return Conversation(messages, flags, learn=reader.flag(view, "") is not False)


def _prompt_completion(reader: _Reader, view: dict[str, Any]) -> Completion:
    prompt = reader.text(view.get("prompt"), reader.name("prompt"))
    completion = reader.text(view.get("completion"), reader.name("completion"))
    return Completion(prompt, completion, learn=reader.flag(view, "") is not False)


def _text(reader: _Reader, view: dict[str, Any]) -> Completion:
    return Completion("", reader.text(view.get("text"), reader.name("text")), learn=reader.flag(view, "") is not False)


_PARSERS: dict[str, Callable[[_Reader, dict[str, Any]], Example]] = {
    "messages": lambda reader, view: _messages_shape(reader, view, "messages"),
    "sharegpt": lambda reader, view: _messages_shape(reader, view, "conversations"),
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "conversational_prompt_completion": _conversational_prompt_completion,
    "text": _text,
}
