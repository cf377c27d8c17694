"""Training data: tokenise with loss masks, truncate, split off a held-out set, count what was
truncated, dropped or skipped and why, and cache by fingerprint.

The files are read by data_sources.py (splits, streaming) and checked by record_checks.py (the shape,
file:line errors, data.on_bad_record). Records go to an Arrow file, are tokenised
by `data.num_proc` processes (`datasets.map`, one `tokenize_record` per record) into Arrow again, and
every count comes from those columns: no Python list of every record or token is built."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from noesis_accel.config import DataConfig
from noesis_accel.core.errors import DataError
from noesis_accel.training import data_sources, formats, record_checks, templates
from noesis_accel.training.data_sources import is_hub_dataset  # noqa: F401  (callers import it from here)
from noesis_accel.training.record_checks import (
    MAX_LISTED_PROBLEMS,
    RawRecord,
    detect_format,  # noqa: F401  (callers import it from here)
    validate_records,  # noqa: F401  (callers import it from here)
)

IGNORE_INDEX = -100  # labels with this value take no part in the loss
_CACHE_VERSION = "4"  # bump when tokenisation, masking or the stored columns change (4: location column)


@dataclass
class SourceStats:
    """One source of records (the training split, or the held-out one) and what became of its records."""

    name: str  # as the console says it: "train split", "test split, held out", "data.eval_path, held out"
    source: str  # its files or hub split, in words
    format: str = ""
    held_out: bool = False
    records: int = 0  # read and valid
    kept: int = 0
    too_long: int = 0  # longer than data.max_length (cut, or dropped under data.on_too_long=drop)
    dropped: dict[str, int] = field(default_factory=dict)  # reason (DROP_REASONS) -> records
    where: dict[str, list[str]] = field(default_factory=dict)  # "truncated" or a reason -> the first locations
    tokens: int = 0  # in the kept records
    learned_tokens: int = 0  # of those, the ones in the loss
    lengths: dict[str, int] = field(default_factory=dict)  # min/p50/p90/p99/max tokens, before truncation
    ignored: list[str] = field(default_factory=list)  # files beside it whose names match no split
    key: str = "data.path"  # the config key that names it
    skipped: int = 0  # bad records left out (data.on_bad_record=skip); where["skipped"]: the first ones
    skipped_problem: str = ""  # the first of their problems
    without_system: int | None = None  # chat records that open without a system turn (None: not counted)
    read_as: str = ""  # the line saying the data group's format gave way to the records' own shape


@dataclass
class DataStats:
    records: int = 0  # valid records of the training split, before anything is dropped
    train_records: int = 0  # what training reads
    eval_records: int = 0
    truncated: int = 0  # training-split records cut at data.max_length (kept, or dropped when nothing learned is left)
    dropped_truncated: int = 0  # of those, dropped because no learned token survived the cut
    format: str = ""
    eval_source: str = ""  # where the held-out records came from, in words
    max_length: int = 0
    on_too_long: str = "truncate"
    sources: list[SourceStats] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataStats:
        """The stats as `asdict` wrote them (stats.json in the cache)."""
        sources = [SourceStats(**source) for source in values.get("sources", [])]
        return cls(**{**values, "sources": sources})


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels, length, label_count (and location)
    eval: Any
    stats: DataStats


# Why a record takes no part in training, as the console says it (max_length filled in).
DROP_REASONS = {
    "truncated_away": "truncation at data.max_length={max_length} left no learned token",
    "too_long": "longer than data.max_length={max_length} (data.on_too_long=drop)",
    "nothing_learned": "nothing in it is learned",
}


# ------------------------------------------------ reading and checking (data_sources.py reads, record_checks.py checks)

_WRITE_BATCH = 1_000  # records written to the Arrow file at once


def read_records(path_spec: str, split: str = "train") -> list[RawRecord]:
    """Every record of a file, a directory's split (all of it when no file names a split) or a hub split.

    Each record has the location a user can open. Holds them all: training streams them instead.
    """
    source = data_sources.source_for("data.path", path_spec, split)
    return [RawRecord(where, fields) for where, fields in data_sources.rows(source, MAX_LISTED_PROBLEMS)]


def _write_raw(source: data_sources.Source, path: Path) -> int:
    """Every record of the source to an Arrow file as (location, JSON text), unvalidated; returns how many.

    A few records in memory at a time; the worker processes that validate and tokenise them read
    the file memory-mapped.
    """
    import pyarrow as pa

    schema = pa.schema([("location", pa.string()), ("record", pa.large_string())])
    count, batch = 0, []
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for entry in data_sources.texts(source):
            batch.append(entry)
            if len(batch) == _WRITE_BATCH:
                writer.write_batch(pa.record_batch(list(map(list, zip(*batch))), schema=schema))
                count, batch = count + len(batch), []
        if batch:
            writer.write_batch(pa.record_batch(list(map(list, zip(*batch))), schema=schema))
            count += len(batch)
    return count


def _raw_checked(
    source: data_sources.Source, data_cfg: DataConfig, work: Path
) -> tuple[Any, record_checks.Checked, int]:
    """The source written to `work`/raw.arrow and checked: (its good records, what the check found, processes)."""
    import datasets

    count = _write_raw(source, work / "raw.arrow")
    processes = worker_processes(data_cfg, count)
    raw = datasets.Dataset.from_file(str(work / "raw.arrow"))
    checked = record_checks.check_raw(raw, source, data_cfg, processes, work)
    if checked.skipped.records:  # data.on_bad_record=skip: the bad ones take no further part
        raw = raw.select(checked.keep)
    return raw, checked, processes


def _checked_stats(stats: SourceStats, source: data_sources.Source, checked: record_checks.Checked) -> SourceStats:
    """`stats` with what the check said: the records skipped as bad, the data group's format given way."""
    stats.key = source.key
    stats.skipped = checked.skipped.records
    stats.skipped_problem = checked.skipped.first()
    if checked.skipped.records:
        stats.where["skipped"] = checked.skipped.places
    stats.without_system = checked.without_system
    stats.read_as = checked.shape.note(source.key) or ""
    return stats


