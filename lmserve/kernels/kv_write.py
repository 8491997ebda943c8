"""Write new keys and values into the paged KV cache at their slots; or rotate q and k and write in one launch."""

from __future__ import annotations

import torch

from lmserve.kernels._triton import jit, next_power_of_2, pdl_enter, pdl_options, tl
from lmserve.kernels.rotary import apply_rotary_ref, load_cos_sin, rotate_heads


@jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to write
        return
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    cache_offsets = slot * stride_cache_slot + heads * stride_cache_head + dims
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k/v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at slot_mapping [T]; -1 is skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=next_power_of_2(num_kv_heads),
        DIM_PAD=next_power_of_2(head_dim),
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Torch reference of store_kv."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid].to(v_cache.dtype)


@jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, positions_ptr, slot_mapping_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cache_slot, stride_cache_head,
    stride_cos, num_q_heads, num_kv_heads,
    Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """One token: q rotated in place; k rotated straight into the cache and v copied there (slot >= 0)."""
    pdl_enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = load_cos_sin(cos_sin_ptr, positions_ptr, token, stride_cos, HALF)
    q_row = q_ptr + token * stride_qt
    rotate_heads(q_row, q_row, stride_qh, stride_qh, cos, sin, num_q_heads, Q_HEADS_PAD, HALF)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # padding tokens (slot -1) write nothing
        k_dst = k_cache_ptr + slot * stride_cache_slot
        rotate_heads(
            k_ptr + token * stride_kt, k_dst, stride_kh, stride_cache_head, cos, sin, num_kv_heads, KV_HEADS_PAD,
            HALF,
        )  # fmt: skip
        heads = tl.arange(0, KV_HEADS_PAD)[:, None]
        dims = tl.arange(0, 2 * HALF)[None, :]
        mask = heads < num_kv_heads
        v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
        v_dst = v_cache_ptr + slot * stride_cache_slot + heads * stride_cache_head + dims
        tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> None:
    """apply_rotary then store_kv in one launch: q [T, Hq, D] rotated in place, rotated k and v into the caches.

    k itself is left unrotated (attention reads keys from the cache). The whole head is rotated:
    cos_sin_cache [max_positions, D] float32 (cos then sin), D a power of two.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    assert cos_sin_cache.shape[1] == head_dim == next_power_of_2(head_dim)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    if num_tokens == 0:
        return
    _rotary_store_kv_kernel[(num_tokens,)](
        q, k, v, k_cache, v_cache, positions, slot_mapping, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1),
        k_cache.stride(2), cos_sin_cache.stride(0), q.shape[1], num_kv_heads,
        Q_HEADS_PAD=next_power_of_2(q.shape[1]), KV_HEADS_PAD=next_power_of_2(num_kv_heads), HALF=head_dim // 2,
        num_warps=4, **pdl_options(q.device),
    )  # fmt: skip


def rotary_store_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> None:
    """Torch reference of rotary_store_kv: apply_rotary_ref (on a copy of k), then store_kv_ref."""
    rotated_k = k.clone()
    apply_rotary_ref(q, rotated_k, positions, cos_sin_cache)
    store_kv_ref(rotated_k, v, k_cache, v_cache, slot_mapping)
