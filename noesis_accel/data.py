"""Training data: read JSONL/JSON/Parquet/hub datasets, validate with file:line errors, format,
tokenise with loss masks, truncate, split off a held-out set, and cache by fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig

from noesis_accel import formats, templates
from noesis_accel.errors import DataError

IGNORE_INDEX = -100  # labels with this value take no part in the loss
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_CACHE_VERSION = "3"  # bump when tokenisation, masking or the stored columns change
_MAX_LISTED_PROBLEMS = 10


@dataclass(frozen=True)
class RawRecord:
    location: str  # "file.jsonl:12" or "file.parquet: row 3": where a user finds it
    fields: Any


@dataclass
class DataStats:
    records: int = 0
    train_records: int = 0
    eval_records: int = 0
    truncated: int = 0
    dropped_truncated: int = 0
    format: str = ""


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels, length, label_count
    eval: Any
    stats: DataStats


# ---------------------------------------------------------------- reading


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _FILE_SUFFIXES)
        if not files:
            raise DataError(f"data.path: directory {path} holds no .jsonl, .json or .parquet files")
        return files
    if path.suffix not in _FILE_SUFFIXES:
        raise DataError(f"data.path: {path} is not a .jsonl, .json or .parquet file")
    return [path]


def _read_text_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM is not part of line 1
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte {err.start}: {err.reason}); save the file as UTF-8") from None


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    for number, line in enumerate(_read_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            yield RawRecord(f"{path}:{number}", json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno}); "
                "each line must be one complete JSON object"
            ) from None


def _read_json(path: Path) -> Iterator[RawRecord]:
    text = "\n".join(_read_text_lines(path))
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        # Many ".json" training files are really JSON Lines.
        yield from _read_jsonl(path)
        return
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(f"{path}: expected a JSON array of records (or JSON Lines), found {type(payload).__name__}")
    for index, record in enumerate(payload):
        yield RawRecord(f"{path}: record {index}", record)


def _read_table(rows: Any, name: str) -> Iterator[RawRecord]:
    for index, row in enumerate(rows):
        yield RawRecord(f"{name}: row {index}", dict(row))


def is_hub_dataset(path_spec: str) -> bool:
    """A hub dataset's name rather than a path: nothing by that name here, and it does not look like a file."""
    path = Path(os.path.expanduser(path_spec))
    looks_local = path_spec.startswith((".", "/", "~")) or path.suffix in _FILE_SUFFIXES
    return not path.exists() and not looks_local


def read_records(path_spec: str, split: str = "train") -> list[RawRecord]:
    """Every record of a file, directory or hub dataset, each with the location a user can open."""
    path = Path(os.path.expanduser(path_spec))
    if path.exists():
        records: list[RawRecord] = []
        for file in _data_files(path):
            if file.suffix == ".jsonl":
                records.extend(_read_jsonl(file))
            elif file.suffix == ".json":
                records.extend(_read_json(file))
            else:
                import pyarrow.parquet as pq

                records.extend(_read_table(pq.read_table(file).to_pylist(), str(file)))
        return records
    if not is_hub_dataset(path_spec):
        raise DataError(f"data.path: {path_spec} does not exist; point data.path at a .jsonl, .json or .parquet file")
    import datasets

    try:
        rows = datasets.load_dataset(path_spec, split=split)
    except Exception as err:  # the hub raises many types; all mean "cannot read this name"
        raise DataError(
            f"data.path: '{path_spec}' is neither a local file nor a loadable hub dataset "
            f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    return list(_read_table(rows, f"{path_spec}[{split}]"))


# ---------------------------------------------------------------- validation


def detect_format(record: RawRecord, declared: str, options: formats.Options | None = None) -> str:
    """The record's shape (see formats.py): `declared` unless it is auto, else what its fields say."""
    fields = record.fields
    if not isinstance(fields, dict):
        raise DataError(f"{record.location}: a record must be a JSON object, found {type(fields).__name__}")
    if declared != "auto":
        return formats.canonical_shape(declared)
    shape = formats.detect_shape(fields, options or formats.Options.from_config())
    if shape is None:
        raise formats.unknown_shape(fields, record.location)
    return shape


def record_problems(record: RawRecord, fmt: str, options: formats.Options | None = None) -> list[str]:
    """Everything wrong with one record, each naming its field and the fix."""
    return formats.parse(record.fields, fmt, options or formats.Options.from_config(), record.location)[1]


def _with_shape_hint(problems: list[str], record: RawRecord, fmt: str, declared: str,
                     options: formats.Options) -> list[str]:
    """`problems`, the first one saying which shape the record has when data.format names another."""
    looks = formats.detect_shape(record.fields, options) if declared != "auto" and problems else None
    if looks is None or looks == fmt:
        return problems
    return [f"{problems[0]} (the record looks like {looks}: set data.format=auto or data.format={looks})",
            *problems[1:]]


def validate_records(records: list[RawRecord], declared_format: str, data_cfg: Any = None) -> str:
    """Check every record; raise one DataError listing the first problems. Returns the shape.

    `data_cfg` (the `data` config) gives the mapping (data.columns, data.roles, ...); without it
    the defaults apply.
    """
    if not records:
        raise DataError("data.path: no records found; the file is empty")
    options = formats.Options.from_config(data_cfg)
    if options.problems():
        raise DataError("; ".join(options.problems()))
    fmt = detect_format(records[0], declared_format, options)
    problems: list[str] = []
    for record in records:
        record_fmt = detect_format(record, declared_format, options)
        if record_fmt != fmt:
            problems.append(f"{record.location}: record is {record_fmt} but the first record is {fmt}; use one shape per file")
            continue
        found = record_problems(record, fmt, options)
        problems.extend(_with_shape_hint(found, record, fmt, declared_format, options))
    if problems:
        shown = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - _MAX_LISTED_PROBLEMS} more" if len(problems) > _MAX_LISTED_PROBLEMS else ""
        raise DataError(f"{len(problems)} bad record(s) in the training data:\n  {shown}{more}")
    return fmt


