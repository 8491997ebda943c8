"""Paged prefill attention: varlen causal attention of prompt chunks over their paged context (prefix hits included)."""

from __future__ import annotations

import math

import torch

from lmserve.kernels._triton import jit, next_power_of_2, tl
from lmserve.kernels.decode_attention import NO_WINDOW, attend, gather_context, is_fp8


@jit
def _attend_tile(
    q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table, start_n, end, query_positions, kv_head,
    dims, dim_mask, scale_log2, stride_cache_block, stride_cache_token, stride_cache_head, sliding_window,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (m_i, l_i, acc) with keys start_n..start_n+BLOCK_N read through the block table."""
    tokens = start_n + tl.arange(0, BLOCK_N)
    token_mask = tokens < end
    block_ids = tl.load(block_table + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
    cache_rows = block_ids * stride_cache_block + (tokens % BLOCK_SIZE) * stride_cache_token
    offsets = cache_rows[:, None] + kv_head * stride_cache_head + dims[None, :]
    kv_mask = token_mask[:, None] & dim_mask
    k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0).to(q.dtype)  # FP8 widens here
    v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0).to(q.dtype)
    scores = tl.dot(q, tl.trans(k)) * scale_log2
    if MASKED:
        visible = token_mask[None, :] & (tokens[None, :] <= query_positions[:, None])
        visible &= tokens[None, :] > query_positions[:, None] - sliding_window
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    scale_log2,
    first_seq,
    sliding_window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_block_table,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOWED: tl.constexpr,
    WIDEN_KV: tl.constexpr,
):
    """One program = BLOCK_M query tokens of one sequence x one query head; K/V come from the cache (an FP8
    cache, WIDEN_KV, is widened to float16 tile by tile, q cast to it: see _decode_split_kernel)."""
    seq = first_seq + tl.program_id(0)
    query_block = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    if query_block * BLOCK_M >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_offset = seq_len - query_len  # tokens cached before this chunk

    rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < query_len
    dims = tl.arange(0, DIM_PAD)
    dim_mask = dims[None, :] < HEAD_DIM
    q_offsets = (query_start + rows)[:, None].to(tl.int64) * stride_qt + head * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_mask[:, None] & dim_mask, other=0.0)
    if WIDEN_KV:
        q = q.to(tl.float16)
    else:
        q = q.to(k_cache_ptr.dtype.element_ty)
    query_positions = context_offset + rows

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_block_table
    # Keys before the block's first query position are visible to every row: no causal mask there;
    # with a window every tile is masked, and tiles before the first row's window are skipped.
    first_position = context_offset + query_block * BLOCK_M
    unmasked_end = first_position // BLOCK_N * BLOCK_N
    masked_start = unmasked_end
    if WINDOWED:
        unmasked_end = 0
        masked_start = tl.maximum(first_position - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
    end = tl.minimum(seq_len, context_offset + (query_block + 1) * BLOCK_M)
    for start_n in range(0, unmasked_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table, start_n, end, query_positions, kv_head,
            dims, dim_mask, scale_log2, stride_cache_block, stride_cache_token, stride_cache_head,
            sliding_window, BLOCK_SIZE, BLOCK_N, False,
        )  # fmt: skip
    for start_n in range(masked_start, end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table, start_n, end, query_positions, kv_head,
            dims, dim_mask, scale_log2, stride_cache_block, stride_cache_token, stride_cache_head,
            sliding_window, BLOCK_SIZE, BLOCK_N, True,
        )  # fmt: skip

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_offsets = (query_start + rows)[:, None].to(tl.int64) * stride_ot + head * stride_oh + dims[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    first_seq: int,
    num_seqs: int,
    max_query_len: int,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Causal attention of sequences first_seq..first_seq+num_seqs-1 over their paged context.

    q/out: [T, Hq, D] flat over the whole batch (rows query_start_loc[i]:query_start_loc[i+1] belong to
    sequence i); the chunk's own K/V must already be in the cache. max_query_len (a host int) sizes the grid.
    sliding_window W: the query at position i sees keys i - W + 1 .. i only.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0 or max_query_len == 0:
        return out
    grid = (num_seqs, math.ceil(max_query_len / block_m), num_q_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * math.log2(math.e), first_seq, sliding_window or NO_WINDOW,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, DIM_PAD=next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, WINDOWED=sliding_window is not None,
        WIDEN_KV=is_fp8(k_cache), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    first_seq: int,
    num_seqs: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Torch reference of paged_prefill_attention; rows outside the chosen sequences are zero."""
    out = torch.zeros_like(q)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for seq in range(first_seq, first_seq + num_seqs):
        begin, end = starts[seq], starts[seq + 1]
        keys, values = gather_context(k_cache, v_cache, block_tables[seq], lens[seq])
        offset = lens[seq] - (end - begin)
        out[begin:end] = attend(q[begin:end], keys, values, scale, offset, sliding_window)
    return out
