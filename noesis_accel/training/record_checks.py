"""Checking records before tokenisation: the shape a source is read as, every bad record (found in
parallel batches), identical problems said once with a count and where, and `data.on_bad_record`.

The shape rule: `data.format=auto` reads each file as the shape its first record has (the first one
with a recognisable shape; records of no shape are bad, not deciding). A data group fixes `format`
to its own file's shape and says so in `data.group_format`; while `data.format` is that value, a
data.path whose first record has another shape is read as that shape, with one line saying so,
since the group's format describes its file, not the user's. Any other `data.format` is the user's
and is kept: records that do not fit it are errors, each naming the shape it looks like. Either
way a file has one shape: a record of another shape is bad.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noesis_accel.config import DataConfig
from noesis_accel.core.errors import DataError
from noesis_accel.training import data_sources, formats

MAX_LISTED_PROBLEMS = 10  # kinds of problem listed in one error
_PLACES_PER_PROBLEM = 3  # locations named for a problem that several records share
# Records checked at once (each worker's batches): a batch's parsed records are all a process holds.
_VALIDATION_BATCH = 5_000
_READ_BATCH = 1_000  # records read at once while looking for the first record with a shape


@dataclass(frozen=True)
class RawRecord:
    location: str  # "file.jsonl:12" or "file.parquet: row 3": where a user finds it
    fields: Any


@dataclass(frozen=True)
class Shape:
    """The shape a source's records are read as (see the module docstring for the rule)."""

    name: str  # a name from formats.SHAPES; "" when no record has a shape (every record is then bad)
    declared: str  # data.format as given
    own: bool  # each record's own shape counts: data.format=auto, or the data group's format
    group_format: str = ""  # the data group's format the records did not have ("": none was overridden)

    def note(self, key: str) -> str | None:
        """The line that says the data group's format gave way to the records' own shape (None when it did not)."""
        if not self.group_format:
            return None
        return (
            f"data: {key} holds {self.name} records, not the data group's {self.group_format} (its data.format); "
            f"reading them as {self.name} (set data.format={self.name} or data=jsonl to say so)"
        )


def is_group_default(declared: str, group_format: str | None) -> bool:
    """data.format is the data group's own value, so the records' own shape may override it.

    The config keeps values, not who set them: a user who sets data.format to the group's own value
    gets the group's behaviour; any other value is theirs and is kept.
    """
    if not group_format or declared == "auto":
        return False
    return formats.canonical_shape(declared) == formats.canonical_shape(group_format)


def decide_shape(first: Any, declared: str, group_format: str | None, options: formats.Options) -> Shape:
    """The shape to read a source as, given the fields of its first record with a shape (None: no record has one)."""
    looks = formats.detect_shape(first, options) if isinstance(first, dict) else None
    if declared == "auto":
        return Shape(looks or "", declared, own=True)
    fixed = formats.canonical_shape(declared)
    if not is_group_default(declared, group_format):
        return Shape(fixed, declared, own=False)
    if looks is not None and looks != fixed:
        return Shape(looks, declared, own=True, group_format=declared)
    return Shape(fixed, declared, own=True)


def first_with_shape(records: Any, options: formats.Options) -> Any:
    """The fields of the first record (an iterable of parsed records) whose fields have a shape; None if none has."""
    return next((f for f in records if isinstance(f, dict) and formats.detect_shape(f, options) is not None), None)


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


def record_problems(
    record: RawRecord, shape: Shape, options: formats.Options
) -> tuple[formats.Example | None, list[str]]:
    """The record in canonical form, or None and everything wrong with it (each naming the field and fix).

    A record of another shape than the source's has one problem, saying which shape it has: the
    field problems of reading it as the wrong shape would only hide that.
    """
    where, fields = record.location, record.fields
    if not isinstance(fields, dict):
        return None, [f"{where}: a record must be a JSON object, found {type(fields).__name__}"]
    looks = formats.detect_shape(fields, options)
    if shape.own and looks is None:
        return None, [str(formats.unknown_shape(fields, where))]
    if shape.own and looks != shape.name:
        return None, [f"{where}: record is {looks} but the first record is {shape.name}; use one shape per file"]
    example, problems = formats.parse(fields, shape.name, options, where)
    if problems and looks is not None and looks != shape.name:
        return None, [f"{problems[0]} (the record looks like {looks}: set data.format=auto or data.format={looks})"]
    return example, problems


def lacks_system_turn(example: formats.Example | None) -> bool:
    """A chat record whose conversation does not open with a system turn (the template may add its own)."""
    if not isinstance(example, formats.Conversation):
        return False
    return not example.messages or example.messages[0].get("role") != "system"


# ---------------------------------------------------------------- problems, identical ones together


@dataclass
class Problem:
    """One problem and the records that have it."""

    text: str  # without the record's location
    count: int = 0
    places: list[str] = field(default_factory=list)  # the first records' locations


