"""Chat templates: which one renders conversations (`data.chat_template`), rendering a conversation
turn by turn so each assistant turn is trained as the template writes it, and the default system
prompt a template slips into records without one.

Turn by turn: the text of assistant turn k is what the template renders for the conversation
through turn k (the turn as it is written when it is the last one, as in generation) after its
rendering of the turns before k with a generation prompt. Between two assistant turns comes the
text the template adds for the messages in between. A template that rewrites earlier turns once
later ones follow (Qwen3 drops the `<think>` block of earlier assistant turns) therefore still
trains every turn with its reasoning; where the template keeps earlier turns as they were, this is
exactly the template's rendering of the whole conversation.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noesis_accel.core.errors import DataError

_TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".tmpl", ".txt")
_PROBE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]
_PROBE_SYSTEM = "<<system prompt probe>>"


@dataclass(frozen=True)
class Turn:
    """A piece of a rendered conversation: an assistant message's own text, or the text around them."""

    text: str
    message: int | None  # the index of the assistant message this text is; None: everything else


# ---------------------------------------------------------------- which template


def template_names(tokenizer: Any) -> list[str]:
    """The names of the templates a tokenizer ships ("default" for a tokenizer with a single one)."""
    shipped = getattr(tokenizer, "chat_template", None)
    if isinstance(shipped, dict):
        return sorted(shipped)
    return ["default"] if shipped else []


def _template_file(spec: str) -> Path | None:
    """The file `spec` names, or None when it is a template name."""
    path = Path(os.path.expanduser(spec))
    looks_like_path = spec.endswith(_TEMPLATE_SUFFIXES) or "/" in spec or spec.startswith("~") or os.sep in spec
    return path if path.is_file() or looks_like_path else None


@functools.lru_cache(maxsize=8)
def _read_template(path: str, modified_ns: int) -> str:  # the mtime makes an edited file a new key
    return Path(path).read_text(encoding="utf-8")


def resolve(tokenizer: Any, spec: str | None, tools: list[dict[str, Any]] | None = None) -> str:
    """The Jinja source that renders conversations: a file's, one the tokenizer ships by name, or its own.

    Args:
        tokenizer: the run's tokenizer.
        spec: `data.chat_template`: None, a template name, or a path to a Jinja file.
        tools: the record's tool definitions (a tokenizer with a `tool_use` template picks it for them).
    """
    names = template_names(tokenizer)
    ships = f"the tokenizer ships: {', '.join(names)}" if names else "the tokenizer ships none"
    if spec is None:
        try:
            return tokenizer.get_chat_template(None, tools)
        except ValueError:  # no template at all, or several and none called "default"
            raise DataError(
                f"data.chat_template: chat-shaped records need a chat template and none is chosen ({ships}); "
                "set data.chat_template to a template name or a Jinja file, or use prompt/completion records"
            ) from None
    path = _template_file(spec)
    if path is not None:
        if not path.is_file():
            raise DataError(
                f"data.chat_template: {path} does not exist; give a Jinja file, a template name "
                f"({ships}), or null for the tokenizer's own"
            )
        return _read_template(str(path.resolve()), path.stat().st_mtime_ns)
    if spec not in names:
        raise DataError(
            f"data.chat_template: no template named '{spec}' ({ships}); give one of those, "
            "a path to a Jinja file, or null for the tokenizer's own"
        )
    shipped = tokenizer.chat_template
    return shipped[spec] if isinstance(shipped, dict) else shipped


def template_fingerprint(spec: str | None) -> str:
    """What identifies `data.chat_template` for the data cache: a file by its contents, a name by itself."""
    if spec is None:
        return "tokenizer"
    path = _template_file(spec)
    if path is None or not path.is_file():
        return f"name:{spec}"  # a missing file is refused before anything is cached
    return "file:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------- rendering


def render(
    tokenizer: Any,
    template: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    where: str,
    generation_prompt: bool = False,
) -> str:
    """The template's text for `messages`; a DataError naming the record when the template fails on it."""
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # Jinja raises many types (TypeError on a missing field, TemplateError, ...)
        reason = (str(err).splitlines() or [""])[0]
        raise DataError(
            f"{where}: the chat template cannot render this conversation ({type(err).__name__}: "
            f"{reason}); set data.chat_template to one that can (a name the tokenizer ships "
            "or a Jinja file)"
        ) from None


def render_turns(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, where: str
) -> list[Turn]:
    """The conversation as consecutive pieces: each assistant turn's text and the text around it.

    See the module docstring for what the text of each turn is. The pieces joined are the
    template's rendering of the whole conversation whenever the template renders turns in order.
    """
    turns: list[Turn] = []
    earlier = ""  # the rendering the pieces so far end with
    assistants = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    for k in assistants:
        prompt = render(tokenizer, template, messages[:k], tools, where, generation_prompt=True) if k else ""
        through = render(tokenizer, template, messages[: k + 1], tools, where)
        if not through.startswith(prompt):
            raise DataError(
                f"{where}: the chat template's generation prompt for messages[{k}] is not how it "
                "renders the assistant turn itself, so the turn cannot be told from its prompt; "
                "set data.chat_template to a template whose generation prompt starts the turn; "
                + first_difference(("generation prompt", prompt), ("assistant turn", through))
            )
        turns.append(Turn(prompt[_end_of(earlier, prompt, k, where) :], None))
        turns.append(Turn(through[len(prompt) :], k))
        earlier = through
    if not assistants or assistants[-1] < len(messages) - 1:
        full = render(tokenizer, template, messages, tools, where)
        turns.append(Turn(full[_end_of(earlier, full, len(messages), where) :], None))
    _check_tools_rendered(turns, messages, tools, where)
    return turns


