"""W4A16 matmul over AutoAWQ GEMM tensors: a split-K GEMV for single rows, a tl.dot GEMM otherwise.

Layout (lmserve/quant/formats.py): qweight int32 [K, N / 8], eight nibbles per int32 where nibble i holds column
8 * word + AWQ_ORDER[i] (AWQ_ORDER = 0, 2, 4, 6, 1, 3, 5, 7); qzeros int32 [K / group, N / 8] packed the same
way; scales fp16 [K / group, N]; w[k, n] = (q - z) * s. Both kernels dequantize in registers and never
write a dense weight; their split-K partials (float32 [splits, M, N]) are summed by one reduce kernel.
"""

from __future__ import annotations

import math

import torch

from lmserve.kernels._triton import jit, num_sms, tl

PACK_NUM = 8
GEMV_MAX_ROWS = 1
"""Rows (tokens) up to which awq_gemm runs the CUDA-core GEMV; more rows go to the tensor-core GEMM."""
_GEMV_PROGRAMS_PER_SM = 4
_GEMM_PROGRAMS_PER_SM = 2
# The GEMV ORs nibbles into 0x4B000000 (float32 2**23): an integer below 2**23 in its mantissa reads back as
# 2**23 + that integer. The same trick in 16 bits: 1024 + q in fp16 (0x6400), 128 + q in bf16 (0x4300), exact for q < 16
_MAGIC_16 = {torch.float16: 0x6400, torch.bfloat16: 0x4300}


@jit
def _nibble_f32(word, j: tl.constexpr):
    """2**23 + nibble_j * 16**j exactly: nibble j (bits 4j..4j+3, j < 4) left in place inside 2**23's mantissa."""
    return ((word & (0xF << (4 * j))) | 0x4B000000).to(tl.float32, bitcast=True)


@jit
def _scaled_column(scale_row, packed_cols, col_mask, column: tl.constexpr, place: tl.constexpr):
    """Scales of columns 8 * word + column, times place (1 / 16**j) to undo _nibble_f32's place value."""
    scale = tl.load(scale_row + packed_cols * 8 + column, mask=col_mask, other=0.0).to(tl.float32)
    return (scale * place)[None, :]


