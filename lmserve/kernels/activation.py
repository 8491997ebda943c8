"""SiLU-and-mul on the fused gate_up projection output; optionally quantized per row to e4m3 for an FP8 down_proj."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmserve.kernels._triton import jit, next_power_of_2, num_sms, tl, triton_dtype
from lmserve.kernels.fp8 import FP8, FP8_MAX, MIN_SCALE, Fp8Activation
from lmserve.kernels.int8_gemm import quantize_row


@jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, intermediate, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _gate_up(x_ptr, row, num_rows, stride_x, intermediate, cols):
    """Row `row`'s gate and up halves as stored (nothing read from row num_rows on)."""
    row_mask = cols < tl.where(row < num_rows, intermediate, 0)
    base = x_ptr + tl.cast(row, tl.int64) * stride_x
    gate = tl.load(base + cols, mask=row_mask, other=0.0)
    return gate, tl.load(base + intermediate + cols, mask=row_mask, other=0.0)


@jit
def _silu_and_mul_fp8_kernel(
    x_ptr, q_ptr, scale_ptr, num_rows, stride_x, stride_q, intermediate,
    BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
):  # fmt: skip
    """Rows pid, pid + num_programs, ...: silu(gate) * up as _silu_and_mul_kernel rounds it to OUT_DTYPE, then
    quantize_row of it to e4m3 (the 16-bit row is never stored).

    A whole row sits in registers, so few programs fit on an SM, and a program that loads, then computes, then
    stores leaves memory idle while it computes: each loads its next row before the arithmetic of this one.
    """
    cols = tl.arange(0, BLOCK)
    mask = cols < intermediate
    step = tl.num_programs(0)
    first = tl.program_id(0)
    gate, up = _gate_up(x_ptr, first, num_rows, stride_x, intermediate, cols)
    for row in range(first, num_rows, step):
        next_gate, next_up = _gate_up(x_ptr, row + step, num_rows, stride_x, intermediate, cols)
        gate32 = gate.to(tl.float32)
        out = (gate32 * tl.sigmoid(gate32) * up.to(tl.float32)).to(OUT_DTYPE)
        q, scale = quantize_row(out.to(tl.float32), q_ptr.dtype.element_ty, QMAX, MIN_SCALE)
        tl.store(q_ptr + tl.cast(row, tl.int64) * stride_q + cols, q, mask=mask)
        tl.store(scale_ptr + row, scale)
        gate, up = next_gate, next_up


SILU_FP8_PROGRAMS_PER_SM = 2
"""Programs per SM of silu_and_mul_fp8, each looping over rows (0: one program per row)."""
SILU_FP8_NUM_WARPS: int | None = None
"""Warps per program (None: one per 1024 columns, at most 16). Both from benchmarks/bench_fp8_fusion.py."""


def silu_and_mul_fp8(
    x: torch.Tensor, num_warps: int | None = None, programs_per_sm: int | None = None
) -> Fp8Activation:
    """x [T, 2I] = cat(gate, up) -> silu(gate) * up [T, I] rounded to x's dtype and quantized per row to e4m3:
    the numbers of per_token_quant_fp8(silu_and_mul(x)) in one launch. num_warps and programs_per_sm override
    SILU_FP8_NUM_WARPS and SILU_FP8_PROGRAMS_PER_SM."""
    if programs_per_sm is None:
        programs_per_sm = SILU_FP8_PROGRAMS_PER_SM
    num_warps = num_warps or SILU_FP8_NUM_WARPS
    num_rows, intermediate = x.shape[0], x.shape[-1] // 2
    assert x.dim() == 2 and x.stride(-1) == 1
    q = torch.empty(num_rows, intermediate, dtype=FP8, device=x.device)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    if num_rows > 0:
        block = next_power_of_2(intermediate)
        num_programs = min(num_rows, programs_per_sm * num_sms(x.device)) if programs_per_sm else num_rows
        _silu_and_mul_fp8_kernel[(num_programs,)](
            x, q, scale, num_rows, x.stride(0), q.stride(0), intermediate, BLOCK=block,
            OUT_DTYPE=triton_dtype(x.dtype), QMAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
            num_warps=num_warps or min(16, max(1, block // 1024)),
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
            x2d, out, x2d.stride(0), out.stride(0), intermediate, BLOCK=block, num_warps=4
        )
    return out.view(*x.shape[:-1], intermediate)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """HF LlamaMLP's act_fn(gate) * up, with gate and up the two halves of x."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