def check_data(data_cfg: Any) -> DataStats:
    """Read and validate `data.path` (and `data.eval_path`) as training will, without a tokenizer.

    The same file:line errors as training, in seconds and before any GPU is paid for. The held-out
    split is counted before truncation, so too few records is certain here, not merely likely. Hub
    datasets are left to training: reading one here could mean downloading all of it.
    """
    stats = DataStats()
    if data_cfg.eval_path and not is_hub_dataset(data_cfg.eval_path):
        validate_records(read_records(data_cfg.eval_path, data_cfg.split), data_cfg.format)
    if is_hub_dataset(data_cfg.path):
        return stats
    records = read_records(data_cfg.path, data_cfg.split)
    stats.format, stats.records = validate_records(records, data_cfg.format), len(records)
    if not data_cfg.eval_path and data_cfg.eval_fraction:
        stats.eval_records = min(math.ceil(len(records) * data_cfg.eval_fraction), data_cfg.max_eval_examples)
    stats.train_records = len(records) - stats.eval_records
    if stats.train_records < data_cfg.min_examples:
        raise DataError(
            f"data.path: only {stats.train_records} training records ({stats.records} read, {stats.eval_records} "
            f"held out); data.min_examples is {data_cfg.min_examples}. Add data or lower data.min_examples."
        )
    return stats


# ---------------------------------------------------------------- tokenisation and masking


def _learned_messages(conversation: formats.Conversation, train_on: str) -> list[bool]:
    """Which messages are learned: data.train_on picks the turns, a message's own flag wins over it.

    `assistant`: every assistant turn after the prompt (a conversational prompt-completion's prompt
    is never learned); `last_assistant`: only the final one; `all`: every message. A record whose
    own flag is off learns nothing.
    """
    messages = conversation.messages
    if not conversation.learn:
        return [False] * len(messages)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= conversation.prompt_turns]
    chosen = {"all": set(range(len(messages))), "last_assistant": set(answers[-1:])}.get(train_on, set(answers))
    return [i in chosen if flag is None else flag for i, flag in enumerate(conversation.flags)]


