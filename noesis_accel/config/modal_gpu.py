"""`modal.gpu`: the GPU types Modal offers, how a count is laid out in containers, and advice when it cannot be.

`modal.gpu` is one spec (`H100:8`) or a list of them that Modal tries in order (`[H100:8, H200:8]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig

from noesis_accel.config.batch import batch_splits
from noesis_accel.config.schema import Config

MODAL_GPU_TYPES = ("T4", "L4", "A10G", "A10", "A100", "A100-40GB", "A100-80GB", "L40S", "H100", "H100!", "H200", "B200")
GPUS_PER_CONTAINER = 8
GPU_SPEC_HELP = "write TYPE:COUNT (e.g. H100:8) or a list of them tried in order (e.g. [H100:8, H200:8])"


def parse_gpu_spec(spec: str) -> tuple[str, int]:
    """`H100:8` -> ("H100", 8); a bare type is one GPU. Raises ValueError with the reason."""
    kind, _, count_text = spec.strip().partition(":")
    kind = kind.upper()
    if kind not in MODAL_GPU_TYPES:
        raise ValueError(f"unknown GPU type {kind!r}; Modal offers {', '.join(MODAL_GPU_TYPES)}")
    try:
        count = int(count_text) if count_text else 1
    except ValueError:
        raise ValueError(f"GPU count {count_text!r} is not a whole number (write TYPE:COUNT, e.g. H100:8)") from None
    if count < 1:
        raise ValueError("the GPU count must be >= 1")
    return kind, count


def gpu_specs(cfg_or_value: Any) -> list[str]:
    """The entries of `modal.gpu`, in the order Modal tries them.

    Args:
        cfg_or_value: The config (typed, or composed: the Modal plumbing's), or the value of `modal.gpu`
            itself: null, a string or a list of strings.

    Returns:
        The specs as written, e.g. `["H100:8", "H200:8"]`; one entry for a single string; `[]` for
        null or an empty string (a CPU container). The specs themselves are not checked here.

    Raises:
        ValueError: The value, or one of its entries, is not a string.
    """
    whole = isinstance(cfg_or_value, Config) or (isinstance(cfg_or_value, DictConfig) and "modal" in cfg_or_value)
    value = cfg_or_value.modal.gpu if whole else cfg_or_value
    if value is None or value == "":  # `modal.gpu=` has always meant no GPU, like null
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (ListConfig, list, tuple)):
        raise ValueError(f"{value!r} is not a GPU spec; {GPU_SPEC_HELP}")
    for entry in value:
        if not isinstance(entry, str):
            raise ValueError(f"{entry!r} is not a GPU spec; write each entry as TYPE:COUNT, e.g. H100:8")
    return list(value)


def gpu_spec_text(entries: str | Sequence[object]) -> str:
    """How messages show `modal.gpu`: `H100:8` for one string, `[H100:8, H200:8]` for a list."""
    if isinstance(entries, str):
        return entries
    return "[" + ", ".join(str(entry) for entry in entries) + "]"


def modal_layout(spec: str) -> tuple[str, int, int]:
    """(GPU type, GPUs per container, containers) for a valid spec: 16 -> 8 per container x 2."""
    kind, count = parse_gpu_spec(spec)
    if count <= GPUS_PER_CONTAINER:
        return kind, count, 1
    return kind, GPUS_PER_CONTAINER, count // GPUS_PER_CONTAINER


def modal_gpu_problems(cfg: Config) -> list[str]:
    """Why `modal.gpu` cannot run this config, each with the options spelled out (empty if it can).

    A single spec's problems start with the spec (`H100:10: ...`); a list's start with the list, then
    the entry (`[H100:8, X9:8]: X9:8: ...`). Every entry of a list is checked as a single spec is, and
    all must ask for the same number of GPUs.
    """
    value = cfg.modal.gpu
    if value is None or value == "":
        return []
    global_batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if isinstance(value, str):
        return _spec_problems(value, global_batch, micro)
    if not isinstance(value, (ListConfig, list, tuple)):
        return [f"{value!r} is not a GPU spec; {GPU_SPEC_HELP}"]
    shown = gpu_spec_text(value)
    if not value:
        return [
            f"{shown}: an empty list asks for no GPU; name at least one (e.g. [H100:8, H200:8]), "
            "or null for a CPU container"
        ]
    problems = []
    counts: dict[str, int] = {}
    for entry in value:
        if not isinstance(entry, str):
            problems.append(f"{shown}: {entry!r} is not a GPU spec; write each entry as TYPE:COUNT, e.g. H100:8")
            continue
        problems.extend(f"{shown}: {problem}" for problem in _spec_problems(entry, global_batch, micro))
        try:
            counts[entry] = parse_gpu_spec(entry)[1]
        except ValueError:
            pass  # already reported above
    if len(set(counts.values())) > 1:
        # Modal tries the entries for one declared function: its cluster size and the processes per
        # container (`placement_overrides`) are fixed before it knows which entry it got.
        first = next(iter(counts.values()))
        same = gpu_spec_text([f"{parse_gpu_spec(entry)[0]}:{first}" for entry in counts])
        asked = ", ".join(f"{entry} asks for {count}" for entry, count in counts.items())
        problems.append(
            f"{shown}: every entry must ask for the same number of GPUs ({asked}), since the process layout "
            f"and the cluster size are fixed when the app is declared; e.g. {same}"
        )
    return problems


def _spec_problems(spec: str, global_batch: int, micro: int) -> list[str]:
    """One spec's problems (type, count, layout in containers, batch split), each starting with the spec."""
    try:
        kind, count = parse_gpu_spec(spec)
    except ValueError as err:
        return [f"{spec}: {err}"]
    if count > GPUS_PER_CONTAINER and count % GPUS_PER_CONTAINER:
        lower = count // GPUS_PER_CONTAINER * GPUS_PER_CONTAINER
        higher = lower + GPUS_PER_CONTAINER
        options = []
        for total in (lower, higher):
            splits = batch_splits(global_batch, total, micro)
            layout = (
                "one container"
                if total == GPUS_PER_CONTAINER
                else f"a cluster of {total // GPUS_PER_CONTAINER} x {GPUS_PER_CONTAINER}"
            )
            keep = (
                f"global batch {global_batch} kept as {splits[0]} x {total}"
                if splits
                else f"global batch {global_batch} cannot be split over {total} GPUs"
            )
            options.append(f"{kind}:{total} ({layout}; {keep})")
        return [
            f"{spec}: a container holds at most {GPUS_PER_CONTAINER} GPUs and a cluster is made of full "
            f"{GPUS_PER_CONTAINER}-GPU containers, so {count} GPUs cannot be placed; use " + " or ".join(options)
        ]
    if global_batch % (micro * count):
        splits = batch_splits(global_batch, count, micro)
        fix = (
            f"set train.micro_batch_size for one of: {', '.join(s + f' x {count}' for s in splits)}"
            if splits
            else f"choose a global batch divisible by {count}"
        )
        return [
            f"{spec}: train.global_batch_size={global_batch} is not micro_batch_size ({micro}) x accumulation x "
            f"{count} GPUs for any whole accumulation; {fix}"
        ]
    return []
