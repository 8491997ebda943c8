"""The CPU KV cache memory: zeroed without being written, and its default size fitted to the available memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmserve.engine import cpu_memory
from lmserve.engine.cpu_memory import default_cpu_num_blocks, lazily_zeroed


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="needs Linux /proc")
def test_lazily_zeroed_is_zero_and_costs_no_memory_until_written() -> None:
    before = resident_bytes()
    cache = lazily_zeroed((2, 4096, 64, 8, 64), torch.bfloat16, torch.device("cpu"))  # 1 GiB
    assert resident_bytes() - before < 64 * 2**20
    assert cache.shape == (2, 4096, 64, 8, 64) and cache.dtype == torch.bfloat16
    flat = cache.view(2, -1, 8, 64)
    flat[0].index_copy_(0, torch.tensor([5]), torch.ones(1, 8, 64, dtype=torch.bfloat16))
    assert flat[0, 5].eq(1).all() and flat[0, 4].eq(0).all() and flat[1, 5].eq(0).all()
    assert torch.equal(lazily_zeroed((3, 5), torch.float32, "cpu"), torch.zeros(3, 5))


def test_default_size_is_full_sessions_capped_by_memory_but_never_below_one_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block_bytes = 1_000_000
    monkeypatch.setattr(cpu_memory, "available_memory_bytes", lambda: 400 * block_bytes)
    assert default_cpu_num_blocks(16, 8192, 64, block_bytes) == 200  # half of 400 blocks' worth
    assert default_cpu_num_blocks(1, 8192, 64, block_bytes) == 128  # one full session fits under the cap
    monkeypatch.setattr(cpu_memory, "available_memory_bytes", lambda: 10 * block_bytes)
    assert default_cpu_num_blocks(16, 8192, 64, block_bytes) == 128  # one session even when memory is short
    monkeypatch.setattr(cpu_memory, "available_memory_bytes", lambda: None)
    assert default_cpu_num_blocks(16, 8192, 64, block_bytes) == 16 * 128
