"""Quantized KV cache (int8 / int4): quantize-and-store, dequantize, and paged decode attention over int codes.

Per token and KV head, one asymmetric (scale, zero) pair in float16: x ~= code * scale + zero, with codes
in [0, 2**bits - 1]. int8 keeps one code per byte; int4 packs two per byte, dim j in the low nibble and
dim j + head_dim / 2 in the high one, so both kernels read a head as two contiguous halves.
Layout per layer: codes uint8 [2, num_blocks, block_size, Hkv, head_dim * bits / 8] (0 = K, 1 = V) and
params float16 [2, num_blocks, block_size, Hkv, 2] (scale, zero).
"""

from __future__ import annotations

import math

import torch

from lmserve.kernels._triton import jit, next_power_of_2, tl
from lmserve.kernels.decode_attention import _decode_reduce_kernel, choose_num_splits

KV_BITS = (8, 4)
PARAMS_DTYPE = torch.float16
# float16's smallest normal number: a constant head (max == min) still gets a representable, nonzero scale
MIN_SCALE = 2.0**-14


def packed_dim(head_dim: int, bits: int) -> int:
    """Bytes per head and token: head_dim for int8, head_dim / 2 for int4."""
    if bits not in KV_BITS or head_dim % 2:
        raise ValueError(
            f"KV quantization needs bits in {KV_BITS} and an even head_dim; got {bits=}, {head_dim=}"
        )
    return head_dim * bits // 8


# -- torch references --------------------------------------------------------------------------------


def quantize_kv_ref(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes uint8 [..., D * bits / 8], params float16 [..., 2] = (scale, zero))."""
    x = x.float()
    qmax = 2**bits - 1
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    # round scale and zero to their stored dtype first, so codes are computed with what dequantization uses
    scale = ((high - low) / qmax).clamp_min(MIN_SCALE).to(PARAMS_DTYPE).float()
    zero = low.to(PARAMS_DTYPE).float()
    codes = torch.floor((x - zero) / scale + 0.5).clamp_(0, qmax).to(torch.uint8)
    if bits == 4:
        half = x.shape[-1] // 2
        codes = codes[..., :half] | (codes[..., half:] << 4)
    return codes, torch.cat([scale, zero], -1).to(PARAMS_DTYPE)


def dequantize_kv_ref(
    codes: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of quantize_kv_ref: codes [..., D * bits / 8], params [..., 2] -> [..., D] in dtype."""
    if bits == 4:
        codes = torch.cat([codes & 15, codes >> 4], -1)
    params = params.float()
    return (codes.float() * params[..., :1] + params[..., 1:]).to(dtype)


def store_quantized_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    codes: torch.Tensor,
    params: torch.Tensor,
    slot_mapping: torch.Tensor,
    bits: int,
) -> None:
    """Quantize k/v [T, Hkv, D] and store them at slot_mapping [T] (-1 skipped) in one layer's codes/params."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    for index, x in enumerate((k, v)):
        new_codes, new_params = quantize_kv_ref(x[valid], bits)
        codes[index].view(-1, *codes.shape[3:])[slots] = new_codes
        params[index].view(-1, *params.shape[3:])[slots] = new_params


def dequantize_blocks(
    codes: torch.Tensor, params: torch.Tensor, block_ids: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """The given blocks of one layer, dequantized: block_ids [n] -> [2, n, block_size, Hkv, D]."""
    block_ids = block_ids.long()
    return dequantize_kv_ref(codes[:, block_ids], params[:, block_ids], bits, dtype)


# -- Triton kernels ----------------------------------------------------------------------------------


@jit
def _quantize_head(x_low, x_high, mask, QMAX: tl.constexpr):
    """(codes of both halves, scale, zero) of [HEADS, HALF] tiles; scale/zero already rounded to float16."""
    low = tl.minimum(
        tl.min(tl.where(mask, x_low, float("inf")), 1), tl.min(tl.where(mask, x_high, float("inf")), 1)
    )
    high = tl.maximum(
        tl.max(tl.where(mask, x_low, float("-inf")), 1), tl.max(tl.where(mask, x_high, float("-inf")), 1)
    )
    scale = tl.maximum((high - low) / QMAX, 2.0**-14).to(tl.float16).to(tl.float32)
    zero = low.to(tl.float16).to(tl.float32)
    code_low = tl.floor(tl.math.div_rn(x_low - zero[:, None], scale[:, None]) + 0.5)
    code_high = tl.floor(tl.math.div_rn(x_high - zero[:, None], scale[:, None]) + 0.5)
    code_low = tl.minimum(tl.maximum(code_low, 0.0), QMAX).to(tl.uint8)
    code_high = tl.minimum(tl.maximum(code_high, 0.0), QMAX).to(tl.uint8)
    return code_low, code_high, scale, zero


@jit
def _store_quantized_kernel(
    x_ptr, codes_ptr, params_ptr, slot_mapping_ptr, stride_xt, stride_xh,
    stride_codes_slot, stride_codes_head, stride_params_slot,
    NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    BITS: tl.constexpr,
):  # fmt: skip
    """One program = one token of K (program_id 1 == 0) or V (1): all its heads."""
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to write
        return
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims < HALF)
    row = x_ptr + token * stride_xt + heads[:, None] * stride_xh
    x_low = tl.load(row + dims, mask=mask, other=0.0).to(tl.float32)
    x_high = tl.load(row + HALF + dims, mask=mask, other=0.0).to(tl.float32)
    code_low, code_high, scale, zero = _quantize_head(x_low, x_high, mask, 2**BITS - 1)
    out = codes_ptr + slot * stride_codes_slot + heads[:, None] * stride_codes_head + dims
    if BITS == 4:
        tl.store(out, code_low | (code_high << 4), mask=mask)
    else:
        tl.store(out, code_low, mask=mask)
        tl.store(out + HALF, code_high, mask=mask)
    params = params_ptr + slot * stride_params_slot + heads * 2
    head_mask = heads < NUM_KV_HEADS
    tl.store(params, scale.to(tl.float16), mask=head_mask)
    tl.store(params + 1, zero.to(tl.float16), mask=head_mask)


def store_quantized_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    codes: torch.Tensor,
    params: torch.Tensor,
    slot_mapping: torch.Tensor,
    bits: int,
) -> None:
    """Triton store_quantized_kv_ref: no host sync, so it can run inside a CUDA graph."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and codes.is_contiguous() and params.is_contiguous()
    if num_tokens == 0:
        return
    half = head_dim // 2
    for index, x in enumerate((k, v)):
        _store_quantized_kernel[(num_tokens,)](
            x, codes[index], params[index], slot_mapping, x.stride(0), x.stride(1),
            codes.stride(2), codes.stride(3), params.stride(2),
            NUM_KV_HEADS=num_kv_heads, HALF=half, HEADS_PAD=next_power_of_2(num_kv_heads),
            HALF_PAD=next_power_of_2(half), BITS=bits, num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
        )  # fmt: skip