def _end_of(earlier: str, later: str, turn: int, where: str) -> int:
    """Where the text of `earlier` (a rendering through some turn) ends inside `later` (a longer one).

    Where the template keeps earlier turns as they were, `earlier` is a prefix of `later`. Where it
    rewrites them, the end is where the ending of `earlier` reappears in `later` (matched by
    difflib after their common prefix).
    """
    if later.startswith(earlier):
        return len(earlier)
    common = len(os.path.commonprefix([earlier, later]))
    tail, rest = earlier[common:], later[common:]
    for block in difflib.SequenceMatcher(None, tail, rest, autojunk=False).get_matching_blocks():
        if block.size and block.a + block.size == len(tail):
            return common + block.b + block.size
    raise DataError(
        f"{where}: the chat template rewrites the end of an earlier turn once messages[{turn}] "
        "follows, so the turns cannot be told apart; set data.chat_template to a template "
        "that keeps each turn's ending; " + first_difference(("before", earlier), (f"with messages[{turn}]", later))
    )


_CONTEXT = 30  # characters shown on each side of the first difference


def _escaped(text: str) -> str:
    """`text` as repr writes it, without the quotes, so whitespace and control characters show; escaped
    character by character, so a piece's escaping never depends on what surrounds it (the ^ lines up)."""
    return "".join(repr(char)[1:-1] for char in text)


def first_difference(first: tuple[str, str], second: tuple[str, str]) -> str:
    """Two labelled renderings one above the other, around their first differing character, marked with ^.

    A window of `_CONTEXT` characters on each side, escaped (a space, a tab and a newline look different);
    `…` where a rendering is cut.
    """
    (label_a, a), (label_b, b) = first, second
    at = len(os.path.commonprefix([a, b]))
    start = max(0, at - _CONTEXT)
    width = max(len(label_a), len(label_b)) + 1

    def shown(label: str, text: str) -> tuple[str, int]:
        head = ("…" if start else "") + _escaped(text[start:at])
        tail = _escaped(text[at : at + _CONTEXT]) + ("…" if len(text) > at + _CONTEXT else "")
        prefix = f"  {label + ':':<{width}} '"
        return f"{prefix}{head}{tail}'", len(prefix) + len(head)

    line_a, column = shown(label_a, a)
    line_b, _ = shown(label_b, b)
    return f"they first differ at character {at + 1}:\n{line_a}\n{line_b}\n{' ' * column}^"


def _check_tools_rendered(
    turns: list[Turn], messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, where: str
) -> None:
    """Refuse a template that drops tool calls, tool results or tool definitions without a word."""
    text = "".join(turn.text for turn in turns)
    own_text = {turn.message: turn.text for turn in turns if turn.message is not None}
    for i, message in enumerate(messages):
        names = [call["function"]["name"] for call in message.get("tool_calls", [])]
        missing = [name for name in names if name not in own_text.get(i, "")]
        if missing:
            _tools_not_rendered(where, f"the tool call {missing[0]!r} of messages[{i}]")
        if message["role"] == "tool" and message["content"] not in text:
            _tools_not_rendered(where, f"the tool result in messages[{i}]")
    for tool in tools or []:
        function = tool.get("function")
        name = (function if isinstance(function, dict) else tool).get("name")
        if isinstance(name, str) and name not in text:
            _tools_not_rendered(where, f"the definition of tool {name!r}")


def _tools_not_rendered(where: str, what: str) -> None:
    raise DataError(
        f"{where}: the chat template does not render {what}, so training would silently leave it out; "
        "set data.chat_template to a template that renders tools (a name the tokenizer ships, "
        "e.g. tool_use, or a Jinja file)"
    )


# ---------------------------------------------------------------- the template's default system prompt


def default_system_prompt(tokenizer: Any, template: str) -> str | None:
    """The system prompt the template adds to a conversation without one, or None when it adds none.

    Found by rendering one exchange without a system turn and with a probe system turn: the text
    the template puts where the probe's stands is its default.
    """
    without = render(tokenizer, template, _PROBE, None, "probe")
    probed = render(tokenizer, template, [{"role": "system", "content": _PROBE_SYSTEM}, *_PROBE], None, "probe")
    prefix = len(os.path.commonprefix([without, probed]))
    suffix = len(os.path.commonprefix([without[prefix:][::-1], probed[prefix:][::-1]]))
    added = without[prefix : len(without) - suffix].strip()
    return added or None


def system_prompt_note(tokenizer: Any, spec: str | None, lacking: int | None = None) -> str | None:
    """The start-up line that names the template's default system prompt; None when it has none.

    `lacking`: how many records open without a system turn, said in the line (None: not counted).
    """
    try:
        default = default_system_prompt(tokenizer, resolve(tokenizer, spec))
    except DataError:  # a template that refuses the probe (no system role, say) adds none we can name
        return None
    if default is None:
        return None
    here = f" ({lacking:,} here)" if lacking is not None else ""
    return (
        f'data: the chat template adds a default system prompt to records without one{here}: "{default}"; '
        "add a system turn to your records or set data.chat_template to change it"
    )
