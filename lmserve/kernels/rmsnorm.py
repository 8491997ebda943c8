"""RMSNorm and fused residual-add + RMSNorm, as HF LlamaRMSNorm computes them (float32, then cast)."""

from __future__ import annotations

import torch

from lmserve.kernels._triton import jit, next_power_of_2, tl


@jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    eps,
    stride_x,
    stride_residual,
    stride_out,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
):
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
    out = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = x.shape[-1]
    x2d = x.reshape(-1, hidden)
    assert x2d.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty(x2d.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual2d = x2d if residual is None else residual.view(-1, hidden)
    if x2d.shape[0] == 0:
        return out.view(x.shape)
    block = next_power_of_2(hidden)
    _rms_norm_kernel[(x2d.shape[0],)](
        x2d, residual2d, weight, out, eps, x2d.stride(0), residual2d.stride(0), out.stride(0),
        HIDDEN=hidden, BLOCK=block, ADD_RESIDUAL=residual is not None, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x [..., H] with weight [H]."""
    return _launch(x, None, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (in place), then RMSNorm of it; returns (normed, residual). residual must be contiguous."""
    assert residual.is_contiguous() and residual.shape == x.shape
    return _launch(x, residual, weight, eps), residual


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