@jit
def _load_codes(codes_ptr, params_ptr, rows, param_rows, dims, kv_mask, token_mask,
                HALF: tl.constexpr, BITS: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
    """(codes of both halves [BLOCK_N, HALF_PAD] as DTYPE, scale [BLOCK_N], zero [BLOCK_N]) of one head.

    Codes stay codes (0..255 are exact in bf16/fp16): callers fold scale and zero into the scores and the
    output, x = code * scale + zero, instead of dequantizing every element of the tile.
    """
    if BITS == 4:
        packed = tl.load(codes_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0)
        code_low, code_high = packed & 15, packed >> 4
    else:
        code_low = tl.load(codes_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0)
        code_high = tl.load(codes_ptr + rows[:, None] + HALF + dims[None, :], mask=kv_mask, other=0)
    scale = tl.load(params_ptr + param_rows, mask=token_mask, other=0.0).to(tl.float32)
    zero = tl.load(params_ptr + param_rows + 1, mask=token_mask, other=0.0).to(tl.float32)
    return code_low.to(DTYPE), code_high.to(DTYPE), scale, zero


@jit
def _quantized_scores(q_low, q_high, q_sum, k_low, k_high, k_scale, k_zero):
    """q · k for k = code * scale + zero: scale * (q · code) + zero * sum(q), in float32 [M, BLOCK_N]."""
    q_codes = tl.dot(q_low, tl.trans(k_low)) + tl.dot(q_high, tl.trans(k_high))
    return q_codes * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]


@jit
def _quantized_values(p, v_low, v_high, v_scale, v_zero, DTYPE: tl.constexpr):
    """(p @ v for both halves, float32 [M, HALF_PAD]) for v = code * scale + zero, p [M, BLOCK_N] float32."""
    weights = (p * v_scale[None, :]).to(DTYPE)
    offset = tl.sum(p * v_zero[None, :], 1)[:, None]
    return tl.dot(weights, v_low) + offset, tl.dot(weights, v_high) + offset


