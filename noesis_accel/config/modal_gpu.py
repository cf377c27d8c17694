"""`modal.gpu`: the GPU types Modal offers, how a count is laid out in containers, and advice when it cannot be."""

from __future__ import annotations

from omegaconf import DictConfig

from noesis_accel.config.batch import batch_splits

MODAL_GPU_TYPES = ("T4", "L4", "A10G", "A10", "A100", "A100-40GB", "A100-80GB", "L40S", "H100", "H100!", "H200", "B200")
GPUS_PER_CONTAINER = 8


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


def modal_layout(spec: str) -> tuple[str, int, int]:
    """(GPU type, GPUs per container, containers) for a valid spec: 16 -> 8 per container x 2."""
    kind, count = parse_gpu_spec(spec)
    if count <= GPUS_PER_CONTAINER:
        return kind, count, 1
    return kind, GPUS_PER_CONTAINER, count // GPUS_PER_CONTAINER


def modal_gpu_problems(cfg: DictConfig) -> list[str]:
    """Why `modal.gpu` cannot run this config, each with the options spelled out (empty if it can)."""
    spec = str(cfg.modal.gpu)
    try:
        kind, count = parse_gpu_spec(spec)
    except ValueError as err:
        return [f"{spec}: {err}"]
    global_batch, micro = int(cfg.train.global_batch_size), int(cfg.train.micro_batch_size)
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
