"""Paged prefill attention over the int8 / int4 KV cache: codes are read through the block tables and
folded into the scores in registers, so no chunk dequantizes its context into a bf16 copy first."""

from __future__ import annotations

import math

import torch

from lmserve.kernels._triton import jit, next_power_of_2, tl
from lmserve.kernels.kv_quant import _attend_quant_tile


@jit
def _quant_prefill_kernel(
    q_ptr, codes_ptr, params_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
    scale_log2, first_seq, stride_qt, stride_qh, stride_ot, stride_oh,
    stride_codes_kv, stride_codes_block, stride_codes_token, stride_codes_head,
    stride_params_kv, stride_params_block, stride_params_token, stride_block_table,
    GROUP: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr,
):  # fmt: skip
    """One program = BLOCK_M query tokens of one sequence x one query head (as _prefill_kernel)."""
    seq = first_seq + tl.program_id(0)
    query_block = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    if query_block * BLOCK_M >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_offset = seq_len - query_len

    rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < query_len
    dims = tl.arange(0, HALF_PAD)
    q_mask = row_mask[:, None] & (dims[None, :] < HALF)
    q_row = q_ptr + (query_start + rows)[:, None].to(tl.int64) * stride_qt + head * stride_qh + dims[None, :]
    q_low = tl.load(q_row, mask=q_mask, other=0.0)
    q_high = tl.load(q_row + HALF, mask=q_mask, other=0.0)
    q_sum = tl.sum(q_low.to(tl.float32), 1) + tl.sum(q_high.to(tl.float32), 1)
    query_positions = context_offset + rows

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_low = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    acc_high = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_block_table
    unmasked_end = (context_offset + query_block * BLOCK_M) // BLOCK_N * BLOCK_N
    end = tl.minimum(seq_len, context_offset + (query_block + 1) * BLOCK_M)
    for start_n in range(0, unmasked_end, BLOCK_N):
        m_i, l_i, acc_low, acc_high = _attend_quant_tile(
            q_low, q_high, q_sum, m_i, l_i, acc_low, acc_high, codes_ptr, params_ptr, block_table, start_n,
            end, query_positions, kv_head, dims, scale_log2, stride_codes_kv, stride_codes_block,
            stride_codes_token, stride_codes_head, stride_params_kv, stride_params_block, stride_params_token,
            HALF, BLOCK_SIZE, BLOCK_N, BITS, 0,
        )  # fmt: skip
    for start_n in range(unmasked_end, end, BLOCK_N):
        m_i, l_i, acc_low, acc_high = _attend_quant_tile(
            q_low, q_high, q_sum, m_i, l_i, acc_low, acc_high, codes_ptr, params_ptr, block_table, start_n,
            end, query_positions, kv_head, dims, scale_log2, stride_codes_kv, stride_codes_block,
            stride_codes_token, stride_codes_head, stride_params_kv, stride_params_block, stride_params_token,
            HALF, BLOCK_SIZE, BLOCK_N, BITS, 2,
        )  # fmt: skip

    norm = tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_row = (
        out_ptr + (query_start + rows)[:, None].to(tl.int64) * stride_ot + head * stride_oh + dims[None, :]
    )
    tl.store(out_row, (acc_low / norm).to(out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(out_row + HALF, (acc_high / norm).to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_prefill_attention_quant(
    q: torch.Tensor,
    codes: torch.Tensor,
    params: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    bits: int,
    first_seq: int,
    num_seqs: int,
    max_query_len: int,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 32,  # 64 spills registers on sm_90 (Triton 3.6, head_dim 128); 32 does not
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """paged_prefill_attention over one layer's quantized cache (layout in kernels/kv_quant.py).

    The chunk's own K/V must already be stored; max_query_len (a host int) sizes the grid.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    _, _, block_size, num_kv_heads, _ = codes.shape
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0 or max_query_len == 0:
        return out
    half = head_dim // 2
    grid = (num_seqs, math.ceil(max_query_len / block_m), num_q_heads)
    _quant_prefill_kernel[grid](
        q, codes, params, block_tables, seq_lens, query_start_loc, out, scale * math.log2(math.e), first_seq,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        codes.stride(0), codes.stride(1), codes.stride(2), codes.stride(3),
        params.stride(0), params.stride(1), params.stride(2), block_tables.stride(0),
        GROUP=num_q_heads // num_kv_heads, HALF=half, HALF_PAD=max(16, next_power_of_2(half)),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, BITS=bits,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
