"""Paged decode attention (one query token per sequence): flash-decoding over the paged KV cache."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lmserve.kernels._triton import (
    DECODE_FUSIONS,
    jit,
    next_power_of_2,
    num_sms,
    pdl_enter,
    pdl_options,
    tl,
)
from lmserve.kernels.split_k import MAX_TILES, tile_locks

_MIN_TOKENS_PER_SPLIT = 128
DECODE_TILES = {"default": (64, 4), "fp8": (128, 2)}
"""(block_n, num_warps) of the decode kernel by cache dtype. e4m3 at the bf16 tile (64, 4) ran at 0.73x bf16
(batch 64 x 4,096 tokens, Llama-3-8B heads, H200); (128, 2) ran at 1.41x (benchmarks/bench_kv_quant.py
--sweep-policy fp8; RESULTS.md)."""
NO_WINDOW = 2**30
"""The window the kernels are given when a layer has none: longer than any context."""


@jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    counters_ptr,
    k_new_ptr,
    v_new_ptr,
    positions_ptr,
    slot_mapping_ptr,
    cos_sin_ptr,
    scale_log2,
    num_splits,
    sliding_window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_block_table,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WRITE_OUTPUT: tl.constexpr,
    WIDEN_KV: tl.constexpr,
    ROPE: tl.constexpr = False,
    FUSED_REDUCE: tl.constexpr = False,
    SPLITS_PAD: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """One program = one sequence x one KV head x one split of its context; all GROUP query heads at once.

    WIDEN_KV (an FP8 cache): q is cast to float16 and keys and values are widened to float16 in registers as they
    are loaded (e4m3 -> f16 is one exact cvt on sm_90, -> bf16 takes more; f16 also keeps more of q and p than
    bf16); otherwise q is cast to the cache's dtype (the same one for a bf16/fp16 model).

    ROPE (decode_new_kv): q and the step's new key arrive unrotated. Every program rotates its q heads in
    registers; the new key (rotated) and value come from registers for the context's last token, and the program
    whose split holds that token also writes them into the cache at the token's slot, so rotary_store_kv takes no
    launch of its own. The values are rounded to the cache's dtype first, as a store and a load would round them.

    FUSED_REDUCE (several splits): the last program of a (sequence, KV head) to finish, counted on counters_ptr
    (the split-K GEMVs' tile_locks; it resets its own to 0), combines the splits' partials itself, so the reduce
    takes no launch of its own.
    """
    pdl_enter(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    window_start = tl.maximum(seq_len - sliding_window, 0)  # the first key the query sees
    # Splits divide each sequence's own window, so the grid stays fixed (CUDA graphs) while work balances.
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len - window_start, num_splits), BLOCK_N) * BLOCK_N
    start = window_start + split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + group
    head_mask = group < GROUP
    q_mask = head_mask[:, None] & (dims[None, :] < HEAD_DIM)
    q_heads = q_ptr + seq * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_heads + dims[None, :], mask=q_mask, other=0.0)
    last = seq_len - 1  # the step's own token
    if ROPE:
        # neox rotate-half of a whole head (HEAD_DIM a power of two): x * cos -/+ partner * sin
        half = HEAD_DIM // 2  # a constexpr: HEAD_DIM is one
        partner = (dims + half) % HEAD_DIM
        first_half = dims < half
        position = tl.load(positions_ptr + seq).to(tl.int64)
        cos = tl.load(cos_sin_ptr + position * stride_cos + dims % half).to(tl.float32)
        sin = tl.load(cos_sin_ptr + position * stride_cos + half + dims % half).to(tl.float32)
        q32 = q.to(tl.float32)
        q_partner = tl.load(q_heads + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
        q = tl.where(
            first_half[None, :],
            q32 * cos[None, :] - q_partner * sin[None, :],
            q32 * cos[None, :] + q_partner * sin[None, :],
        ).to(q_ptr.dtype.element_ty)
        k_row = k_new_ptr + seq * stride_kt + kv_head * stride_kh
        k32 = tl.load(k_row + dims).to(tl.float32)
        k_partner = tl.load(k_row + partner).to(tl.float32)
        k_new = tl.where(first_half, k32 * cos - k_partner * sin, k32 * cos + k_partner * sin).to(
            k_cache_ptr.dtype.element_ty
        )
        v_new = tl.load(v_new_ptr + seq * stride_vt + kv_head * stride_vh + dims).to(
            v_cache_ptr.dtype.element_ty
        )
        slot = tl.load(slot_mapping_ptr + seq).to(tl.int64)
        if (slot >= 0) & (last >= start) & (last < end):  # this split holds the new token: it stores it
            new_offsets = slot * stride_cache_token + kv_head * stride_cache_head + dims
            tl.store(k_cache_ptr + new_offsets, k_new)
            tl.store(v_cache_ptr + new_offsets, v_new)
    if WIDEN_KV:
        q = q.to(tl.float16)
    else:
        q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_block_table
    for start_n in range(start, end, BLOCK_N):
        tokens = start_n + tl.arange(0, BLOCK_N)
        token_mask = tokens < end
        block_ids = tl.load(block_table + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
        rows = block_ids * stride_cache_block + (tokens % BLOCK_SIZE) * stride_cache_token
        offsets = rows[:, None] + kv_head * stride_cache_head + dims[None, :]
        kv_mask = token_mask[:, None] & (dims[None, :] < HEAD_DIM)
        if ROPE:  # the new token from registers, not from the cache this launch writes
            is_new = (tokens == last)[:, None]
            k = tl.load(k_cache_ptr + offsets, mask=kv_mask & ~is_new, other=0.0).to(q.dtype)
            v = tl.load(v_cache_ptr + offsets, mask=kv_mask & ~is_new, other=0.0).to(q.dtype)
            k = tl.where(is_new, k_new.to(q.dtype)[None, :], k)
            v = tl.where(is_new, v_new.to(q.dtype)[None, :], v)
        else:
            k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0).to(q.dtype)
            v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k)) * scale_log2
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0  # a split past the end of a short sequence, or a zero-length padding sequence
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    if WRITE_OUTPUT:
        out = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        rows = (seq * GROUP * tl.num_programs(1) + heads) * num_splits
        tl.store(partial_lse_ptr + rows + split, lse, mask=head_mask)
        tl.store(partial_out_ptr + (rows + split)[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)
        if FUSED_REDUCE:
            tl.debug_barrier()  # every thread's partials are stored before the release below
            counter = counters_ptr + seq * tl.num_programs(1) + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:  # the last split of this KV head
                tl.atomic_xchg(counter, 0)  # ready for the next launch (it waits for this one: stream order)
                splits = tl.arange(0, SPLITS_PAD)
                split_mask = head_mask[:, None] & (splits[None, :] < num_splits)
                lses = tl.load(
                    partial_lse_ptr + rows[:, None] + splits[None, :],
                    mask=split_mask,
                    other=float("-inf"),
                    cache_modifier=".cg",
                )
                lse_max = tl.max(lses, 1)
                lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
                total = tl.sum(tl.exp2(lses - lse_max[:, None]), 1)
                # splits past the context's end are empty (weight 0): only the ones holding keys are read
                active = tl.cdiv(seq_len - window_start, tl.maximum(tokens_per_split, 1))
                combined = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
                for s in range(0, active):
                    weight = tl.exp2(
                        tl.load(
                            partial_lse_ptr + rows + s,
                            mask=head_mask,
                            other=float("-inf"),
                            cache_modifier=".cg",
                        )
                        - lse_max
                    )
                    part = tl.load(
                        partial_out_ptr + (rows + s)[:, None] * HEAD_DIM + dims[None, :],
                        mask=q_mask,
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    combined += part * weight[:, None]
                combined = combined / tl.where(total == 0.0, 1.0, total)[:, None]
                out = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :]
                tl.store(out, combined.to(out_ptr.dtype.element_ty), mask=q_mask)


@jit
def _decode_reduce_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Combine the splits of one (sequence, query head) by their log-sum-exp weights."""
    pdl_enter(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    split_mask = splits < num_splits
    lse = tl.load(partial_lse_ptr + row * num_splits + splits, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    mask = split_mask[:, None] & (dims[None, :] < HEAD_DIM)
    partial = tl.load(
        partial_out_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
        mask=mask,
        other=0.0,
    )
    total = tl.sum(weights, 0)
    out = tl.sum(partial * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + seq * stride_ot + head * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Enough splits to give every SM about two programs, none shorter than _MIN_TOKENS_PER_SPLIT tokens."""
    wanted = math.ceil(2 * num_sms(device) / max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, math.ceil(max_context_len / _MIN_TOKENS_PER_SPLIT), 64))


class NewTokenKV(NamedTuple):
    """The step's new key and value of each decode sequence, unrotated, for paged_decode_attention to rotate (with
    q), store at slot_mapping and attend to from registers: rotary_store_kv fused into the attention launch."""

    k: torch.Tensor  # [B, Hkv, D]
    v: torch.Tensor  # [B, Hkv, D]
    slot_mapping: torch.Tensor  # [>=B] int; -1 (padding) stores nothing
    positions: torch.Tensor  # [>=B]
    cos_sin_cache: torch.Tensor  # [max_positions, D] float32, cos then sin (rotary.build_cos_sin_cache)


FUSE_ROTARY = "rotary" in DECODE_FUSIONS
"""rotary_store_kv inside the attention launch of a decode-only step (_triton.FUSION_ENV; off: on an H100 it won
2 % for AWQ at batch 1 and lost at 16-64 rows and in the bf16 job)."""
FUSE_ROTARY_ROWS = 0
"""Decode-only steps of at most this many sequences take the rotary fusion even where FUSE_ROTARY is off (the one-row
step is where it won, for AWQ)."""
FUSE_REDUCE = "reduce" in DECODE_FUSIONS
"""The splits combined by their last program, no reduce launch (_triton.FUSION_ENV; off: it lost on an H100)."""


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    sliding_window: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    new_kv: NewTokenKV | None = None,
    fused_reduce: bool | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    q: [B, Hq, D]; k_cache/v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [>=B, max_blocks] int32;
    seq_lens: [>=B] int32 (context length including the query token, already in the cache).
    With new_kv, q and the new token's key are unrotated and the new key and value are not yet in the cache: the
    launch rotates both, stores the key and value and reads the new token from registers (q is left as it is).
    fused_reduce (default FUSE_REDUCE): several splits combine in the same launch, without a reduce launch.
    sliding_window W: the query (at position seq_len - 1) reads only the last W keys.
    The grid depends only on B and block_tables.shape[1], never on GPU values: safe to capture in a CUDA graph.
    block_n / num_warps default to the tile measured fastest for the cache's dtype (DECODE_TILES).
    """
    default_block_n, default_warps = DECODE_TILES["fp8" if is_fp8(k_cache) else "default"]
    block_n, num_warps = block_n or default_block_n, num_warps or default_warps
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    if num_splits is None:
        max_context_len = min(block_tables.shape[1] * block_size, sliding_window or NO_WINDOW)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context_len, q.device)
    group = num_q_heads // num_kv_heads
    # unused placeholders when one split writes the output directly
    partial_out = partial_lse = counters = out
    if num_splits > 1:
        partial_out = torch.empty(
            num_seqs, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        partial_lse = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    reduce_here = num_splits > 1 and (FUSE_REDUCE if fused_reduce is None else fused_reduce)
    if reduce_here and num_seqs * num_kv_heads <= MAX_TILES:
        counters = tile_locks(q.device)  # the split-K GEMVs' counters: zero between launches, as here
    else:
        reduce_here = False
    new_tensors, new_strides = _new_token_args(new_kv, q, k_cache, v_cache)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, partial_out, partial_lse, counters, *new_tensors,
        scale * math.log2(math.e), num_splits, sliding_window or NO_WINDOW,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), *new_strides,
        GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), HEAD_DIM=head_dim,
        DIM_PAD=next_power_of_2(head_dim), BLOCK_SIZE=block_size, BLOCK_N=block_n,
        WRITE_OUTPUT=num_splits == 1, WIDEN_KV=is_fp8(k_cache), ROPE=new_kv is not None,
        FUSED_REDUCE=reduce_here, SPLITS_PAD=next_power_of_2(num_splits) if reduce_here else 1,
        num_warps=num_warps, num_stages=num_stages, **pdl_options(q.device),
    )  # fmt: skip
    if num_splits > 1 and not reduce_here:
        _decode_reduce_kernel[(num_seqs, num_q_heads)](
            partial_out, partial_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, DIM_PAD=next_power_of_2(head_dim), SPLITS_PAD=next_power_of_2(num_splits),
            num_warps=4, **pdl_options(q.device),
        )  # fmt: skip
    return out