@dataclass
class Problems:
    """Every bad record's problems, identical ones together, in the order first met."""

    records: int = 0  # bad records (one may have several problems)
    places: list[str] = field(default_factory=list)  # the first bad records' locations
    kinds: dict[str, Problem] = field(default_factory=dict)  # text -> the problem

    def add(self, location: str, problems: list[str]) -> None:
        self.records += 1
        if len(self.places) < _PLACES_PER_PROBLEM:
            self.places.append(location)
        for problem in problems:
            text = problem.removeprefix(f"{location}: ")
            kind = self.kinds.setdefault(text, Problem(text))
            kind.count += 1
            if len(kind.places) < _PLACES_PER_PROBLEM:
                kind.places.append(location)

    def merge(self, other: Problems) -> None:
        """`other`'s records added after these (a later batch's)."""
        self.records += other.records
        self.places = (self.places + other.places)[:_PLACES_PER_PROBLEM]
        for text, theirs in other.kinds.items():
            kind = self.kinds.setdefault(text, Problem(text))
            kind.count += theirs.count
            kind.places = (kind.places + theirs.places)[:_PLACES_PER_PROBLEM]

    def to_json(self) -> str:
        kinds = [[k.text, k.count, k.places] for k in self.kinds.values()]
        return json.dumps({"records": self.records, "places": self.places, "kinds": kinds})

    @classmethod
    def from_json(cls, text: str) -> Problems:
        values = json.loads(text)
        kinds = {t: Problem(t, count, places) for t, count, places in values["kinds"]}
        return cls(values["records"], values["places"], kinds)

    def lines(self) -> list[str]:
        """One line per kind of problem: the record and the problem, or how many records, the problem and where."""
        shown = list(self.kinds.values())[:MAX_LISTED_PROBLEMS]
        lines = [
            f"{k.places[0]}: {k.text}"
            if k.count == 1
            else f"{k.count:,} records: {k.text} ({places(k.places, k.count)})"
            for k in shown
        ]
        if len(self.kinds) > len(shown):
            lines.append(f"... and {len(self.kinds) - len(shown)} more kinds of problem")
        return lines

    def first(self) -> str:
        """The first problem met, without its fix (the part before '; '): for a one-line summary."""
        return next(iter(self.kinds)).split("; ")[0] if self.kinds else ""


_LINE = re.compile(r"(?P<file>.+):(?P<number>\d+)")  # file.jsonl:12
_ROW = re.compile(r"(?P<file>.+): (?P<kind>record|row) (?P<number>\d+)")  # file.json: record 3, file.parquet: row 3


def _place(location: str) -> tuple[str, str, str] | None:
    """(file, "line"/"record"/"row", number) of a location; None when it has another form."""
    if match := _ROW.fullmatch(location):
        return match["file"], match["kind"], match["number"]
    if match := _LINE.fullmatch(location):
        return match["file"], "line", match["number"]
    return None


def places(locations: list[str], total: int) -> str:
    """Records' locations, shortest: `f.jsonl: lines 1, 2, 3 and 77 more`; as given when in several files."""
    parsed = [place for location in locations if (place := _place(location)) is not None]
    if len(locations) > 1 and len(parsed) == len(locations) and len({place[:2] for place in parsed}) == 1:
        file, kind, _ = parsed[0]
        shown = f"{file}: {kind}s {', '.join(number for _, _, number in parsed)}"
    else:
        shown = ", ".join(locations)
    return shown + (f" and {total - len(locations):,} more" if total > len(locations) else "")


def bad_records_error(problems: Problems, total: int, where: str, shape: Shape, skippable: bool) -> DataError:
    """One error for every bad record: how many, each kind of problem once, and what would fix them."""
    lines = [f"{problems.records:,} bad record{'s' if problems.records != 1 else ''} in {where}:"]
    lines += [f"  {line}" for line in problems.lines()]
    if problems.records == total and shape.own and shape.declared != "auto" and not shape.group_format:
        lines.append(
            f"data.format={shape.declared} is the data group's; data=jsonl reads each file's own shape "
            "(or name one with data.format=..., map your fields with +data.columns=...)"
        )
    elif problems.records < total and skippable:
        them = "them" if problems.records != 1 else "it"
        lines.append(f"Fix {them}, or set data.on_bad_record=skip to train without {them}.")
    return DataError("\n".join(lines))


def validate_records(records: list[RawRecord], declared_format: str, data_cfg: DataConfig | None = None) -> str:
    """Check every record; raise one DataError listing the problems, identical ones once. Returns the shape.

    `data_cfg` (the `data` config) gives the mapping (data.columns, data.roles, ...) and
    data.group_format; without it the defaults apply.
    """
    if not records:
        raise DataError("data.path: no records found; the file is empty")
    options = _options(data_cfg)
    first = first_with_shape((record.fields for record in records), options)
    shape = decide_shape(first, declared_format, data_cfg.group_format if data_cfg else None, options)
    problems = Problems()
    for record in records:
        found = record_problems(record, shape, options)[1]
        if found:
            problems.add(record.location, found)
    if problems.records:
        raise bad_records_error(problems, len(records), "the training data", shape, skippable=True)
    return shape.name


