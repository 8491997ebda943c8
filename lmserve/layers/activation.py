"""Activations over fused projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmserve.kernels._triton import HAS_TRITON


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim."""
    if gate_up.is_cuda and HAS_TRITON:
        from lmserve.kernels.activation import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(gate_up)
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]
