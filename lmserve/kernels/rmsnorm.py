"""RMSNorm and fused residual-add + RMSNorm, as HF LlamaRMSNorm computes them (float32, then cast); either
can also quantize its output per row to e4m3 for an FP8 linear (the numbers of quantize_rows_fp8 on the 16-bit
output, which is never written)."""

from __future__ import annotations

import torch

from lmserve.kernels._triton import jit, next_power_of_2, pdl_enter, pdl_options, tl, triton_dtype
from lmserve.kernels.fp8 import FP8, FP8_MAX, MIN_SCALE, Fp8Activation
from lmserve.kernels.int8_gemm import quantize_row


@jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    scale_ptr,
    eps,
    stride_x,
    stride_residual,
    stride_out,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    QUANTIZE_FP8: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    QMAX: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One row. OUT_DTYPE: the output's 16/32-bit dtype; with QUANTIZE_FP8 the output rounded to it is quantized
    per row (out_ptr e4m3, scale_ptr float32 per row) instead of stored."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        # The sum is rounded to the activation dtype first, as HF's `residual + hidden_states` is.
        x = x + tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        tl.store(residual_ptr + row * stride_residual + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, 0) / HIDDEN
    normed = (x32 * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (weight.to(tl.float32) * normed.to(tl.float32)).to(OUT_DTYPE)
    if QUANTIZE_FP8:
        q, scale = quantize_row(out.to(tl.float32), out_ptr.dtype.element_ty, QMAX, MIN_SCALE)
        tl.store(out_ptr + row * stride_out + cols, q, mask=mask)
        tl.store(scale_ptr + row, scale)
    else:
        tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, fp8: bool
) -> torch.Tensor | Fp8Activation:
    hidden = x.shape[-1]
    x2d = x.reshape(-1, hidden)
    assert x2d.stride(-1) == 1 and weight.is_contiguous()
    dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x2d.shape, dtype=FP8 if fp8 else dtype, device=x.device)
    scale = torch.empty(x2d.shape[0], 1, dtype=torch.float32, device=x.device) if fp8 else out
    residual2d = x2d if residual is None else residual.view(-1, hidden)
    if x2d.shape[0]:
        block = next_power_of_2(hidden)
        _rms_norm_kernel[(x2d.shape[0],)](
            x2d, residual2d, weight, out, scale, eps, x2d.stride(0), residual2d.stride(0), out.stride(0),
            HIDDEN=hidden, BLOCK=block, ADD_RESIDUAL=residual is not None, QUANTIZE_FP8=fp8,
            OUT_DTYPE=triton_dtype(dtype), QMAX=FP8_MAX, MIN_SCALE=MIN_SCALE, num_warps=min(16, max(1, block // 256)),
            **pdl_options(x.device),
        )  # fmt: skip
    if fp8:
        return Fp8Activation(out, scale, dtype)
    return out.view(x.shape)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool = False
) -> torch.Tensor | Fp8Activation:
    """RMSNorm over the last dimension of x [..., H] with weight [H]; with fp8, its rows [T, H] quantized to e4m3."""
    return _launch(x, None, weight, eps, fp8)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool = False
) -> tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
    """residual += x (in place), then RMSNorm of it; returns (normed, residual). residual must be contiguous.
    With fp8 the normed rows [T, H] come quantized to e4m3 (an Fp8Activation)."""
    assert residual.is_contiguous() and residual.shape == x.shape
    return _launch(x, residual, weight, eps, fp8), residual


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm.forward."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of fused_add_rms_norm (also updates residual in place)."""
    residual.add_(x)
    return rms_norm_ref(residual, weight, eps), residual
