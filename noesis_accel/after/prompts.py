"""What an evaluation asks: the prompt file (JSONL, one `{"prompt", "expected"?, "tags"?}` object per line,
read with file:line errors), or the run's held-out records when the only file at hand is the demo's."""

from __future__ import annotations

import filecmp
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noesis_accel.config import DataConfig
from noesis_accel.core.errors import DataError

_ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_PROMPTS = _ASSETS / "noesis_eval_prompts.jsonl"  # eval.prompts' default: asks the demo model its name
DEMO_DATA = _ASSETS / "noesis_sample.jsonl"  # conf/data/sample.yaml: the data those prompts were written for
_OWN_FILE = "eval.prompts=FILE.jsonl"

_SHAPE = 'each line must be one JSON object: {"prompt": "...", "expected": "..." (optional), "tags": [...] (optional)}'


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    expected: Any = None  # a string, a list of acceptable strings, or None
    tags: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)  # the whole line, handed to the judge
    location: str = ""  # "file.jsonl:12"


def read_prompts(path_spec: str) -> list[PromptRecord]:
    """Every prompt of the file, or a DataError naming the file, line and field of the first bad one."""
    path = Path(os.path.expanduser(str(path_spec)))
    if not path.is_file():
        raise DataError(f"eval.prompts: {path} does not exist; point eval.prompts at a JSONL file ({_SHAPE})")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte {err.start}: {err.reason}); save the file as UTF-8") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno}); {_SHAPE}") from None
        records.append(_record(fields, where))
    if not records:
        raise DataError(f"{path}: no prompts in the file; {_SHAPE}")
    return records


def _record(fields: Any, where: str) -> PromptRecord:
    if not isinstance(fields, dict):
        raise DataError(f"{where}: a line must be a JSON object, found {type(fields).__name__}; {_SHAPE}")
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt' must be a non-empty string; {_SHAPE}")
    expected = fields.get("expected")
    valid_list = isinstance(expected, list) and expected and all(isinstance(e, str) for e in expected)
    if expected is not None and not isinstance(expected, str) and not valid_list:
        raise DataError(
            f"{where}: field 'expected' must be a string or a non-empty list of strings, "
            f"found {type(expected).__name__}"
        )
    tags = fields.get("tags", [])
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DataError(f"{where}: field 'tags' must be a list of strings (or one string)")
    return PromptRecord(prompt=prompt, expected=expected, tags=list(tags), record=fields, location=where)


# ---------------------------------------------------------------- which prompts a run is asked


@dataclass(frozen=True)
class EvalPrompts:
    """The prompts of one evaluation and where they came from, in words (the header and summary say it)."""

    records: list[PromptRecord]
    source: str  # "11 from /path/prompts.jsonl", "6 held-out records of data.path (/data/geo.jsonl) ...", ...
    file: str | None = None  # the prompt file, when they came from one
    warning: str | None = None  # one line: why nothing is asked where something was expected


def _same_file(path_spec: str, reference: Path) -> bool:
    """`path_spec` is `reference` or a copy of it (a run dir carried to another machine keeps its copies)."""
    path = Path(os.path.expanduser(path_spec))
    if not path.is_file():
        return False
    return path.resolve() == reference.resolve() or filecmp.cmp(path, reference, shallow=False)


def asks_heldout(prompts_spec: str | None, data_path: str) -> bool:
    """True when `eval.prompts` is the demo's prompt file but the run trained on other data.

    The demo's prompts ask the demo model its name and maker: on anyone else's data they score 0 and
    say nothing about the model. We ask the run's held-out records instead (their prompt turns, the
    reference answers expected) rather than only warning: they are the user's own questions with
    known answers, judged as the file's would be; only a run with no held-out record to ask gets the
    one-line warning (`from_heldout`). The file is told apart by what it is, not by whether it was
    typed: configs reach worker processes and Modal resolved, where a default and an explicit value
    look the same, and `eval.prompts=null` already means "no prompts".
    """
    return bool(prompts_spec) and _same_file(str(prompts_spec), DEMO_PROMPTS) and not _same_file(data_path, DEMO_DATA)


def from_file(prompts_spec: str | None) -> EvalPrompts:
    """The prompts of the file `eval.prompts` names; none for `eval.prompts=null`."""
    if not prompts_spec:
        return EvalPrompts([], "none (eval.prompts=null)")
    records = read_prompts(str(prompts_spec))
    return EvalPrompts(records, f"{len(records)} from {prompts_spec}", file=str(prompts_spec))


def from_heldout(data_cfg: DataConfig, locations: list[str]) -> EvalPrompts:
    """The held-out records at `locations` (in that order) as prompts: the user turn a record's final
    answer replies to, that answer expected, the whole record handed to the judge.

    `generate.reply` asks one user turn, so earlier turns of a multi-turn record are not part of the
    prompt. A record with no user turn before its answer (the `text` shape) is not asked.
    """
    from noesis_accel.training import data_sources

    held_out = data_sources.eval_source(data_cfg) or data_sources.training_source(data_cfg)
    where = f"{held_out.key} ({held_out.describe()})"
    wanted = {location: i for i, location in enumerate(locations)}
    found: dict[int, PromptRecord] = {}
    for location, text, fields in data_sources.entries(held_out) if wanted else ():
        if location not in wanted:
            continue
        record = _heldout_record(json.loads(text) if text is not None else fields, location, data_cfg)
        if record is not None:
            found[wanted[location]] = record
        if len(found) == len(wanted):
            break
    records = [found[i] for i in sorted(found)]
    if not records:
        why = "holds out no records" if not locations else "holds out no record with a prompt turn"
        return EvalPrompts(
            [],
            "none",
            warning=(
                f"no answers judged: the demo's prompt file (eval.prompts' default) asks about the demo's data, "
                f"not {data_cfg.path}, and this run {why} to ask instead; to ask your own: {_OWN_FILE}, "
                'one {"prompt": ..., "expected": ...} per line'
            ),
        )
    left_out = len(locations) - len(records)
    skipped = f", {left_out} without a prompt turn left out" if left_out else ""
    return EvalPrompts(
        records,
        f"{len(records)} held-out records of {where}, each user turn asked and its reference answer expected"
        f"{skipped} (the demo's prompt file fits only the demo's data; to ask your own: {_OWN_FILE})",
    )


def _heldout_record(fields: Any, location: str, data_cfg: DataConfig) -> PromptRecord | None:
    """One held-out record as a prompt and its expected answer, or None when it has no prompt turn."""
    from noesis_accel.training import formats

    options = formats.Options.from_config(data_cfg)
    example, _ = formats.parse(fields, data_cfg.format, options, location)  # "auto" detects the shape
    if example is None and isinstance(fields, dict):
        # data.format may name the shape of a data group's own file rather than of data.path: read the
        # record as its fields say, as training can. One that is still unreadable is not asked.
        example, _ = formats.parse(fields, "auto", options, location)
    if isinstance(example, formats.Completion):
        prompt, expected = example.prompt, example.completion
    elif isinstance(example, formats.Conversation):
        prompt, expected = _last_exchange(example.messages)
    else:
        return None
    if not prompt.strip() or not expected.strip():
        return None
    return PromptRecord(prompt=prompt, expected=expected, record=dict(fields), location=location)


def _last_exchange(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """(the user turn, the assistant's answer to it) of the record's last answer; ("", "") if it has none."""
    answer = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "assistant"), None)
    if answer is None:
        return "", ""
    user = next((m for m in reversed(messages[:answer]) if m.get("role") == "user"), None)
    if user is None:
        return "", ""
    return str(user.get("content") or ""), str(messages[answer].get("content") or "")
