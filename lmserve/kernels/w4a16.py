"""W4A16 matmul over a K-interleaved 4-bit layout made once at load time from AutoAWQ tensors.

Layout (`repack_awq`): K is padded to a multiple of 128 and cut into blocks of 128 rows. Block b holds 16
packed rows; word (16 * b + i, n) of `qweight` int32 [K / 8, N] keeps in nibble j the 4-bit weight of row
k = 128 * b + 16 * j + i, column n. So one contiguous [16, BLOCK_N] load gives a 128-row block, and nibble
plane j pairs with the contiguous activations x[128 * b + 16 * j : +16]: no shuffles, no gathers. `scales`
and `zeros` are [K / group, N] in 16-bit floats (zeros are the integers 0..15), w[k, n] = (q - z) * s.

Three kernels, one launch each:
- `_w4_gemv_kernel` (one row, CUDA cores): a nibble becomes a float with one AND/OR into 2**23's mantissa and
  one subtract of (2**23 + z) kept in place (the nibble's place value 16**j is undone by pre-scaling x), so a
  weight costs one integer and two float instructions; the group scale is applied once per group.
- `_w4_swap_kernel` (2..16 rows, tensor cores, transposed): out^T = W^T x^T with the unpacked weights as the
  dot's first operand, so on Hopper wgmma reads them from registers (no shared-memory round trip) and the rows
  pad the small second operand to 16; by default each weight is (q - z) * s rounded once to x's dtype and one
  dot per plane runs into the accumulator carried across blocks.
- `_w4_dot_kernel` (17..128 rows, tensor cores): a nibble becomes the 16-bit float BIAS + q by OR-ing it into
  BIAS's mantissa (exact); each 16-row plane is one tl.dot, and BIAS + z times the row sums of x is taken off
  once per group.
Split-K is finished inside the launch (lmserve/kernels/split_k.py): no second launch.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import torch

from lmserve.kernels import cuda_jit
from lmserve.kernels._triton import jit, num_sms, pdl_enabled, tl
from lmserve.kernels.awq_dequant import unpack_awq
from lmserve.kernels.split_k import choose_splits, finish_split, split_partials, tile_locks

TILE_N = 64
"""Columns per contiguous strip of the layout."""
BLOCK_ROWS = 128
"""K rows per packed block (16 packed rows x 8 nibbles)."""
PACKED_ROWS = BLOCK_ROWS // 8
GEMV_MAX_ROWS = 1
SWAP_MAX_ROWS = 16
"""Rows up to which the transposed tensor-core kernel runs (one 16-row tile of the dot's second operand)."""
DOT_MAX_ROWS = 128
"""Rows up to which the tensor-core kernel runs; more rows dequantize once and call cuBLAS (prefill)."""
_MAGIC_16 = {torch.float16: (0x6400, 1024.0), torch.bfloat16: (0x4300, 128.0)}
"""16-bit float whose mantissa's low bits take a nibble exactly: (bit pattern, its value)."""


@dataclass(frozen=True)
class W4Weight:
    """A linear layer's 4-bit weight in the K-interleaved layout (see module docstring)."""

    qweight: torch.Tensor  # int32 [N_pad / 64, K_pad / 8, 64]
    scales: torch.Tensor  # [N_pad / 64, K_pad / group, 64], float16 or bfloat16
    zeros: torch.Tensor  # [N_pad / 64, K_pad / group, 64], same dtype as scales
    in_features: int
    out_features: int
    group_size: int

    @property
    def num_blocks(self) -> int:
        return self.qweight.shape[1] // PACKED_ROWS


def supports_group_size(group_size: int) -> bool:
    """Group sizes the kernels take: a multiple of 16 that divides 128, or a multiple of 128."""
    return group_size % 16 == 0 and (BLOCK_ROWS % group_size == 0 or group_size % BLOCK_ROWS == 0)


def padded_in_features(in_features: int, group_size: int) -> int:
    step = max(BLOCK_ROWS, group_size)
    return math.ceil(in_features / step) * step


def repack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> W4Weight:
    """AutoAWQ GEMM tensors (qweight [K, N / 8], qzeros [K / g, N / 8], scales [K / g, N]) -> W4Weight."""
    if not supports_group_size(group_size):
        raise ValueError(
            f"the W4A16 kernels need a group size that divides 128 or is a multiple of it, got {group_size}"
        )
    k, n = qweight.shape[0], qweight.shape[1] * 8
    k_pad = padded_in_features(k, group_size)
    q = unpack_awq(qweight).to(torch.int64)  # [K, N], 0..15
    q = torch.nn.functional.pad(q, (0, 0, 0, k_pad - k))
    planes = q.view(k_pad // BLOCK_ROWS, 8, PACKED_ROWS, n)  # [block, j, i, n]
    shifts = (4 * torch.arange(8, device=q.device, dtype=torch.int64)).view(1, 8, 1, 1)
    words = (planes << shifts).sum(dim=1)  # [block, i, n] < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(k_pad // 8, n)
    groups_pad = k_pad // group_size - k // group_size
    zeros = torch.nn.functional.pad(unpack_awq(qzeros).to(scales.dtype), (0, 0, 0, groups_pad))
    padded_scales = torch.nn.functional.pad(scales, (0, 0, 0, groups_pad))
    return W4Weight(
        _tile_columns(words), _tile_columns(padded_scales), _tile_columns(zeros), k, n, group_size
    )


def _tile_columns(rows: torch.Tensor) -> torch.Tensor:
    """[R, N] -> [N_pad / 64, R, 64]: each 64-column strip contiguous, so a program streams one run of memory."""
    n = rows.shape[1]
    rows = torch.nn.functional.pad(rows, (0, -n % TILE_N))
    return rows.view(rows.shape[0], -1, TILE_N).permute(1, 0, 2).contiguous()


def _untile_columns(tiled: torch.Tensor, n: int) -> torch.Tensor:
    return tiled.permute(1, 0, 2).reshape(tiled.shape[1], -1)[:, :n]


def dequantize_w4_ref(weight: W4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [K, N] weight (x @ w) from the K-interleaved layout, in float32 math, one rounding to dtype."""
    n = weight.out_features
    k_pad = weight.num_blocks * BLOCK_ROWS
    words = _untile_columns(weight.qweight, n).to(torch.int64).view(k_pad // BLOCK_ROWS, 1, PACKED_ROWS, n)
    shifts = (4 * torch.arange(8, device=words.device, dtype=torch.int64)).view(1, 8, 1, 1)
    q = ((words >> shifts) & 0xF).view(k_pad, n).float()
    g = weight.group_size
    zeros, scales = (
        _untile_columns(t, n).float().repeat_interleave(g, 0) for t in (weight.zeros, weight.scales)
    )
    w = (q - zeros) * scales
    return w[: weight.in_features].to(dtype)


def w4a16_matmul_ref(x: torch.Tensor, weight: W4Weight) -> torch.Tensor:
    return (x.float() @ dequantize_w4_ref(weight)).to(x.dtype)


TINYGEMM_MAX_ROWS = 4
WIDE_N = 16384
"""Output widths from which a one-row GEMV streams faster through our kernel with more programs per SM."""
TINYGEMM_INNER_K_TILES = 8


TINYGEMM_ONE_ROW_MAX_WEIGHTS = 4096 * 4096
"""At one row the CUDA GEMV beats tinygemm above this many weights (H100, Llama-3-8B layer: qkv 9.4 against 10.4 us,
gate_up 30 against 38, down 18.4 against 20.3) and loses at it (o, 4096 x 4096: 8.9 against 7.4 us): its 8-warp CTAs
are too few there to keep enough loads in flight."""


def prefers_tinygemm(
    num_rows: int, out_features: int, device: torch.device | None = None, in_features: int | None = None
) -> bool:
    """Where tinygemm beats our kernels (Llama-3-8B layer, benchmarks/RESULTS.md): 2-4 rows by 1.5-1.9x (our
    tensor-core tiles are 16 rows); one row where the CUDA GEMV compiles, up to TINYGEMM_ONE_ROW_MAX_WEIGHTS
    weights; where it does not, outputs narrower than WIDE_N (the Triton GEMV's 11.7 / 9.0 / 20.7 us against
    10.1 / 7.3 / 20.1 for qkv / o / down on the H200)."""
    if num_rows == 1:
        if device is not None and cuda_gemv_available(device):
            return in_features is not None and in_features * out_features <= TINYGEMM_ONE_ROW_MAX_WEIGHTS
        return out_features < WIDE_N
    return 1 < num_rows <= TINYGEMM_MAX_ROWS


@dataclass(frozen=True)
class TinyGemmWeight:
    """The same 4-bit weight in torch's tinygemm layout (`torch.ops.aten._weight_int4pack_mm`, gpt-fast's kernel),
    for bfloat16 activations (the only dtype its CUDA kernel takes).

    A second copy beside W4Weight: K * N / 2 bytes plus 4 bytes per group and column (about 3.7 GB more for a
    Llama-3-8B). tinygemm computes w = (q - 8) * s + zero, so AutoAWQ's integer zero z becomes the float
    zero (8 - z) * s, rounded once to the activations' dtype.
    """

    packed: torch.Tensor  # tinygemm's int4pack of q [N, K]
    scales_and_zeros: torch.Tensor  # [K / group, N, 2], bfloat16
    group_size: int


def tinygemm_supported(in_features: int, out_features: int, group_size: int) -> bool:
    """tinygemm's shape rules (inner K tiles of 16 x 8, groups of 32..256 rows, N a multiple of 8)."""
    return (
        group_size in (32, 64, 128, 256)
        and in_features % group_size == 0
        and in_features % (TINYGEMM_INNER_K_TILES * 16) == 0
        and out_features % 8 == 0
    )


def tinygemm_zeros(qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """AutoAWQ's packed integer zeros [K / g, N / 8] -> tinygemm's float zeros (8 - z) * s in dtype."""
    return ((8 - unpack_awq(qzeros).float()) * scales.float()).to(dtype)


def tinygemm_pack(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> TinyGemmWeight:
    """AutoAWQ GEMM tensors (on CUDA) -> TinyGemmWeight."""
    dtype = torch.bfloat16
    q = unpack_awq(qweight).to(torch.int32).t().contiguous()  # [N, K]
    packed = torch._convert_weight_to_int4pack(
        (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), TINYGEMM_INNER_K_TILES
    )
    zeros = tinygemm_zeros(qzeros, scales, dtype)
    return TinyGemmWeight(packed, torch.stack([scales.to(dtype), zeros], dim=-1).contiguous(), group_size)


def tinygemm_matmul(x: torch.Tensor, weight: TinyGemmWeight) -> torch.Tensor:
    """y [M, N] = x [M, K] @ w through tinygemm (x bfloat16)."""
    return torch.ops.aten._weight_int4pack_mm(
        x.contiguous(), weight.packed, weight.group_size, weight.scales_and_zeros
    )


# -- kernels ------------------------------------------------------------------------------------------


@jit
def _strip_offsets(cols, strip_stride, BLOCK_N: tl.constexpr):
    """Offsets of columns cols in the 64-column strip layout (a strip every strip_stride elements)."""
    RUN: tl.constexpr = 64 if BLOCK_N > 64 else BLOCK_N
    offsets = (cols // 64) * strip_stride + cols % 64
    return tl.max_contiguous(tl.multiple_of(offsets, RUN), RUN)


@jit
def _gemv_block(
    acc, words, kb, x_ptr, s_ptr, z_ptr, s_cols, col_mask, K, nibble, magic,
    GROUP: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """acc [16, BLOCK_N] += one 128-row block's products.

    nibble (0xF) and magic (0x4B000000) arrive as run-time values: with both in registers ptxas fuses the AND
    and the OR of each weight into one LOP3 (an immediate each would take two).
    """
    lanes = tl.arange(0, 16)
    APPLY: tl.constexpr = GROUP if GROUP < 128 else 128
    PLANES: tl.constexpr = APPLY // 16
    high = words >> 16
    for sub in tl.static_range(128 // APPLY):
        group = (kb * 128 + sub * APPLY) // GROUP
        scale = tl.load(s_ptr + s_cols + group * 64, mask=col_mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + s_cols + group * 64, mask=col_mask, other=0.0).to(tl.float32)
        part = tl.zeros_like(acc)
        for plane in tl.static_range(PLANES):
            j = sub * PLANES + plane
            place = 1 << (4 * (j % 4))
            ks = kb * 128 + j * 16 + lanes
            if EVEN_K:
                xj = tl.load(x_ptr + ks).to(tl.float32) * (1.0 / place)
            else:
                xj = tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32) * (1.0 / place)
            if j < 4:
                src = words
            else:
                src = high
            value = ((src & (nibble << (4 * (j % 4)))) | magic).to(tl.float32, bitcast=True)
            part += (value - (zero * place + 8388608.0)[None, :]) * xj[:, None]
        acc += part * scale[None, :]
    return acc


@jit
def _w4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, part_ptr, lock_ptr,
    N, K, num_blocks, blocks_per_split, num_splits, stride_w, stride_s, stride_pm, stride_om, nibble, magic,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """One program = BLOCK_N columns x one split of the 128-row blocks, for a single row x."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    lanes = tl.arange(0, 16)
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    kb_start = split * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, num_blocks)
    w_tile = w_ptr + _strip_offsets(cols, stride_w, BLOCK_N)[None, :] + lanes[:, None] * 64
    s_cols = _strip_offsets(cols, stride_s, BLOCK_N)
    if PREFETCH:  # the next block's words load while this block is decoded: two tiles in flight
        words = tl.load(
            w_tile + kb_start * 1024,
            mask=col_mask[None, :] & (lanes[:, None] * 0 + kb_start < kb_end),
            other=0,
        )
        for kb in range(kb_start, kb_end):
            upcoming = tl.load(
                w_tile + (kb + 1) * 1024,
                mask=col_mask[None, :] & (lanes[:, None] * 0 + kb + 1 < kb_end),
                other=0,
            )
            acc = _gemv_block(
                acc, words, kb, x_ptr, s_ptr, z_ptr, s_cols, col_mask, K, nibble, magic, GROUP, EVEN_K
            )
            words = upcoming
    else:
        for kb in range(kb_start, kb_end):
            words = tl.load(w_tile + kb * 1024, mask=col_mask[None, :], other=0)
            acc = _gemv_block(
                acc, words, kb, x_ptr, s_ptr, z_ptr, s_cols, col_mask, K, nibble, magic, GROUP, EVEN_K
            )
    total = tl.sum(acc, 0)[None, :]
    out_mask = col_mask[None, :]
    finish_split(
        total, part_ptr, lock_ptr, out_ptr, tl.arange(0, 1), cols, out_mask, pid_n, split, num_splits,
        stride_pm, stride_om, N, 1, BLOCK_M=1, BLOCK_N=BLOCK_N,
    )  # fmt: skip


@jit
def _program_tile(pid_m, pid_n, split, M, N, num_blocks, blocks_per_split,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """A tensor-core program's rows, columns, their masks and its split's range of 128-row blocks."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kb_start = split * blocks_per_split
    return rows, cols, rows < M, cols < N, kb_start, tl.minimum(kb_start + blocks_per_split, num_blocks)


@jit
def _w4_dot_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, num_blocks, blocks_per_split, num_splits, stride_xm, stride_w, stride_s, stride_pm, stride_om,
    MAGIC: tl.constexpr, BIAS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """One program = a [BLOCK_M, BLOCK_N] output tile x one split of the 128-row blocks, on tensor cores."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows, cols, row_mask, col_mask, kb_start, kb_end = _program_tile(
        pid_m, pid_n, split, M, N, num_blocks, blocks_per_split, BLOCK_M, BLOCK_N
    )
    lanes = tl.arange(0, 16)
    dtype = x_ptr.dtype.element_ty
    APPLY: tl.constexpr = GROUP if GROUP < 128 else 128
    PLANES: tl.constexpr = APPLY // 16
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_tile = w_ptr + _strip_offsets(cols, stride_w, BLOCK_N)[None, :] + lanes[:, None] * 64
    s_cols = _strip_offsets(cols, stride_s, BLOCK_N)
    x_rows = x_ptr + rows[:, None] * stride_xm
    for kb in range(kb_start, kb_end):
        words = tl.load(w_tile + kb * 1024, mask=col_mask[None, :], other=0)
        for sub in tl.static_range(128 // APPLY):
            group = (kb * 128 + sub * APPLY) // GROUP
            scale = tl.load(s_ptr + s_cols + group * 64, mask=col_mask, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + s_cols + group * 64, mask=col_mask, other=0.0).to(tl.float32)
            if WIDE:  # the group's planes side by side: one [APPLY, BLOCK_N] operand, one dot
                shifts = 4 * (sub * PLANES + tl.arange(0, PLANES))
                planes = ((words[None, :, :] >> shifts[:, None, None]) & 0xF) | MAGIC
                q = tl.reshape(planes, [APPLY, BLOCK_N]).to(tl.int16).to(dtype, bitcast=True)
                ks = kb * 128 + sub * APPLY + tl.arange(0, APPLY)
                a = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)
                part = tl.dot(a, q)
                row_sum = tl.sum(a.to(tl.float32), 1)
            else:
                part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                row_sum = tl.zeros([BLOCK_M], tl.float32)
                for plane in tl.static_range(PLANES):
                    j = sub * PLANES + plane
                    ks = kb * 128 + j * 16 + lanes
                    a = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)
                    q = (((words >> (4 * j)) & 0xF) | MAGIC).to(tl.int16).to(dtype, bitcast=True)
                    part = tl.dot(a, q, part)
                    row_sum += tl.sum(a.to(tl.float32), 1)
            acc += (part - row_sum[:, None] * (zero + BIAS)[None, :]) * scale[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    finish_split(
        acc, part_ptr, lock_ptr, out_ptr, rows, cols, out_mask, pid_m * tl.num_programs(1) + pid_n, split,
        num_splits, stride_pm, stride_om, N, M, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )  # fmt: skip


@jit
def _w4_swap_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, num_blocks, blocks_per_split, num_splits, stride_xm, stride_w, stride_s, stride_pm, stride_om,
    MAGIC: tl.constexpr, BIAS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FOLD: tl.constexpr,
):  # fmt: skip
    """The transposed product out^T [BLOCK_N, BLOCK_M] = W^T x^T on tensor cores: the unpacked weights are the
    dot's first operand (BLOCK_N >= 64 output columns as its rows, so Hopper's wgmma can take them from
    registers), the activations, padded to BLOCK_M >= 16 rows, its second. One program = one tile x one split."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows, cols, row_mask, col_mask, kb_start, kb_end = _program_tile(
        pid_m, pid_n, split, M, N, num_blocks, blocks_per_split, BLOCK_M, BLOCK_N
    )
    lanes = tl.arange(0, 16)
    dtype = x_ptr.dtype.element_ty
    APPLY: tl.constexpr = GROUP if GROUP < 128 else 128
    PLANES: tl.constexpr = APPLY // 16
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    w_tile = w_ptr + _strip_offsets(cols, stride_w, BLOCK_N)[:, None] + lanes[None, :] * 64
    s_cols = _strip_offsets(cols, stride_s, BLOCK_N)
    x_cols = x_ptr + rows[None, :] * stride_xm
    for kb in range(kb_start, kb_end):
        words = tl.load(w_tile + kb * 1024, mask=col_mask[:, None], other=0)  # [BLOCK_N, 16 packed rows]
        for sub in tl.static_range(128 // APPLY):
            group = (kb * 128 + sub * APPLY) // GROUP
            scale = tl.load(s_ptr + s_cols + group * 64, mask=col_mask, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + s_cols + group * 64, mask=col_mask, other=0.0).to(tl.float32)
            if FOLD:  # (q - z) * s rounded once to x's dtype, straight into the loop's accumulator
                offset = (zero + 8388608.0)[:, None]
                for plane in tl.static_range(PLANES):
                    j = sub * PLANES + plane
                    ks = kb * 128 + j * 16 + lanes
                    b = tl.load(x_cols + ks[:, None], mask=(ks < K)[:, None] & row_mask[None, :], other=0.0)
                    q = (((words >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
                    acc = tl.dot(((q - offset) * scale[:, None]).to(dtype), b, acc)
            else:  # exact: MAGIC + q per plane, the group's zero and scale applied to the plane sums
                part = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                row_sum = tl.zeros([BLOCK_M], tl.float32)
                for plane in tl.static_range(PLANES):
                    j = sub * PLANES + plane
                    ks = kb * 128 + j * 16 + lanes
                    b = tl.load(x_cols + ks[:, None], mask=(ks < K)[:, None] & row_mask[None, :], other=0.0)
                    a = (((words >> (4 * j)) & 0xF) | MAGIC).to(tl.int16).to(dtype, bitcast=True)
                    part = tl.dot(a, b, part)
                    row_sum += tl.sum(b.to(tl.float32), 0)
                acc += (part - (zero + BIAS)[:, None] * row_sum[None, :]) * scale[:, None]
    out_mask = row_mask[:, None] & col_mask[None, :]
    finish_split(
        tl.trans(acc), part_ptr, lock_ptr, out_ptr, rows, cols, out_mask, pid_m * tl.num_programs(0) + pid_n,
        split, num_splits, stride_pm, stride_om, N, M, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )  # fmt: skip


# -- launchers ----------------------------------------------------------------------------------------


def gemv_options(out_features: int) -> dict[str, int]:
    """The GEMV's launch settings (H100 and H200 sweeps in benchmarks/RESULTS.md: 64-column tiles, 4 warps, no
    prefetch; 16 programs per SM from WIDE_N columns, gate_up 32.4 against 34.4 us with 4)."""
    programs_per_sm = 16 if out_features >= WIDE_N else 4
    return {"block_n": 64, "num_warps": 4, "programs_per_sm": programs_per_sm, "prefetch": 0, "num_stages": 1}


def dot_options(num_rows: int, out_features: int) -> dict[str, int]:
    """Tiles by row count (H100 sweep, benchmarks/RESULTS.md): 16-row tiles up to 16 rows, then 64. With 16-row
    tiles (H200 sweep at 16 rows): 2 stages, and 8 programs per SM from WIDE_N columns (gate_up 68.6 against
    73.8 us).

    wide (one dot per group instead of one per 16-row plane) by the H200 measurements in benchmarks/RESULTS.md:
    with 64-row tiles it cut the batch-64 decode step from 12.6 to 10.1 ms; with 16-row tiles it made the layer's
    GEMMs at 16 rows 1.6x slower (241 against 153 us).
    """
    if num_rows > 16:
        return {
            "block_m": 64,
            "block_n": 128,
            "num_warps": 4,
            "programs_per_sm": 2,
            "num_stages": 2,
            "wide": 1,
        }
    programs_per_sm = 8 if out_features >= WIDE_N else 4
    return {"block_m": 16, "block_n": 128, "num_warps": 4, "programs_per_sm": programs_per_sm, "num_stages": 2,
            "wide": 0}  # fmt: skip


def w4a16_matmul(
    x: torch.Tensor, weight: W4Weight, kernel: str | None = None, **options: int
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ w, in x's dtype (float16 or bfloat16).

    kernel: "cuda" (one row, lmserve/kernels/cuda/w4_gemv.cu, compiled by NVRTC; the default where it compiles),
    "gemv" (one row, Triton), "swap" (the transposed tensor-core kernel, up to SWAP_MAX_ROWS rows), "dot" (up to
    DOT_MAX_ROWS rows) or "dense" (dequantize, then cuBLAS); default by row count. options override block_n,
    block_m, num_warps, num_stages, programs_per_sm, blocks_per_split (and wide for "dot", fold for "swap").
    """
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the W4 weight takes {weight.in_features}")
    if x.dtype not in _MAGIC_16:
        raise ValueError(f"w4a16_matmul needs float16 or bfloat16 activations, got {x.dtype}")
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1 or (flat.shape[0] > 1 and flat.stride(0) != flat.shape[1]):
        flat = flat.contiguous()
    num_rows = flat.shape[0]
    kernel = kernel or (
        ("cuda" if cuda_gemv_available(x.device) else "gemv")
        if num_rows <= GEMV_MAX_ROWS
        else "swap"
        if num_rows <= SWAP_MAX_ROWS
        else "dot"
        if num_rows <= DOT_MAX_ROWS
        else "dense"
    )
    if kernel == "dense":
        out = flat @ dequantize_w4(weight, x.dtype)
    else:
        out = torch.empty(num_rows, weight.out_features, dtype=x.dtype, device=x.device)
        if num_rows:
            launch = {
                "cuda": _launch_cuda_gemv,
                "gemv": _launch_gemv,
                "dot": _launch_dot,
                "swap": _launch_swap,
            }[kernel]
            launch(flat, weight, out, **options)
    return out.reshape(*x.shape[:-1], weight.out_features)


def w4a16_silu_gemv(gate_up: torch.Tensor, weight: W4Weight, **options: int) -> torch.Tensor:
    """y [1, N] = (silu(gate) * up) @ w for one gate_up row [1, 2K] = [gate | up], in one launch of the CUDA GEMV
    (its _silu kernels make the activation while staging x, rounded as kernels/activation.py's silu_and_mul
    rounds it): a down projection without the activation's own launch. Where cuda_gemv_available."""
    if gate_up.shape[-1] != 2 * weight.in_features:
        raise ValueError(
            f"gate_up has {gate_up.shape[-1]} features, the W4 weight takes {weight.in_features} x 2"
        )
    if gate_up.dtype not in _MAGIC_16:
        raise ValueError(f"w4a16_silu_gemv needs float16 or bfloat16 activations, got {gate_up.dtype}")
    flat = gate_up.reshape(-1, gate_up.shape[-1])
    if flat.shape[0] > GEMV_MAX_ROWS:
        raise ValueError(f"w4a16_silu_gemv takes {GEMV_MAX_ROWS} row, got {flat.shape[0]}")
    flat = flat.contiguous()
    out = torch.empty(flat.shape[0], weight.out_features, dtype=gate_up.dtype, device=gate_up.device)
    if flat.shape[0]:
        _launch_cuda_gemv(flat, weight, out, gated=1, **options)
    return out.reshape(*gate_up.shape[:-1], weight.out_features)


def w4a16_add_norm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: W4Weight,
    **options: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * norm_weight @ w, x + residual) for one row [1, K] in one launch of the CUDA GEMV
    (its _norm kernels norm while staging x, rounded as kernels/rmsnorm.py's fused_add_rms_norm rounds; the sum of
    squares in another order): a qkv or gate_up projection without the norm's own launch. The new residual is a new
    tensor (every CTA reads the old one). Where cuda_gemv_available."""
    if x.shape != (1, weight.in_features) or residual.shape != x.shape:
        raise ValueError(
            f"w4a16_add_norm_gemv takes x and residual [1, {weight.in_features}], got {tuple(x.shape)}"
        )
    if not (x.dtype == residual.dtype == norm_weight.dtype) or x.dtype not in _MAGIC_16:
        raise ValueError("w4a16_add_norm_gemv needs x, residual and norm_weight in one 16-bit dtype")
    x, residual, norm_weight = (aligned_16(t) for t in (x, residual, norm_weight))
    new_residual = torch.empty_like(x)
    out = torch.empty(1, weight.out_features, dtype=x.dtype, device=x.device)
    _cuda_gemv(x, weight, out, (residual, new_residual, norm_weight, eps), options)
    return out, new_residual


def aligned_16(t: torch.Tensor) -> torch.Tensor:
    """t contiguous at a 16-byte aligned address (the CUDA GEMV reads 16 bytes at a time): t itself or a copy."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _launch_gemv(x: torch.Tensor, weight: W4Weight, out: torch.Tensor, **options: int) -> None:
    n, num_blocks = out.shape[1], weight.num_blocks
    opts = gemv_options(n) | options
    for row in range(x.shape[0]):  # one row in practice (GEMV_MAX_ROWS); a loop keeps "gemv" usable in tests
        tiles = math.ceil(n / opts["block_n"])
        per_split = opts.get("blocks_per_split") or choose_splits(
            tiles, num_blocks, opts["programs_per_sm"], x.device
        )
        num_splits = math.ceil(num_blocks / per_split)
        partial = split_partials(num_splits, 1, n, x.device)
        _w4_gemv_kernel[(tiles, num_splits)](
            x[row], weight.qweight, weight.scales, weight.zeros, out[row], partial, tile_locks(x.device),
            n, weight.in_features, num_blocks, per_split, num_splits, weight.qweight.stride(0),
            weight.scales.stride(0), partial.stride(0), out.stride(0), 0xF, 0x4B000000,
            GROUP=weight.group_size, BLOCK_N=opts["block_n"], PREFETCH=bool(opts["prefetch"]),
            EVEN_K=weight.in_features % BLOCK_ROWS == 0,
            num_warps=opts["num_warps"], num_stages=opts["num_stages"],
        )  # fmt: skip


CUDA_GEMV_SOURCE = "w4_gemv.cu"
CUDA_GEMV_THREADS = 256
CUDA_GEMV_MAX_BLOCKS = 64
"""128-row blocks one CTA of the CUDA GEMV takes at most (its x slice lives in 16 KB of shared memory)."""
GEMV_OCCUPANCY = 1
"""CTAs per SM the CUDA GEMV's default launch is built for: 1 (the kernels as measured best), or 3 (the `_o3`
kernels, held to 85 registers: register-staged, group sizes >= 64, a split count that fills 3 CTAs per SM)."""


def cuda_gemv_available(device: torch.device) -> bool:
    """Whether the CUDA C GEMV (kernels/cuda/w4_gemv.cu) compiles and loads on this device."""
    return cuda_jit.available_on(CUDA_GEMV_SOURCE, device)


def cuda_gemv_options(
    out_features: int, num_blocks: int, device: torch.device, groups_per_block: int = 1
) -> dict[str, int]:
    """Launch options of the CUDA GEMV, from the H100 sweep (benchmarks/RESULTS.md, bench_decode_gemms --cuda-gemv):
    with at least one 64-column strip per SM (gate_up), no prefetch (124 registers, 2 CTAs per SM) and one split
    up to CUDA_GEMV_MAX_BLOCKS blocks; with fewer strips (qkv, o, down), the prefetching kernel (178 registers, one
    CTA per SM) and as many splits as fill the SMs once. A programmatic launch on sm_90+ unless LMSERVE_PDL=0
    (_triton.pdl_enabled). GEMV_OCCUPANCY = 3 picks the _o3 kernels where they exist (groups_per_block <= 2)."""
    strips, sms = math.ceil(out_features / TILE_N), num_sms(device)
    least = math.ceil(num_blocks / CUDA_GEMV_MAX_BLOCKS)
    pdl = int(pdl_enabled(device))
    if (
        GEMV_OCCUPANCY == 3 and groups_per_block <= 2
    ):  # as many CTAs as are resident at once, 8 blocks a CTA at least
        resident = 3 * sms
        splits = max(least, min(max(1, resident // strips), math.ceil(num_blocks / 8)))
        return {"blocks_per_cta": math.ceil(num_blocks / splits), "prefetch": 0, "occupancy": 3, "pdl": pdl}
    if strips >= sms:
        return {"blocks_per_cta": math.ceil(num_blocks / least), "prefetch": 0, "pdl": pdl}
    splits = max(least, min(sms // strips, math.ceil(num_blocks / 8)))
    return {"blocks_per_cta": math.ceil(num_blocks / splits), "prefetch": 1, "pdl": pdl}


def _launch_cuda_gemv(x: torch.Tensor, weight: W4Weight, out: torch.Tensor, **options: int) -> None:
    """The CUDA GEMV over x's rows; option gated=1: a gate_up row (the _silu kernels)."""
    _cuda_gemv(x, weight, out, None, options)


def _cuda_gemv(
    x: torch.Tensor,
    weight: W4Weight,
    out: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None,
    options: dict[str, int],
) -> None:
    """_launch_cuda_gemv; norm = (residual, new_residual, norm_weight, eps): one row, 16-byte aligned (the _norm
    kernels)."""
    n, num_blocks, group = out.shape[1], weight.num_blocks, weight.group_size
    groups_per_block = BLOCK_ROWS // group if group < BLOCK_ROWS else 1
    blocks_per_group = group // BLOCK_ROWS if group >= BLOCK_ROWS else 1
    defaults = cuda_gemv_options(n, num_blocks, x.device, groups_per_block)
    if "prefetch" in options:  # the caller names the kernel
        defaults.pop("occupancy", None)
    if options.get("occupancy", 1) == 3:
        defaults["prefetch"] = 0
    options = defaults | options
    per_cta = options["blocks_per_cta"]
    if not 1 <= per_cta <= CUDA_GEMV_MAX_BLOCKS:
        raise ValueError(f"blocks_per_cta must be 1..{CUDA_GEMV_MAX_BLOCKS}, got {per_cta}")
    dtype = "bf16" if x.dtype == torch.bfloat16 else "f16"
    device = cuda_jit.device_index(x.device)
    prefetch, pdl, gated = options.get("prefetch", 0), options.get("pdl", 0), options.get("gated", 0)
    occupancy = options.get("occupancy", 1)
    for name, value in (("prefetch", prefetch), ("pdl", pdl), ("gated", gated)):
        if value not in (0, 1):
            raise ValueError(f"{name} must be 0 or 1, got {value}")
    if occupancy not in (1, 3):
        raise ValueError(f"occupancy must be 1 or 3, got {occupancy}")
    if occupancy == 3 and (prefetch or groups_per_block > 2):
        raise ValueError(
            f"the _o3 kernels take group sizes >= 64 and no prefetch (group {group}, prefetch {prefetch})"
        )
    if weight.in_features % 8:
        raise ValueError(
            f"the CUDA GEMV stages x 8 values at a time: K={weight.in_features} is not a multiple of 8"
        )
    if x.data_ptr() % 16 or x.stride(0) % 8:
        x = x.clone(memory_format=torch.contiguous_format)  # read 16 bytes at a time: an aligned copy
    if norm is not None and (gated or x.shape[0] != 1):
        raise ValueError("the CUDA GEMV norms one row, and not a gate_up row")
    residual, new_residual, norm_weight, eps = norm if norm is not None else (None, None, None, 0.0)
    extra = [
        ctypes.c_void_p(0 if t is None else t.data_ptr()) for t in (residual, new_residual, norm_weight)
    ] + [ctypes.c_float(eps)]
    suffix = (
        ("_pf" if prefetch else "")
        + ("_o3" if occupancy == 3 else "")
        + ("_silu" if gated else "")
        + ("_norm" if norm is not None else "")
        + ("_pdl" if pdl else "")
    )
    handle = cuda_jit.function(CUDA_GEMV_SOURCE, f"w4_gemv_{dtype}_g{groups_per_block}{suffix}", device)
    strips, splits = math.ceil(n / TILE_N), math.ceil(num_blocks / per_cta)
    partial = split_partials(splits, 1, n, x.device)
    locks = tile_locks(x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    for row in range(x.shape[0]):  # one row in practice (GEMV_MAX_ROWS); a loop keeps it usable in tests
        args = [
            ctypes.c_void_p(x[row].data_ptr()),
            ctypes.c_void_p(weight.qweight.data_ptr()),
            ctypes.c_void_p(weight.scales.data_ptr()),
            ctypes.c_void_p(weight.zeros.data_ptr()),
            ctypes.c_void_p(out[row].data_ptr()),
            ctypes.c_void_p(partial.data_ptr()),
            ctypes.c_void_p(locks.data_ptr()),
            ctypes.c_int(n),
            ctypes.c_int(weight.in_features),
            ctypes.c_int(num_blocks),
            ctypes.c_int(per_cta),
            ctypes.c_int(blocks_per_group),
            ctypes.c_longlong(weight.qweight.stride(0)),
            ctypes.c_longlong(weight.scales.stride(0)),
            ctypes.c_int(weight.scales.dtype == torch.bfloat16),
            *extra,
        ]
        cuda_jit.launch(
            handle, (strips, splits, 1), (CUDA_GEMV_THREADS, 1, 1), args, stream, programmatic=bool(pdl)
        )


def _launch_dot(x: torch.Tensor, weight: W4Weight, out: torch.Tensor, **options: int) -> None:
    opts = dot_options(*out.shape) | options
    _launch_tensor_cores(_w4_dot_kernel, x, weight, out, opts, transposed=False, WIDE=bool(opts["wide"]))


SWAP_OPTIONS = {
    "block_m": 16,
    "block_n": 64,
    "num_warps": 4,
    "programs_per_sm": 4,
    "num_stages": 3,
    "fold": 1,
}
"""Launch settings of the transposed kernel (H200 sweeps at 1 and 16 rows, benchmarks/RESULTS.md): 64-column
tiles, 4 warps, 3 stages, 4 programs per SM, fold on (the Llama-3-8B layer at 16 rows 117.8 us against 128.6 with
the exact per-group correction and 131.6 for cuBLAS bf16).

fold: each weight becomes (q - z) * s rounded once to x's dtype, and one dot per 16-row plane accumulates across
all blocks (what the dense path, tinygemm and Marlin do to their weights; relative error ~2.5e-3 in bf16 against
7e-5 exact). fold 0 keeps the weights exact: MAGIC + q per plane, the group's scale and zero applied to the plane
sums (one more accumulator and its correction per group)."""


def _launch_swap(x: torch.Tensor, weight: W4Weight, out: torch.Tensor, **options: int) -> None:
    opts = SWAP_OPTIONS | options
    _launch_tensor_cores(_w4_swap_kernel, x, weight, out, opts, transposed=True, FOLD=bool(opts["fold"]))


def _launch_tensor_cores(
    kernel: Any, x: torch.Tensor, weight: W4Weight, out: torch.Tensor, opts: dict[str, int], transposed: bool,
    **flags: bool,
) -> None:  # fmt: skip
    """Split-K plan and launch of a tensor-core kernel; the transposed one's grid puts the column tiles first."""
    num_rows, n = out.shape
    num_blocks = weight.num_blocks
    row_tiles, col_tiles = math.ceil(num_rows / opts["block_m"]), math.ceil(n / opts["block_n"])
    per_split = opts.get("blocks_per_split") or choose_splits(
        row_tiles * col_tiles, num_blocks, opts["programs_per_sm"], x.device
    )
    num_splits = math.ceil(num_blocks / per_split)
    partial = split_partials(num_splits, num_rows, n, x.device)
    magic, bias = _MAGIC_16[x.dtype]
    grid = (col_tiles, num_splits, row_tiles) if transposed else (row_tiles, col_tiles, num_splits)
    kernel[grid](
        x, weight.qweight, weight.scales, weight.zeros, out, partial, tile_locks(x.device),
        num_rows, n, weight.in_features, num_blocks, per_split, num_splits, x.stride(0),
        weight.qweight.stride(0), weight.scales.stride(0), partial.stride(0), out.stride(0),
        MAGIC=magic, BIAS=bias, GROUP=weight.group_size, BLOCK_M=opts["block_m"], BLOCK_N=opts["block_n"],
        num_warps=opts["num_warps"], num_stages=opts["num_stages"], **flags,
    )  # fmt: skip


@jit
def _w4_dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_w, stride_s, stride_o,
                          GROUP: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One 128-row block x BLOCK_N columns of the dense weight: (q - z) * s, one rounding."""
    kb = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    lanes = tl.arange(0, 16)
    w_cols = _strip_offsets(cols, stride_w, BLOCK_N)
    s_cols = _strip_offsets(cols, stride_s, BLOCK_N)
    words = tl.load(
        w_ptr + w_cols[None, :] + (kb * 16 + lanes)[:, None] * 64, mask=col_mask[None, :], other=0
    )
    for j in tl.static_range(8):
        ks = kb * 128 + j * 16 + lanes
        group = (kb * 128 + j * 16) // GROUP
        scale = tl.load(s_ptr + s_cols + group * 64, mask=col_mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + s_cols + group * 64, mask=col_mask, other=0.0).to(tl.float32)
        q = ((words >> (4 * j)) & 0xF).to(tl.float32)
        w = (q - zero[None, :]) * scale[None, :]
        mask = (ks < K)[:, None] & col_mask[None, :]
        tl.store(out_ptr + ks[:, None] * stride_o + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_w4(weight: W4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Dense [K, N] weight in dtype (for prefill-sized batches, then one cuBLAS GEMM)."""
    k, n = weight.in_features, weight.out_features
    out = torch.empty(k, n, dtype=dtype, device=weight.qweight.device)
    num_blocks = weight.num_blocks
    block_n = 64
    _w4_dequantize_kernel[(num_blocks, math.ceil(n / block_n))](
        weight.qweight, weight.scales, weight.zeros, out, n, k, weight.qweight.stride(0), weight.scales.stride(0),
        out.stride(0), GROUP=weight.group_size, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out