@jit
def _awq_gemv_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    dest_ptr,
    num_packed_cols,
    num_groups,
    groups_per_split,
    stride_xm,
    stride_qk,
    stride_zg,
    stride_sg,
    stride_dest_split,
    stride_dest_m,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_PACKED: tl.constexpr,
):
    """One program = one row of x x BLOCK_PACKED * 8 columns x one split of the groups, on CUDA cores.

    Each int32 of weights is read once (16-byte loads along a row) and taken apart as eight nibble planes:
    plane i is column AWQ_ORDER[i] of every word, so no shuffle is needed. A nibble becomes a float with one
    AND/OR (exact, via 2**23's mantissa) and one subtract of the zero's float; the group's scale is applied
    once per group to the [BLOCK_K, BLOCK_PACKED] partial sums, and rows are reduced only at the end.
    """
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    packed_cols = pid_n * BLOCK_PACKED + tl.arange(0, BLOCK_PACKED)
    col_mask = packed_cols < num_packed_cols
    k_offsets = tl.arange(0, BLOCK_K)
    acc0 = tl.zeros([BLOCK_K, BLOCK_PACKED], tl.float32)
    acc1, acc2, acc3, acc4, acc5, acc6, acc7 = acc0, acc0, acc0, acc0, acc0, acc0, acc0
    group_start = split * groups_per_split
    group_end = tl.minimum(group_start + groups_per_split, num_groups)
    for group in range(group_start, group_end):
        zero_low = tl.load(qzeros_ptr + group * stride_zg + packed_cols, mask=col_mask, other=0)
        zero_high = zero_low >> 16
        z0, z1 = _nibble_f32(zero_low, 0)[None, :], _nibble_f32(zero_low, 1)[None, :]
        z2, z3 = _nibble_f32(zero_low, 2)[None, :], _nibble_f32(zero_low, 3)[None, :]
        z4, z5 = _nibble_f32(zero_high, 0)[None, :], _nibble_f32(zero_high, 1)[None, :]
        z6, z7 = _nibble_f32(zero_high, 2)[None, :], _nibble_f32(zero_high, 3)[None, :]
        part0 = tl.zeros([BLOCK_K, BLOCK_PACKED], tl.float32)
        part1, part2, part3, part4, part5, part6, part7 = part0, part0, part0, part0, part0, part0, part0
        for step in tl.static_range(GROUP_SIZE // BLOCK_K):  # unrolled: all of a group's loads issue early
            rows = group * GROUP_SIZE + step * BLOCK_K + k_offsets
            word = tl.load(
                qweight_ptr + rows[:, None] * stride_qk + packed_cols[None, :],
                mask=col_mask[None, :],
                other=0,
            )
            x = tl.load(x_ptr + row * stride_xm + rows).to(tl.float32)[:, None]
            high = word >> 16
            part0 += x * (_nibble_f32(word, 0) - z0)
            part1 += x * (_nibble_f32(word, 1) - z1)
            part2 += x * (_nibble_f32(word, 2) - z2)
            part3 += x * (_nibble_f32(word, 3) - z3)
            part4 += x * (_nibble_f32(high, 0) - z4)
            part5 += x * (_nibble_f32(high, 1) - z5)
            part6 += x * (_nibble_f32(high, 2) - z6)
            part7 += x * (_nibble_f32(high, 3) - z7)
        scale_row = scales_ptr + group * stride_sg
        # nibble i of a word is column AWQ_ORDER[i] = 0, 2, 4, 6, 1, 3, 5, 7 of its eight
        acc0 += part0 * _scaled_column(scale_row, packed_cols, col_mask, 0, 1.0)
        acc1 += part1 * _scaled_column(scale_row, packed_cols, col_mask, 2, 0.0625)
        acc2 += part2 * _scaled_column(scale_row, packed_cols, col_mask, 4, 0.00390625)
        acc3 += part3 * _scaled_column(scale_row, packed_cols, col_mask, 6, 0.000244140625)
        acc4 += part4 * _scaled_column(scale_row, packed_cols, col_mask, 1, 1.0)
        acc5 += part5 * _scaled_column(scale_row, packed_cols, col_mask, 3, 0.0625)
        acc6 += part6 * _scaled_column(scale_row, packed_cols, col_mask, 5, 0.00390625)
        acc7 += part7 * _scaled_column(scale_row, packed_cols, col_mask, 7, 0.000244140625)
    dest = dest_ptr + split * stride_dest_split + row * stride_dest_m + packed_cols * 8
    out_type = dest_ptr.dtype.element_ty
    tl.store(dest + 0, tl.sum(acc0, 0).to(out_type), mask=col_mask)
    tl.store(dest + 2, tl.sum(acc1, 0).to(out_type), mask=col_mask)
    tl.store(dest + 4, tl.sum(acc2, 0).to(out_type), mask=col_mask)
    tl.store(dest + 6, tl.sum(acc3, 0).to(out_type), mask=col_mask)
    tl.store(dest + 1, tl.sum(acc4, 0).to(out_type), mask=col_mask)
    tl.store(dest + 3, tl.sum(acc5, 0).to(out_type), mask=col_mask)
    tl.store(dest + 5, tl.sum(acc6, 0).to(out_type), mask=col_mask)
    tl.store(dest + 7, tl.sum(acc7, 0).to(out_type), mask=col_mask)


@jit
def _awq_gemm_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    dest_ptr,
    M,
    N,
    blocks_per_split,
    num_k_blocks,
    stride_xm,
    stride_qk,
    stride_zg,
    stride_sg,
    stride_dest_split,
    stride_dest_m,
    MAGIC: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program = a [BLOCK_M, BLOCK_N] output tile x one split of K, on tensor cores (tl.dot).

    A [BLOCK_K, BLOCK_N / 8] tile of words is loaded (contiguous), each word repeated eight times along N
    (three interleaves), its nibbles shifted out in AutoAWQ's order and turned into 16-bit floats BIAS + q by
    OR-ing them into MAGIC's mantissa; subtracting BIAS + z leaves q - z exactly. BLOCK_K divides the group,
    so the group's scale multiplies each tile's dot product once per column.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    packed_cols = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    m_mask = rows_m < M
    n_mask = cols < N
    packed_mask = packed_cols < N // 8
    # column c sits in nibble AWQ_REVERSE_ORDER[c % 8] = (c % 8) // 2 + 4 * (c % 2)
    shifts = ((cols % 8) // 2 + (cols % 2) * 4) * 4
    dtype = x_ptr.dtype.element_ty
    k_offsets = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    kb_start = split * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, num_k_blocks)
    for kb in range(kb_start, kb_end):
        ks = kb * BLOCK_K + k_offsets
        group = kb * BLOCK_K // GROUP_SIZE
        zero_words = tl.load(qzeros_ptr + group * stride_zg + cols // 8, mask=n_mask, other=0)
        zeros = (((zero_words >> shifts) & 0xF) | MAGIC).to(tl.int16).to(dtype, bitcast=True)
        scale = tl.load(scales_ptr + group * stride_sg + cols, mask=n_mask, other=0.0).to(tl.float32)
        a = tl.load(x_ptr + rows_m[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None], other=0.0)
        words = tl.load(
            qweight_ptr + ks[:, None] * stride_qk + packed_cols[None, :], mask=packed_mask[None, :], other=0
        )
        words = tl.interleave(words, words)
        words = tl.interleave(words, words)
        words = tl.interleave(words, words)
        q = (((words >> shifts[None, :]) & 0xF) | MAGIC).to(tl.int16).to(dtype, bitcast=True)
        acc += tl.dot(a, q - zeros[None, :]) * scale[None, :]
    dest = dest_ptr + split * stride_dest_split + rows_m[:, None] * stride_dest_m + cols[None, :]
    tl.store(dest, acc.to(dest_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@jit
def _sum_splits_kernel(partial_ptr, out_ptr, N, num_splits, stride_split, stride_om, BLOCK: tl.constexpr):
    """out[m, :] = sum over splits of partial[split, m, :] (float32), cast to out's dtype."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    total = tl.zeros([BLOCK], tl.float32)
    for split in range(num_splits):
        total += tl.load(partial_ptr + split * stride_split + row * N + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=mask)


def sum_splits(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [M, N] = partial [splits, M, N] (contiguous float32) summed over splits."""
    num_splits, num_rows, n = partial.shape
    block = 1024
    _sum_splits_kernel[(num_rows, math.ceil(n / block))](
        partial, out, n, num_splits, partial.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out


def choose_split(num_tiles: int, num_k_blocks: int, programs_per_sm: int, device: torch.device) -> int:
    """K-blocks per split: enough splits for about programs_per_sm programs per SM, none of them empty."""
    wanted = max(1, math.ceil(programs_per_sm * num_sms(device) / max(1, num_tiles)))
    return math.ceil(num_k_blocks / min(wanted, num_k_blocks))


def split_destination(num_splits: int, out: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Where the split programs write: out itself for one split, else a float32 [splits, M, N] buffer."""
    if num_splits == 1:
        return out, 0, out.stride(0)
    num_rows, n = out.shape
    partial = torch.empty(num_splits, num_rows, n, dtype=torch.float32, device=out.device)
    return partial, partial.stride(0), partial.stride(1)


def check_awq_shapes(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> None:
    k, packed_n = qweight.shape
    if x.shape[-1] != k or k % group_size or qzeros.shape != (k // group_size, packed_n):
        raise ValueError(
            f"AWQ shapes disagree: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
            f"qzeros {tuple(qzeros.shape)}, {group_size=}"
        )
    if scales.shape != (k // group_size, packed_n * PACK_NUM):
        raise ValueError(f"scales {tuple(scales.shape)} != {(k // group_size, packed_n * PACK_NUM)}")
    if x.dtype not in _MAGIC_16:
        raise ValueError(f"awq_gemm needs float16 or bfloat16 activations, got {x.dtype}")


def awq_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    kernel: str | None = None,
    blocks_per_split: int | None = None,
    **block_options: int,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequantized weight [K, N], in x's dtype (float16 or bfloat16).

    kernel: "gemv" or "gemm" (default: gemv for up to GEMV_MAX_ROWS rows); blocks_per_split counts groups for
    the GEMV and BLOCK_K tiles for the GEMM; block_options override the chosen tile sizes and warps.
    """
    check_awq_shapes(x, qweight, qzeros, scales, group_size)
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape[0], scales.shape[1], dtype=x.dtype, device=x.device)
    if flat.shape[0] > 0:
        kernel = kernel or ("gemv" if flat.shape[0] <= GEMV_MAX_ROWS else "gemm")
        launch = _launch_gemv if kernel == "gemv" else _launch_gemm
        launch(flat, qweight, qzeros, scales, group_size, out, blocks_per_split, **block_options)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _launch_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    out: torch.Tensor,
    groups_per_split: int | None,
    block_packed: int = 32,
    block_k: int = 16,
    num_warps: int = 4,
) -> None:
    num_rows, (k, packed_n) = x.shape[0], qweight.shape
    num_groups = k // group_size
    block_k = min(block_k, group_size)
    assert group_size % block_k == 0, f"{block_k=} must divide {group_size=}"
    num_col_blocks = math.ceil(packed_n / block_packed)
    if groups_per_split is None:
        groups_per_split = choose_split(
            num_rows * num_col_blocks, num_groups, _GEMV_PROGRAMS_PER_SM, x.device
        )
    num_splits = math.ceil(num_groups / groups_per_split)
    dest, stride_split, stride_m = split_destination(num_splits, out)
    _awq_gemv_kernel[(num_rows, num_col_blocks, num_splits)](
        x, qweight, qzeros, scales, dest, packed_n, num_groups, groups_per_split,
        x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), stride_split, stride_m,
        GROUP_SIZE=group_size, BLOCK_K=block_k, BLOCK_PACKED=block_packed, num_warps=num_warps,
    )  # fmt: skip
    if num_splits > 1:
        sum_splits(dest, out)


def gemm_blocks(num_rows: int, group_size: int) -> dict[str, int]:
    """Tile sizes, warps and pipeline depth of the tensor-core kernel for num_rows rows."""
    block_m = 16 if num_rows <= 16 else 32 if num_rows <= 32 else 64 if num_rows <= 64 else 128
    return {
        "block_m": block_m,
        "block_n": 128,
        "block_k": min(64, group_size),
        "num_warps": 8 if block_m == 128 else 4,
        "num_stages": 3,
    }


def _launch_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    out: torch.Tensor,
    blocks_per_split: int | None,
    **overrides: int,
) -> None:
    options = gemm_blocks(x.shape[0], group_size) | overrides
    block_m, block_n, block_k = options["block_m"], options["block_n"], options["block_k"]
    assert group_size % block_k == 0, f"{block_k=} must divide {group_size=}"
    num_rows, n = out.shape
    num_k_blocks = qweight.shape[0] // block_k
    tiles = (math.ceil(num_rows / block_m), math.ceil(n / block_n))
    if blocks_per_split is None:
        blocks_per_split = choose_split(tiles[0] * tiles[1], num_k_blocks, _GEMM_PROGRAMS_PER_SM, x.device)
    num_splits = math.ceil(num_k_blocks / blocks_per_split)
    dest, stride_split, stride_m = split_destination(num_splits, out)
    _awq_gemm_kernel[(*tiles, num_splits)](
        x, qweight, qzeros, scales, dest, num_rows, n, blocks_per_split, num_k_blocks,
        x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), stride_split, stride_m,
        MAGIC=_MAGIC_16[x.dtype], GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=options["num_warps"], num_stages=options["num_stages"],
    )  # fmt: skip
    if num_splits > 1:
        sum_splits(dest, out)


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
    from lmserve.quant.formats import unpack_awq

    q = unpack_awq(qweight)
    zeros = unpack_awq(qzeros).repeat_interleave(group_size, dim=0)
    w = (q - zeros).float() * scales.float().repeat_interleave(group_size, dim=0)
    return w.to(dtype or scales.dtype)


def awq_gemm_ref(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Torch reference of awq_gemm: float32 dense weight, float32 matmul, one rounding to x's dtype."""
    weight = awq_dequantize_ref(qweight, qzeros, scales, group_size, torch.float32)
    return (x.float() @ weight).to(x.dtype)
