"""Optional Triton import: the torch references work without it, the kernels need it."""

from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs run the torch references
    triton = None
    tl = None
    HAS_TRITON = False


def jit(fn: Any) -> Any:
    """triton.jit when Triton is installed; otherwise the plain function, never launched."""
    return triton.jit(fn) if HAS_TRITON else fn


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SM_COUNTS: dict[int, int] = {}


def num_sms(device: Any) -> int:
    """Multiprocessor count of a CUDA device (cached; a fixed guess off CUDA, e.g. the interpreter)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]
