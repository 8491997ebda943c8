"""Round-to-nearest weight quantization: per-group int4 with zero points, per-channel int8."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def check_group_size(in_features: int, group_size: int, name: str = "linear") -> None:
    """Groups run along the input features, so the group size must divide them exactly."""
    if group_size <= 0 or in_features % group_size != 0:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(
            f"w_group_size={group_size} does not divide {name}'s in_features={in_features}; "
            f"use one of {divisors or 'a divisor of in_features'}"
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


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (int8 [out, in], float32 scale [out, 1])."""
    scale = (weight.float().abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-8)
    q = torch.round(weight.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row (token): (int8 [..., in], float32 scale [..., 1])."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-8)
    q = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale
