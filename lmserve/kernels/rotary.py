"""Rotary position embedding (neox style, HF Llama's rotate_half) applied in place to q and k."""

from __future__ import annotations

import torch

from lmserve.kernels._triton import jit, next_power_of_2, tl


@jit
def rotate_heads(
    src_ptr,
    dst_ptr,
    stride_src_h,
    stride_dst_h,
    cos,
    sin,
    num_heads,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    """Rotate num_heads heads at src (one token) and store them at dst (src itself for in place)."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    first = src_ptr + heads * stride_src_h + dims
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    out = dst_ptr + heads * stride_dst_h + dims
    tl.store(out, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@jit
def load_cos_sin(cos_sin_ptr, positions_ptr, token, stride_cache, HALF: tl.constexpr):
    """cos and sin [1, HALF] (float32) of the token's position."""
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_sin_ptr + position * stride_cache + dims).to(tl.float32)
    sin = tl.load(cos_sin_ptr + position * stride_cache + HALF + dims).to(tl.float32)
    return cos, sin


@jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    num_q_heads,
    num_kv_heads,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = load_cos_sin(cos_sin_ptr, positions_ptr, token, stride_cache, HALF)
    q_row = q_ptr + token * stride_qt
    k_row = k_ptr + token * stride_kt
    rotate_heads(q_row, q_row, stride_qh, stride_qh, cos, sin, num_q_heads, Q_HEADS_PAD, HALF)
    rotate_heads(k_row, k_row, stride_kh, stride_kh, cos, sin, num_kv_heads, KV_HEADS_PAD, HALF)


def build_cos_sin_cache(
    max_position: int, rotary_dim: int, base: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[max_position, rotary_dim] float32: cos of the rotary_dim/2 frequencies, then their sin (no scaling)."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim)
    )
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32, device=device), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place; the first cos_sin_cache.shape[1] dims are rotated."""
    half = cos_sin_cache.shape[1] // 2
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    assert half == next_power_of_2(half), f"rotary half-dim {half} must be a power of two"
    if q.shape[0] == 0:
        return
    _rotary_kernel[(q.shape[0],)](
        q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        q.shape[1], k.shape[1], Q_HEADS_PAD=next_power_of_2(q.shape[1]), KV_HEADS_PAD=next_power_of_2(k.shape[1]),
        HALF=half, num_warps=4,
    )  # fmt: skip


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Torch reference of apply_rotary: q * cos + rotate_half(q) * sin, in float32, written back in place."""
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)
    cos = torch.cat([cos, cos], dim=-1)[:, None, :]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :]
    for x in (q, k):
        rotated = x[..., :rotary_dim].float()
        first, second = rotated.chunk(2, dim=-1)
        x[..., :rotary_dim] = (rotated * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)