def _new_token_args(
    new_kv: NewTokenKV | None, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """The split kernel's (k_new, v_new, positions, slot_mapping, cos_sin) and (stride_kt, stride_kh, stride_vt,
    stride_vh, stride_cos); q as placeholders and zeros without new_kv (ROPE off)."""
    if new_kv is None:
        return (q,) * 5, (0,) * 5
    k_new, v_new, slots, positions, cos_sin = new_kv
    head_dim = q.shape[-1]
    assert head_dim == next_power_of_2(head_dim) and cos_sin.shape[1] == head_dim
    assert k_new.stride(-1) == 1 and v_new.stride(-1) == 1 and cos_sin.stride(-1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    strides = (k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos_sin.stride(0))
    return (k_new, v_new, positions, slots, cos_sin), strides


def is_fp8(cache: torch.Tensor) -> bool:
    """An FP8 (e4m3) KV cache: the attention kernels widen it to the query's dtype as they read it."""
    return cache.dtype == torch.float8_e4m3fn


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Torch reference of paged_decode_attention (float32 math, output in q's dtype)."""
    out = torch.empty_like(q)
    for seq, seq_len in enumerate(seq_lens[: q.shape[0]].tolist()):
        keys, values = gather_context(k_cache, v_cache, block_tables[seq], seq_len)
        out[seq] = attend(q[seq : seq + 1], keys, values, scale, seq_len - 1, sliding_window)[0]
    return out


def gather_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first seq_len keys and values [seq_len, Hkv, D] of one sequence, read through its block table."""
    block_size = k_cache.shape[1]
    tokens = torch.arange(seq_len, device=k_cache.device)
    blocks = block_table.long()[tokens // block_size]
    return k_cache[blocks, tokens % block_size], v_cache[blocks, tokens % block_size]


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    context_offset: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal GQA attention of q [Tq, Hq, D] at positions context_offset.. over keys/values [Tk, Hkv, D],
    each query seeing only the last sliding_window keys up to its own position when that is given."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
    query_positions = context_offset + torch.arange(q.shape[0], device=q.device)
    key_positions = torch.arange(keys.shape[0], device=q.device)[None, :]
    hidden = key_positions > query_positions[:, None]
    if sliding_window is not None:
        hidden |= key_positions <= query_positions[:, None] - sliding_window
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
