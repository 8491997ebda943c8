"""Split-K in one launch, shared by the GEMV-shaped kernels (W4A16, FP8): float32 partials per split, and the
tile's last program (an atomic arrival counter per tile) sums them in split order and writes the output.

The counter is reset by that last program, so the counters stay zero between calls and under CUDA graphs.
"""

from __future__ import annotations

import math

import torch

from lmserve.kernels._triton import jit, num_sms, tl

MAX_TILES = 1 << 16


@jit
def finish_split(
    total, part_ptr, lock_ptr, out_ptr, rows, cols, out_mask, tile, split, num_splits, stride_pm, stride_om,
    N, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Store the tile's output: directly when K is not split; otherwise write this split's float32 partial, and
    the tile's last program sums all splits in order and stores them."""
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if num_splits == 1:
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        split_stride = M * stride_pm
        tl.store(
            part_ptr + split * split_stride + rows[:, None] * stride_pm + cols[None, :], total, mask=out_mask
        )
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(num_splits):
                acc += tl.load(
                    part_ptr + s * split_stride + rows[:, None] * stride_pm + cols[None, :],
                    mask=out_mask,
                    other=0.0,
                    cache_modifier=".cg",
                )
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


_LOCKS: dict[torch.device, torch.Tensor] = {}


def tile_locks(device: torch.device) -> torch.Tensor:
    """Per-tile arrival counters, zero between launches (each tile's last program resets its own)."""
    if device not in _LOCKS:
        _LOCKS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _LOCKS[device]


def choose_splits(num_tiles: int, num_blocks: int, programs_per_sm: int, device: torch.device) -> int:
    """Blocks per split: enough splits for about programs_per_sm programs per SM, none of them empty."""
    wanted = max(1, math.ceil(programs_per_sm * num_sms(device) / max(1, num_tiles)))
    return math.ceil(num_blocks / min(wanted, num_blocks))


def split_partials(num_splits: int, num_rows: int, n: int, device: torch.device) -> torch.Tensor:
    """Float32 split partials [splits * rows, N] (a one-row placeholder when nothing is split)."""
    rows = num_splits * num_rows if num_splits > 1 else 1
    return torch.empty(rows, n, dtype=torch.float32, device=device)
