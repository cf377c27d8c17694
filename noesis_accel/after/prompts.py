"""The evaluation prompt file: JSONL, one `{"prompt", "expected"?, "tags"?}` object per line.

Read with file:line errors."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noesis_accel.core.errors import DataError

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