def _spans_for_chat(tokenizer: Any, conversation: formats.Conversation, options: formats.Options,
                    where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans to learn.

    The template renders turn by turn (templates.py): an assistant turn's span runs from the end of
    the rendered prefix with a generation prompt to the end of the rendering that includes the turn,
    so the end-of-turn token is learned too. Under data.train_on=all the text between turns (system
    prompt, user turns, headers) is learned as well.
    """
    template = templates.resolve(tokenizer, options.chat_template, conversation.tools)
    learned = _learned_messages(conversation, options.train_on)
    learn_context = options.train_on == "all" and conversation.learn
    text, spans = "", []
    for turn in templates.render_turns(tokenizer, template, conversation.messages, conversation.tools, where):
        if turn.text and (learned[turn.message] if turn.message is not None else learn_context):
            spans.append((len(text), len(text) + len(turn.text)))
        text += turn.text
    return text, spans


def _spans_for_completion(tokenizer: Any, example: formats.Completion,
                          train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """Prompt, completion and end-of-sequence as one text; the completion (all of it under `all`) is learned."""
    text = example.prompt + example.completion + (tokenizer.eos_token or "")
    start = 0 if train_on == "all" else len(example.prompt)
    return text, [(start, len(text))] if example.learn else []


def tokenize_record(tokenizer: Any, record: RawRecord, fmt: str, max_length: int, *,
                    data_cfg: Any = None) -> tuple[list[int], list[int], bool]:
    """Token ids and labels (IGNORE_INDEX where nothing is learned); truncated or not.

    Args:
        tokenizer: a fast tokenizer (loss masks come from its character offsets).
        record: one record as read, in the shape `fmt` (a name from formats.SHAPES, or `chat`).
        max_length: longer records are cut to this many tokens.
        data_cfg: the `data` config: its mapping, data.train_on and data.chat_template decide what
            the record means and what of it is learned; without it their defaults apply.
    """
    options = formats.Options.from_config(data_cfg)
    example = formats.to_example(record.fields, fmt, options, record.location)
    if isinstance(example, formats.Conversation):
        text, spans = _spans_for_chat(tokenizer, example, options, record.location)
        add_special = False  # the template already placed its special tokens
    else:
        text, spans = _spans_for_completion(tokenizer, example, options.train_on)
        add_special = True
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the tokenizer is a slow (Python) one; loss masks need a fast tokenizer's offsets. "
                        "Use a model that ships tokenizer.json")
    encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = []
    for token_id, (start, end) in zip(input_ids, encoded["offset_mapping"]):
        # Special tokens added by the tokenizer have empty offsets (0, 0): never learned.
        learn = end > start and any(lo <= start < hi for lo, hi in spans)
        labels.append(token_id if learn else IGNORE_INDEX)
    truncated = len(input_ids) > max_length
    return input_ids[:max_length], labels[:max_length], truncated


def template_notes(tokenizer: Any, data_cfg: Any, fmt: str) -> list[str]:
    """Lines for the start-up summary about how records are rendered (the template's default system prompt)."""
    if formats.canonical_shape(fmt) not in formats.CHAT_SHAPES:
        return []
    note = templates.system_prompt_note(tokenizer, formats.Options.from_config(data_cfg).chat_template)
    return [note] if note else []


def label_count(labels: list[int]) -> int:
    """Tokens a record contributes to the loss: learned labels after the causal shift.

    The first position is never predicted (nothing comes before it), so it never counts.
    """
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    parts = [type(tokenizer).__name__, str(len(tokenizer)), str(tokenizer.chat_template or ""),
             str(tokenizer.eos_token), str(getattr(tokenizer, "name_or_path", ""))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _source_fingerprint(path_spec: str) -> str:
    path = Path(os.path.expanduser(path_spec))
    digest = hashlib.sha256()
    if path.exists():
        for file in _data_files(path):
            digest.update(str(file.resolve()).encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    else:
        digest.update(path_spec.encode())  # hub datasets: the name (and split) identify them
    return digest.hexdigest()[:16]


def _tokenize_all(tokenizer: Any, records: list[RawRecord], fmt: str, max_length: int) -> tuple[list[dict], int, int]:
    rows, truncated, dropped = [], 0, 0
    for record in records:
        input_ids, labels, was_truncated = tokenize_record(tokenizer, record, fmt, max_length)
        truncated += was_truncated
        learned = label_count(labels)
        if learned == 0:
            dropped += 1  # truncation cut off every learned token: nothing left to train on
            continue
        rows.append({"input_ids": input_ids, "labels": labels, "length": len(input_ids), "label_count": learned})
    return rows, truncated, dropped


def prepare(data_cfg: DictConfig, tokenizer: Any, seed: int) -> PreparedData:
    """Read, validate, tokenise and split the data, or load the cached result of the same inputs."""
    import datasets

    key_parts = [
        _CACHE_VERSION, _source_fingerprint(data_cfg.path), data_cfg.split, data_cfg.format,
        str(data_cfg.max_length), str(data_cfg.eval_fraction), str(data_cfg.max_eval_examples), str(seed),
        _source_fingerprint(data_cfg.eval_path) if data_cfg.eval_path else "-", tokenizer_fingerprint(tokenizer),
    ]
    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:20]
    cache = Path(os.path.expanduser(data_cfg.cache_dir)) / key
    persistent = Path(os.path.expanduser(data_cfg.persistent_cache_dir)) / key if data_cfg.persistent_cache_dir else None
    if persistent is not None and not (cache / "stats.json").is_file() and (persistent / "stats.json").is_file():
        _publish_copy(persistent, cache)  # an earlier machine tokenised it: copy, never map the shared one
    if (cache / "stats.json").is_file():
        stats = DataStats(**json.loads((cache / "stats.json").read_text()))
        # An empty held-out set is not saved (datasets cannot reload a table without rows).
        held_out = datasets.load_from_disk(str(cache / "eval")) if (cache / "eval").is_dir() else _empty_dataset()
        prepared = PreparedData(datasets.load_from_disk(str(cache / "train")), held_out, stats)
    else:
        prepared = _prepare_uncached(data_cfg, tokenizer, seed)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        prepared.train.save_to_disk(str(tmp / "train"))
        if len(prepared.eval):
            prepared.eval.save_to_disk(str(tmp / "eval"))
        (tmp / "stats.json").write_text(json.dumps(asdict(prepared.stats)))
        try:
            os.replace(tmp, cache)
        except OSError:  # another process published the same key first
            shutil.rmtree(tmp, ignore_errors=True)
        if persistent is not None and not (persistent / "stats.json").is_file():
            _publish_copy(cache, persistent)
    if prepared.stats.train_records < data_cfg.min_examples:
        raise DataError(
            f"data.path: only {prepared.stats.train_records} usable training records "
            f"({prepared.stats.records} read, {prepared.stats.dropped_truncated} truncated away, "
            f"{prepared.stats.eval_records} held out); data.min_examples is {data_cfg.min_examples}. "
            "Add data or lower data.min_examples."
        )
    return prepared


def _publish_copy(source: Path, target: Path) -> None:
    """Copy a cache entry to `target` whole or not at all (tmp + rename); files are closed after."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process published the same key first
        shutil.rmtree(tmp, ignore_errors=True)


def _prepare_uncached(data_cfg: DictConfig, tokenizer: Any, seed: int) -> PreparedData:
    records = read_records(data_cfg.path, data_cfg.split)
    fmt = validate_records(records, data_cfg.format)
    rows, truncated, dropped = _tokenize_all(tokenizer, records, fmt, data_cfg.max_length)
    if not rows:
        raise DataError(
            f"data.path: every one of {len(records)} records was truncated away at data.max_length="
            f"{data_cfg.max_length} (no assistant/completion token left); raise data.max_length"
        )
    if data_cfg.eval_path:
        eval_records = read_records(data_cfg.eval_path, data_cfg.split)
        eval_fmt = validate_records(eval_records, data_cfg.format)
        eval_rows, _, _ = _tokenize_all(tokenizer, eval_records, eval_fmt, data_cfg.max_length)
        train_rows = rows
    else:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)  # the held-out split is fixed by the seed
        n_eval = min(math.ceil(len(rows) * data_cfg.eval_fraction), data_cfg.max_eval_examples) if data_cfg.eval_fraction else 0
        held_out = set(order[:n_eval])
        eval_rows = [rows[i] for i in sorted(held_out)]
        train_rows = [row for i, row in enumerate(rows) if i not in held_out]
    eval_rows = eval_rows[: data_cfg.max_eval_examples]
    stats = DataStats(
        records=len(records), train_records=len(train_rows), eval_records=len(eval_rows),
        truncated=truncated, dropped_truncated=dropped, format=fmt,
    )
    return PreparedData(_to_dataset(train_rows), _to_dataset(eval_rows), stats)


def _features() -> Any:
    import datasets

    return datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "label_count": datasets.Value("int32"),
    })


def _to_dataset(rows: list[dict]) -> Any:
    import datasets

    features = _features()
    # Column-wise, so an empty held-out set still has its columns.
    return datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)


def _empty_dataset() -> Any:
    return _to_dataset([])


# ---------------------------------------------------------------- batching


class PaddingCollator:
    """Pads a micro-batch to its longest record (optionally to a multiple) and reports real tokens."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
