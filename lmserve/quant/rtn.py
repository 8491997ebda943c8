"""Round-to-nearest weight quantization: per-group int4 with zero points, packed as AutoAWQ checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.kernels.awq_dequant import pack_awq
from lmserve.layers.quant_formats import check_group_size

SUPPORTED_W_BITS = (4,)


@dataclass(frozen=True)
class GroupQuantized:
    """Integer weights with per-group scales and zero points: w ~ (q - zeros) * scales.

    Shapes follow nn.Linear: q is [out, in]; scales and zeros are [out, in // group_size].
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int


def check_w_bits(w_bits: int) -> None:
    if w_bits not in SUPPORTED_W_BITS:
        raise ValueError(
            f"{w_bits=} is not supported; allowed values: {SUPPORTED_W_BITS} (AutoAWQ GEMM layout)"
        )


def group_params(grouped: torch.Tensor, w_bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) per row of `grouped` [num_groups_total, group_size] (AutoAWQ's pseudo_quantize_tensor)."""
    max_int = 2**w_bits - 1
    if symmetric:
        # The zero point is fixed at the middle so the same GEMM layout serves both modes.
        zeros = torch.full((grouped.shape[0], 1), float(2 ** (w_bits - 1)), device=grouped.device)
        scales = (grouped.abs().amax(dim=1, keepdim=True) / (2 ** (w_bits - 1) - 1)).clamp(min=1e-5)
        return scales, zeros
    max_val = grouped.amax(dim=1, keepdim=True)
    min_val = grouped.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp(0, max_int)
    return scales, zeros


def quantize_groups(weight: torch.Tensor, w_bits: int, group_size: int, symmetric: bool) -> GroupQuantized:
    """Round-to-nearest per group of `group_size` input features, with a zero point per group."""
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size)
    grouped = weight.float().reshape(-1, group_size)
    scales, zeros = group_params(grouped, w_bits, symmetric)
    q = (torch.round(grouped / scales) + zeros).clamp(0, 2**w_bits - 1)
    num_groups = in_features // group_size
    return GroupQuantized(
        q=q.reshape(out_features, in_features).to(torch.int32),
        scales=scales.reshape(out_features, num_groups),
        zeros=zeros.reshape(out_features, num_groups).to(torch.int32),
        group_size=group_size,
    )


def dequantize_groups(quantized: GroupQuantized) -> torch.Tensor:
    """Float [out, in] weight from integer weights, scales and zero points."""
    expand = quantized.group_size
    zeros = quantized.zeros.float().repeat_interleave(expand, dim=1)
    scales = quantized.scales.float().repeat_interleave(expand, dim=1)
    return (quantized.q.float() - zeros) * scales


def fake_quantize(weight: torch.Tensor, w_bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Quantize then dequantize, in the weight's dtype (what the searches score against)."""
    grouped = weight.float().reshape(-1, group_size)
    scales, zeros = group_params(grouped, w_bits, symmetric)
    q = (torch.round(grouped / scales) + zeros).clamp(0, 2**w_bits - 1)
    return ((q - zeros) * scales).reshape(weight.shape).to(weight.dtype)


def awq_tensors(quantized: GroupQuantized) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales for one linear (the AutoAWQ GEMM checkpoint layout), from [out, in] integers."""
    return {
        "qweight": pack_awq(quantized.q.t().contiguous()),
        "qzeros": pack_awq(quantized.zeros.t().contiguous()),
        "scales": quantized.scales.t().contiguous().to(torch.float16),
    }