def check_data(data_cfg: DataConfig) -> DataStats:
    """Read and validate the training split and the held-out records as training will, without a tokenizer.

    The same file:line errors as training, in seconds and before any GPU is paid for. Records are
    counted before truncation, so too few records is certain here, not merely likely. Hub datasets
    are left to training: reading one here could mean downloading all of it.
    """
    stats = DataStats(max_length=data_cfg.max_length, on_too_long=data_cfg.on_too_long)
    source = None if data_sources.is_hub_dataset(data_cfg.path) else data_sources.training_source(data_cfg)
    if source is not None:
        checked, stats.records = _count_valid(source, data_cfg)
        stats.format = checked.shape.name
        counted = SourceStats(_source_name(source, False), source.describe(), stats.format, records=stats.records)
        stats.sources.append(_checked_stats(counted, source, checked))
    held_out = None
    if not data_sources.is_hub_dataset(data_cfg.eval_path or data_cfg.path):
        held_out = data_sources.eval_source(data_cfg)
    if held_out is not None:
        stats.eval_records = min(_count_valid(held_out, data_cfg)[1], data_cfg.max_eval_examples)
    if source is None:
        return stats
    from_training = held_out is None and not data_cfg.eval_path  # data.eval_fraction of the training split
    if from_training:
        stats.eval_records = _fraction_held_out(stats.records, data_cfg)
    stats.train_records = stats.records - (stats.eval_records if from_training else 0)
    if stats.train_records < data_cfg.min_examples:
        raise DataError(
            f"data.path: only {stats.train_records} training records ({stats.records} read from "
            f"{source.describe()}, {stats.records - stats.train_records} held out); data.min_examples is "
            f"{data_cfg.min_examples}. Add data or lower data.min_examples."
        )
    return stats


