"""The CPU rotary (4 ops, in place) against HF's rotate-half formula."""

from __future__ import annotations

import torch

from lmserve.layers.rotary import RotaryEmbedding, rotate_in_place


def test_rotary_rounds_as_the_rotate_half_formula() -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        rotary = RotaryEmbedding(64, 2048, 100000.0, None)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 2048, (37,), generator=generator)
    qkv = (torch.randn(37, 960, generator=generator) * 3).bfloat16()
    qkv_before = qkv.clone()
    x = qkv[:, :768].view(37, 12, 64)  # q and k heads: a strided view into the fused projection
    freqs = positions[:, None].float() * (1.0 / 100000.0 ** (torch.arange(0, 64, 2).float() / 64))[None, :]
    cos, sin = freqs.cos().bfloat16()[:, None, :], freqs.sin().bfloat16()[:, None, :]
    x1, x2 = x[..., :32].clone(), x[..., 32:].clone()
    expected = torch.cat(
        (x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1
    )  # HF's q * cos + rotate_half(q) * sin
    rotate_in_place(x, *rotary.lookup(positions))
    assert torch.equal(x, expected)
    assert torch.equal(qkv[:, 768:], qkv_before[:, 768:])  # v untouched
