"""The GPU types a plan prices and fits against: memory, peak bf16 throughput and Modal's list price.

A dated table, not a live one: prices change, and a plan says which date its prices are from.
`budget.gpu_hour_usd` overrides the price for a run (and prices the CPU's process-hours for a local run).
"""

from __future__ import annotations

from dataclasses import dataclass

# Modal's published per-second rates x 3600, as listed in May 2026 (modal.com/pricing).
PRICES_AS_OF = "2026-05"

GIB = 2**30


@dataclass(frozen=True)
class GpuType:
    """One GPU type as a plan needs it."""

    name: str  # Modal's name for it (modal.gpu's TYPE)
    memory_bytes: int  # what CUDA reports as the device's total memory (torch.cuda.get_device_properties)
    bf16_tflops: float  # dense peak, no sparsity: the denominator of MFU
    usd_per_hour: float  # Modal's list price of one GPU for one hour


def _gib(value: float) -> int:
    return int(value * GIB)


GPU_TYPES: dict[str, GpuType] = {
    gpu.name: gpu
    for gpu in (
        # T4 has no bf16: its fp16 figure, which a bf16 recipe cannot use at full rate.
        GpuType("T4", _gib(14.57), 65.0, 0.5904),
        GpuType("L4", _gib(22.06), 121.0, 0.7992),
        GpuType("A10G", _gib(21.99), 70.0, 1.1016),
        GpuType("A10", _gib(21.99), 125.0, 1.1016),
        GpuType("A100", _gib(39.39), 312.0, 2.0988),  # Modal's plain A100 is the 40 GB card
        GpuType("A100-40GB", _gib(39.39), 312.0, 2.0988),
        GpuType("A100-80GB", _gib(79.14), 312.0, 2.4984),
        GpuType("L40S", _gib(44.39), 362.0, 1.9512),
        GpuType("H100", _gib(79.19), 989.0, 3.9492),
        GpuType("H200", _gib(139.72), 989.0, 4.5396),
        GpuType("B200", _gib(178.35), 2250.0, 6.2496),
    )
}


def gpu_type(name: str) -> GpuType:
    """`H100`, `H100!` (pinned: the same card) or `h100` -> its entry; KeyError for a type not in the table."""
    return GPU_TYPES[name.upper().rstrip("!")]


# torch.cuda.get_device_name() of each type, matched in this order (the more specific names first).
_DEVICE_NAME_MARKERS = (
    ("H200", "H200"),
    ("H100", "H100"),
    ("B200", "B200"),
    ("A100-SXM4-80GB", "A100-80GB"),
    ("A100 80GB", "A100-80GB"),
    ("A100-PCIE-80GB", "A100-80GB"),
    ("A100", "A100-40GB"),
    ("L40S", "L40S"),
    ("A10G", "A10G"),
    ("A10", "A10"),
    ("L4", "L4"),
    ("T4", "T4"),
)


def type_of_device(device_name: str | None) -> str | None:
    """The table's type for a CUDA device name ("NVIDIA H100 80GB HBM3" -> "H100"); None if not known."""
    if not device_name:
        return None
    upper = device_name.upper()
    return next((kind for marker, kind in _DEVICE_NAME_MARKERS if marker in upper), None)