def _count_valid(source: data_sources.Source, data_cfg: DataConfig) -> tuple[record_checks.Checked, int]:
    """(what the check found, valid records) of a source, every record read and checked (in a temporary directory)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="noesis-check-") as work:
        raw, checked, _ = _raw_checked(source, data_cfg, Path(work))
        count = len(raw)
        del raw  # memory-mapped from `work`
    return checked, count


def _fraction_held_out(records: int, data_cfg: DataConfig) -> int:
    """How many of `records` training records `data.eval_fraction` holds out (at most data.max_eval_examples)."""
    if not data_cfg.eval_fraction:
        return 0
    return min(math.ceil(records * data_cfg.eval_fraction), data_cfg.max_eval_examples)


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


def _spans_for_chat(
    tokenizer: Any, conversation: formats.Conversation, options: formats.Options, where: str
) -> tuple[str, list[tuple[int, int]]]:
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


def _spans_for_completion(
    tokenizer: Any, example: formats.Completion, train_on: str
) -> tuple[str, list[tuple[int, int]]]:
    """Prompt, completion and end-of-sequence as one text; the completion (all of it under `all`) is learned."""
    text = example.prompt + example.completion + (tokenizer.eos_token or "")
    start = 0 if train_on == "all" else len(example.prompt)
    return text, [(start, len(text))] if example.learn else []


def tokenize_record(
    tokenizer: Any, record: RawRecord, fmt: str, max_length: int, *, data_cfg: DataConfig | None = None
) -> tuple[list[int], list[int], bool]:
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
        raise DataError(
            "the tokenizer is a slow (Python) one; loss masks need a fast tokenizer's offsets. "
            "Use a model that ships tokenizer.json"
        )
    encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = []
    for token_id, (start, end) in zip(input_ids, encoded["offset_mapping"]):
        # Special tokens added by the tokenizer have empty offsets (0, 0): never learned.
        learn = end > start and any(lo <= start < hi for lo, hi in spans)
        labels.append(token_id if learn else IGNORE_INDEX)
    truncated = len(input_ids) > max_length
    return input_ids[:max_length], labels[:max_length], truncated


def template_notes(tokenizer: Any, data_cfg: DataConfig, prepared: DataStats | str) -> list[str]:
    """Lines for the start-up summary about how records are rendered (the template's default system prompt).

    `prepared`: the data's stats, so the note is said only when some record opens without a system
    turn; or only its format, when the note is said whatever the records hold.
    """
    fmt = prepared if isinstance(prepared, str) else prepared.format
    if formats.canonical_shape(fmt) not in formats.CHAT_SHAPES:
        return []
    counts = [] if isinstance(prepared, str) else [source.without_system for source in prepared.sources]
    lacking = None if not counts or None in counts else sum(c or 0 for c in counts)  # None: not counted
    if lacking == 0:
        return []
    note = templates.system_prompt_note(tokenizer, formats.Options.from_config(data_cfg).chat_template, lacking)
    return [note] if note else []


def label_count(labels: list[int]) -> int:
    """Tokens a record contributes to the loss: learned labels after the causal shift.

    The first position is never predicted (nothing comes before it), so it never counts.
    """
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    parts = [
        type(tokenizer).__name__,
        str(len(tokenizer)),
        str(tokenizer.chat_template or ""),
        str(tokenizer.eos_token),
        str(getattr(tokenizer, "name_or_path", "")),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _cache_key(data_cfg: DataConfig, tokenizer: Any, seed: int) -> str:
    """Everything the prepared data depends on: the files' bytes, the settings, the tokenizer, the seed."""

    def fingerprint(spec: str | None, resolve: Any) -> str:
        if not spec:
            return "-"
        if data_sources.is_hub_dataset(str(spec)):
            return str(spec)  # hub datasets: the name (and the split keys below) identify them
        return data_sources.source_fingerprint(resolve())

    parts = [
        _CACHE_VERSION,
        fingerprint(data_cfg.path, lambda: data_sources.training_source(data_cfg)),
        data_cfg.split,
        str(data_cfg.eval_split),
        data_cfg.format,
        formats.fingerprint(data_cfg),
        str(data_cfg.max_length),
        data_cfg.on_too_long,
        str(data_cfg.eval_fraction),
        str(data_cfg.max_eval_examples),
        str(seed),
        fingerprint(data_cfg.eval_path or data_cfg.path, lambda: data_sources.eval_source(data_cfg)),
        tokenizer_fingerprint(tokenizer),
    ]
    # Added keys enter the key only away from their defaults, so data prepared before they existed is reused.
    on_bad_record = data_cfg.on_bad_record
    if on_bad_record != "error":
        parts.append(f"on_bad_record={on_bad_record}")
    # A data.format the user set is kept where the data group's own gives way to the records' shape
    # (record_checks.py): the same file read under the group's may not be readable under the user's.
    declared = data_cfg.format
    if declared != "auto" and not record_checks.is_group_default(declared, data_cfg.group_format):
        parts.append("data.format kept")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def prepare(data_cfg: DataConfig, tokenizer: Any, seed: int) -> PreparedData:
    """Read, validate, tokenise and split the data, or load the cached result of the same inputs."""
    key = _cache_key(data_cfg, tokenizer, seed)
    cache = Path(os.path.expanduser(data_cfg.cache_dir)) / key
    persistent = (
        Path(os.path.expanduser(data_cfg.persistent_cache_dir)) / key if data_cfg.persistent_cache_dir else None
    )
    if persistent is not None and not (cache / "stats.json").is_file() and (persistent / "stats.json").is_file():
        _publish_copy(persistent, cache)  # an earlier machine tokenised it: copy, never map the shared one
    if not (cache / "stats.json").is_file():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _prepare_uncached(data_cfg, tokenizer, seed, tmp, key)
            os.replace(tmp, cache)
        except OSError:
            if not (cache / "stats.json").is_file():
                raise
        finally:  # a bad record or another process publishing first leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
        if persistent is not None and not (persistent / "stats.json").is_file():
            _publish_copy(cache, persistent)
    prepared = _load_prepared(cache)
    stats = prepared.stats
    if stats.train_records < data_cfg.min_examples:
        dropped = sum(sum(source.dropped.values()) for source in stats.sources[:1])
        raise DataError(
            f"data.path: only {stats.train_records} usable training records ({stats.records} read from "
            f"{stats.sources[0].source if stats.sources else data_cfg.path}, {dropped} dropped, "
            f"{stats.eval_records} held out); data.min_examples is {data_cfg.min_examples}. "
            "Add data or lower data.min_examples."
        )
    return prepared


def _load_prepared(cache: Path) -> PreparedData:
    import datasets

    stats = DataStats.from_dict(json.loads((cache / "stats.json").read_text()))
    # An empty held-out set is not saved (datasets cannot reload a table without rows).
    held_out = datasets.load_from_disk(str(cache / "eval")) if (cache / "eval").is_dir() else _empty_dataset()
    return PreparedData(datasets.load_from_disk(str(cache / "train")), held_out, stats)


def _publish_copy(source: Path, target: Path) -> None:
    """Copy a cache entry to `target` whole or not at all (tmp + rename); files are closed after."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process published the same key first
        shutil.rmtree(tmp, ignore_errors=True)


def _prepare_uncached(data_cfg: DataConfig, tokenizer: Any, seed: int, target: Path, key: str) -> None:
    """Tokenise the training split and the held-out records into `target`: train/, eval/, stats.json.

    Records go from the files to Arrow and through tokenising processes to Arrow again: no list
    of every record or token is built. The intermediate files live in `target`/work until done.
    """
    work = target / "work"
    source = data_sources.training_source(data_cfg)
    train, fmt, train_stats, keep = _tokenized(source, False, data_cfg, tokenizer, work / "train", key)
    held_out_source = data_sources.eval_source(data_cfg)
    stats = DataStats(
        records=train_stats.records,
        truncated=train_stats.too_long - train_stats.dropped.get("too_long", 0),
        dropped_truncated=train_stats.dropped.get("truncated_away", 0),
        format=fmt,
        max_length=data_cfg.max_length,
        on_too_long=data_cfg.on_too_long,
        sources=[train_stats],
    )
    if held_out_source is None:
        train_rows, eval_rows = _split_off(keep, seed, data_cfg)
        held_out = train
        fraction = f"{data_cfg.eval_fraction:g}" if data_cfg.eval_fraction else "0"
        stats.eval_source = f"data.eval_fraction={fraction} of the {source.split} split, chosen by train.seed"
    else:
        held_out, _, eval_stats, eval_keep = _tokenized(held_out_source, True, data_cfg, tokenizer, work / "eval", key)
        train_rows, eval_rows = keep, eval_keep[: data_cfg.max_eval_examples]
        stats.sources.append(eval_stats)
        stats.eval_source = (
            f"the {held_out_source.split} split ({held_out_source.describe()})"
            if held_out_source.key == "data.path"
            else f"data.eval_path ({held_out_source.describe()})"
        )
    stats.train_records, stats.eval_records = len(train_rows), len(eval_rows)
    train.select(train_rows).select_columns(list(_features())).save_to_disk(str(target / "train"))
    if len(eval_rows):
        held_out.select(eval_rows).select_columns(list(_features())).save_to_disk(str(target / "eval"))
    del train, held_out  # memory-mapped files under work/, removed next
    shutil.rmtree(work, ignore_errors=True)
    (target / "stats.json").write_text(json.dumps(asdict(stats)))


def _split_off(keep: Any, seed: int, data_cfg: DataConfig) -> tuple[Any, Any]:
    """Row numbers of the training and held-out records: data.eval_fraction of the kept ones, fixed by the seed."""
    import numpy as np

    order = list(range(len(keep)))
    random.Random(seed).shuffle(order)  # the held-out split is fixed by the seed
    held = np.zeros(len(keep), dtype=bool)
    held[order[: _fraction_held_out(len(keep), data_cfg)]] = True
    return keep[~held], keep[held]


# ---------------------------------------------------------------- tokenising a source, in parallel

_PARALLEL_FROM_RECORDS = 4_000  # below this, starting processes costs more than they save
_MAX_AUTO_PROCESSES = 8
_NO_LIMIT = 1 << 62  # max_length for measuring a record's full length
# Records per batch in a tokenising process: a batch's token lists are Python objects until written,
# and a process keeps the memory of its largest batch.
_MAP_BATCH = 100


def worker_processes(data_cfg: DataConfig, records: int) -> int:
    """Processes that validate and tokenise: `data.num_proc`, or when null one per core (at most 8), and
    one for a small dataset."""
    if data_cfg.num_proc is not None:
        return data_cfg.num_proc
    if records < _PARALLEL_FROM_RECORDS:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), _MAX_AUTO_PROCESSES))


def _tokenized(
    source: data_sources.Source, held_out: bool, data_cfg: DataConfig, tokenizer: Any, work: Path, key: str
) -> tuple[Any, str, SourceStats, Any]:
    """A source tokenised: (dataset of every record, format, its stats, row numbers of the kept records).

    The dataset has input_ids, labels, length, label_count, location and full_length (tokens before
    truncation); records that cannot train are still in it, and left out of the row numbers.
    """
    raw, checked, processes = _raw_checked(source, data_cfg, work)
    fmt = checked.shape.name
    tokenized = raw.map(
        _tokenize_batch,
        batched=True,
        batch_size=_MAP_BATCH,
        writer_batch_size=_MAP_BATCH,
        num_proc=processes if processes > 1 else None,
        remove_columns=["record"],
        fn_kwargs={
            "tokenizer": tokenizer,
            "fmt": fmt,
            "max_length": data_cfg.max_length,
            "data_cfg": data_cfg,
        },
        features=_features(with_full_length=True),
        cache_file_name=str(work / "tokenized.arrow"),
        load_from_cache_file=False,
        new_fingerprint=f"{key}-{'eval' if held_out else 'train'}",
        desc=f"tokenising {source.split} ({processes} process{'es' if processes > 1 else ''})",
    )
    stats = SourceStats(_source_name(source, held_out), source.describe(), fmt, held_out, ignored=list(source.ignored))
    stats, keep = _count_outcomes(tokenized, _checked_stats(stats, source, checked), source, data_cfg)
    return tokenized, fmt, stats, keep


def _tokenize_batch(
    batch: dict[str, list], tokenizer: Any, fmt: str, max_length: int, data_cfg: DataConfig
) -> dict[str, list]:
    """`tokenize_record` for each record of a batch (in a worker process), as columns."""
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "label_count": [], "full_length": []}
    for location, text in zip(batch["location"], batch["record"]):
        record = RawRecord(location, json.loads(text))
        input_ids, labels, truncated = tokenize_record(tokenizer, record, fmt, max_length, data_cfg=data_cfg)
        full_length = len(input_ids)
        if truncated:  # only records over max_length pay for their full length (the length report needs it)
            full_length = len(tokenize_record(tokenizer, record, fmt, _NO_LIMIT, data_cfg=data_cfg)[0])
        columns["input_ids"].append(input_ids)
        columns["labels"].append(labels)
        columns["length"].append(len(input_ids))
        columns["label_count"].append(label_count(labels))
        columns["full_length"].append(full_length)
    return columns


def _source_name(source: data_sources.Source, held_out: bool) -> str:
    name = f"{source.split} split" if source.key == "data.path" else source.key
    return f"{name}, held out" if held_out else name


def _count_outcomes(
    tokenized: Any, stats: SourceStats, source: data_sources.Source, data_cfg: DataConfig
) -> tuple[SourceStats, Any]:
    """`stats` filled in with what becomes of each record (kept, truncated, dropped and why), from the
    columns alone; and the row numbers of the records kept."""
    import numpy as np

    max_length, policy = data_cfg.max_length, data_cfg.on_too_long
    column = lambda name: np.asarray(tokenized.data.column(name).to_numpy())  # noqa: E731
    full_length, learned, length = column("full_length"), column("label_count"), column("length")
    too_long = full_length > max_length
    if policy == "error" and too_long.any():
        raise _too_long_error(tokenized, np.flatnonzero(too_long), full_length, max_length)
    dropped_long = too_long if policy == "drop" else np.zeros_like(too_long)
    nothing = (learned == 0) & ~dropped_long
    reasons = {"too_long": dropped_long, "truncated_away": nothing & too_long, "nothing_learned": nothing & ~too_long}
    keep = ~(dropped_long | nothing)
    stats.records, stats.kept, stats.too_long = len(keep), int(keep.sum()), int(too_long.sum())
    stats.tokens, stats.learned_tokens = int(length[keep].sum()), int(learned[keep].sum())
    stats.lengths = _length_summary(full_length)
    for reason, mask in [("truncated", too_long & keep), *reasons.items()]:
        if mask.any():
            stats.where[reason] = _locations(tokenized, np.flatnonzero(mask)[:_LISTED_LOCATIONS])
            if reason != "truncated":
                stats.dropped[reason] = int(mask.sum())
    if not keep.any():
        raise _nothing_left_error(stats, source, max_length)
    return stats, np.flatnonzero(keep)


_LISTED_LOCATIONS = 3  # locations named per reason on the console


def _locations(tokenized: Any, rows: Any) -> list[str]:
    import pyarrow as pa

    return tokenized.data.column("location").take(pa.array(rows, type=pa.int64())).to_pylist()


def _length_summary(full_length: Any) -> dict[str, int]:
    import numpy as np

    if not len(full_length):
        return {}
    points = {"min": 0, "p50": 50, "p90": 90, "p99": 99, "max": 100}
    return {name: int(np.percentile(full_length, q, method="nearest")) for name, q in points.items()}


def _too_long_error(tokenized: Any, rows: Any, full_length: Any, max_length: int) -> DataError:
    shown = rows[:MAX_LISTED_PROBLEMS]
    lines = [f"{where} ({int(full_length[row])} tokens)" for where, row in zip(_locations(tokenized, shown), shown)]
    more = f"\n  ... and {len(rows) - len(shown)} more" if len(rows) > len(shown) else ""
    return DataError(
        f"{len(rows)} record{'s are' if len(rows) != 1 else ' is'} longer than data.max_length={max_length} "
        f"(data.on_too_long=error):\n  " + "\n  ".join(lines) + more + "\nShorten them, raise data.max_length "
        f"(the longest is {int(full_length.max())} tokens), or set data.on_too_long=truncate or drop"
    )


def _nothing_left_error(stats: SourceStats, source: data_sources.Source, max_length: int) -> DataError:
    if stats.dropped.get("truncated_away") == stats.records:
        return DataError(
            f"{source.key}: every one of {stats.records} records was truncated away at data.max_length="
            f"{max_length} (no learned token left) in {source.describe()}; raise data.max_length"
        )
    reasons = ", ".join(f"{n} {DROP_REASONS[r].format(max_length=max_length)}" for r, n in stats.dropped.items())
    return DataError(f"{source.key}: none of the {stats.records} records of {source.describe()} can train ({reasons})")


def describe(stats: DataStats) -> list[str]:
    """The console's lines about the data: each source's counts, then every truncation and drop with where."""
    lines: list[str] = []
    ignored: set[str] = set()
    for source in stats.sources:
        if source.read_as and source.read_as not in lines:  # a directory's splits: said once for data.path
            lines.append(source.read_as)
        lines.append(
            f"data: {source.name} ({source.source}, {source.format}): {_records(source.records)} read, "
            f"{_used_as(source, stats)}; {source.tokens:,} tokens, {source.learned_tokens:,} learned"
        )
        lines += _outcome_lines(source, stats.max_length, stats.on_too_long)
        unsaid = [name for name in source.ignored if name not in ignored]
        if unsaid:
            ignored.update(unsaid)
            lines.append(f"data: not read, their names match no split: {_listed(unsaid, len(unsaid))}")
    return lines


def _used_as(source: SourceStats, stats: DataStats) -> str:
    """What the source's kept records became: train records, and held-out ones."""
    if source.held_out:
        capped = (
            f" (data.max_eval_examples={source.kept and stats.eval_records})"
            if source.kept > stats.eval_records
            else ""
        )
        return f"{stats.eval_records:,} held out{capped}"
    if stats.eval_records and not any(other.held_out for other in stats.sources):
        return f"{stats.train_records:,} train + {stats.eval_records:,} held out ({stats.eval_source})"
    return f"{stats.train_records:,} train"


def _outcome_lines(source: SourceStats, max_length: int, on_too_long: str) -> list[str]:
    """One line per outcome other than "kept whole": how many records, why, and the first ones' locations."""
    lines = []
    if source.skipped:
        shown = record_checks.places(source.where["skipped"], source.skipped)
        lines.append(
            f"data: {source.name}: {source.skipped:,} bad record{'s' if source.skipped != 1 else ''} skipped "
            f"(data.on_bad_record=skip): {shown}{': ' if source.skipped == 1 else '; the first: '}"
            f"{source.skipped_problem}"
        )
    kept_truncated = source.too_long - source.dropped.get("truncated_away", 0) - source.dropped.get("too_long", 0)
    if kept_truncated:
        lines.append(
            f"data: {source.name}: {_records(kept_truncated)} truncated at data.max_length={max_length} and "
            f"kept (data.on_too_long={on_too_long}): {_listed(source.where['truncated'], kept_truncated)}"
        )
    for reason, count in source.dropped.items():
        lines.append(
            f"data: {source.name}: {_records(count)} dropped, {DROP_REASONS[reason].format(max_length=max_length)}: "
            f"{_listed(source.where[reason], count)}"
        )
    return lines


def _records(count: int) -> str:
    return f"{count:,} record{'s' if count != 1 else ''}"


def _listed(locations: list[str], total: int) -> str:
    return ", ".join(locations) + (f" and {total - len(locations):,} more" if total > len(locations) else "")


def _features(with_full_length: bool = False) -> Any:
    import datasets

    features = {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "label_count": datasets.Value("int32"),
        "location": datasets.Value("string"),  # where the record is, for any message about it
    }
    if with_full_length:
        features["full_length"] = datasets.Value("int32")
    return datasets.Features(features)


def _empty_dataset() -> Any:
    import datasets

    features = _features()
    # Column-wise, so an empty held-out set still has its columns.
    return datasets.Dataset.from_dict({name: [] for name in features}, features=features)


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
