"""Where training records come from, and reading them: a file, a directory's splits, or a hub dataset.

A directory follows the `datasets` naming: a file whose name starts with a split's name (or one of
its synonyms) followed by a separator belongs to that split: `train.jsonl` and
`train-00000-of-00002.parquet` to train, `validation.jsonl` and `dev.json` to validation, `test.jsonl`
to test. Splits are never mixed. A directory where no file names a split is all training data.

Records stream, so a file of any size is read in bounded memory; each keeps the location a user
opens (`file.jsonl:12`, `file.parquet: row 3`). A JSON Lines line can be passed on unparsed (to be
parsed in parallel); where it is parsed here, every line of invalid JSON is reported in one error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noesis_accel.config import DataConfig
from noesis_accel.core.errors import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# `datasets`' own synonyms (datasets/data_files.py SPLIT_KEYWORDS): dev.jsonl is a validation file there too.
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
# Held out when `data.eval_split` is null, the first that the data has: validation is what a
# dataset sets aside for watching training; test is TRL's default eval split and what many datasets ship.
AUTO_EVAL_SPLITS = ("validation", "test")
_SEPARATORS = "-._ 0123456789"  # what may follow a split's name in a file name (`datasets`' NON_WORDS_CHARS)
BATCH_RECORDS = 1_000  # rows read from Parquet or a hub dataset at once

Entry = tuple[str, "str | None", Any]  # (location, its JSON text, or None and the record parsed)


@dataclass(frozen=True)
class Source:
    """One split's records: local files, or a hub dataset's split.

    `key` is the config key a user edits to change it (`data.path`, `data.eval_path`).
    """

    key: str
    split: str
    files: tuple[str, ...] = ()
    hub: str | None = None
    ignored: tuple[str, ...] = ()  # data files in the directory that name no split, hence not read

    def describe(self, most: int = 3) -> str:
        """The files (or hub split) in words: the first `most` files and how many more."""
        if self.hub is not None:
            return f"{self.hub}[{self.split}]"
        shown = ", ".join(self.files[:most])
        return shown if len(self.files) <= most else f"{shown} and {len(self.files) - most} more"


# ---------------------------------------------------------------- which files form which split


def split_of(file_name: str, names: Iterable[str]) -> str | None:
    """The split among `names` that a file's name starts with (a synonym counts), or None.

    The split's name must be followed by a separator, so `trainer.jsonl` is no train file; the
    longest match wins, so `train_sft-00000.parquet` is in `train_sft` when that split is asked for.
    """
    lower = file_name.lower()
    best: tuple[int, str] | None = None
    for split in dict.fromkeys(names):
        for keyword in SPLIT_KEYWORDS.get(split, (split.lower(),)):
            named = lower.startswith(keyword) and len(lower) > len(keyword) and lower[len(keyword)] in _SEPARATORS
            if named and (best is None or len(keyword) > best[0]):
                best = (len(keyword), split)
    return best[1] if best else None


def data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES)


def find_splits(directory: Path, names: Iterable[str]) -> tuple[dict[str, list[Path]], list[Path]]:
    """The directory's files by split, and the files that name none (ignored when any file names a split)."""
    names = tuple(dict.fromkeys([*SPLIT_KEYWORDS, *names]))
    splits: dict[str, list[Path]] = {}
    unnamed: list[Path] = []
    for file in data_files(directory):
        split = split_of(file.name, names)
        if split is None:
            unnamed.append(file)
        else:
            splits.setdefault(split, []).append(file)
    return splits, unnamed


def is_hub_dataset(path_spec: str) -> bool:
    """A hub dataset's name rather than a path: nothing by that name here, and it does not look like a file."""
    path = Path(os.path.expanduser(path_spec))
    looks_local = path_spec.startswith((".", "/", "~")) or path.suffix in FILE_SUFFIXES
    return not path.exists() and not looks_local


def _local_path(key: str, path_spec: str) -> Path:
    path = Path(os.path.expanduser(path_spec))
    if not path.exists():
        raise DataError(
            f"{key}: {path_spec} does not exist; point {key} at a .jsonl, .json or .parquet file or a directory of them"
        )
    if path.is_dir() and not data_files(path):
        raise DataError(f"{key}: directory {path} holds no .jsonl, .json or .parquet files")
    if path.is_file() and path.suffix not in FILE_SUFFIXES:
        raise DataError(f"{key}: {path} is not a .jsonl, .json or .parquet file")
    return path


