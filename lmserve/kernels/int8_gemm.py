"""W8A8 int8 matmul (SmoothQuant / compressed-tensors): per-token activation quantization and an int8 GEMM.

y[m, n] = (sum_k x_q[m, k] * w_q[n, k]) * x_scale[m] * w_scale[n]: int8 tensor-core dots accumulate exactly in
int32, the two scales are applied once in float32 at the end. Small batches split K (float32 partials summed
by a reduce kernel) so that the weight streams through every SM.
"""

from __future__ import annotations

import math

import torch

from lmserve.kernels._triton import jit, next_power_of_2, num_sms, tl

_PROGRAMS_PER_SM = 4


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


@jit
def quantize_row(x, q_dtype: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """One float32 row (masked lanes 0) -> (q in q_dtype, float32 scale): scale = max(absmax / QMAX, MIN_SCALE);
    q = x / scale in IEEE division as torch, clamped to +-QMAX and rounded to nearest even into q_dtype (int8;
    e4m3 by its conversion). Shared by the per-token quantizer and the kernels that fuse it (RMSNorm, SiLU)."""
    absmax = tl.max(tl.abs(x), 0)
    scale = tl.maximum(tl.math.div_rn(absmax, absmax * 0.0 + QMAX), MIN_SCALE)
    scaled = tl.math.div_rn(x, tl.zeros_like(x) + scale)
    if q_dtype == tl.int8:
        # adding and subtracting 1.5 * 2**23 rounds |v| < 2**22 to an integer, ties to even (torch.round's rule)
        scaled = (scaled + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(scaled, -QMAX), QMAX).to(q_dtype), scale


@jit
def _per_token_quant_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row per program: quantize_row."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    q, scale = quantize_row(x, q_ptr.dtype.element_ty, QMAX, MIN_SCALE)
    tl.store(q_ptr + row * stride_qm + cols, q, mask=mask)
    tl.store(scale_ptr + row, scale)


def per_token_quant(
    x: torch.Tensor, dtype: torch.dtype, qmax: float, min_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (`dtype` [..., K], float32 scale [..., 1]) in one launch: the row quantizer of W8A8 (int8) and
    FP8 (e4m3), scale = max(absmax / qmax, min_scale)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    num_rows, k = flat.shape
    q = torch.empty(num_rows, k, dtype=dtype, device=x.device)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    if num_rows:
        block = next_power_of_2(k)
        _per_token_quant_kernel[(num_rows,)](
            flat, q, scale, k, flat.stride(0), q.stride(0),
            QMAX=qmax, MIN_SCALE=min_scale, BLOCK=block, num_warps=min(16, max(1, block // 1024)),
        )  # fmt: skip
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def per_token_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 [..., K], float32 scale [..., 1]); the same numbers as per_token_quant_int8_ref."""
    return per_token_quant(x, torch.int8, 127.0, 1e-8)


@jit
def _int8_gemm_kernel(
    x_ptr,
    w_ptr,
    x_scale_ptr,
    w_scale_ptr,
    dest_ptr,
    M,
    N,
    K,
    blocks_per_split,
    stride_xm,
    stride_wn,
    stride_xs,
    stride_ws,
    stride_dest_split,
    stride_dest_m,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program = a [BLOCK_M, BLOCK_N] tile x one split of K; w is [N, K], read K-major as tl.dot's B."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rows < M
    n_mask = cols < N
    k_offsets = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    kb_start = split * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(kb_start, kb_end):
        ks = kb * BLOCK_K + k_offsets
        k_mask = ks < K
        a = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0
        )
        b = tl.load(
            w_ptr + cols[None, :] * stride_wn + ks[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0
        )
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    x_scale = tl.load(x_scale_ptr + rows * stride_xs, mask=m_mask, other=0.0).to(tl.float32)
    w_scale = tl.load(w_scale_ptr + cols * stride_ws, mask=n_mask, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    dest = dest_ptr + split * stride_dest_split + rows[:, None] * stride_dest_m + cols[None, :]
    tl.store(dest, out.to(dest_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int8_gemm_blocks(num_rows: int) -> dict[str, int]:
    """Tile sizes, warps and pipeline depth for num_rows rows (small batches: narrow tiles, deep K)."""
    if num_rows > 64:
        return {"block_m": 128, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 3}
    block_m = 16 if num_rows <= 16 else 32 if num_rows <= 32 else 64
    return {"block_m": block_m, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4}


def int8_gemm(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    blocks_per_split: int | None = None,
    **overrides: int,
) -> torch.Tensor:
    """y [M, N] in out_dtype from x_q int8 [M, K], w_q int8 [N, K], x_scale [M, 1], w_scale [N, 1]."""
    (num_rows, k), n = x_q.shape, w_q.shape[0]
    if x_q.dtype != torch.int8 or w_q.dtype != torch.int8 or w_q.shape[1] != k:
        raise ValueError(f"int8_gemm needs int8 x_q [M, K] and w_q [N, K]; got {x_q.dtype} {tuple(x_q.shape)}, "
                         f"{w_q.dtype} {tuple(w_q.shape)}")  # fmt: skip
    if x_q.stride(1) != 1 or w_q.stride(1) != 1:
        x_q, w_q = x_q.contiguous(), w_q.contiguous()
    out = torch.empty(num_rows, n, dtype=out_dtype, device=x_q.device)
    if num_rows == 0:
        return out
    options = int8_gemm_blocks(num_rows) | overrides
    block_m, block_n, block_k = options["block_m"], options["block_n"], options["block_k"]
    num_k_blocks = math.ceil(k / block_k)
    tiles = (math.ceil(num_rows / block_m), math.ceil(n / block_n))
    if blocks_per_split is None:
        blocks_per_split = choose_split(tiles[0] * tiles[1], num_k_blocks, _PROGRAMS_PER_SM, x_q.device)
    num_splits = math.ceil(num_k_blocks / blocks_per_split)
    dest, stride_split, stride_m = split_destination(num_splits, out)
    _int8_gemm_kernel[(*tiles, num_splits)](
        x_q, w_q, x_scale, w_scale, dest, num_rows, n, k, blocks_per_split,
        x_q.stride(0), w_q.stride(0), x_scale.stride(0), w_scale.stride(0), stride_split, stride_m,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=options["num_warps"], num_stages=options["num_stages"],
    )  # fmt: skip
    if num_splits > 1:
        sum_splits(dest, out)
    return out


# -- torch references --------------------------------------------------------------------------------


def quantize_rows_int8(x: torch.Tensor, min_scale: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (last dim): (int8 [..., K], float32 scale [..., 1]), x ~ codes * scale.

    scale = max(absmax / 127, min_scale) in float32 (the floor keeps an all-zero row finite: its codes are 0),
    codes = round_half_even(x / scale) clamped to +-127.
    The one int8 row quantizer: weights per output channel (SmoothQuant checkpoints, the CPU lm_head copy),
    activations per token (W8A8Linear's torch paths); the Triton per_token_quant_int8 must give the same.
    """
    if x.device.type == "cpu" and x.numel() > QUANTIZE_CHUNK_ELEMENTS:
        return _quantize_rows_int8_chunked(x, min_scale)
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=min_scale)
    codes = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    return codes, scale


QUANTIZE_CHUNK_ELEMENTS = 1 << 18
"""Above this many values (a CPU weight: the lm_head copy) the rows go by chunks that stay in the cache."""


@torch.no_grad()  # out= and in-place ops refuse tensors that require grad (a weight still a Parameter)
def _quantize_rows_int8_chunked(x: torch.Tensor, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_int8's numbers (the same ops on each row), a block of rows at a time, in place: the
    SmolLM2 lm_head (49152 x 576) took 0.31 s in six passes over 113 MB of float32, now one pass per chunk."""
    rows = x.reshape(-1, x.shape[-1])
    codes = torch.empty(rows.shape, dtype=torch.int8)
    scale = torch.empty(rows.shape[0], 1, dtype=torch.float32)
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        part = rows[start : start + step].to(torch.float32, copy=True)
        part_scale = scale[start : start + step]
        torch.amax(part.abs(), dim=-1, keepdim=True, out=part_scale)
        part_scale.div_(127.0).clamp_(min=min_scale)
        codes[start : start + step] = part.div_(part_scale).round_().clamp_(-127, 127)
    return codes.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


per_token_quant_int8_ref = quantize_rows_int8
"""The CPU path's own quantizer: the kernel must give the same int8 codes and scales."""


def int8_gemm_ref(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Torch reference of int8_gemm: the integer product exactly (float64), scales in float64, one rounding."""
    accumulated = x_q.double() @ w_q.double().t()
    return (accumulated * x_scale.double() * w_scale.double().reshape(1, -1)).to(out_dtype)
