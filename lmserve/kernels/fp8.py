"""FP8 (e4m3) W8A8: per-channel weight and per-token activation quantization, and the scaled GEMM.

y[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n], xq and wq in float8_e4m3fn (max 448). On CUDA
one Triton kernel quantizes the activations (a row per program) and torch._scaled_mm (cuBLASLt's FP8 GEMM on
Hopper) multiplies with both scales and the bias fused; elsewhere the same numbers are computed in float32
(an emulation: the CPU has no FP8 GEMM worth using, so the activations are still rounded to e4m3 exactly as on
the GPU, and the weights are dequantized).
"""

from __future__ import annotations

import torch

from lmserve.kernels._triton import HAS_TRITON
from lmserve.kernels.int8_gemm import per_token_quant

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1e-12
"""Floor of a scale: an all-zero row quantizes to zeros instead of dividing by zero."""


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]): scale = absmax / 448, q = round(x / scale)."""
    absmax = x.float().abs().amax(dim=-1, keepdim=True)
    # a tensor divisor: torch on CUDA turns division by a Python scalar into a multiply by its reciprocal,
    # which rounds differently from the IEEE division of the Triton kernel and of the CPU
    scale = (absmax / torch.full_like(absmax, FP8_MAX)).clamp_min(MIN_SCALE)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] on CUDA -> (e4m3 [M, K], float32 scale [M, 1]): quantize_rows_fp8's numbers in one launch."""
    return per_token_quant(x, FP8, FP8_MAX, MIN_SCALE)


def scaled_mm_supported(in_features: int, out_features: int) -> bool:
    """torch._scaled_mm's shape rule: both matrix dims of the weight a multiple of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] @ (e4m3 weight [N, K] * weight_scale [N, 1])^T + bias, in x's dtype.

    cuBLASLt's row-wise scaled FP8 GEMM writes bfloat16 only: other activation dtypes get its output cast.
    """
    if x.is_cuda and HAS_TRITON and scaled_mm_supported(weight.shape[1], weight.shape[0]):
        q, x_scale = per_token_quant_fp8(x)
        out = torch._scaled_mm(
            q,
            weight.t(),
            scale_a=x_scale,
            scale_b=weight_scale.t(),
            bias=None if bias is None else bias.to(torch.bfloat16),
            out_dtype=torch.bfloat16,
        )
        return out if x.dtype == torch.bfloat16 else out.to(x.dtype)
    return fp8_linear_ref(x, weight, weight_scale, bias)


def fp8_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The same product in float32 (the CPU path and the GPU kernels' reference)."""
    q, x_scale = quantize_rows_fp8(x)
    out = (q.float() @ weight.float().t()) * x_scale * weight_scale.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def requantize_blocks_per_channel(
    weight: torch.Tensor, block_scale_inv: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled e4m3 [N, K] with scales [ceil(N / bn), ceil(K / bk)] -> per-channel e4m3 and [N, 1] scales.

    torch._scaled_mm takes per-row and per-column scales, not blocks: the weight is dequantized in float32 and
    rounded again per output channel (a second rounding of the values whose block scale is below the row's).
    """
    block_n, block_k = block
    n, k = weight.shape
    scales = block_scale_inv.float().repeat_interleave(block_n, 0)[:n].repeat_interleave(block_k, 1)[:, :k]
    return quantize_rows_fp8(weight.float() * scales)
