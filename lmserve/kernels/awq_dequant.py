"""AutoAWQ GEMM layout: int4 packing, a CUDA dequantize kernel, and the torch references W4A16 kernels are tested against.

Layout: qweight int32 [K, N / 8], eight nibbles per int32 where nibble i holds column 8 * word + AWQ_ORDER[i]
(AWQ_ORDER = 0, 2, 4, 6, 1, 3, 5, 7); qzeros int32 [K / group, N / 8] packed the same way; scales fp16
[K / group, N]; w[k, n] = (q - z) * s (lmserve/layers/quant_formats.py describes the checkpoint). The matmul
kernels run on the repacked layout of lmserve/kernels/w4a16.py; this dense dequantize serves the group sizes
those kernels do not take.
"""

from __future__ import annotations

import math

import torch

from lmserve.kernels._triton import jit, tl

PACK_NUM = 8  # 4-bit values per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of each packed int32 holds column AWQ_ORDER[i] of its block of eight."""
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""Column c of a block of eight sits in nibble AWQ_REVERSE_ORDER[c]."""
_SHIFTS = torch.arange(PACK_NUM, dtype=torch.int64) * 4


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Pack int4 values [rows, cols] (0..15) into int32 [rows, cols / 8] in AutoAWQ's order."""
    rows, cols = values.shape
    if cols % PACK_NUM:
        raise ValueError(f"cannot pack {cols} columns: must be a multiple of {PACK_NUM}")
    if values.min() < 0 or values.max() > 15:
        raise ValueError("int4 values must lie in 0..15")
    blocks = values.to(torch.int64).reshape(rows, cols // PACK_NUM, PACK_NUM)[..., list(AWQ_ORDER)]
    packed = (blocks << _SHIFTS).sum(dim=-1)
    # Wrap to two's complement: nibble 7 reaches bit 31.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_awq: int32 [rows, cols / 8] -> int32 [rows, cols] in 0..15."""
    rows, packed_cols = packed.shape
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(rows, packed_cols * PACK_NUM).to(torch.int32)


@jit
def _awq_dequantize_kernel(
    qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, N, stride_qk, stride_zg, stride_sg, stride_ok,
    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[k, n] = (q - z) * s for one [BLOCK_K, BLOCK_N] tile, rounded once to out's dtype."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    shifts = ((cols % 8) // 2 + (cols % 2) * 4) * 4
    groups = ks // GROUP_SIZE
    words = tl.load(qweight_ptr + ks[:, None] * stride_qk + cols[None, :] // 8, mask=mask[None, :], other=0)
    zero_words = tl.load(
        qzeros_ptr + groups[:, None] * stride_zg + cols[None, :] // 8, mask=mask[None, :], other=0
    )
    scales = tl.load(scales_ptr + groups[:, None] * stride_sg + cols[None, :], mask=mask[None, :], other=0.0)
    q = (words >> shifts[None, :]) & 0xF
    z = (zero_words >> shifts[None, :]) & 0xF
    w = (q - z).to(tl.float32) * scales.to(tl.float32)
    tl.store(
        out_ptr + ks[:, None] * stride_ok + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask[None, :]
    )


def awq_dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense [K, N] weight (x @ w) in dtype (default: scales' dtype), each element rounded once."""
    k, packed_n = qweight.shape
    n = packed_n * PACK_NUM
    out = torch.empty(k, n, dtype=dtype or scales.dtype, device=qweight.device)
    block_k = min(32, group_size)
    _awq_dequantize_kernel[(math.ceil(k / block_k), math.ceil(n / 128))](
        qweight, qzeros, scales, out, n, qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=group_size, BLOCK_K=block_k, BLOCK_N=128, num_warps=4,
    )  # fmt: skip
    return out


# -- torch references --------------------------------------------------------------------------------


def awq_dequantize_ref(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Torch reference of awq_dequantize: unpack in AutoAWQ's order, (q - z) * s in float32, one rounding."""
    q = unpack_awq(qweight)
    zeros = unpack_awq(qzeros).repeat_interleave(group_size, dim=0)
    w = (q - zeros).float() * scales.float().repeat_interleave(group_size, dim=0)
    return w.to(dtype or scales.dtype)


def awq_gemm_ref(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Reference of an AWQ matmul (x @ dequantized weight): float32 dense weight, float32 matmul, one rounding to x's dtype."""
    weight = awq_dequantize_ref(qweight, qzeros, scales, group_size, torch.float32)
    return (x.float() @ weight).to(x.dtype)