def _options(data_cfg: DataConfig | None) -> formats.Options:
    options = formats.Options.from_config(data_cfg)
    if options.problems():
        raise DataError("; ".join(options.problems()))
    return options


# ---------------------------------------------------------------- a whole source, in parallel batches


@dataclass
class Checked:
    """A source's records after checking: the shape they are read as, and what was bad."""

    shape: Shape
    keep: Any  # row numbers of the good records (numpy), in order
    skipped: Problems  # the bad records left out (data.on_bad_record=skip)
    without_system: int  # good chat records that do not open with a system turn


def check_raw(raw: Any, source: data_sources.Source, data_cfg: DataConfig, processes: int, work: Path) -> Checked:
    """Check every record of a raw Arrow dataset (location, JSON text) in `processes` processes.

    `data_cfg` is the `data` config as plain values. Under data.on_bad_record=error every line of
    invalid JSON is listed first, else every kind of problem once; under `skip` the bad records are
    left out, unless every record is bad.
    """
    import numpy as np

    if not len(raw):
        raise DataError(f"{source.key}: no records in {source.describe()}; the file is empty")
    options = _options(data_cfg)
    declared, group_format = data_cfg.format, data_cfg.group_format
    needs_first = declared == "auto" or is_group_default(declared, group_format)
    shape = decide_shape(_first_with_shape(raw, options) if needs_first else None, declared, group_format, options)
    outcomes = raw.map(
        _check_batch,
        batched=True,
        with_indices=True,
        batch_size=_VALIDATION_BATCH,
        num_proc=processes if processes > 1 else None,
        remove_columns=raw.column_names,
        features=_check_features(),
        cache_file_name=str(work / "checked.arrow"),
        fn_kwargs={"shape": shape, "data_cfg": data_cfg},
        load_from_cache_file=False,
        new_fingerprint=f"check-{work.name}-{len(raw)}",
        desc=f"checking {source.split} ({processes} process{'es' if processes > 1 else ''})",
    )[:]
    problems = Problems()
    for batch in outcomes["problems"]:
        problems.merge(Problems.from_json(batch))
    skip = data_cfg.on_bad_record == "skip"
    if problems.records and not skip and sum(outcomes["bad_json"]):
        listed = [line for lines in outcomes["bad_json_first"] for line in lines][:MAX_LISTED_PROBLEMS]
        raise data_sources.invalid_json_error(sum(outcomes["bad_json"]), listed)
    if problems.records and (not skip or problems.records == len(raw)):
        where = f"{source.key} ({source.describe()})"
        raise bad_records_error(problems, len(raw), where, shape, skippable=not skip)
    bad = np.zeros(len(raw), dtype=bool)
    bad[[row for rows in outcomes["bad_rows"] for row in rows]] = True
    return Checked(shape, np.flatnonzero(~bad), problems, int(sum(outcomes["without_system"])))


def _first_with_shape(raw: Any, options: formats.Options) -> Any:
    """The fields of the raw dataset's first record that has a shape (None when none has)."""

    def parsed() -> Any:
        for batch in raw.iter(batch_size=_READ_BATCH):
            for text in batch["record"]:
                try:
                    yield json.loads(text)
                except json.JSONDecodeError:
                    continue

    return first_with_shape(parsed(), options)


def _check_batch(batch: dict[str, list], indices: list[int], shape: Shape, data_cfg: DataConfig) -> dict[str, list]:
    """One batch checked (in a worker): its bad rows, lines of invalid JSON and problems, as one row."""
    options = formats.Options.from_config(data_cfg)
    problems = Problems()
    bad_rows: list[int] = []
    bad_json: list[str] = []
    without_system = 0
    for index, where, text in zip(indices, batch["location"], batch["record"]):
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as err:
            found = [data_sources.json_problem(where, err)]
            bad_json += found
        else:
            example, found = record_problems(RawRecord(where, fields), shape, options)
            without_system += not found and lacks_system_turn(example)
        if found:
            bad_rows.append(index)
            problems.add(where, found)
    return {
        "bad_json": [len(bad_json)],
        "bad_json_first": [bad_json[:MAX_LISTED_PROBLEMS]],
        "bad_rows": [bad_rows],
        "problems": [problems.to_json()],
        "without_system": [without_system],
    }


def _check_features() -> Any:
    import datasets

    return datasets.Features(
        {
            "bad_json": datasets.Value("int64"),
            "bad_json_first": datasets.Sequence(datasets.Value("string")),
            "bad_rows": datasets.Sequence(datasets.Value("int64")),
            "problems": datasets.Value("string"),
            "without_system": datasets.Value("int64"),
        }
    )
