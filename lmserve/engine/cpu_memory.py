"""CPU memory for the KV cache: zeroed without writing it, and the default size fitted to the machine's memory."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

CPU_CACHE_MEMORY_FRACTION = 0.5
"""The default CPU KV cache takes at most this share of the memory available when it is sized."""


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros(shape) that writes nothing on the CPU: pages are zero-filled by the OS when first touched.

    numpy.zeros allocates with calloc, which takes big blocks straight from fresh (zero) pages of the OS,
    where torch.zeros writes every byte (~10 s and all of RAM for a 3 GB cache that is mostly never used).
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else the free physical pages; None when neither is known."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_cpu_num_blocks(
    max_batch_size: int, session_len: int, block_size: int, bytes_per_block: float
) -> int:
    """Blocks for max_batch_size full sessions, capped at CPU_CACHE_MEMORY_FRACTION of the available memory
    but never below one full session (so every request the session length admits fits)."""
    one_session = -(-session_len // block_size)
    full = max_batch_size * one_session
    available = available_memory_bytes()
    if available is None:
        return full
    affordable = int(available * CPU_CACHE_MEMORY_FRACTION // bytes_per_block)
    return max(one_session, min(full, affordable))