@jit
def _attend_quant_tile(
    q_low, q_high, q_sum, m_i, l_i, acc_low, acc_high, codes_ptr, params_ptr, block_table, start_n, end,
    query_positions, kv_head, dims, scale_log2, stride_codes_kv, stride_codes_block, stride_codes_token,
    stride_codes_head, stride_params_kv, stride_params_block, stride_params_token,
    HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr,
    MASK: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (m_i, l_i, acc) with the keys start_n..+BLOCK_N, read as int codes.

    MASK: 0 every key of the tile is visible (whole prefill tiles), 1 keys at or past `end` are hidden (decode's
    last tile), 2 also causal against query_positions (prefill's diagonal tiles).
    """
    dtype = q_low.dtype
    tokens = start_n + tl.arange(0, BLOCK_N)
    token_mask = tokens < end
    block_ids = tl.load(block_table + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
    offsets = tokens % BLOCK_SIZE
    rows = block_ids * stride_codes_block + offsets * stride_codes_token + kv_head * stride_codes_head
    param_rows = block_ids * stride_params_block + offsets * stride_params_token + kv_head * 2
    kv_mask = token_mask[:, None] & (dims[None, :] < HALF)
    k_low, k_high, k_scale, k_zero = _load_codes(
        codes_ptr, params_ptr, rows, param_rows, dims, kv_mask, token_mask, HALF, BITS, dtype
    )
    v_low, v_high, v_scale, v_zero = _load_codes(
        codes_ptr + stride_codes_kv, params_ptr + stride_params_kv, rows, param_rows, dims, kv_mask,
        token_mask, HALF, BITS, dtype,
    )  # fmt: skip
    scores = _quantized_scores(q_low, q_high, q_sum, k_low, k_high, k_scale, k_zero) * scale_log2
    if MASK == 1:
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
    if MASK == 2:
        visible = token_mask[None, :] & (tokens[None, :] <= query_positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pv_low, pv_high = _quantized_values(p, v_low, v_high, v_scale, v_zero, dtype)
    return m_new, l_i, acc_low * alpha[:, None] + pv_low, acc_high * alpha[:, None] + pv_high


@jit
def _quant_decode_split_kernel(
    q_ptr, codes_ptr, params_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
    scale_log2, num_splits, stride_qt, stride_qh, stride_ot, stride_oh,
    stride_codes_kv, stride_codes_block, stride_codes_token, stride_codes_head,
    stride_params_kv, stride_params_block, stride_params_token, stride_block_table,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, WRITE_OUTPUT: tl.constexpr,
):  # fmt: skip
    """decode_attention's _decode_split_kernel over int codes; the head dim runs as two halves throughout."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HALF_PAD)
    heads = kv_head * GROUP + group
    head_mask = group < GROUP
    q_mask = head_mask[:, None] & (dims[None, :] < HALF)
    q_row = q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q_low = tl.load(q_row, mask=q_mask, other=0.0)
    q_high = tl.load(q_row + HALF, mask=q_mask, other=0.0)
    q_sum = tl.sum(q_low.to(tl.float32), 1) + tl.sum(q_high.to(tl.float32), 1)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc_low = tl.zeros([GROUP_PAD, HALF_PAD], tl.float32)
    acc_high = tl.zeros([GROUP_PAD, HALF_PAD], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_block_table
    for start_n in range(start, end, BLOCK_N):
        m_i, l_i, acc_low, acc_high = _attend_quant_tile(
            q_low, q_high, q_sum, m_i, l_i, acc_low, acc_high, codes_ptr, params_ptr, block_table, start_n,
            end, group, kv_head, dims, scale_log2, stride_codes_kv, stride_codes_block, stride_codes_token,
            stride_codes_head, stride_params_kv, stride_params_block, stride_params_token,
            HALF, BLOCK_SIZE, BLOCK_N, BITS, 1,
        )  # fmt: skip

    empty = l_i == 0.0
    norm = tl.where(empty, 1.0, l_i)[:, None]
    acc_low, acc_high = acc_low / norm, acc_high / norm
    if WRITE_OUTPUT:
        out = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out, acc_low.to(out_ptr.dtype.element_ty), mask=q_mask)
        tl.store(out + HALF, acc_high.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        row = (seq * GROUP * tl.num_programs(1) + heads) * num_splits + split
        tl.store(partial_lse_ptr + row, lse, mask=head_mask)
        partial = partial_out_ptr + row[:, None] * (2 * HALF) + dims[None, :]
        tl.store(partial, acc_low, mask=q_mask)
        tl.store(partial + HALF, acc_high, mask=q_mask)


def paged_decode_attention_quant(
    q: torch.Tensor,
    codes: torch.Tensor,
    params: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    bits: int,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """paged_decode_attention over one layer's quantized cache (codes/params as in this module's docstring).

    The grid depends only on q.shape[0] and block_tables.shape[1]: safe to capture in a CUDA graph.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = codes.shape
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    group, half = num_q_heads // num_kv_heads, head_dim // 2
    partial_out = partial_lse = out
    if num_splits > 1:
        partial_out = torch.empty(
            num_seqs, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        partial_lse = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    _quant_decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, codes, params, block_tables, seq_lens, out, partial_out, partial_lse,
        scale * math.log2(math.e), num_splits, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        codes.stride(0), codes.stride(1), codes.stride(2), codes.stride(3),
        params.stride(0), params.stride(1), params.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), HALF=half, HALF_PAD=max(16, next_power_of_2(half)),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, BITS=bits, WRITE_OUTPUT=num_splits == 1,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_q_heads)](
            partial_out, partial_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, DIM_PAD=next_power_of_2(head_dim), SPLITS_PAD=next_power_of_2(num_splits),
            num_warps=4,
        )  # fmt: skip
    return out
