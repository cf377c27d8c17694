"""`noesis-data`: check a dataset against the configured tokenizer and template before any GPU time.

It composes the same config as `noesis-train` (same overrides) and prepares the data exactly as
training will (the result lands in the same cache, so a local run after it starts at once). It
prints what training would say about the data, the length distribution, and a few records with
the tokens that are learned marked. No model is loaded. Exit 2 with one line on a data or config error.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from noesis_accel.config import Config
from noesis_accel.core.cli import Command, Option, command_line, parse
from noesis_accel.core.errors import ConfigError, exit_on_user_error, safe_for_pipes

DEFAULT_EXAMPLES = 3
_LEARNED_ON_TERMINAL = ("\x1b[1;32m", "\x1b[0m")  # bold green
_LEARNED_IN_TEXT = ("[[", "]]")


DATA_COMMAND = Command(
    name="data",
    summary=(
        "Check a dataset against the configured tokenizer and template before any GPU time; "
        "learned tokens are shown [[like this]] (in colour on a terminal)."
    ),
    options=(Option("examples", "how many training records to show", int, "N", DEFAULT_EXAMPLES, ("--examples",)),),
    run_dir=False,
    overrides="conf/, the same overrides as noesis train",
    examples=("noesis data data=jsonl data.path=/data/train.jsonl data.max_length=2048 examples=5",),
)


def parse_args(argv: list[str]) -> tuple[int, list[str]]:
    """(examples to show, Hydra overrides) from the command line; UsageError on a bad option."""
    args = parse(DATA_COMMAND, argv)
    return args.options["examples"], args.overrides


def compose_checked(overrides: list[str]) -> Config:
    """noesis-train's config for these overrides, validated and typed; one-line ConfigError otherwise."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from noesis_accel.config import compose, validate

    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), err.__class__.__name__)
        raise ConfigError(f"noesis-data: {first}") from None
    return validate(cfg)


def length_lines(stats: Any) -> list[str]:
    """The token-length distribution of each source, before truncation, and how many exceed data.max_length."""
    lines = [f"lengths in tokens, before truncation (data.max_length={stats.max_length}):"]
    for source in stats.sources:
        summary = ", ".join(f"{name} {value:,}" for name, value in source.lengths.items())
        lines.append(f"  {source.name}: {summary}; {source.too_long:,} of {source.records:,} over data.max_length")
    return lines


def marked_text(tokenizer: Any, input_ids: list[int], labels: list[int], marks: tuple[str, str]) -> str:
    """The record's tokens decoded, each run of learned tokens between `marks`."""
    from noesis_accel.training.data import IGNORE_INDEX

    pieces: list[str] = []
    run: list[int] = []
    learning: bool | None = None
    for token, label in zip(input_ids, labels):
        learned = label != IGNORE_INDEX
        if learned != learning and run:
            pieces.append(_decoded(tokenizer, run, learning, marks))
            run = []
        run.append(token)
        learning = learned
    if run:
        pieces.append(_decoded(tokenizer, run, learning, marks))
    return "".join(pieces)


def _decoded(tokenizer: Any, ids: list[int], learned: bool | None, marks: tuple[str, str]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"{marks[0]}{text}{marks[1]}" if learned else text


def example_lines(tokenizer: Any, train: Any, count: int, colour: bool) -> list[str]:
    """`count` training records spread over the training set, as training sees them, learned tokens marked."""
    if count <= 0 or not len(train):
        return []
    marks = _LEARNED_ON_TERMINAL if colour else _LEARNED_IN_TEXT
    how = "in colour" if colour else "between [[ and ]]"
    picks = sorted({round(i * (len(train) - 1) / max(count - 1, 1)) for i in range(min(count, len(train)))})
    lines = [f"{len(picks)} of {len(train):,} training records as training sees them (learned tokens {how}):"]
    for index in picks:
        row = train[index]
        lines.append(f"--- {row['location']} ({row['length']} tokens, {row['label_count']} learned)")
        lines.append(marked_text(tokenizer, row["input_ids"], row["labels"], marks))
    return lines


def report(cfg: Config, examples: int, out: TextIO) -> None:
    """Prepare `cfg`'s data with its tokenizer as training would, and print what a person needs to see."""
    from noesis_accel.training import data as data_mod
    from noesis_accel.training.modeling import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    prepared = data_mod.prepare(cfg.data, tokenizer, cfg.train.seed)
    stats = prepared.stats
    lines = [f"noesis-data: {cfg.data.path} with the tokenizer of {cfg.model.name_or_path}"]
    lines += data_mod.describe(stats)
    lines += data_mod.template_notes(tokenizer, cfg.data, stats)  # only if some record lacks a system turn
    lines += length_lines(stats)
    lines += example_lines(tokenizer, prepared.train, examples, colour=out.isatty())
    print("\n".join(lines), file=out, flush=True)


@safe_for_pipes
@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`noesis data [examples=N] [overrides]`."""
    examples, overrides = parse_args(command_line(argv))
    cfg = compose_checked(overrides)
    from noesis_accel.core.env import quiet_known_noise

    quiet_known_noise()
    if sys.stderr.isatty():  # a progress bar while a large file is tokenised; none in logs
        import datasets

        datasets.enable_progress_bars()
    report(cfg, examples, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
