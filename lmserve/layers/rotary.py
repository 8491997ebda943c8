"""Rotary position embedding (RoPE): HF's default, linear and llama3 frequency scalings."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32, exactly as transformers' ROPE_INIT_FUNCTIONS compute them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = "default" if rope_scaling is None else rope_scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / float(_field(rope_scaling, "factor"))
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling or {})
    # "dynamic" (NTK) equals the default inside the original context, where HF leaves theta alone
    return inv_freq


def _field(rope_scaling: dict[str, Any] | None, key: str) -> Any:
    if not rope_scaling or key not in rope_scaling:
        raise ValueError(f"rope_scaling={rope_scaling!r} lacks field {key!r}")
    return rope_scaling[key]


def _llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(_field(rope_scaling, "factor"))
    low_freq_factor = float(_field(rope_scaling, "low_freq_factor"))
    high_freq_factor = float(_field(rope_scaling, "high_freq_factor"))
    old_context_len = float(_field(rope_scaling, "original_max_position_embeddings"))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables [max_positions, head_dim] for the NeoX (rotate-half) layout of HF Llama: cos
    repeated over both halves, sin negated over the first (so `rotate_in_place` is 4 torch ops instead of 7)."""

    cos_cache: torch.Tensor
    sin_cache: torch.Tensor

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, rope_scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, rope_scaling).to(torch.get_default_device())
        positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
        freqs = positions[:, None] * inv_freq[None, :]
        # HF computes cos/sin in float32 and rounds them to the activation dtype
        dtype = torch.get_default_dtype()
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        self.register_buffer("cos_cache", torch.cat([cos, cos], dim=-1), persistent=False)
        self.register_buffer("sin_cache", torch.cat([-sin, sin], dim=-1), persistent=False)
        # CUDA rotates in place with the Triton kernel, from one float32 [max_positions, head_dim] table
        self.cos_sin_cache: torch.Tensor | None = None
        if inv_freq.is_cuda:
            self.cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def prepare(self, positions: torch.Tensor) -> RopeInputs:
        """What every layer needs to rotate this step's q and k (computed once per step)."""
        if self.cos_sin_cache is not None:
            return RopeInputs(positions, None, None, self.cos_sin_cache)
        cos, sin = self.lookup(positions)
        return RopeInputs(positions, cos, sin, None)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim] (the tables' layout) at `positions`, ready to broadcast over heads."""
        return self.cos_cache[positions].unsqueeze(1), self.sin_cache[positions].unsqueeze(1)


class RopeInputs(NamedTuple):
    positions: torch.Tensor
    cos: torch.Tensor | None
    """[T, 1, head_dim] (torch path: cos over both halves, sin negated over the first) or None (Triton path)."""
    sin: torch.Tensor | None
    cos_sin_cache: torch.Tensor | None
    """float32 [max_positions, head_dim] for the Triton kernel, or None."""


def rotate_qk(qk: torch.Tensor, num_q_heads: int, rope: RopeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place, given as qk [T, Hq + Hkv, D] (a view into the fused qkv output): k stays beside
    v there, so the CPU backend stores both with one copy."""
    if rope.cos_sin_cache is not None:
        from lmserve.kernels.rotary import apply_rotary as triton_apply_rotary

        q, k = qk[:, :num_q_heads], qk[:, num_q_heads:]
        triton_apply_rotary(q, k, rope.positions, rope.cos_sin_cache)
        return q, k
    assert rope.cos is not None and rope.sin is not None
    rotate_in_place(qk, rope.cos, rope.sin)
    return qk[:, :num_q_heads], qk[:, num_q_heads:]


def rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, heads, head_dim] in place by the tables' cos/sin [T, 1, head_dim].

    x * cos + swap_halves(x) * sin is (x1 cos - x2 sin, x2 cos + x1 sin) rounded exactly as HF's rotate-half
    form rounds it (negating a product is exact), in 4 ops instead of 7 and one allocation (the swapped copy).
    """
    num_tokens, num_heads, head_dim = x.shape
    swapped = x.view(num_tokens, num_heads, 2, head_dim // 2).flip(2).view(num_tokens, num_heads, head_dim)
    x.mul_(cos).add_(swapped.mul_(sin))
