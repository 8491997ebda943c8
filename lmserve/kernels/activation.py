"""SiLU-and-mul on the fused gate_up projection output."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmserve.kernels._triton import jit, tl


@jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, intermediate, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """x [..., 2I] = cat(gate, up) -> silu(gate) * up [..., I]."""
    intermediate = x.shape[-1] // 2
    x2d = x.reshape(-1, x.shape[-1])
    assert x2d.stride(-1) == 1
    out = torch.empty(x2d.shape[0], intermediate, dtype=x.dtype, device=x.device)
    if x2d.shape[0] > 0:
        grid = (x2d.shape[0], math.ceil(intermediate / block))
        _silu_and_mul_kernel[grid](
            x2d, out, x2d.stride(0), out.stride(0), intermediate, BLOCK=block, num_warps=4
        )
    return out.view(*x.shape[:-1], intermediate)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """HF LlamaMLP's act_fn(gate) * up, with gate and up the two halves of x."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
