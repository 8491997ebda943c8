"""The CPU RMSNorm (one layer_norm over [x, -x]) and rotary (4 ops) against the plain torch formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.layers.norm import RMSNorm
from lmserve.layers.rotary import RotaryEmbedding, rotate_in_place


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_rows", [1, 5, 128])
def test_rms_norm_matches_torch_rms_norm_and_follows_weight_changes(
    dtype: torch.dtype, num_rows: int
) -> None:
    generator = torch.Generator().manual_seed(num_rows)
    x = (torch.randn(num_rows, 576, generator=generator) * 7).to(dtype)
    residual = torch.randn(num_rows, 576, generator=generator).to(dtype)
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=generator))
    truth = F.rms_norm(x.double(), (576,), norm.weight.double(), 1e-5)
    ours, torchs = norm(x), F.rms_norm(x, (576,), norm.weight, 1e-5)
    # as close to the float64 truth as torch's own CPU rms_norm (in bf16 they differ in a rare last bit at most)
    float32_rounding = 2e-6 if dtype == torch.float32 else 0.0
    assert (ours.double() - truth).abs().max() <= (torchs.double() - truth).abs().max() + float32_rounding
    if dtype == torch.bfloat16:
        assert (ours != torchs).float().mean() < 1e-3
    torch.testing.assert_close(ours, torchs)
    normed, summed = norm.add_forward(x, residual)
    assert torch.equal(summed, x + residual)
    torch.testing.assert_close(normed, F.rms_norm(x + residual, (576,), norm.weight, 1e-5))
    with torch.no_grad():
        norm.weight.mul_(2)  # an in-place change (AWQ's folding, a weight-cache restore) reaches the norm
    torch.testing.assert_close(norm(x), F.rms_norm(x, (576,), norm.weight, 1e-5))


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