def _named_split(
    key: str, split_key: str, directory: Path, split: str, splits: dict[str, list[Path]], unnamed: list[Path]
) -> Source:
    if split not in splits:
        raise DataError(
            f"{split_key}: {directory} has no '{split}' files (it has {', '.join(sorted(splits))}: "
            "a file belongs to the split its name starts with); set "
            f"{split_key} to one of those"
        )
    return Source(key, split, tuple(map(str, splits[split])), ignored=tuple(map(str, unnamed)))


def source_for(key: str, path_spec: str, split: str, other_splits: Iterable[str] = ()) -> Source:
    """The records of `split` at `path_spec` (a file is read whole; a directory without split names too).

    `other_splits` are split names besides train/validation/test that the directory's files may carry.
    """
    if is_hub_dataset(path_spec):
        return Source(key, split, hub=str(path_spec))
    path = _local_path(key, path_spec)
    if path.is_file():
        return Source(key, split, (str(path),))
    splits, unnamed = find_splits(path, [split, *other_splits])
    if not splits:
        return Source(key, split, tuple(map(str, unnamed)))
    return _named_split(key, "data.split" if key == "data.path" else f"{key} split", path, split, splits, unnamed)


def training_source(data_cfg: DataConfig) -> Source:
    """The records training reads: `data.path`'s `data.split` (the whole file or directory when it has no splits)."""
    return source_for("data.path", data_cfg.path, data_cfg.split, [data_cfg.eval_split] if data_cfg.eval_split else [])


def eval_source(data_cfg: DataConfig) -> Source | None:
    """Where the held-out records come from; None: `data.eval_fraction` of the training records.

    In order: `data.eval_path` (a file, a directory's eval split or all its files, a hub dataset's
    eval split); else `data.path`'s `data.eval_split`; else, when that is null, its validation split,
    else its test split. An eval split named explicitly must exist.
    """
    explicit = data_cfg.eval_split or None
    if explicit is not None and explicit == data_cfg.split and not data_cfg.eval_path:
        raise DataError(
            f"data.eval_split: '{explicit}' is also data.split; the held-out records must be "
            "other records than the training ones"
        )
    key = "data.eval_path" if data_cfg.eval_path else "data.path"
    spec = data_cfg.eval_path or data_cfg.path
    if is_hub_dataset(spec):
        split = explicit or _first_hub_split(spec, AUTO_EVAL_SPLITS)
        if split is None and data_cfg.eval_path:
            split = data_cfg.split  # a separate hub dataset without eval splits: its training split
        return Source(key, split, hub=spec) if split else None
    path = _local_path(key, spec)
    if path.is_file():
        if key == "data.eval_path":
            return Source(key, explicit or "eval", (str(path),))
        if explicit:
            raise DataError(
                f"data.eval_split: data.path is one file ({path}), which has no splits; point data.path "
                f"at a directory holding {explicit}* files, or set data.eval_path"
            )
        return None
    splits, unnamed = find_splits(path, [data_cfg.split, *([explicit] if explicit else [])])
    if explicit:
        if not splits:
            raise DataError(
                f"data.eval_split: {path} has no '{explicit}' files (no file there names a split); "
                "name the held-out file after its split (validation.jsonl) or set data.eval_path"
            )
        return _named_split(key, "data.eval_split", path, explicit, splits, unnamed)
    for split in AUTO_EVAL_SPLITS:
        if split in splits:
            return Source(key, split, tuple(map(str, splits[split])), ignored=tuple(map(str, unnamed)))
    if key == "data.eval_path" and not splits:
        return Source(key, "eval", tuple(map(str, unnamed)))  # a directory of held-out files
    if key == "data.eval_path":
        raise DataError(
            f"data.eval_path: {path} has no validation or test files (it has {', '.join(sorted(splits))}); "
            "set data.eval_split to the split to hold out"
        )
    return None


