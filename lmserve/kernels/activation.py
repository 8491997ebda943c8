"""SiLU-and-mul on the fused gate_up projection output; optionally quantized per row to e4m3 for an FP8 down_proj."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmserve.kernels._triton import jit, next_power_of_2, pdl_enter, pdl_options, tl, triton_dtype
from lmserve.kernels.fp8 import FP8, FP8_MAX, MIN_SCALE, Fp8Activation
from lmserve.kernels.int8_gemm import quantize_row


@jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_out, intermediate, BLOCK: tl.constexpr, PDL: tl.constexpr = False
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _silu_and_mul_fp8_kernel(
    x_ptr, q_ptr, scale_ptr, stride_x, stride_q, intermediate,
    BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """One whole row per program: silu(gate) * up as _silu_and_mul_kernel rounds it to OUT_DTYPE, then
    quantize_row of it to e4m3 (the 16-bit row is never stored)."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    out = (gate * tl.sigmoid(gate) * up).to(OUT_DTYPE)
    q, scale = quantize_row(out.to(tl.float32), q_ptr.dtype.element_ty, QMAX, MIN_SCALE)
    tl.store(q_ptr + row * stride_q + cols, q, mask=mask)
    tl.store(scale_ptr + row, scale)


def silu_fp8_num_warps(intermediate: int) -> int:
    """One warp per 512 columns, at most 32: a whole row sits in registers and one or two programs fit on an SM,
    so wide programs issue its arithmetic faster (H200, 14336 columns: 235 us at 8192 rows with 32 warps, 255
    with 16, 305 with 8; RESULTS.md "FP8 job, fused input quantization")."""
    return min(32, max(1, next_power_of_2(intermediate) // 512))


def silu_and_mul_fp8(x: torch.Tensor, num_warps: int | None = None) -> Fp8Activation:
    """x [T, 2I] = cat(gate, up) -> silu(gate) * up [T, I] rounded to x's dtype and quantized per row to e4m3:
    the numbers of per_token_quant_fp8(silu_and_mul(x)) in one launch. num_warps overrides silu_fp8_num_warps
    (benchmarks/bench_fp8_fusion.py)."""
    num_rows, intermediate = x.shape[0], x.shape[-1] // 2
    assert x.dim() == 2 and x.stride(-1) == 1
    q = torch.empty(num_rows, intermediate, dtype=FP8, device=x.device)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    if num_rows > 0:
        _silu_and_mul_fp8_kernel[(num_rows,)](
            x, q, scale, x.stride(0), q.stride(0), intermediate, BLOCK=next_power_of_2(intermediate),
            OUT_DTYPE=triton_dtype(x.dtype), QMAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
            num_warps=num_warps or silu_fp8_num_warps(intermediate),
        )  # fmt: skip
    return Fp8Activation(q, scale, x.dtype)


def silu_and_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """x [..., 2I] = cat(gate, up) -> silu(gate) * up [..., I]."""
    intermediate = x.shape[-1] // 2
    x2d = x.reshape(-1, x.shape[-1])
    assert x2d.stride(-1) == 1
    out = torch.empty(x2d.shape[0], intermediate, dtype=x.dtype, device=x.device)
    if x2d.shape[0] > 0:
        grid = (x2d.shape[0], math.ceil(intermediate / block))
        _silu_and_mul_kernel[grid](
            x2d,
            out,
            x2d.stride(0),
            out.stride(0),
            intermediate,
            BLOCK=block,
            num_warps=4,
            **pdl_options(x.device),
        )
    return out.view(*x.shape[:-1], intermediate)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """HF LlamaMLP's act_fn(gate) * up, with gate and up the two halves of x."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
