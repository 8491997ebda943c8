"""Orthonormal Hadamard rotations along the head dim (QuaRot-style), used by the int4 KV cache.

Rotating keys and queries by the same orthogonal H leaves every score unchanged, (qH)·(kH) = q·k, while
spreading a few outlier channels over all dims, which is what per-token int4 scales cannot follow.
"""

from __future__ import annotations

import functools
import math

import torch


def _sylvester(size: int) -> torch.Tensor:
    """The size x size Sylvester Hadamard matrix (size a power of two), scaled to be orthonormal."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / math.sqrt(size)


@functools.cache
def _hadamard_cpu(dim: int) -> torch.Tensor:
    # A head_dim that is not a power of two (e.g. 80 = 64 + 16) gets one block per set bit: still orthogonal.
    sizes = [1 << bit for bit in reversed(range(dim.bit_length())) if dim >> bit & 1]
    return torch.block_diag(*(_sylvester(size) for size in sizes))


@functools.cache
def hadamard_matrix(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Symmetric orthonormal [dim, dim]: H == H.T == H^-1, so x @ H @ H == x (up to dtype rounding)."""
    if dim < 1:
        raise ValueError(f"{dim=} must be >= 1")
    return _hadamard_cpu(dim).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ H (its own inverse: rotate(rotate(x)) == x)."""
    return x @ hadamard_matrix(x.shape[-1], x.dtype, x.device)