def _first_hub_split(name: str, candidates: Iterable[str]) -> str | None:
    """The first of `candidates` that the hub dataset has (None when it has none, or cannot say)."""
    import datasets

    try:
        available = set(datasets.get_dataset_split_names(name))
    except Exception:  # the hub raises many types; the training split's own read reports the real problem
        return None
    return next((split for split in candidates if split in available), None)


def source_fingerprint(source: Source | None) -> str:
    """What identifies a source's records for the cache: each file's path and bytes, or the hub name and split."""
    import hashlib

    digest = hashlib.sha256()
    if source is None:
        return "-"
    digest.update(f"{source.key}|{source.split}|{source.hub}".encode())
    for name in source.files:
        digest.update(str(Path(name).resolve()).encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- reading records


def invalid_json_error(count: int, first: list[str]) -> DataError:
    """One error for every line of invalid JSON: how many, and the first ones (file:line and why)."""
    more = f"\n  ... and {count - len(first)} more" if count > len(first) else ""
    lines = "line" if count == 1 else "lines"
    return DataError(
        f"{count} {lines} of invalid JSON (each line must be one complete JSON object):\n  " + "\n  ".join(first) + more
    )


def json_problem(where: str, err: json.JSONDecodeError) -> str:
    return f"{where}: invalid JSON ({err.msg} at column {err.colno})"


def _jsonl_lines(path: Path) -> Iterator[Entry]:
    """A JSON Lines file's non-empty lines, unparsed."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a BOM is not part of line 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{number}: not UTF-8 (byte {err.start} of the line: {err.reason}); save the file as UTF-8"
                ) from None
            if line.strip():
                yield f"{path}:{number}", line.rstrip("\r\n"), None


def _json_records(path: Path) -> Iterator[Entry]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM is not part of the text
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte {err.start}: {err.reason}); save the file as UTF-8") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        del text
        yield from _jsonl_lines(path)  # many ".json" training files are really JSON Lines
        return
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(f"{path}: expected a JSON array of records (or JSON Lines), found {type(payload).__name__}")
    for index, record in enumerate(payload):
        yield f"{path}: record {index}", None, record


def _parquet_records(path: Path) -> Iterator[Entry]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_RECORDS):
        for row in batch.to_pylist():
            yield f"{path}: row {index}", None, row
            index += 1


def _hub_records(key: str, name: str, split: str) -> Iterator[Entry]:
    import datasets

    try:
        records = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub raises many types; all mean "cannot read this name"
        raise DataError(
            f"{key}: '{name}' is neither a local file nor a loadable hub dataset with a '{split}' split "
            f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    index = 0
    for batch in records.iter(batch_size=BATCH_RECORDS):
        keys = list(batch)
        for values in zip(*batch.values()):
            yield f"{name}[{split}]: row {index}", None, dict(zip(keys, values))
            index += 1


def entries(source: Source) -> Iterator[Entry]:
    """Every record of a source in order as (location, JSON text or None, parsed record or None).

    A JSON Lines line comes as its text, unparsed (parsing can then happen in parallel); a record
    from a JSON array, Parquet or the hub comes parsed.
    """
    if source.hub is not None:
        yield from _hub_records(source.key, source.hub, source.split)
    for name in source.files:
        path = Path(name)
        if path.suffix == ".jsonl":
            yield from _jsonl_lines(path)
        elif path.suffix == ".json":
            yield from _json_records(path)
        else:
            yield from _parquet_records(path)


def texts(source: Source) -> Iterator[tuple[str, str]]:
    """Every record of a source as (location, JSON text): a line as it is, any other record serialised."""
    for where, text, fields in entries(source):
        yield where, text if text is not None else json.dumps(fields, ensure_ascii=False, default=str)


def rows(source: Source, limit: int = 10) -> Iterator[tuple[str, Any]]:
    """Every record of a source in order, parsed, with its location; every line of invalid JSON is raised
    together after the last record (the first `limit` of them listed)."""
    count = 0
    first: list[str] = []
    for where, text, fields in entries(source):
        if text is None:
            yield where, fields
            continue
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as err:
            count += 1
            if len(first) < limit:
                first.append(json_problem(where, err))
    if count:
        raise invalid_json_error(count, first)
